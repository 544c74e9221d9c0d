"""Integrated Gradients explanations of a DRL planner's decisions (captum).

:func:`explain_episode` runs one deterministic episode of a discrete-action policy on
:class:`rtenv.env.TPPTuningEnv` and, at every step, attributes the chosen action's *logit* (the
policy head's output before the softmax) to the observation with captum's
:class:`~captum.attr.IntegratedGradients`. The observation is the cumulative DVH of each
structure (volume fraction, 0..1) at 100 dose points: PTV from 1.00 to 1.15 Rx, OARs from 0.60 to
1.10 Rx (:mod:`rtenv.env`), so each attribution is indexed by (structure, dose point) and is in
the logit's unit (nats of unnormalised log-probability).

Baselines (the reference input IG integrates from):

* ``"zero"``: the all-zero DVH (no structure receives any of the sampled doses), as in the ACER
  planner's XAI follow-up (SPEC section 3).
* ``"mean"``: the *reference DVH*: the element-wise mean observation of the SPEC default-TPP plans
  (t = 1, lambda = 1, V_PTV = 0.1, V_OAR = 1) of the ``knowledge`` cohort's cases
  (:func:`reference_dvh`). It is a typical starting plan of the scenario, computed on cases
  disjoint from the ``test`` cohort; averaging cumulative DVHs keeps them monotone in dose.

IG's completeness axiom says that the attributions sum to ``logit(x) - logit(baseline)``; captum's
convergence delta is the difference of the two sides (the error of the path-integral
quadrature). Attribution runs on a float64 copy of the policy's logit network, so the delta
measures the quadrature error, not float32 round-off.

Organ-wise agreement: at step ``t`` the agent sees the plan of step ``t`` and picks an action. The
structures with a violated protocol criterion in that plan are compared with the structure that
carries the largest share of the absolute attribution mass ``sum_k |A[s, k]|``. The agreement rate
is the fraction of steps (with at least one violated structure) whose top-attributed structure is
violated; ``chance_rate`` is the rate a uniformly random structure would reach.

Recurrent policies (:class:`~drl.acer.ACERLstmPolicy`, SPEC's LSTM planner network): the logit at
step ``t`` depends on the observation ``x_t`` and on the hidden state ``(h, c)`` carried from the
earlier steps of the episode. IG attributes the logit to ``x_t`` alone, with the hidden state
*held fixed* at the value the episode reached before step ``t`` (the memory is part of the
function, not of the input; the baseline keeps that memory too). The attributions therefore
explain the current DVH's influence given the episode so far, not the earlier DVHs' influence
through the memory. :class:`ActionLogits` holds that state (:meth:`ActionLogits.set_state`);
:func:`explain_episode` advances it along the episode.

captum is an optional dependency (``pip install 'rtenv[explain]'``); it is imported only when
attributions are computed. Figures are PNG files written with :func:`rtenv.plots.save_figure`.
"""

from __future__ import annotations

import copy
import json
import math
import warnings
from collections.abc import Sequence
from functools import lru_cache
from pathlib import Path
from typing import Any

import numpy as np
import torch
from gymnasium import spaces
from stable_baselines3.common.base_class import BaseAlgorithm
from stable_baselines3.common.policies import ActorCriticPolicy, BasePolicy
from torch import nn

from drl.acer import ACERLstmPolicy, ACERPolicy, usable_masks
from rtenv.case import PlanningCase
from rtenv.env import DVH_POINTS, OAR_DVH_RANGE, TARGET_DVH_RANGE, TPPTuningEnv, TuningCore
from rtenv.evaluation import Protocol, ProtocolResult, score_plan
from rtenv.plots import new_figure, save_figure
from rtenv.validation import check_integer, is_integer

__all__ = [
    "BASELINES",
    "ActionLogits",
    "agreement_summary",
    "explain_episode",
    "integrated_gradients",
    "reference_dvh",
]

BASELINES = ("zero", "mean")
JSON_VERSION = 1


def _captum_ig() -> Any:
    """captum's IntegratedGradients class, or an ImportError that says how to install it."""
    try:
        from captum.attr import IntegratedGradients
    except ImportError as exc:  # pragma: no cover - exercised only without captum
        raise ImportError("drl.explain needs captum: pip install captum (or pip install 'rtenv[explain]')") from exc
    return IntegratedGradients


# ------------------------------------------------------------------------------------ the network


