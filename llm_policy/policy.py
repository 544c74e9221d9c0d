"""The LLM planning policy and its planning loop.

:class:`LLMPolicy` is a policy for the continuous-action environments (``policy(obs, info) ->
action``): each call builds the prompt of :mod:`llm_policy.prompt` from the observation and info,
asks the backend for the next TPP vector, validates it (:mod:`llm_policy.proposal`) and, on a
validation failure, sends the error back and asks again up to ``repair_retries`` times; if no
valid answer comes it keeps the current TPPs and records the failure. Model output never crashes
an episode; a backend that cannot answer at all (endpoint down) raises :class:`BackendError`.

:func:`plan_episode` runs one episode until full score or the step budget, recording every step
(prompt, raw responses, parsed TPPs, score, timing, tokens) and, given an output folder, writing
``transcript.jsonl`` as it goes, ``summary.json``, DVH PNGs and the TPP trajectory.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from llm_policy.backends import DEFAULT_TEMPERATURE, SEED_LIMIT, LLMBackend, check_sampling
from llm_policy.prompt import Attempt, Message, PlanState, PromptOptions, build_messages
from llm_policy.proposal import (
    REASONING_MAX_CHARS,
    ProposalError,
    parse_proposal,
    proposal_bounds,
    proposal_schema,
    scoped_names,
)


@dataclass
class StepLog:
    """What happened in one policy call.

    Attributes:
        step: Index of the plan the prompt describes (0: the starting plan).
        messages: The prompt as first sent.
        responses: Per model call: ``text``, ``mode``, ``prompt_tokens``, ``completion_tokens``,
            ``latency_s`` and ``error`` (the validation problem, or ``None``).
        proposal: The validated TPPs (all of them, scope applied), or the kept ones after a failure.
        reasoning: The chain-of-thought text, if asked for.
        valid_first: The first answer was valid without repair.
        fallback: No valid answer: the TPPs were kept.
    """

    step: int
    messages: list[Message]
    responses: list[dict[str, Any]] = field(default_factory=list)
    proposal: dict[str, float] = field(default_factory=dict)
    reasoning: str = ""
    valid_first: bool = False
    fallback: bool = False

    @property
    def prompt_tokens(self) -> int:
        return sum(r["prompt_tokens"] for r in self.responses)

    @property
    def completion_tokens(self) -> int:
        return sum(r["completion_tokens"] for r in self.responses)

    @property
    def llm_seconds(self) -> float:
        return sum(r["latency_s"] for r in self.responses)


class LLMPolicy:
    """Knowledge-guided in-context TPP tuning with an LLM.

    Args:
        backend: Any :class:`~llm_policy.backends.LLMBackend`.
        structures: The scenario's structures (target first).
        prescription_gy: Prescribed dose (Gy), used where a step's ``info`` has no
            ``prescription_gy`` (the rtenv environments give the episode case's).
        to_action: Maps a TPP vector to the environment's action (``None``: return the vector).
        knowledge: A knowledge base (:mod:`knowledge_extraction.knowledge`); needed when
            ``options.guidance`` is on.
        options: Prompt switches (guidance, chain of thought, memory, action scope).
        temperature: Sampling temperature (DOLA's best, 0.4, by default).
        seed: Base seed, an integer in [0, 2**32 - 2]; each call uses ``seed``, the step and the
            attempt (modulo 2**32 - 1, llama.cpp's seed range).
        max_tokens: Tokens per answer (``None``: sized from the number of TPPs asked for).
        repair_retries: Extra attempts after an invalid answer.
        constrained: Send the answer schema for constrained decoding (``False``: free text, the
            answer still validated; for measuring what constraining buys).
    """

    def __init__(self, backend: LLMBackend, structures: tuple[str, ...] | list[str], prescription_gy: float,
                 to_action: Callable[[np.ndarray], np.ndarray] | None = None,
                 knowledge: Mapping[str, Any] | None = None, options: PromptOptions | None = None,
                 temperature: float = DEFAULT_TEMPERATURE, seed: int = 0, max_tokens: int | None = None,
                 repair_retries: int = 2, constrained: bool = True) -> None:
        options = options or PromptOptions()
        if options.guidance and knowledge is None:
            raise ValueError("guidance is on but no knowledge base was given (pass knowledge= or guidance=False)")
        if not (isinstance(repair_retries, int) and 0 <= repair_retries <= 10):
            raise ValueError(f"repair_retries = {repair_retries!r} must be an integer in [0, 10]")
        self.backend, self.structures, self.prescription_gy = backend, tuple(structures), float(prescription_gy)
        self.to_action, self.knowledge, self.options = to_action, knowledge, options
        self.temperature, self.seed, self.repair_retries = temperature, seed, repair_retries
        n = len(scoped_names(self.structures, options.action_scope))
        # chain of thought: the grammar bounds the reasoning to REASONING_MAX_CHARS one-byte
        # characters, each at least a token's worth, so this budget always sees the answer closed
        self.max_tokens = max_tokens or (24 * n + 64 + (REASONING_MAX_CHARS + 16 if options.chain_of_thought else 0))
        check_sampling(temperature, self.max_tokens, seed)
        self.schema = proposal_schema(self.structures, options.action_scope, options.chain_of_thought)
        self.constrained = constrained
        self.history: list[Attempt] = []
        self.log: list[StepLog] = []

    @classmethod
    def for_env(cls, env: Any, backend: LLMBackend, **kwargs: Any) -> LLMPolicy:
        """A policy for a continuous-action rtenv environment (single or vector core)."""
        core = env.unwrapped.core
        if core.action_mode != "continuous":
            raise ValueError("LLMPolicy acts on the continuous-action environments (action_mode='continuous')")
        return cls(backend, core.structures, core.scenario.prescription_gy, to_action=core.tpp_to_action, **kwargs)

    def reset(self) -> None:
        """Forget the episode (memory and log), and the backend's cached prompt where it keeps one
        (:meth:`~llm_policy.backends.LlamaCppBackend.reset`), so that the episode replays under its seed."""
        self.history, self.log = [], []
        backend_reset = getattr(self.backend, "reset", None)
        if callable(backend_reset):
            backend_reset()

    def propose(self, obs: np.ndarray, info: Mapping[str, Any]) -> tuple[dict[str, float], StepLog]:
        """The next TPP values (all of them, by name) and the log of how they were obtained."""
        # the episode's case may have its own prescription (own cases): the env's info says which
        state = PlanState.from_step(obs, info, self.structures, info.get("prescription_gy", self.prescription_gy))
        step = len(self.history)
        messages = build_messages(state, self.options, self.knowledge, self.history)
        self.history.append(Attempt(step, dict(state.tpp), state.score, state.violated))
        log = StepLog(step, messages)
        chat = list(messages)
        proposal: dict[str, float] | None = None
        for attempt in range(self.repair_retries + 1):
            c = self.backend.complete(chat, self.schema if self.constrained else None, temperature=self.temperature,
                                      seed=(self.seed * 100_003 + step * 101 + attempt) % SEED_LIMIT,
                                      max_tokens=self.max_tokens)
            record = {"text": c.text, "mode": c.mode, "prompt_tokens": c.prompt_tokens,
                      "completion_tokens": c.completion_tokens, "latency_s": round(c.latency_s, 4), "error": None}
            log.responses.append(record)
            try:
                proposal, log.reasoning = parse_proposal(c.text, self.structures, self.options.action_scope,
                                                         self.options.chain_of_thought)
                log.valid_first = attempt == 0
                break
            except ProposalError as exc:
                record["error"] = str(exc)
                chat = chat + [{"role": "assistant", "content": c.text},
                               {"role": "user", "content": f"That answer is invalid: {exc}. Answer again with one "
                                                           "JSON object as specified, and nothing else."}]
        if proposal is None:
            log.fallback = True
            proposal = {}
        # the TPPs the answer leaves as they are, inside the range the env's action map realises
        # (a start may lie outside it: the env would clip them the same way)
        bounds = proposal_bounds(self.structures)
        kept = {n: min(max(v, bounds[n][0]), bounds[n][1]) for n, v in state.tpp.items()}
        log.proposal = {**kept, **proposal}
        self.log.append(log)
        return log.proposal, log

    def __call__(self, obs: np.ndarray, info: Mapping[str, Any]) -> np.ndarray:
        """The action for a step; a new episode (``info["steps"] == 0``) starts with :meth:`reset`."""
        if info.get("steps") == 0:
            self.reset()
        tpp, _ = self.propose(obs, info)
        vector = np.array([tpp[n] for n in info["tpp"]], dtype=np.float64)
        return self.to_action(vector) if self.to_action is not None else vector


@dataclass
class PlanningResult:
    """One LLM planning episode (``final_dv_metrics`` as in :class:`rtenv.rollout.EpisodeRecord`:
    Gy for dose criteria; for ``V`` criteria percent of the structure's volume, or cc where the
    protocol gives them so); ``case`` is the env's case name (``info["case"]``)."""

    case: str
    initial_score: float
    final_score: float
    max_score: float
    steps: int
    full_score: bool
    final_tpp: dict[str, float]
    final_dv_metrics: dict[str, float]
    score_trajectory: list[float]
    valid_first_rate: float | None
    fallbacks: int
    prompt_tokens: int
    completion_tokens: int
    llm_seconds: float
    seconds: float
    records: list[dict[str, Any]] = field(default_factory=list, repr=False)

    def summary(self) -> dict[str, Any]:
        out = asdict(self)
        out.pop("records")
        return out


def _changes(before: Mapping[str, float], after: Mapping[str, float]) -> dict[str, list[float]]:
    return {k: [before[k], after[k]] for k in before if abs(after[k] - before[k]) > 1e-6 * max(1.0, abs(before[k]))}


def plan_episode(env: Any, policy: LLMPolicy, seed: int | None = None, options: dict[str, Any] | None = None,
                 out_dir: str | Path | None = None, on_step: Callable[[dict[str, Any]], None] | None = None,
                 dvh_figures: bool = True) -> PlanningResult:
    """Tune one plan with ``policy`` until full score or the environment's step budget.

    Args:
        env: A continuous-action :class:`rtenv.env.TPPTuningEnv` (its ``max_steps`` is the budget).
        policy: The LLM policy (reset here).
        seed, options: Passed to ``env.reset``.
        out_dir: Where to write ``transcript.jsonl`` (one record per step, appended as each step
            finishes), ``summary.json``, DVH PNGs (``dvh/step_NN.png``, ``dvh_initial_final.png``) and
            ``tpp_trajectory.png`` (each TPP and the score per step, when a step was taken).
        on_step: Called with each step record (e.g. to print a table row).
        dvh_figures: Write the PNGs when ``out_dir`` is given.
    """
    from rtenv.plots import plot_dvh, plot_tpp_trajectory

    t_start = time.perf_counter()
    out = Path(out_dir) if out_dir is not None else None
    if out is not None:
        out.mkdir(parents=True, exist_ok=True)
    policy.reset()
    obs, info = env.reset(seed=seed, options=options)
    case = env.unwrapped.case
    initial_dose = env.unwrapped.dose.copy()
    initial_score, trajectory = info["score"], [info["score"]]

    def figure(step: int, score: float) -> None:
        if out is not None and dvh_figures:
            plot_dvh(case, env.unwrapped.dose, out / "dvh" / f"step_{step:02d}.png",
                     subtitle=f"LLM planner, step {step}: score {score:.2f}/{info['max_score']:g}")

    figure(0, info["score"])
    records: list[dict[str, Any]] = []
    done = bool(info["full_score"])
    # opened once the episode has started, so a failed reset leaves neither an open file nor an empty one
    transcript = (out / "transcript.jsonl").open("w") if out is not None else None
    try:
        while not done:
            t0 = time.perf_counter()
            before_tpp, before_score = dict(info["tpp"]), info["score"]
            action = policy(obs, info)
            log = policy.log[-1]
            t1 = time.perf_counter()
            obs, _, terminated, truncated, info = env.step(action)
            t2 = time.perf_counter()
            done = terminated or truncated
            trajectory.append(info["score"])
            rec = {
                "step": info["steps"], "prompt": log.messages, "responses": log.responses, "reasoning": log.reasoning,
                "parsed_tpp": None if log.fallback else log.proposal, "valid_first": log.valid_first,
                "fallback": log.fallback, "tpp_before": before_tpp, "tpp_after": info["tpp"],
                "tpp_changes": _changes(before_tpp, info["tpp"]), "score_before": before_score,
                "score": info["score"], "max_score": info["max_score"], "full_score": info["full_score"],
                "violated": info["violated"], "dv_metrics": info["dv_metrics"],
                "prompt_tokens": log.prompt_tokens, "completion_tokens": log.completion_tokens,
                "llm_seconds": round(log.llm_seconds, 4), "policy_seconds": round(t1 - t0, 4),
                "tps_seconds": round(t2 - t1, 4),
            }
            records.append(rec)
            if transcript is not None:
                transcript.write(json.dumps(rec) + "\n")
                transcript.flush()
            figure(info["steps"], info["score"])
            if on_step is not None:
                on_step(rec)
    finally:
        if transcript is not None:
            transcript.close()
    result = PlanningResult(
        case=info["case"], initial_score=initial_score, final_score=info["score"], max_score=info["max_score"],
        steps=info["steps"],
        full_score=bool(info["full_score"]), final_tpp=info["tpp"], final_dv_metrics=info["dv_metrics"],
        score_trajectory=trajectory,
        valid_first_rate=sum(r["valid_first"] for r in records) / len(records) if records else None,
        fallbacks=sum(r["fallback"] for r in records), prompt_tokens=sum(r["prompt_tokens"] for r in records),
        completion_tokens=sum(r["completion_tokens"] for r in records),
        llm_seconds=sum(r["llm_seconds"] for r in records), seconds=time.perf_counter() - t_start, records=records,
    )
    if out is not None:
        (out / "summary.json").write_text(json.dumps(result.summary(), indent=2))
        if dvh_figures:
            plot_dvh(case, {"initial": initial_dose, "final": env.unwrapped.dose}, out / "dvh_initial_final.png",
                     subtitle=f"LLM planner: score {initial_score:.2f} (initial) -> {info['score']:.2f} (final) "
                              f"of {info['max_score']:g}")
            if records:  # the seed's Fig. 3: how the planner moved each TPP
                plot_tpp_trajectory([records[0]["tpp_before"], *(r["tpp_after"] for r in records)],
                                    out / "tpp_trajectory.png", scores=trajectory, max_score=info["max_score"],
                                    title=f"{info['case']}: TPPs and score per LLM step")
    return result
