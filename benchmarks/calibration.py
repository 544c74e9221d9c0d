"""Calibration: do the built-in cases start where the papers' plans start, and is full score reachable?

    python -m benchmarks.calibration --scenario S1|S2|S3 --json OUT.json [--budget 400] [--fresh] [--device cpu]

Over the scenario's test cohort, with the M2M seed's starting TPPs: S1 and S2 start every test
case from the SPEC default TPPs; S3 starts every test case from a SPEC random TPP vector (seed =
case index). (The seed's Table 3 runs S3 as 10 random starts on one liver case; the Table 3
benchmark does that. Calibration covers the cohort, so no single phantom decides it.)
For each start it records the initial plan score (binary, the seed's scoring; linear too) and runs
the CMA-ES search baseline (:func:`rtenv.search.cma_search`) from it to find a full-score plan (a
start already at full score is found with 0 evaluations).

Each finished case is written to the JSON at once (replacing the file whole, so a crash never
leaves half a file); a rerun with the same settings resumes after the last finished case unless
``--fresh`` is given, and a JSON made with other settings is an error.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import numpy as np
from tqdm.auto import tqdm

from rtenv.env import EpisodeState, TuningCore
from rtenv.evaluation import score_plan
from rtenv.runlog import check_output_path, read_json, settings_changes, write_atomic
from rtenv.search import cma_search
from rtenv.tpp import TPP

PAPER_INITIAL = {"S1": (6.0, 1.8, 9), "S2": (11.3, 1.4, 15), "S3": (2.5, 0.4, 4)}  # M2M seed, Table 3
N_CASES = 10


def starts(scenario: str, structures: tuple[str, ...]) -> list[tuple[tuple[str, int], np.ndarray, str]]:
    """``(case key, start TPPs, label)`` of the seed's ten test episodes of a scenario."""
    if scenario == "S3":
        return [(("test", i), TPP.random(structures, np.random.default_rng(i)).values, f"random start {i}")
                for i in range(N_CASES)]
    return [(("test", i), TPP.default(structures).values, "default start") for i in range(N_CASES)]


def summarise(res: dict) -> None:
    cases = res["cases"]
    init = [c["initial_score"] for c in cases]
    res["initial_score_mean"] = statistics.mean(init)
    res["initial_score_sd"] = statistics.stdev(init) if len(init) > 1 else 0.0
    res["initial_linear_score_mean"] = statistics.mean(c["initial_linear_score"] for c in cases)
    res["search_success_rate"] = sum(c["search_success"] for c in cases) / len(cases)
    found = [c["search_evaluations"] for c in cases if c["search_success"]]
    res["search_evaluations_mean"] = statistics.mean(found) if found else None
    res["search_evaluations_max"] = max(found) if found else None
    mean, sd, _ = PAPER_INITIAL[res["scenario"]]
    res["within_one_sd_of_paper"] = abs(res["initial_score_mean"] - mean) <= sd


def run(scenario: str, json_path: str | Path | None, budget: int, popsize: int, fresh: bool,
        device: str = "cpu") -> dict:
    json_path = None if json_path is None else check_output_path(json_path, "--json", "file")
    core = TuningCore(scenario, action_mode="continuous", cohort="test", scoring_mode="binary", device=device)
    res: dict = {"scenario": scenario, "max_score": None, "budget": budget, "popsize": popsize,
                 "device": str(core.device),
                 "paper_initial_mean_sd": PAPER_INITIAL[scenario][:2], "cases": []}
    if json_path is not None and json_path.is_file() and not fresh:
        previous = read_json(json_path, "calibration result (JSON)")
        if not isinstance(previous, dict) or not isinstance(previous.get("cases"), list):
            raise ValueError(f"{json_path} holds no calibration run (a JSON object with a 'cases' list): "
                             "pass --fresh to overwrite it, or another --json")
        previous.setdefault("device", "cpu")  # runs before the device was recorded were CPU runs
        differ = settings_changes(previous, res, keys=("scenario", "budget", "popsize", "device"))
        if differ:
            raise ValueError(f"{json_path} holds a calibration run with other settings ({'; '.join(differ)}): "
                             "pass --fresh to start over, or another --json")
        res = previous
    todo = starts(scenario, core.structures)
    for k, (key, tpp, label) in enumerate(tqdm(todo, desc=f"calibration {scenario}", unit="case")):
        if k < len(res["cases"]):
            continue
        t0 = time.perf_counter()
        ep = EpisodeState(key, tpp)
        core.solve([ep], warm=[False])
        linear = score_plan(core.case(key), ep.dose, mode="linear").total
        if ep.result.full_score:  # the start is a full-score plan: nothing to search
            success, evaluations, best_score, best_tpp = True, 0, ep.result.total, tpp
        else:
            found = cma_search(core, key, tpp, budget=budget, popsize=popsize, seed=k)
            success, evaluations, best_score, best_tpp = (found.success, found.evaluations, found.best_score,
                                                          found.best_tpp)
        res["max_score"] = ep.result.max_score
        res["cases"].append({
            "case": f"{scenario}-{key[0]}-{key[1]}", "start": label, "initial_score": ep.result.total,
            "initial_linear_score": linear, "initial_violated": [c.name for c in ep.result.violated],
            "search_success": success, "search_evaluations": evaluations, "search_best_score": best_score,
            "search_best_tpp": dict(zip(core.names, map(float, best_tpp), strict=True)),
            "seconds": time.perf_counter() - t0,
        })
        summarise(res)
        if json_path is not None:
            json_path.parent.mkdir(parents=True, exist_ok=True)
            write_atomic(json_path, json.dumps(res, indent=2))
    summarise(res)
    return res


def table(res: dict) -> str:
    mean, sd = res["paper_initial_mean_sd"]
    lines = [f"calibration {res['scenario']} (binary score, max {res['max_score']:g})",
             f"{'case':<16}{'start':<17}{'initial':>8}{'search':>9}{'evals':>7}  violated at start"]
    for c in res["cases"]:
        lines.append(f"{c['case']:<16}{c['start']:<17}{c['initial_score']:>8.0f}"
                     f"{'full' if c['search_success'] else 'no':>9}{c['search_evaluations']:>7}  "
                     f"{', '.join(c['initial_violated'])}")
    ev = res["search_evaluations_mean"]
    lines += ["", f"initial score {res['initial_score_mean']:.2f} +- {res['initial_score_sd']:.2f} "
              f"(paper {mean} +- {sd}; within one sd: {res['within_one_sd_of_paper']})",
              f"search: full score on {100 * res['search_success_rate']:.0f} % of cases, "
              f"{'n/a' if ev is None else f'{ev:.0f}'} evaluations on average over those "
              f"(budget {res['budget']} each)"]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--scenario", default="S1", choices=sorted(PAPER_INITIAL))
    p.add_argument("--json", default=None, help="results JSON, written after each case; a rerun resumes it")
    p.add_argument("--budget", type=int, default=400, help="plan evaluations per search")
    p.add_argument("--popsize", type=int, default=16)
    p.add_argument("--fresh", action="store_true", help="ignore a previous partial JSON")
    p.add_argument("--device", default="cpu", help="torch device of the TPS (cpu, cuda)")
    args = p.parse_args(argv)
    try:
        res = run(args.scenario, args.json, args.budget, args.popsize, args.fresh, args.device)
    except ValueError as e:  # a JSON from other settings or none, a bad budget or popsize, an unusable --json
        p.error(str(e))
    print(table(res))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