class ActionLogits(nn.Module):
    """The action logits of a discrete SB3 policy as a plain module: ``(batch, obs_dim) -> (batch, n_actions)``.

    * :class:`~drl.acer.ACERPolicy`: the policy head's output (before the softmax);
    * :class:`~drl.acer.ACERLstmPolicy`: the same, with the LSTM's input state ``(h, c)`` held
      fixed (zero, an episode's first step, until :meth:`set_state` sets another);
    * SB3 actor-critic policies (PPO, A2C) on a ``Discrete`` space: the action net's output (the
      categorical distribution's logits);
    * DQN: the Q values (the greedy action is their arg max, as it is the logits' for the others).

    SB3's observation preprocessing (a cast to float32 for flat ``Box`` spaces) is skipped so that
    the module also runs in float64; it expects flat float observations.

    Args:
        model: An SB3 model or its policy.
    """

    def __init__(self, model: BaseAlgorithm | BasePolicy) -> None:
        super().__init__()
        policy = model.policy if isinstance(model, BaseAlgorithm) else model
        if not isinstance(policy.action_space, spaces.Discrete):
            raise ValueError(f"Integrated Gradients of action logits needs a Discrete action space, "
                             f"got {policy.action_space}")
        if not isinstance(policy.observation_space, spaces.Box) or len(policy.observation_space.shape) != 1:
            raise ValueError(f"expected a flat Box observation space, got {policy.observation_space}")
        self.lstm: nn.LSTMCell | None = None
        if isinstance(policy, ACERLstmPolicy):
            parts = [policy.features_extractor, policy.torso]
            self.lstm, self.pi_head = policy.lstm, policy.pi_head
            self.register_buffer("h0", torch.zeros(1, policy.hidden_size, device=policy.device))
            self.register_buffer("c0", torch.zeros(1, policy.hidden_size, device=policy.device))
            self.kind = "acer lstm policy logits, hidden state held fixed"
        elif isinstance(policy, ACERPolicy):
            parts = [policy.features_extractor, policy.torso, policy.pi_head]
            self.kind = "acer policy logits"
        elif isinstance(policy, ActorCriticPolicy):
            parts = [policy.pi_features_extractor, policy.mlp_extractor.policy_net, policy.action_net]
            self.kind = "actor-critic policy logits"
        elif hasattr(policy, "q_net") and hasattr(policy.q_net, "q_net"):
            parts = [policy.q_net.features_extractor, policy.q_net.q_net]
            self.kind = "dqn q-values"
        else:
            raise ValueError(f"unsupported policy type {type(policy).__name__}; supported: ACER (MLP or LSTM), "
                             "PPO/A2C (ActorCriticPolicy), DQN")
        self.net = nn.Sequential(*parts)
        self.n_actions = int(policy.action_space.n)
        self.obs_dim = int(policy.observation_space.shape[0])

    @property
    def recurrent(self) -> bool:
        """Whether the logits depend on a held hidden state (:class:`~drl.acer.ACERLstmPolicy`)."""
        return self.lstm is not None

    def set_state(self, h: torch.Tensor | np.ndarray, c: torch.Tensor | np.ndarray) -> None:
        """Hold the LSTM's input state ``(h, c)`` (each ``(hidden_size,)`` or ``(1, hidden_size)``)
        fixed for the following forward passes; only for a recurrent policy."""
        if self.lstm is None:
            raise ValueError(f"set_state needs a recurrent policy; this one gives {self.kind}")
        for name, value in (("h0", h), ("c0", c)):
            buf = getattr(self, name)
            t = torch.as_tensor(value).to(device=buf.device, dtype=buf.dtype)
            if t.numel() != buf.numel():
                raise ValueError(f"{name[0]} has {t.numel()} values; the LSTM has {buf.numel()} units")
            buf.copy_(t.reshape(buf.shape))

    def forward(self, obs: torch.Tensor) -> torch.Tensor:
        if self.lstm is None:
            return self.net(obs)
        features = self.net(obs)
        n = features.shape[0]
        h, _ = self.lstm(features, (self.h0.expand(n, -1), self.c0.expand(n, -1)))
        return self.pi_head(h)


# -------------------------------------------------------------------------------- the baselines


@lru_cache(maxsize=8)
def _reference_dvh_cached(scenario: str, cohort: str, cases: tuple[int, ...], device: str) -> np.ndarray:
    total: np.ndarray | None = None
    for index in cases:
        core = TuningCore(scenario, cohort=cohort, cases=[index], start="default", device=device)
        ep = core.new_episode(np.random.default_rng(0), {"index": index})
        core.reset_batch([ep])
        obs = core.observe(ep).astype(np.float64)
        total = obs if total is None else total + obs
    assert total is not None
    out = total / len(cases)
    out.setflags(write=False)
    return out


