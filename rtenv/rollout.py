"""Running any policy on the environments: single episodes and whole cohorts, with summaries.

A policy here is any callable ``policy(observation, info) -> action``, called once per step; a
stateful policy resets its state where ``info["steps"] == 0`` (an episode's first step). A
feed-forward SB3 model adapts with ``lambda obs, info: model.predict(obs, deterministic=True)[0]``;
``drl.train.as_policy`` also carries recurrent state and applies ACER's action masks.
"""

from __future__ import annotations

import statistics
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import gymnasium as gym
import numpy as np

from rtenv.case import PlanningCase
from rtenv.env import OWN_COHORT, TPPTuningEnv, own_cases
from rtenv.evaluation import score_plan
from rtenv.runlog import RunLog
from rtenv.scenarios import COHORTS, cohort_size
from rtenv.validation import check_integer

Policy = Callable[[np.ndarray, dict[str, Any]], Any]


@dataclass
class EpisodeRecord:
    """One tuning episode: scores (the env's scoring mode and binary), steps, final TPPs and metrics
    (``final_dv_metrics``: each protocol criterion's value by name, in its own unit: Gy for
    dose criteria; for ``V`` criteria percent of the structure's volume, or cc where the protocol
    gives them so)."""

    case: str
    initial_score: float
    final_score: float
    initial_binary_score: float
    final_binary_score: float
    max_score: float
    steps: int
    full_score: bool
    final_tpp: dict[str, float]
    final_dv_metrics: dict[str, float]
    score_trajectory: list[float] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def run_episode(env: gym.Env, policy: Policy, seed: int | None = None,
                options: dict[str, Any] | None = None) -> EpisodeRecord:
    """Roll ``policy`` out for one episode (until full score or truncation) on a
    :class:`TPPTuningEnv`, bare or as ``gym.make`` wraps it."""
    base = env.unwrapped  # gym.make's wrappers do not forward `case` and `dose`
    if not isinstance(base, TPPTuningEnv):
        raise TypeError(f"run_episode needs a TPPTuningEnv (or a wrapper of one), got {type(base).__name__}")
    obs, info = env.reset(seed=seed, options=options)
    initial, initial_binary = info["score"], score_plan(base.case, base.dose, mode="binary").total
    trajectory = [info["score"]]
    terminated = truncated = info["full_score"]  # a start at full score needs no tuning
    while not (terminated or truncated):
        obs, _, terminated, truncated, info = env.step(policy(obs, info))
        trajectory.append(info["score"])
    return EpisodeRecord(
        case=info["case"], initial_score=initial, final_score=info["score"], initial_binary_score=initial_binary,
        final_binary_score=score_plan(base.case, base.dose, mode="binary").total, max_score=info["max_score"],
        steps=info["steps"], full_score=bool(info["full_score"]), final_tpp=info["tpp"],
        final_dv_metrics=info["dv_metrics"], score_trajectory=trajectory,
    )


def evaluate_cohort(policy: Policy, scenario: str, cohort: str = "test",
                    cases: int | PlanningCase | Sequence[PlanningCase] | None = None, start: str = "default",
                    max_steps: int = 20,
                    seed: int = 0, log: RunLog | None = None, **env_kwargs: Any) -> dict[str, Any]:
    """Run ``policy`` once on every case of a cohort and summarise.

    ``cases``: the cohort's first ``n`` (``None``: all of it), or your own cases (a sequence of
    :class:`~rtenv.case.PlanningCase` with the scenario's structures, e.g. imported ones), which
    then replace the cohort (reported as ``"own"``).

    With a ``log`` (a :class:`~rtenv.runlog.RunLog` whose settings name the policy and these
    arguments), each finished episode is written to it at once and episodes already there are
    not run again: an interrupted evaluation resumes where it stopped.

    Returns a JSON-ready dict with ``cases`` (one :class:`EpisodeRecord` dict each) and the
    summary keys ``initial_score_mean``, ``final_score_mean``, ``final_score_sd``, ``steps_mean``,
    ``steps_sd``, ``full_score_rate`` (scores in the env's scoring mode; ``*_binary_*`` too).
    """
    check_integer("seed", seed, 0)  # episode i is reset with seed + i
    own = own_cases(cases)
    if own is not None:
        n, cohort = len(own), OWN_COHORT
        env = TPPTuningEnv(scenario, cases=own, start=start, max_steps=max_steps, **env_kwargs)
    else:
        size = cohort_size(scenario, cohort) if cohort in COHORTS else None
        n = check_integer("cases", cases, 1, size) if cases is not None else (size or 1)
        env = TPPTuningEnv(scenario, cohort=cohort, cases=list(range(n)), start=start, max_steps=max_steps,
                           **env_kwargs)
    records = logged_episodes(n, lambda i: run_episode(env, policy, seed=seed + i, options={"index": i}), log)
    return summarise(records, scenario=scenario, cohort=cohort, start=start, max_steps=max_steps)


def logged_episodes(n: int, run: Callable[[int], EpisodeRecord], log: RunLog | None) -> list[EpisodeRecord]:
    """``[run(i) for i in range(n)]``, where an episode found in ``log`` (under key ``i``) is read
    back instead of run, and each episode run is written to ``log`` as soon as it ends."""
    records = []
    for i in range(n):
        done = log.get(i) if log is not None else None
        if done is None:
            record = run(i)
            if log is not None:
                log.add(i, record.to_dict())
        else:
            record = EpisodeRecord(**done)
        records.append(record)
    return records


def summarise(records: list[EpisodeRecord], **meta: Any) -> dict[str, Any]:
    """Mean +- sd summary of episode records (plus the records)."""
    def ms(values: list[float]) -> tuple[float, float]:
        return statistics.mean(values), (statistics.stdev(values) if len(values) > 1 else 0.0)

    if not records:
        raise ValueError("summarise needs at least one episode record, got none")
    out: dict[str, Any] = dict(meta)
    out["initial_score_mean"], out["initial_score_sd"] = ms([r.initial_score for r in records])
    out["final_score_mean"], out["final_score_sd"] = ms([r.final_score for r in records])
    out["initial_binary_score_mean"], out["initial_binary_score_sd"] = ms([r.initial_binary_score for r in records])
    out["final_binary_score_mean"], out["final_binary_score_sd"] = ms([r.final_binary_score for r in records])
    out["steps_mean"], out["steps_sd"] = ms([float(r.steps) for r in records])
    out["full_score_rate"] = sum(r.full_score for r in records) / len(records)
    out["max_score"] = records[0].max_score
    out["cases"] = [r.to_dict() for r in records]
    return out
