"""Every benchmark of the project in one run, with one summary markdown.

    python -m benchmarks.all --quick --out DIR [--device cpu|cuda] [--fresh]

Runs, one after the other (timings are only comparable when nothing else loads the machine):
TPS speed (S1), env speed (S1, 8 and 32 envs), the calibration of starting scores (S1, S3) with
full-score reachability by CMA-ES, and a small Table 3 (S1 and S3; default, random and search).
``--quick`` shrinks repeats, budgets and episode counts so the whole run takes minutes on a
2-core CPU; without it every benchmark runs at its full default size. Each benchmark writes its own
JSON under ``DIR``; ``DIR/summary.md`` collects the headline figures.

A run resumes: ``DIR/seconds.json`` records each benchmark's wall time as it finishes, and a rerun
into the same ``DIR`` reuses the finished ones (their JSON and their original wall time) and
continues the rest (Table 3 episode by episode; a benchmark continued from a partial run records
the wall time of the continuation only). ``DIR/settings.json`` holds the mode and device;
a rerun with others is refused unless ``--fresh``, which starts over.
"""

from __future__ import annotations

import argparse
import json
import shutil
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from benchmarks import calibration, env_speed, table3, tps_speed
from rtenv.runlog import check_output_path, read_json, settings_changes, write_atomic
from rtenv.tps import resolve_device


def run_all(out: str | Path, quick: bool = True, device: str = "cpu", fresh: bool = False) -> str:
    """Run (or resume) every benchmark; returns (and writes to ``out/summary.md``) the summary markdown."""
    out = check_output_path(out, "--out", "dir")
    device = str(resolve_device(device))  # before anything is written to out; "cuda" is "cuda:0"
    settings = {"quick": quick, "device": device}
    settings_path, seconds_path = out / "settings.json", out / "seconds.json"
    if fresh and out.is_dir():
        for name in ("settings.json", "seconds.json", "summary.md", "tps_speed_S1.json", "env_speed_S1.json",
                     "calibration_S1.json", "calibration_S3.json"):
            (out / name).unlink(missing_ok=True)
        shutil.rmtree(out / "table3", ignore_errors=True)
    before = read_json(settings_path, "benchmark settings file") if settings_path.is_file() else settings
    if before != settings:
        changed = (settings_changes(before, settings) if isinstance(before, dict)
                   else [f"{before!r} there, {settings!r} now"])
        raise ValueError(f"{out} holds a run with other settings ({'; '.join(changed)}): pass --fresh to start "
                         "over, or another --out")
    # finished benchmarks are reused only from a run whose settings are known to match
    seconds: dict[str, float] = (read_json(seconds_path, "benchmark timings file")
                                 if seconds_path.is_file() and settings_path.is_file() else {})
    out.mkdir(parents=True, exist_ok=True)
    write_atomic(settings_path, json.dumps(settings))

    def step(name: str, json_path: Path | None, run: Callable[[], Any]) -> Any:
        """``run()``'s result, or the finished one's JSON; the wall time is recorded when it ends."""
        if name in seconds and json_path is not None and json_path.is_file():
            return read_json(json_path, "benchmark result")
        t0 = time.perf_counter()
        result = run()
        seconds[name] = time.perf_counter() - t0
        write_atomic(seconds_path, json.dumps(seconds, indent=2))
        return result

    lines = ["# rtenv benchmarks", "", f"mode: {'quick' if quick else 'full'}; device: {device}", ""]
    path = out / "tps_speed_S1.json"
    tps = step("tps_speed", path, lambda: tps_speed.run("S1", device, 2 if quick else 5, path,
                                                         (8, 32) if quick else (8, 32, 64)))
    lines += ["## TPS speed (S1)", "", "```", tps_speed.table(tps), "```", ""]

    path = out / "env_speed_S1.json"
    env = step("env_speed", path, lambda: env_speed.run("S1", (8, 32), 4 if quick else 16, device, path,
                                                         rounds=1 if quick else 3))
    lines += ["## Environment speed (S1)", "", f"single env {env['single_steps_per_s']:.1f} steps/s; vector env "
              + ", ".join(f"{n} envs {v:.1f} steps/s" for n, v in env["vector_steps_per_s"].items()), ""]

    for sc in ("S1", "S3"):
        path = out / f"calibration_{sc}.json"
        cal = step(f"calibration_{sc}", path, lambda sc=sc, path=path: calibration.run(
            sc, path, budget=32 if quick else 400, popsize=16, fresh=False, device=device))
        lines += [f"## Calibration ({sc})", "", "```", calibration.table(cal), "```", ""]

    summary = step("table3", out / "table3" / "summary.json", lambda: table3.run_table3(
        ["S1", "S3"], ["default", "random", "search"], out / "table3", cases=3 if quick else 10,
        max_steps=10 if quick else 20, workers=1, device=device, progress=False))
    lines += [table3.table_markdown(summary).replace("# Table 3", "## Table 3", 1), ""]

    lines += ["## Wall time", "", "| benchmark | seconds |", "|---|---|"]
    lines += [f"| {k} | {v:.1f} |" for k, v in seconds.items()]
    text = "\n".join(lines) + "\n"
    (out / "summary.md").write_text(text)
    return text


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.all", description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="small sizes: the whole run takes minutes")
    p.add_argument("--out", default="benchmarks/results/all", help="output directory")
    p.add_argument("--device", default="cpu")
    p.add_argument("--fresh", action="store_true", help="start over instead of resuming a run in --out")
    args = p.parse_args(argv)
    try:
        text = run_all(args.out, args.quick, args.device, args.fresh)
    except ValueError as e:  # a run with other settings in --out, an unknown or absent device, an unusable --out
        p.error(str(e))
    print(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