def reference_dvh(scenario: str = "S1", cohort: str = "knowledge", cases: int | Sequence[int] | None = None,
                  device: str = "cpu") -> np.ndarray:
    """The ``"mean"`` baseline: the element-wise mean observation (cumulative DVHs, volume
    fraction 0..1 at the env's dose points) of the SPEC default-TPP plans of a cohort's cases.

    Args:
        scenario: ``"S1"``, ``"S2"``, ``"S3"``, ``"TG119"``.
        cohort: Cohort of the reference plans (default ``knowledge``, disjoint from ``test``).
        cases: Number of cases (its first ``n``) or explicit indices; ``None``: the whole cohort
            (20 for ``knowledge``; TG119 has one case).
        device: Torch device of the TPS.

    Returns:
        A float64 vector of the observation's shape, ``(100 n_structures,)``; results are cached
        per process.
    """
    return _reference_dvh_cached(scenario, cohort, _reference_indices(scenario, cohort, cases), device).copy()


def _reference_indices(scenario: str, cohort: str, cases: int | Sequence[int] | None) -> tuple[int, ...]:
    """The case indices :func:`reference_dvh` averages over."""
    from rtenv.scenarios import cohort_size

    size = cohort_size(scenario, cohort)  # checks the cohort; TG119 has one case
    if cases is None:
        cases = 1 if size is None else size
    if is_integer(cases):
        check_integer("reference cases", cases, 1, size)
    indices = tuple(range(cases)) if is_integer(cases) else tuple(int(i) for i in cases)
    if not indices:
        raise ValueError("the reference DVH needs at least one case")
    return indices


# ------------------------------------------------------------------------------- attributions


def integrated_gradients(logits: ActionLogits, obs: np.ndarray, action: int, baselines: dict[str, np.ndarray],
                         n_steps: int = 50, device: str = "cpu") -> dict[str, dict[str, Any]]:
    """IG of ``logits[action]`` with respect to one observation, for each baseline.

    The attribution runs on a float64 copy of ``logits`` (Gauss-Legendre quadrature, ``n_steps``
    nodes), all baselines in one batch.

    Returns:
        ``baseline name -> {"attribution": (obs_dim,) array (logit units), "delta": captum's
        convergence delta, "logit": logit(x), "baseline_logit": logit(baseline),
        "relative_delta": |delta| / |logit(x) - logit(baseline)|}``.
    """
    ig_class = _captum_ig()
    check_integer("n_steps (--ig-steps)", n_steps, 2, 10_000)
    net = copy.deepcopy(logits).to(device=device, dtype=torch.float64).eval()
    names = list(baselines)
    x = torch.as_tensor(np.asarray(obs, dtype=np.float64), device=device).reshape(1, -1).repeat(len(names), 1)
    b = torch.as_tensor(np.stack([np.asarray(baselines[n], dtype=np.float64) for n in names]), device=device)
    if b.shape != x.shape:
        raise ValueError(f"baselines must have the observation's shape {tuple(x.shape[1:])}, got {tuple(b.shape[1:])}")
    ig = ig_class(net)
    attr, delta = ig.attribute(x, baselines=b, target=int(action), n_steps=n_steps, method="gausslegendre",
                               return_convergence_delta=True)
    with torch.no_grad():
        fx = net(x)[:, int(action)]
        fb = net(b)[:, int(action)]
    out: dict[str, dict[str, Any]] = {}
    for i, name in enumerate(names):
        diff = float(fx[i] - fb[i])
        d = float(delta[i])
        out[name] = {"attribution": attr[i].detach().cpu().numpy(), "delta": d, "logit": float(fx[i]),
                     "baseline_logit": float(fb[i]), "relative_delta": abs(d) / max(abs(diff), 1e-12)}
    return out


# ---------------------------------------------------------------------------------- agreement


def _criterion_dose_gy(protocol: Protocol, name: str, result: ProtocolResult) -> float | None:
    """The dose level (Gy) a criterion is about: V criteria their dose, dose criteria their goal."""
    crit = next((c for c in protocol.criteria if c.name == name), None)
    res = next((c for c in result.criteria if c.name == name), None)
    if crit is None or res is None:
        return None
    if crit.type == "dose_volume_V":
        p = crit.parameters
        return float(p["dose_gy"]) if "dose_gy" in p else float(p["dose_perc"]) * result.prescription_gy / 100.0
    return float(res.goal)


def _structure_shares(attr: np.ndarray, structures: Sequence[str]) -> dict[str, float]:
    mass = np.abs(attr.reshape(len(structures), DVH_POINTS)).sum(axis=1)
    total = float(mass.sum())
    if total <= 0:
        return {s: 1.0 / len(structures) for s in structures}
    return {s: float(m / total) for s, m in zip(structures, mass, strict=True)}


