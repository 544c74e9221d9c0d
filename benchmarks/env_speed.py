"""Environment throughput: the single env against the batched vector env, side by side.

    python -m benchmarks.env_speed --scenario S1 --json OUT.json [--envs 8,32] [--steps 16] [--rounds 3] [--device cpu]

Env ``i`` takes stream ``i`` of uniformly random discrete actions on the training case (episodes
start from the SPEC default TPPs, end at full score or after 20 steps and restart): column ``i``
of one ``(steps, largest env count)`` action matrix drawn with seed 0, so the streams depend on
``--steps`` and the largest of ``--envs``. The vector env runs streams ``0..N-1`` together; the
single env replays the same streams one after another, so both sides solve identical plans
(vector sub-envs equal single envs step for step). Steps per second count
transitions, each including the TPS solve, the DVH observation and scoring.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import numpy as np
import torch

from benchmarks.machine import cpu_model, device_name, speedup_spread
from rtenv.env import TPPTuningEnv, TPPTuningVectorEnv
from rtenv.runlog import check_output_path, write_atomic
from rtenv.scenarios import SCENARIOS
from rtenv.validation import check_integer, is_integer


def _workload(num_envs: int, calls: int, n_actions: int) -> np.ndarray:
    """The random discrete actions ``(calls, num_envs)``: env ``i`` always gets column ``i``."""
    return np.random.default_rng(0).integers(n_actions, size=(calls, num_envs))


def single_env_seconds(scenario: str, actions: np.ndarray, device: str) -> list[float]:
    """Wall time of each env's action sequence replayed through a single env (seed = env index)."""
    times = []
    for i in range(actions.shape[1]):
        env = TPPTuningEnv(scenario, device=device)
        env.reset(seed=i)
        t0 = time.perf_counter()
        for a in actions[:, i]:
            _, _, term, trunc, _ = env.step(int(a))
            if term or trunc:
                env.reset()
        times.append(time.perf_counter() - t0)
    return times


def vector_env_seconds(scenario: str, actions: np.ndarray, device: str) -> tuple[float, dict]:
    """Wall time of the action rows through one vector env, and what its step solves did:
    ``working_set`` (plans per batched ADMM iteration: the sub-envs' iterations summed over the
    step solves, divided by the batched iterations those solves ran, i.e. the largest of each),
    ``iterations_mean`` and ``converged_fraction`` (per plan)."""
    venv = TPPTuningVectorEnv(num_envs=actions.shape[1], scenario=scenario, device=device)
    venv.reset(seed=0)  # env i gets seed i, as its single-env replay
    infos = []
    t0 = time.perf_counter()
    for row in actions:
        infos.append(venv.step(row)[4])
    seconds = time.perf_counter() - t0
    its, conv = [], []
    for info in infos:  # a finished env's step solve is in its final_info (the rest is its reset)
        finished = info.get("_final_info", np.zeros(actions.shape[1], dtype=bool))
        step = info["final_info"] if finished.any() else info
        its.append(np.where(finished, step["tps_iterations"], info["tps_iterations"]).tolist())
        conv += np.where(finished, step["tps_converged"], info["tps_converged"]).tolist()
    stats = {"working_set": float(sum(map(sum, its)) / sum(map(max, its))),
             "iterations_mean": float(np.mean(its)), "converged_fraction": float(np.mean(conv))}
    return seconds, stats


def run(scenario: str, envs: tuple[int, ...], calls: int, device: str, json_path: str | Path | None,
        rounds: int = 3) -> dict:
    """Both sides run identical episodes (vector sub-envs equal single envs step for step; on CUDA,
    whose batched reductions need not round as the single ones do, float rounding may part them), in
    interleaved rounds (all single-env replays, then each vector env), so that a change in machine
    speed during the run hits both sides alike; figures are medians over rounds, each round's
    speedup comparing the vector env with the single-env replays of the same streams."""
    check_integer("rounds (--rounds)", rounds, 1)
    check_integer("calls (--steps)", calls, 1)
    if not envs or not all(is_integer(n) and n >= 1 for n in envs):
        raise ValueError(f"env counts (--envs) {list(envs)} must be integers >= 1")
    json_path = None if json_path is None else check_output_path(json_path, "--json", "file")
    probe = TPPTuningEnv(scenario, device=device)
    probe.reset(seed=0)  # build and cache the case first
    actions = _workload(max(envs), calls, int(probe.action_space.n))
    res: dict = {"scenario": scenario, "device": str(probe.core.device), "device_name": device_name(probe.core.device),
                 "cpu_model": cpu_model(), "torch_threads": torch.get_num_threads(), "steps_per_env": calls,
                 "rounds_requested": rounds, "rounds": 0, "vector_steps_per_s": {}, "vector_speedup": {},
                 "vector_speedup_rounds": {}, "vector_tps": {}}
    single_rates, vector_rates = [], {n: [] for n in envs}
    speedups: dict[int, list[float]] = {n: [] for n in envs}
    for done in range(1, rounds + 1):
        single = single_env_seconds(scenario, actions, device)
        single_rates.append(actions.size / sum(single))
        for n in envs:
            seconds, stats = vector_env_seconds(scenario, actions[:, :n], device)
            sps = n * calls / seconds
            res["vector_tps"][str(n)] = stats  # the same in every round (the same episodes)
            vector_rates[n].append(sps)
            speedups[n].append(sps / (n * calls / sum(single[:n])))  # same episodes on both sides
        res["rounds"] = done  # the rounds the medians are over (a run cut short keeps the ones it finished)
        res["single_steps_per_s"] = statistics.median(single_rates)
        for n in envs:
            res["vector_steps_per_s"][str(n)] = statistics.median(vector_rates[n])
            res["vector_speedup"][str(n)] = statistics.median(speedups[n])
            res["vector_speedup_rounds"][str(n)] = speedups[n]
        if json_path is not None:
            json_path.parent.mkdir(parents=True, exist_ok=True)
            write_atomic(json_path, json.dumps(res, indent=2))
    return res


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--scenario", default="S1", choices=sorted(SCENARIOS))
    p.add_argument("--envs", default="8,32")
    p.add_argument("--steps", type=int, default=16, help="steps per env (the same episodes on both sides)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--rounds", type=int, default=3, help="interleaved rounds; figures are their medians")
    p.add_argument("--json", default=None, help="write the figures here (JSON)")
    args = p.parse_args(argv)
    try:
        envs = tuple(int(n) for n in args.envs.split(","))
    except ValueError:
        p.error(f"--envs {args.envs!r} must be comma-separated integers >= 1")
    try:
        res = run(args.scenario, envs, args.steps, args.device, args.json, args.rounds)
    except ValueError as e:  # counts out of range (checked before the timings), an unusable --json path
        p.error(str(e))
    print(f"env speed {res['scenario']} on {res['device']} ({res['device_name']}): "
          f"single env {res['single_steps_per_s']:.1f} steps/s "
          f"({res['steps_per_env']} steps of each of {max(map(int, res['vector_steps_per_s']))} episode streams)")
    for n, sps in res["vector_steps_per_s"].items():
        tps = res["vector_tps"][n]
        print(f"  vector env, {n:>3} envs: {sps:8.1f} steps/s  ({res['vector_speedup'][n]:.1f}x"
              f"{speedup_spread(res['vector_speedup_rounds'][n])}); its TPS solves: "
              f"{tps['working_set']:.1f} plans per batched iteration, {tps['iterations_mean']:.1f} iterations "
              f"per plan, {100 * tps['converged_fraction']:.0f} % converged")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
