"""The planning prompt: active configuration, dosimetric state, knowledge guidance (SPEC section 4).

:func:`build_messages` turns one plan state into chat messages:

1. **Active configuration**: the optimisation problem the TPS solves, and every TPP with its
   meaning, allowed range and current value.
2. **Dosimetric state**: the score, the cumulative DVH of each structure sampled at nearly evenly
   spaced dose points (the same dose ranges the DRL agent observes), the clinical checkpoints
   (criterion, value, goal, limit, met) and the violated ones.
3. **Knowledge guidance** (``guidance=True``): for each TPP, the final values of the successful
   plans of a knowledge base, listed parameter-wise (sorted values and quartiles; never one
   patient's vector), with an explicit instruction to condition the proposal on them.

The parts that stay fixed over an episode (the problem, the knowledge) come first and the current
TPPs and dosimetric state after them, so local backends reuse the cached prompt prefix from one
step to the next. DOLA's extras: ``memory_k`` prior attempts of this episode (the ``k`` best-scoring, ties broken by
recency), ``chain_of_thought`` (reason in a ``reasoning`` field first) and ``action_scope``
(``weights_only``: propose the weights only). The prompt carries dosimetric numbers only: no case
name, patient identifier or file path, and no human planning heuristics.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from knowledge_extraction.knowledge import target_key
from llm_policy.proposal import REASONING_MAX_CHARS, proposal_bounds, scoped_names
from rtenv.env import DVH_POINTS, OAR_DVH_RANGE, TARGET_DVH_RANGE
from rtenv.tpp import tpp_kinds, tpp_names

Message = dict[str, str]


@dataclass(frozen=True)
class PromptOptions:
    """Prompt switches.

    Attributes:
        guidance: Include the knowledge guidance (component 3).
        chain_of_thought: Ask for a ``reasoning`` field before the TPPs.
        memory_k: Number of prior attempts of this episode to show (0: none; DOLA used 3).
        action_scope: ``"all"`` TPPs or ``"weights_only"``.
        dvh_points: DVH samples per structure, points of the observation's dose grid as evenly
            spaced as it allows (11 of its 100 points: every 10th, one step of 9).
    """

    guidance: bool = True
    chain_of_thought: bool = False
    memory_k: int = 0
    action_scope: str = "all"
    dvh_points: int = 11

    def __post_init__(self) -> None:
        scoped_names(["PTV"], self.action_scope)  # validates the scope
        if not (isinstance(self.memory_k, int) and 0 <= self.memory_k <= 20):
            raise ValueError(f"memory_k (--memory-k) = {self.memory_k!r} must be an integer in [0, 20]")
        if not (isinstance(self.dvh_points, int) and 2 <= self.dvh_points <= DVH_POINTS):
            raise ValueError(f"dvh_points = {self.dvh_points!r} must be an integer in [2, {DVH_POINTS}]")


@dataclass(frozen=True)
class PlanState:
    """What the prompt shows of one plan.

    Attributes:
        structures: Structure names, target first.
        prescription_gy: Prescribed dose (Gy).
        tpp: Current TPP values by name.
        score: Plan score (points) and ``max_score``.
        criteria: Per criterion: ``value``, ``unit``, ``goal``, ``limit``, ``met`` (the env's info).
        dvh: The environment's observation: cumulative DVH (volume fraction) at
            :data:`rtenv.env.DVH_POINTS` dose points per structure.
    """

    structures: tuple[str, ...]
    prescription_gy: float
    tpp: dict[str, float]
    score: float
    max_score: float
    criteria: dict[str, dict[str, Any]]
    dvh: np.ndarray

    @classmethod
    def from_step(cls, obs: np.ndarray, info: Mapping[str, Any], structures: Sequence[str],
                  prescription_gy: float) -> PlanState:
        """From an environment observation and info dict."""
        return cls(tuple(structures), float(prescription_gy), dict(info["tpp"]), float(info["score"]),
                   float(info["max_score"]), dict(info["criteria"]), np.asarray(obs, dtype=np.float64))

    @property
    def violated(self) -> list[str]:
        return [name for name, c in self.criteria.items() if not c["met"]]


@dataclass(frozen=True)
class Attempt:
    """One earlier step of the episode: the TPPs tried and what they gave."""

    step: int
    tpp: dict[str, float]
    score: float
    violated: list[str] = field(default_factory=list)


_MEANING = {
    ("t", True): "hot-spot dose threshold of the target, fraction of Rx",
    ("t", False): "dose threshold of {s}, fraction of Rx",
    ("lambda", True): "objective weight of the target",
    ("lambda", False): "objective weight of {s}",
    ("V", True): "fraction of the target volume the hot-spot term may act on",
    ("V", False): "fraction of the {s} volume the term may act on",
}


def _fmt(v: float) -> str:
    return f"{v:.4g}"


def problem_text(state: PlanState) -> str:
    """Component 1a: the optimisation problem, in symbols."""
    target = state.structures[0]
    return (
        f"The treatment planning system computes beamlet intensities x >= 0 (dose d = D x, Gy) that minimise\n"
        f"  sum over structures s of (lambda_s / lambda_{target}) / (2 |A_s|) * || d_{{A_s}} - t_s * Rx ||^2\n"
        f"subject to D95({target}) >= Rx, where A_s is the set of voxels of s with dose above t_s * Rx, "
        f"limited to the hottest fraction V_s of s, and the plan is finally scaled so that D95({target}) = Rx. "
        f"Rx = {state.prescription_gy:g} Gy. Structures: {target} (target), "
        + ", ".join(state.structures[1:]) + " (organs at risk)."
    )


def tpp_table(state: PlanState) -> str:
    """Component 1b: every TPP with its meaning, allowed range and current value."""
    bounds = proposal_bounds(state.structures)
    rows = ["parameter | meaning | allowed range | current value"]
    owners = list(state.structures) * 3
    for name, key, owner in zip(tpp_names(state.structures), tpp_kinds(state.structures), owners, strict=True):
        lo, hi = bounds[name]
        rows.append(f"{name} | {_MEANING[key].format(s=owner)} | [{_fmt(lo)}, {_fmt(hi)}] | {_fmt(state.tpp[name])}")
    return "\n".join(rows)


def dvh_text(state: PlanState, points: int) -> str:
    """Component 2a: each structure's cumulative DVH at ``points`` doses of the observation's
    :data:`~rtenv.env.DVH_POINTS`-point grid, the nearest grid points to evenly spaced ones (so the
    steps differ by up to one grid step: 11 points are 4.0 Gy apart on S1's organs, one step 3.6 Gy)."""
    idx = np.unique(np.round(np.linspace(0, DVH_POINTS - 1, points)).astype(int))
    lines = []
    for i, s in enumerate(state.structures):
        lo, hi = TARGET_DVH_RANGE if i == 0 else OAR_DVH_RANGE
        doses = np.linspace(lo, hi, DVH_POINTS) * state.prescription_gy
        curve = state.dvh[i * DVH_POINTS:(i + 1) * DVH_POINTS]
        pairs = ", ".join(f"{doses[j]:.1f} Gy: {100 * curve[j]:.1f}%" for j in idx)
        lines.append(f"{s}: {pairs}")
    return "\n".join(lines)


def checkpoints_text(state: PlanState) -> str:
    """Component 2b: clinical checkpoints and the current violations."""
    rows = ["criterion | value | goal | limit | met"]
    for name, c in state.criteria.items():
        u = c["unit"]
        rows.append(f"{name} | {c['value']:.2f} {u} | {c['goal']:.2f} {u} | {c['limit']:.2f} {u} | "
                    f"{'yes' if c['met'] else 'NO'}")
    violated = state.violated
    rows.append("violated: " + (", ".join(violated) if violated else "none"))
    return "\n".join(rows)


def knowledge_guidance(kb: Mapping[str, Any], structures: Sequence[str]) -> dict[str, dict[str, Any]]:
    """Per TPP of ``structures``: the knowledge base's values for it, parameter-wise.

    A TPP named in the knowledge base takes its values. Otherwise (a knowledge base from another
    site or with fewer organs) the values are pooled by role: the target's TPP of that kind, or
    all organ-at-risk TPPs of that kind. Each entry holds ``values`` (sorted), ``median``, ``q1``,
    ``q3`` and ``source`` (the knowledge-base parameters it came from).
    """
    params = kb["parameters"]
    target = target_key(kb)
    kb_target = {p for p in params if p.split("_", 1)[1] == target}
    out: dict[str, dict[str, Any]] = {}
    for name, (kind, is_target) in zip(tpp_names(structures), tpp_kinds(structures), strict=True):
        if name in params:
            sources = [name]
        else:
            sources = [p for p in params if p.split("_", 1)[0] == kind and ((p in kb_target) == is_target)]
        if not sources:
            continue
        values = np.sort(np.concatenate([np.asarray(params[p]["values"], dtype=np.float64) for p in sources]))
        out[name] = {"values": values.tolist(), "median": float(np.median(values)),
                     "q1": float(np.quantile(values, 0.25)), "q3": float(np.quantile(values, 0.75)),
                     "source": sources}
    return out


def knowledge_text(kb: Mapping[str, Any], structures: Sequence[str]) -> str:
    """Component 3: parameter-wise distributions of successful TPPs, with the instruction."""
    guide = knowledge_guidance(kb, structures)
    n = kb["source"].get("successful", "several")
    lines = [f"Final TPP values of {n} plans that reached full score when an automated planner tuned them, "
             "listed separately for each parameter (sorted; values of one parameter are not linked to values "
             "of another):"]
    for name, g in guide.items():
        vals = ", ".join(_fmt(v) for v in g["values"])
        pooled = "" if g["source"] == [name] else f" (pooled from {', '.join(g['source'])})"
        lines.append(f"{name}{pooled}: median {_fmt(g['median'])}, quartiles [{_fmt(g['q1'])}, {_fmt(g['q3'])}]; "
                     f"values: {vals}")
    lines.append("Condition your proposal on these distributions: they show where successful plans ended up.")
    return "\n".join(lines)


def select_memory(history: Sequence[Attempt], k: int) -> list[Attempt]:
    """The ``k`` most relevant prior attempts: highest score first, later steps winning ties;
    returned in step order."""
    if k <= 0:
        return []
    best = sorted(history, key=lambda a: (a.score, a.step), reverse=True)[:k]
    return sorted(best, key=lambda a: a.step)


def memory_text(attempts: Sequence[Attempt]) -> str:
    lines = ["Earlier attempts in this plan (TPPs tried -> result):"]
    for a in attempts:
        tpp = ", ".join(f"{k}={_fmt(v)}" for k, v in a.tpp.items())
        lines.append(f"step {a.step}: {tpp} -> score {a.score:.2f}; violated: {', '.join(a.violated) or 'none'}")
    return "\n".join(lines)


def task_text(state: PlanState, options: PromptOptions) -> str:
    names = scoped_names(state.structures, options.action_scope)
    parts = ["Propose the next TPP vector so that every clinical goal is met."]
    if options.action_scope == "weights_only":
        parts.append("Only the weights (lambda_*) can change; every other TPP keeps its current value.")
    if options.chain_of_thought:
        parts.append(f'Reply with one JSON object {{"reasoning": "...", "tpp": {{...}}}}: first reason step by '
                     f'step in "reasoning" (at most {REASONING_MAX_CHARS} characters), then give in "tpp" '
                     f"a number for each of: {', '.join(names)}.")
    else:
        parts.append(f"Reply with one JSON object whose keys are exactly {', '.join(names)}, each a number "
                     "inside its allowed range, and nothing else.")
    return " ".join(parts)


SYSTEM_PROMPT = ("You tune the treatment planning parameters (TPPs) of a radiotherapy inverse planning system. "
                 "You see the optimisation problem, the current plan's dose-volume state and clinical goals, and "
                 "you answer with the next TPP values as JSON.")


def build_messages(state: PlanState, options: PromptOptions | None = None,
                   knowledge: Mapping[str, Any] | None = None, history: Sequence[Attempt] = ()) -> list[Message]:
    """Chat messages (``system``, ``user``) for one planning step.

    Raises:
        ValueError: ``guidance`` is on but no knowledge base was given.
    """
    options = options or PromptOptions()
    if options.guidance and knowledge is None:
        raise ValueError("guidance=True needs a knowledge base (or turn guidance off)")
    # what stays fixed over an episode comes first, so local backends reuse the cached prompt prefix
    sections = ["## Optimisation problem\n" + problem_text(state)]
    if options.guidance:
        sections.append("## Knowledge guidance\n" + knowledge_text(knowledge, state.structures))  # type: ignore[arg-type]
    sections += [
        "## Active configuration\n" + tpp_table(state),
        f"## Dosimetric state\nScore {state.score:.2f} of {state.max_score:g}.\n"
        "Cumulative DVH (percent of the structure volume receiving at least the dose):\n"
        + dvh_text(state, options.dvh_points) + "\nClinical checkpoints:\n" + checkpoints_text(state),
    ]
    memory = select_memory(history, options.memory_k)
    if memory:
        sections.append("## Memory\n" + memory_text(memory))
    sections.append("## Task\n" + task_text(state, options))
    return [{"role": "system", "content": SYSTEM_PROMPT}, {"role": "user", "content": "\n\n".join(sections)}]