def agreement_summary(steps: Sequence[dict[str, Any]], structures: Sequence[str],
                      baselines: Sequence[str]) -> dict[str, dict[str, Any]]:
    """Organ-wise agreement of attributions with protocol violations over an episode's steps.

    Per baseline:

    * ``rate``: fraction of the evaluated steps (those with >= 1 violated structure) whose
      top-attributed structure (largest ``sum |attribution|``) has a violated criterion;
    * ``chance_rate``: the mean over those steps of ``n_violated_structures / n_structures``;
    * ``violated_share``: the mean share of the |attribution| mass on violated structures;
    * ``action_structure_rate``: fraction of all steps whose changed TPP belongs to the
      top-attributed structure;
    * ``mean_share``: each structure's mean share of the |attribution| mass over all steps;
    * ``top_counts``: how often each structure was the top-attributed one.

    Rates are ``None`` when no step qualifies.
    """
    out: dict[str, dict[str, Any]] = {}
    for base in baselines:
        evaluated = [s for s in steps if s["violated_structures"]]
        hits = [s["top_structure"][base] in s["violated_structures"] for s in evaluated]
        shares = [s["structure_share"][base] for s in steps]
        out[base] = {
            "steps": len(steps),
            "steps_evaluated": len(evaluated),
            "top_in_violated": int(sum(hits)),
            "rate": float(np.mean(hits)) if evaluated else None,
            "chance_rate": (float(np.mean([len(s["violated_structures"]) / len(structures) for s in evaluated]))
                            if evaluated else None),
            "violated_share": (float(np.mean([sum(s["structure_share"][base][v] for v in s["violated_structures"])
                                               for s in evaluated])) if evaluated else None),
            "action_structure_rate": (float(np.mean([s["tpp_structure"] == s["top_structure"][base] for s in steps]))
                                      if steps else None),
            "mean_share": {name: float(np.mean([sh[name] for sh in shares])) if shares else None
                           for name in structures},
            "top_counts": {name: int(sum(s["top_structure"][base] == name for s in steps)) for name in structures},
        }
    return out


# ------------------------------------------------------------------------------------ episode


def _resolve_model(model: BaseAlgorithm | BasePolicy | str, device: str) -> BaseAlgorithm | BasePolicy:
    if isinstance(model, str):
        from drl.train import load_policy

        return load_policy(model, device=device)
    return model


