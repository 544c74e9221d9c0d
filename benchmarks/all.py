"""Every benchmark of the project in one run, with one summary markdown.

    python -m benchmarks.all --quick --out DIR [--device cpu|cuda]

Runs, one after the other (timings are only comparable when nothing else loads the machine):
TPS speed (S1), env speed (S1, 8 and 32 envs), the calibration of starting scores (S1, S3) with
full-score reachability by CMA-ES, and a small Table 3 (S1 and S3; default, random and search).
``--quick`` shrinks repeats, budgets and episode counts so the whole run takes minutes on a
2-core CPU; without it every benchmark runs at its full default size. Each benchmark writes its own
JSON under ``DIR``; ``DIR/summary.md`` collects the headline figures.
"""

from __future__ import annotations

import argparse
import json
import time
from collections.abc import Sequence
from pathlib import Path

from benchmarks import calibration, env_speed, table3, tps_speed


def run_all(out: str | Path, quick: bool = True, device: str = "cpu") -> str:
    """Run every benchmark; returns (and writes to ``out/summary.md``) the summary markdown."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    lines = ["# rtenv benchmarks", "", f"mode: {'quick' if quick else 'full'}; device: {device}", ""]
    seconds = {}

    t0 = time.perf_counter()
    tps = tps_speed.run("S1", device, 2 if quick else 5, out / "tps_speed_S1.json", (8, 32) if quick else (8, 32, 64))
    seconds["tps_speed"] = time.perf_counter() - t0
    lines += ["## TPS speed (S1)", "", "```", tps_speed.table(tps), "```", ""]

    t0 = time.perf_counter()
    env = env_speed.run("S1", (8, 32), 4 if quick else 16, device, out / "env_speed_S1.json", rounds=1 if quick else 3)
    seconds["env_speed"] = time.perf_counter() - t0
    lines += ["## Environment speed (S1)", "", f"single env {env['single_steps_per_s']:.1f} steps/s; vector env "
              + ", ".join(f"{n} envs {v:.1f} steps/s" for n, v in env["vector_steps_per_s"].items()), ""]

    for sc in ("S1", "S3"):
        t0 = time.perf_counter()
        cal = calibration.run(sc, out / f"calibration_{sc}.json", budget=32 if quick else 400, popsize=16,
                              fresh=True)
        seconds[f"calibration_{sc}"] = time.perf_counter() - t0
        lines += [f"## Calibration ({sc})", "", "```", calibration.table(cal), "```", ""]

    t0 = time.perf_counter()
    summary = table3.run_table3(["S1", "S3"], ["default", "random", "search"], out / "table3", cases=3 if quick else 10,
                                max_steps=10 if quick else 20, workers=1, device=device, progress=False)
    seconds["table3"] = time.perf_counter() - t0
    lines += [table3.table_markdown(summary).replace("# Table 3", "## Table 3", 1), ""]

    lines += ["## Wall time", "", "| benchmark | seconds |", "|---|---|"]
    lines += [f"| {k} | {v:.1f} |" for k, v in seconds.items()]
    text = "\n".join(lines) + "\n"
    (out / "summary.md").write_text(text)
    (out / "seconds.json").write_text(json.dumps(seconds, indent=2))
    return text


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.all", description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="small sizes: the whole run takes minutes")
    p.add_argument("--out", default="benchmarks/results/all", help="output directory")
    p.add_argument("--device", default="cpu")
    args = p.parse_args(argv)
    print(run_all(args.out, args.quick, args.device))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