def explain_episode(model: BaseAlgorithm | BasePolicy | str, scenario: str = "S1", cohort: str = "test",
                    case: int | PlanningCase = 0, out_dir: str | Path = "explain", *, n_steps: int = 50,
                    baselines: Sequence[str] = BASELINES, max_steps: int = 20, seed: int = 0, device: str = "cpu",
                    start: str = "default", reference: np.ndarray | None = None,
                    reference_cohort: str = "knowledge", reference_cases: int | Sequence[int] | None = None,
                    delta_tolerance: float = 0.01, plots: bool = True) -> dict[str, Any]:
    """Run one deterministic episode of a policy and explain every action with Integrated Gradients.

    At each step ``t`` the policy sees observation ``x_t`` (the DVHs of the current plan), picks
    the arg max of its action logits (over the actions ``info["action_mask"]`` allows, for an ACER
    model that learned with masks; what :func:`drl.train.as_policy` acts on),
    and IG attributes that action's logit to ``x_t`` for each baseline (a recurrent ACER policy
    carries its hidden state along the episode, held fixed during each step's attribution; see
    the module docstring). Files written under
    ``out_dir``:

    * ``attributions.json``: the returned dict (see below);
    * ``ig_heatmap_<baseline>.png``: per step, attribution over structure x dose point;
    * ``ig_structure_share.png``: per step and structure, the share of |attribution| mass, with
      violated structures marked;
    * ``dvh_ig_step<NN>.png``: per step, each structure's DVH coloured by its attribution (one row
      per baseline), with the violated criteria's dose levels marked.

    Args:
        model: An SB3 model (ACER, PPO, A2C, DQN) or policy on a ``Discrete`` action space, or a
            spec ``"ALGO:PATH"`` for :func:`drl.train.load_policy`.
        scenario: ``"S1"``, ``"S2"``, ``"S3"``.
        cohort: Cohort of the explained case.
        case: Case index within the cohort, or your own case (a
            :class:`~rtenv.case.PlanningCase` with the scenario's structures; ``cohort`` is then
            ``"own"`` and ``case`` 0 in the result).
        out_dir: Output folder (created).
        n_steps: Gauss-Legendre nodes of the IG path integral.
        baselines: Any of ``"zero"`` and ``"mean"`` (see the module docstring).
        max_steps: Episode step budget (truncation).
        seed: Seed of the env reset (matters for ``start="random"``).
        device: Torch device of the TPS and of the attribution.
        start: ``"default"`` (SPEC default TPPs) or ``"random"`` start.
        reference: A precomputed ``"mean"`` baseline (the observation's shape); default
            :func:`reference_dvh` of ``reference_cohort`` / ``reference_cases``.
        reference_cohort: Cohort of the reference plans.
        reference_cases: Cases of the reference cohort (``None``: all).
        delta_tolerance: Relative convergence-delta tolerance; a warning is issued (and
            ``convergence[b]["within_tolerance"]`` is false) when some step exceeds it.
        plots: Write the PNG figures.

    Returns:
        A JSON-ready dict: ``version``, ``scenario``, ``cohort``, ``case``, ``case_name``,
        ``policy``, ``structures``, ``tpp_names``, ``dose_points_gy`` (structure -> 100 doses in Gy),
        ``baselines`` (name -> description and the baseline DVH per structure), ``ig`` (method,
        n_steps), ``initial_score``, ``final_score``, ``max_score``, ``terminated``, ``truncated``,
        ``steps``, ``entropy_mean`` (over the steps; the seed reads a low one as a confident,
        stable policy), ``convergence`` (baseline -> max |delta|, max and mean relative delta,
        tolerance, within_tolerance), ``agreement`` (see :func:`agreement_summary`) and ``files``
        (paths written). Each of ``steps`` holds ``step``, ``observation`` (structure -> 100
        volume fractions the agent saw), ``score`` (of that plan, points), ``score_after``,
        ``violated`` (criterion names), ``violated_structures``, ``violated_criteria`` (name,
        structure, dose_gy, point: the nearest DVH point index or None), ``action``,
        ``tpp_changed``, ``tpp_structure``, ``direction``, ``tpp_before``, ``tpp_after``,
        ``logits`` (all actions), ``logit`` (the chosen action's), ``allowed`` (per action: whether
        the policy could choose it, False for no-ops a masked ACER planner never takes), ``entropy``
        (nats, of the softmax policy over the allowed actions; ``None`` for DQN, whose outputs are Q values) and
        ``probability`` (the chosen action's), and per baseline:
        ``attributions`` (structure -> 100 values, logit units), ``baseline_logit``, ``delta``,
        ``relative_delta``, ``structure_share``, ``top_structure``, ``agreement`` (bool, None
        when nothing is violated).
    """
    baselines = tuple(baselines)
    bad = [b for b in baselines if b not in BASELINES]
    if bad or not baselines:
        raise ValueError(f"baselines {list(baselines)} are invalid; choose from {list(BASELINES)}")
    if len(set(baselines)) != len(baselines):
        raise ValueError(f"baselines {list(baselines)} repeat a name")
    check_integer("seed", seed, 0)
    check_integer("n_steps (--ig-steps, IG quadrature nodes)", n_steps, 2)
    model = _resolve_model(model, device)
    logits_net = ActionLogits(model)
    env = TPPTuningEnv(scenario, cohort=cohort, cases=[case], start=start, max_steps=max_steps, device=device)
    if isinstance(case, PlanningCase):  # an own case: case 0 of the env's cohort "own"
        cohort, case = env.core.cohort, 0
    core = env.core
    structures = list(core.structures)
    obs_dim = DVH_POINTS * len(structures)
    if logits_net.obs_dim != obs_dim or logits_net.n_actions != int(env.action_space.n):
        raise ValueError(f"the policy expects {logits_net.obs_dim} observations and {logits_net.n_actions} actions; "
                         f"scenario {scenario} has {obs_dim} and {int(env.action_space.n)}")

    base_vectors: dict[str, np.ndarray] = {}
    descriptions: dict[str, str] = {}
    if "zero" in baselines:
        base_vectors["zero"] = np.zeros(obs_dim)
        descriptions["zero"] = "all-zero DVH"
    if "mean" in baselines:
        if reference is None:
            indices = _reference_indices(scenario, reference_cohort, reference_cases)
            reference = _reference_dvh_cached(scenario, reference_cohort, indices, device).copy()
            descriptions["mean"] = (f"mean observation of the SPEC default-TPP plans of {scenario} cohort "
                                    f"{reference_cohort!r} (cases {_cases_label(indices)})")
        else:
            descriptions["mean"] = "user-supplied reference DVH"
        reference = np.asarray(reference, dtype=np.float64)
        if reference.shape != (obs_dim,):
            raise ValueError(f"reference must have shape ({obs_dim},), got {reference.shape}")
        base_vectors["mean"] = reference

    obs, info = env.reset(seed=seed, options={"index": case})
    case_obj = env.case
    protocol = Protocol.load(case_obj.protocol)
    rx = case_obj.prescription_gy
    dose_points = {s: (np.linspace(*(TARGET_DVH_RANGE if i == 0 else OAR_DVH_RANGE), DVH_POINTS) * rx)
                   for i, s in enumerate(structures)}
    initial_score = float(info["score"])
    terminated, truncated = bool(info["full_score"]), False  # a full-score start takes no step
    steps: list[dict[str, Any]] = []
    float_net = copy.deepcopy(logits_net).to(device=device, dtype=torch.float32).eval()
    lstm_policy, lstm_state = None, None
    if logits_net.recurrent:  # carry the episode's hidden state; IG holds it fixed at each step
        lstm_policy = model.policy if isinstance(model, BaseAlgorithm) else model
        lstm_state = lstm_policy.initial_state(1)
    while not (terminated or truncated):
        result = score_plan(case_obj, env.dose)
        if lstm_state is not None:
            logits_net.set_state(*lstm_state)
            float_net.set_state(*lstm_state)
        with torch.no_grad():
            logit_vec = float_net(torch.as_tensor(obs, device=device).reshape(1, -1))[0].cpu().numpy()
        # a planner that learned with no-op actions masked acts that way (drl.train.as_policy)
        choice = logit_vec
        if getattr(model, "use_action_masks", False) and info.get("action_mask") is not None:
            allowed = usable_masks(np.array(info["action_mask"], dtype=bool).reshape(1, -1))[0]
            choice = np.where(allowed, logit_vec, -np.inf)
        action = int(np.argmax(choice))
        entropy = None if logits_net.kind.startswith("dqn") else policy_entropy(choice)
        ig = integrated_gradients(logits_net, obs, action, base_vectors, n_steps=n_steps, device=device)
        j, down = divmod(action, 2)
        tpp_before = float(info["tpp"][core.names[j]])
        score_before, violated = float(info["score"]), list(info["violated"])
        violated_structures = list(dict.fromkeys(c.structure for c in result.violated))
        violated_criteria = []
        for c in result.violated:
            dose = _criterion_dose_gy(protocol, c.name, result)
            pts = dose_points.get(c.structure)
            inside = dose is not None and pts is not None and pts[0] <= dose <= pts[-1]
            violated_criteria.append({"name": c.name, "structure": c.structure, "dose_gy": dose,
                                      "point": int(np.argmin(np.abs(pts - dose))) if inside else None})
        seen = {s: [float(v) for v in obs[i * DVH_POINTS:(i + 1) * DVH_POINTS]] for i, s in enumerate(structures)}
        if lstm_policy is not None:
            with torch.no_grad():
                obs_t = torch.as_tensor(obs, device=lstm_policy.device, dtype=torch.float32).reshape(1, -1)
                _, _, lstm_state = lstm_policy.step(obs_t, lstm_state)
        obs, _, terminated, truncated, info = env.step(action)
        record: dict[str, Any] = {
            "step": len(steps), "observation": seen, "score": score_before, "score_after": float(info["score"]),
            "violated": violated, "violated_structures": violated_structures, "violated_criteria": violated_criteria,
            "action": action, "tpp_changed": core.names[j], "tpp_structure": structures[j % len(structures)],
            "direction": "down" if down else "up", "tpp_before": tpp_before,
            "tpp_after": float(info["tpp"][core.names[j]]), "logits": [float(v) for v in logit_vec],
            "allowed": [bool(v) for v in np.isfinite(choice)],
            "entropy": entropy, "probability": None if entropy is None else float(_softmax(choice)[action]),
            "attributions": {}, "logit": None, "baseline_logit": {}, "delta": {}, "relative_delta": {},
            "structure_share": {}, "top_structure": {}, "agreement": {},
        }
        for base in baselines:
            r = ig[base]
            attr = r["attribution"]
            share = _structure_shares(attr, structures)
            top = max(share, key=share.__getitem__)
            record["attributions"][base] = {s: [float(v) for v in attr[i * DVH_POINTS:(i + 1) * DVH_POINTS]]
                                            for i, s in enumerate(structures)}
            record["logit"] = r["logit"]
            record["baseline_logit"][base] = r["baseline_logit"]
            record["delta"][base] = r["delta"]
            record["relative_delta"][base] = r["relative_delta"]
            record["structure_share"][base] = share
            record["top_structure"][base] = top
            record["agreement"][base] = (top in violated_structures) if violated_structures else None
        steps.append(record)

    convergence = {}
    for base in baselines:
        abs_d = [abs(s["delta"][base]) for s in steps]
        rel_d = [s["relative_delta"][base] for s in steps]
        ok = all(r <= delta_tolerance for r in rel_d)
        convergence[base] = {"max_abs_delta": max(abs_d, default=0.0), "max_relative_delta": max(rel_d, default=0.0),
                             "mean_relative_delta": float(np.mean(rel_d)) if rel_d else 0.0,
                             "tolerance": delta_tolerance, "within_tolerance": ok}
        if not ok:
            warnings.warn(f"IG convergence delta of baseline {base!r} reaches {max(rel_d):.3g} of "
                          f"|logit(x) - logit(baseline)| (tolerance {delta_tolerance}); raise n_steps (now {n_steps})",
                          RuntimeWarning, stacklevel=2)

    out: dict[str, Any] = {
        "version": JSON_VERSION, "scenario": scenario, "cohort": cohort, "case": case, "case_name": info["case"],
        "policy": f"{type(model).__name__} ({logits_net.kind})", "seed": seed, "start": start,
        "structures": structures, "tpp_names": list(core.names),
        "dose_points_gy": {s: [float(v) for v in p] for s, p in dose_points.items()},
        "baselines": {b: {"description": descriptions[b],
                          "dvh": {s: [float(v) for v in base_vectors[b][i * DVH_POINTS:(i + 1) * DVH_POINTS]]
                                  for i, s in enumerate(structures)}} for b in baselines},
        "ig": {"method": "gausslegendre", "n_steps": n_steps, "target": "chosen action's logit",
               "dtype": "float64"},
        "initial_score": initial_score, "final_score": float(info["score"]), "max_score": float(info["max_score"]),
        "terminated": bool(info["full_score"]), "truncated": bool(truncated),
        "steps": steps, "convergence": convergence,
        "entropy_mean": (float(np.mean([r["entropy"] for r in steps]))
                         if steps and steps[0]["entropy"] is not None else None),
        "agreement": agreement_summary(steps, structures, baselines),
    }
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    files: list[str] = []
    if plots and steps:
        for base in baselines:
            files.append(str(plot_attribution_heatmaps(out, base, out_dir / f"ig_heatmap_{base}.png")))
        files.append(str(plot_structure_shares(out, out_dir / "ig_structure_share.png")))
        for rec in steps:
            files.append(str(plot_dvh_attribution(out, rec["step"], out_dir / f"dvh_ig_step{rec['step']:02d}.png")))
    json_path = out_dir / "attributions.json"
    files.insert(0, str(json_path))
    out["files"] = files
    json_path.write_text(json.dumps(out, indent=1))
    return out


def _softmax(logits: np.ndarray) -> np.ndarray:
    finite = np.isfinite(logits)
    z = np.where(finite, logits - logits[finite].max(), -np.inf)
    p = np.exp(z)
    return p / p.sum()


def policy_entropy(logits: np.ndarray) -> float:
    """Entropy (nats) of the softmax policy of ``logits`` over its finite entries (masked actions
    are ``-inf``): 0 for a certain choice, ``log n`` for a uniform one over ``n`` actions."""
    p = _softmax(np.asarray(logits, dtype=np.float64))
    nz = p[p > 0]
    return float(-(nz * np.log(nz)).sum())


def _cases_label(indices: Sequence[int]) -> str:
    if tuple(indices) == tuple(range(len(indices))):
        return f"0-{len(indices) - 1}"
    return ", ".join(map(str, indices))


# -------------------------------------------------------------------------------------- figures


def _step_matrix(rec: dict[str, Any], base: str, structures: Sequence[str]) -> np.ndarray:
    return np.array([rec["attributions"][base][s] for s in structures])


def _action_label(rec: dict[str, Any]) -> str:
    return f"{rec['tpp_changed']} {rec['direction']}"


def plot_attribution_heatmaps(res: dict[str, Any], baseline: str, path: str | Path) -> Path:
    """A grid of heatmaps, one per step: attribution (logit units) over structure x dose point.

    Rows are structures (violated ones marked ``*``), columns the 100 DVH points; a shared
    symmetric colour scale over all steps; violated criteria's dose points are marked ``x``.
    """
    from matplotlib.colors import Normalize

    structures, steps = res["structures"], res["steps"]
    n = len(steps)
    cols = min(n, 4)
    rows = math.ceil(n / cols)
    vmax = max(max(float(np.abs(_step_matrix(r, baseline, structures)).max()) for r in steps), 1e-12)
    norm = Normalize(-vmax, vmax)
    fig, axes = new_figure(rows, cols, figsize=(4.2 * cols + 1.0, 0.45 * len(structures) + 1.6 * rows + 0.4),
                           dpi=100, squeeze=False, layout="constrained")  # one colour bar shared by all axes
    im = None
    for k, ax in enumerate(axes.flat):
        if k >= n:
            ax.axis("off")
            continue
        rec = steps[k]
        im = ax.imshow(_step_matrix(rec, baseline, structures), aspect="auto", cmap="RdBu_r", norm=norm,
                       interpolation="nearest")
        ax.set_yticks(range(len(structures)))
        ax.set_yticklabels([s + ("*" if s in rec["violated_structures"] else "") for s in structures], fontsize=7)
        for crit in rec["violated_criteria"]:
            if crit["point"] is not None:
                ax.plot(crit["point"], structures.index(crit["structure"]), "x", color="k", ms=4, mew=1)
        ax.set_title(f"step {rec['step']}: {_action_label(rec)} (score {rec['score']:.2f})", fontsize=8)
        ax.tick_params(axis="x", labelsize=7)
        if k // cols == rows - 1:
            ax.set_xlabel("DVH point (PTV 1.00-1.15 Rx, OARs 0.60-1.10 Rx)", fontsize=7)
    if im is not None:
        fig.colorbar(im, ax=axes.ravel().tolist(), shrink=0.8, label="IG attribution (logit units)")
    fig.suptitle(f"{res['case_name']}: IG of the chosen action's logit, {baseline} baseline "
                 f"(* violated structure, x violated criterion)", fontsize=9)
    return save_figure(fig, path)


def plot_structure_shares(res: dict[str, Any], path: str | Path) -> Path:
    """Per baseline, a steps x structures image of each structure's share of |attribution| mass,
    violated structures outlined."""
    from matplotlib.patches import Rectangle

    structures, steps = res["structures"], res["steps"]
    bases = list(res["baselines"])
    fig, axes = new_figure(1, len(bases), figsize=(2.0 + 1.1 * len(structures) * len(bases),
                                                   1.5 + 0.32 * len(steps)), dpi=100, squeeze=False)
    for ax, base in zip(axes[0], bases, strict=True):
        share = np.array([[rec["structure_share"][base][s] for s in structures] for rec in steps])
        im = ax.imshow(share, aspect="auto", cmap="viridis", vmin=0.0, vmax=1.0, interpolation="nearest")
        for t, rec in enumerate(steps):
            for i, s in enumerate(structures):
                if s in rec["violated_structures"]:
                    ax.add_patch(Rectangle((i - 0.5, t - 0.5), 1, 1, fill=False, ec="red", lw=1.5))
        ax.set_xticks(range(len(structures)))
        ax.set_xticklabels(structures, rotation=30, fontsize=8)
        ax.set_yticks(range(len(steps)))
        ax.set_yticklabels([f"{r['step']}: {_action_label(r)}" for r in steps], fontsize=8)
        rate = res["agreement"][base]["rate"]
        ax.set_title(f"{base} baseline\nagreement {'n/a' if rate is None else f'{rate:.2f}'}", fontsize=9)
        fig.colorbar(im, ax=ax, label="share of |IG| mass")
    fig.suptitle(f"{res['case_name']}: attribution share per structure (red: violated)", fontsize=9)
    return save_figure(fig, path)


def plot_dvh_attribution(res: dict[str, Any], step: int, path: str | Path) -> Path:
    """The DVHs the agent saw at ``step``, each segment coloured by its IG attribution (one row per
    baseline, one panel per structure; dose in Gy, volume in %), violated criteria's doses dashed."""
    from matplotlib.collections import LineCollection
    from matplotlib.colors import Normalize

    structures = res["structures"]
    rec = res["steps"][step]
    bases = list(res["baselines"])
    obs = _observation_of(res, step)
    fig, axes = new_figure(len(bases), len(structures), figsize=(3.3 * len(structures) + 1.0, 2.6 * len(bases)),
                           dpi=100, squeeze=False)
    for r, base in enumerate(bases):
        attr = _step_matrix(rec, base, structures)
        vmax = max(float(np.abs(attr).max()), 1e-12)
        norm = Normalize(-vmax, vmax)
        lc = None
        for i, s in enumerate(structures):
            ax = axes[r, i]
            x = np.asarray(res["dose_points_gy"][s])
            y = 100.0 * obs[i]
            pts = np.column_stack([x, y]).reshape(-1, 1, 2)
            segs = np.concatenate([pts[:-1], pts[1:]], axis=1)
            lc = LineCollection(segs, cmap="RdBu_r", norm=norm, linewidths=3.0)
            lc.set_array(0.5 * (attr[i, :-1] + attr[i, 1:]))
            ax.plot(x, y, color="0.8", lw=5.0, zorder=0)
            ax.add_collection(lc)
            for crit in rec["violated_criteria"]:
                if crit["structure"] == s and crit["point"] is not None:
                    ax.axvline(crit["dose_gy"], color="k", ls="--", lw=0.8)
            ax.set_xlim(x[0], x[-1])
            ax.set_ylim(-2, 102)
            ax.grid(alpha=0.3)
            flag = " (violated)" if s in rec["violated_structures"] else ""
            ax.set_title(f"{s}{flag}, {base}: {rec['structure_share'][base][s]:.0%} of |IG|", fontsize=8)
            ax.tick_params(labelsize=7)
            if r == len(bases) - 1:
                ax.set_xlabel("dose (Gy)", fontsize=8)
            if i == 0:
                ax.set_ylabel("volume (%)", fontsize=8)
        if lc is not None:
            fig.colorbar(lc, ax=axes[r, -1], label="IG (logit units)")
    fig.suptitle(f"{res['case_name']} step {rec['step']}: action {_action_label(rec)}, score {rec['score']:.2f}",
                 fontsize=9)
    return save_figure(fig, path)


def _observation_of(res: dict[str, Any], step: int) -> np.ndarray:
    """The observation the agent saw at ``step``: ``(n_structures, 100)`` volume fractions."""
    return np.array([res["steps"][step]["observation"][s] for s in res["structures"]])
