"""TPS speed: our ADMM (single, warm, batched) against reference solvers and the SpMV bound.

    python -m benchmarks.tps_speed --scenario S1 --json OUT.json [--device cpu|cuda] [--repeats 5]

Side by side in one run, on the scenario's default case (test cohort, case 0):

(a) ADMM, one plan: cold start, and warm start as the environments do it (from the
    ``warm_start`` of the plan one env step away: t_PTV one step up), median of
    repeats, for the benchmark TPPs (every structure active) and the SPEC default TPPs; and the
    benchmark TPPs' cold solve with ``ADMMSettings(precond_every=10)``, with its objective change;
(b) ADMM batched at B = 8, 32, 64 random-start TPP vectors, per-plan time, against the same
    vectors solved one by one (interleaved rounds, medians);
(c) the frozen convex sub-problem (active sets and covered voxels fixed at our solution): our
    ADMM at the default settings and run to convergence, CVXPY + Clarabel, CVXPY + OSQP and scipy
    L-BFGS-B (coverage by an augmented Lagrangian; :mod:`rtenv.reference`), each timed once
    (CVXPY imported beforehand; on the CPU whatever ``--device``, as ``reference_device`` says),
    with objectives, statuses and the relative gap to Clarabel; and,
    at matched accuracy, the time our ADMM needs to come within 1 % of Clarabel's objective
    (doubling the iteration count from 40 up to 5120; ``null`` if it does not get there), against
    the references that converged to within 1 % of it themselves;
(d) the sparse-matvec bound: the timed cold solve's outer iterations x 2 SpMV (one D x and one
    D^T y product of the optimisation matrix), the same per CG step (each needs one product with
    D^T diag(a) D), and for every product the solver makes;
(e) ``--scenario TG119`` only: pyRadPlan on the same phantom, beams and dose grid: its dose-influence
    build and its own fluence optimisation (:data:`PYRADPLAN_OBJECTIVES`, its default solver; both
    on the CPU, ``pyradplan_device``),
    the plan scored with our protocol; and our ADMM on the case built from that same pyRadPlan
    matrix (rows restricted, truncated; :mod:`rtenv.tg119`).

The JSON is rewritten after each stage, so an interrupted run keeps what it measured.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import math
import statistics
import time
from pathlib import Path

import numpy as np
import torch

from benchmarks.machine import cpu_model, device_name, speedup_spread
from rtenv.env import ACTION_FACTORS
from rtenv.reference import import_cvxpy, solve_reference
from rtenv.runlog import check_output_path, write_atomic
from rtenv.scenarios import SCENARIOS, load_case
from rtenv.tpp import RANGES, TPP
from rtenv.tps import TPS, ADMMSettings, resolve_device, spmm

# a moderately aggressive TPP vector: every structure has an active set
S1_LIKE = {"t": (1.03, 0.7), "lambda": (5.0, 3.0), "V": (0.15, 0.5)}


def benchmark_tpp(structures: tuple[str, ...]) -> TPP:
    """The benchmark's fixed TPPs: target (t, lambda, V) = (1.03, 5, 0.15), OARs (0.7, 3, 0.5)."""
    n = len(structures)
    values = [S1_LIKE[k][0] if i == 0 else S1_LIKE[k][1] for k in ("t", "lambda", "V") for i in range(n)]
    return TPP(structures, np.array(values))


def neighbour(tpp: TPP) -> TPP:
    """``tpp`` one discrete env step away: t_PTV one step up (x1.01, at most 1.2)."""
    return tpp.replace(t_PTV=min(tpp["t_PTV"] * ACTION_FACTORS[("t", True)][0], RANGES[("t", True)][1]))


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)  # the device timed, which need not be the current one


def _once(fn, device: torch.device) -> tuple[float, object]:
    """Wall time (ms) of one ``fn()`` call and its result."""
    _sync(device)
    t0 = time.perf_counter()
    out = fn()
    _sync(device)
    return 1000 * (time.perf_counter() - t0), out


def _time(fn, repeats: int, device: torch.device) -> tuple[float, object]:
    """Median wall time (ms) of ``fn()`` over ``repeats`` runs after one warm-up, and its last result."""
    out = fn()
    times = []
    for _ in range(repeats):
        ms, out = _once(fn, device)
        times.append(ms)
    return statistics.median(times), out


def check_settings(repeats: int, batches: tuple[int, ...]) -> None:
    """Raise ``ValueError`` unless ``repeats`` >= 1 and there is at least one batch size, all >= 1."""
    if not (isinstance(repeats, int) and repeats >= 1):
        raise ValueError(f"repeats (--repeats) = {repeats!r} must be an integer >= 1")
    if not batches or not all(isinstance(b, int) and b >= 1 for b in batches):
        raise ValueError(f"batch sizes (--batches) {list(batches)} must be integers >= 1")


def check_reference_solvers() -> None:
    """Raise an ImportError naming the ``bench`` extra unless part (c)'s solvers are installed:
    CVXPY with Clarabel and OSQP (each its own package)."""
    import_cvxpy()
    for solver in ("clarabel", "osqp"):
        if importlib.util.find_spec(solver) is None:
            raise ImportError(f"the {solver} reference solver is not installed: pip install 'rtenv[bench]'")


def run(scenario: str, device: str, repeats: int, json_path: str | Path | None, batches: tuple[int, ...]) -> dict:
    check_settings(repeats, batches)
    check_reference_solvers()  # part (c) needs them: found out before the timings, not after them
    json_path = None if json_path is None else check_output_path(json_path, "--json", "file")
    case = load_case(scenario, "test", 0)
    tps = TPS(case, device=device)
    dev = tps.device
    tpp = benchmark_tpp(tuple(case.structure_names))
    res: dict = {
        "scenario": scenario, "case": case.name, "device": str(dev),
        "device_name": device_name(dev), "cpu_model": cpu_model(), "torch_threads": torch.get_num_threads(),
        "beamlets": case.n_beamlets, "opt_voxels": tps.n_opt,
        "nnz_opt": int(tps._D.values().numel()), "tpp": tpp.to_dict(), "settings": vars(tps.settings).copy(),
    }

    def save() -> None:
        if json_path is not None:
            json_path.parent.mkdir(parents=True, exist_ok=True)
            write_atomic(json_path, json.dumps(res, indent=2))  # each stage as it finishes, never a torn file

    # (a) single plan, cold and warm
    res["admm_ms"], cold = _time(lambda: tps.optimize(tpp), repeats, dev)
    res["admm_iterations"] = int(cold.iterations[0])
    res["admm_converged"] = bool(cold.converged[0])
    start = tps.optimize(neighbour(tpp)).warm_start[0]
    res["admm_warm_ms"], warm = _time(lambda: tps.optimize(tpp, x0=start), repeats, dev)
    res["admm_warm_iterations"] = int(warm.iterations[0])
    default = TPP.default(case.structure_names)
    res["admm_default_ms"], dcold = _time(lambda: tps.optimize(default), repeats, dev)
    res["admm_default_iterations"] = int(dcold.iterations[0])
    dstart = tps.optimize(neighbour(default)).warm_start[0]
    res["admm_default_warm_ms"], dwarm = _time(lambda: tps.optimize(default, x0=dstart), repeats, dev)
    res["admm_default_warm_iterations"] = int(dwarm.iterations[0])
    # the cold solve with the preconditioner rebuilt every 10 outer iterations instead of every one
    lagged = TPS(case, device=device, settings=ADMMSettings(precond_every=10))
    res["admm_precond_every_10_ms"], lag = _time(lambda: lagged.optimize(tpp), repeats, dev)
    res["admm_precond_every_10_objective_change"] = float(lag.objective[0] / cold.objective[0] - 1)
    save()

    # (b) batches of random-start TPPs against the same vectors one by one, interleaved in rounds
    # (each round times every plan alone, then each batch), so that a change in machine speed
    # during the run hits both sides alike; the speedup of a round compares a batch with the
    # single solves of the same plans, and the figures are medians over rounds
    rng = np.random.default_rng(0)
    pool = [TPP.random(case.structure_names, rng) for _ in range(max(batches))]
    for b in batches:
        tps.optimize(pool[:b])  # warm-up
    rounds = max(1, (repeats + 1) // 2)
    single_rounds: list[list[float]] = []
    batch_rounds: dict[int, list[float]] = {b: [] for b in batches}
    for _ in range(rounds):
        single_rounds.append([_once(lambda t=t: tps.optimize(t), dev)[0] for t in pool])
        for b in batches:
            batch_rounds[b].append(_once(lambda b=b: tps.optimize(pool[:b]), dev)[0])
    res["batch_rounds"] = rounds
    res["single_ms_per_plan"] = statistics.median(statistics.mean(s) for s in single_rounds)
    res["batch_ms_per_plan"], res["batch_speedup"], res["batch_speedup_rounds"] = {}, {}, {}
    for b in batches:
        res["batch_ms_per_plan"][str(b)] = statistics.median(batch_rounds[b]) / b
        ratios = [sum(s[:b]) / ms for s, ms in zip(single_rounds, batch_rounds[b], strict=True)]
        res["batch_speedup_rounds"][str(b)] = ratios
        res["batch_speedup"][str(b)] = statistics.median(ratios)
    save()

    # (c) the frozen convex sub-problem
    frozen = tps.freeze(tpp, cold.fluence[0])
    sub = tps.subproblem(tpp, frozen)
    keys = ("reference_ms", "reference_objective", "reference_coverage_violation", "reference_status",
            "reference_converged")
    for key in keys:
        res[key] = {}
    res["reference_device"] = "cpu"  # CVXPY and scipy solve on the host, whatever device our ADMM uses
    for solver in ("clarabel", "osqp", "lbfgsb"):
        sol = solve_reference(sub, solver)
        for key, value in zip(keys, (1000 * sol.seconds, sol.objective, sol.coverage_violation, sol.status,
                                     sol.converged), strict=True):
            res[key][solver] = value
    if not res["reference_converged"]["clarabel"]:
        raise RuntimeError(f"Clarabel did not solve the frozen sub-problem: {res['reference_status']['clarabel']}")
    best = res["reference_objective"]["clarabel"]
    res["admm_frozen_ms"], frz = _time(lambda: tps.optimize(tpp, frozen=frozen), repeats, dev)
    res["admm_frozen_objective"] = tps.objective_of(frz.fluence[0], sub)
    long = TPS(case, device=device, settings=ADMMSettings(max_iter=1000, tol=1e-7))
    res["admm_frozen_1000_ms"], frz_long = _time(lambda: long.optimize(tpp, frozen=frozen), 1, dev)
    res["admm_frozen_1000_objective"] = tps.objective_of(frz_long.fluence[0], sub)
    res["speedup_vs_reference"] = {s: ms / res["admm_frozen_ms"] for s, ms in res["reference_ms"].items()}
    res["objective_gap"] = (res["admm_frozen_objective"] - best) / best
    res["objective_gap_1000_iterations"] = (res["admm_frozen_1000_objective"] - best) / best
    res["objective_gap_reference"] = {s: (o - best) / best for s, o in res["reference_objective"].items()}
    save()
    # the same comparison at matched accuracy: our ADMM until within 1 % of Clarabel's optimum
    res["admm_frozen_to_1pct"] = None
    for iterations in (40 * 2 ** k for k in range(8)):
        solver = TPS(case, device=device, settings=ADMMSettings(max_iter=iterations, tol=1e-12))
        ms, plan = _once(lambda solver=solver: solver.optimize(tpp, frozen=frozen), dev)
        gap = (tps.objective_of(plan.fluence[0], sub) - best) / best
        res["admm_frozen_to_1pct"] = {"iterations": iterations, "ms": ms, "objective_gap": gap}
        if gap <= 0.01:
            break
    reached = res["admm_frozen_to_1pct"]["objective_gap"] <= 0.01
    accurate = [s for s in res["reference_ms"]
                if res["reference_converged"][s] and res["objective_gap_reference"][s] <= 0.01]
    res["speedup_vs_reference_at_1pct"] = (
        {s: res["reference_ms"][s] / res["admm_frozen_to_1pct"]["ms"] for s in accurate} if reached else None)
    save()

    # (d) the sparse-matvec bound
    x = torch.rand(case.n_beamlets, 1, device=dev)
    r = torch.rand(tps.n_opt, 1, device=dev)
    spmv_ms, _ = _time(lambda: (spmm(tps._D, x), spmm(tps._Dt, r)), 50, dev)  # the solver's own products
    res["spmv_pair_ms"] = spmv_ms
    res["spmv_bound_ms"] = res["admm_iterations"] * spmv_ms
    # the same bound per CG step (each CG step needs one product with D^T diag(a) D: 2 SpMV)
    res["spmv_cg_bound_ms"] = res["admm_iterations"] * tps.settings.cg_steps * spmv_ms
    res["admm_over_spmv_cg_bound"] = res["admm_ms"] / res["spmv_cg_bound_ms"]
    # sparse products per outer iteration: the residual, two per CG step but the last (one), and
    # the preconditioner every `precond_every` iterations; a pair costs `spmv_ms`
    cfg = tps.settings
    products = 2 * cfg.cg_steps + math.ceil(res["admm_iterations"] / cfg.precond_every) / res["admm_iterations"]
    res["sparse_products_per_iteration"] = products
    res["spmv_all_products_ms"] = res["admm_iterations"] * products / 2 * spmv_ms
    res["admm_over_spmv_bound"] = res["admm_ms"] / res["spmv_bound_ms"]
    res["admm_over_all_products"] = res["admm_ms"] / res["spmv_all_products_ms"]
    save()

    if scenario == "TG119":
        res["pyradplan"] = pyradplan_stage(case, tpp, device, repeats)
        save()
    return res


# pyRadPlan objectives for (e), doses in Gy: (structure, objective class, priority, parameter)
PYRADPLAN_OBJECTIVES = (("OuterTarget", "SquaredDeviation", 100.0, 50.0), ("Core", "SquaredOverdosing", 30.0, 20.0),
                        ("BODY", "SquaredOverdosing", 10.0, 30.0))


def pyradplan_stage(case, tpp: TPP, device: str, repeats: int) -> dict:
    """(e): pyRadPlan's dose-influence build and fluence optimisation on TG119 (times in ms), and
    our ADMM on the case built from the same pyRadPlan matrix."""
    import warnings

    from pyRadPlan import fluence_optimization
    from pyRadPlan.optimization import objectives as objs
    from pyRadPlan.optimization.solvers import get_available_solvers

    from rtenv.evaluation import score_plan
    from rtenv.scenarios import get_scenario
    from rtenv.tg119 import build_tg119_case, pyradplan_row_order, run_pyradplan

    sc = get_scenario("TG119")
    run_ = run_pyradplan(sc)
    M = run_.dij.physical_dose.flat[0]
    out: dict = {"pyradplan_device": "cpu", "dij_ms": 1000 * run_.seconds, "voxels": int(M.shape[0]),
                 "beamlets": int(M.shape[1]), "nnz": int(M.nnz), "objectives": [list(o) for o in PYRADPLAN_OBJECTIVES],
                 "available_solvers": list(get_available_solvers())}
    by_name = {v.name: v for v in run_.cst.vois}
    for name, cls, priority, dose_gy in PYRADPLAN_OBJECTIVES:
        kw = {"d_ref": dose_gy} if cls == "SquaredDeviation" else {"d_max": dose_gy}
        by_name[name].objectives = [getattr(objs, cls)(priority=priority, **kw)]
    t0 = time.perf_counter()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        fluence = np.asarray(fluence_optimization(run_.ct, run_.cst, run_.stf, run_.dij, run_.pln))
    out["optimisation_ms"] = 1000 * (time.perf_counter() - t0)
    # score their plan with our protocol on our case's rows (same grid), rescaled to PTV D95 = Rx
    dose = np.asarray(M @ fluence, dtype=np.float32)[pyradplan_row_order(run_, _grid_of(case))][case.dose_rows]
    dose *= case.coverage_scale(dose)
    out["score"] = score_plan(case, dose).total
    # our ADMM on the case built from the same pyRadPlan matrix
    pcase = build_tg119_case(sc, engine="pyradplan", name="TG119-pyradplan", run=run_)
    ptps = TPS(pcase, device=device)
    out["case_nnz"] = int(pcase.dose_influence.nnz)
    out["case_truncation"] = pcase.metadata["truncation"]
    out["admm_ms"], cold = _time(lambda: ptps.optimize(tpp), repeats, ptps.device)
    out["admm_iterations"] = int(cold.iterations[0])
    out["admm_score"] = score_plan(pcase, cold.dose[0]).total
    default = TPP.default(pcase.structure_names)
    out["admm_default_ms"], dcold = _time(lambda: ptps.optimize(default), repeats, ptps.device)
    out["admm_default_iterations"] = int(dcold.iterations[0])
    return out


def _grid_of(case):
    from rtenv.dose_engine import Grid

    return Grid(tuple(case.grid_shape), tuple(case.voxel_mm), tuple(case.metadata["grid_origin_mm"]))


def table(res: dict) -> str:
    """The readable table of a run's JSON; a JSON from an earlier version of this benchmark (the
    committed H100 ones) lacks some stages, whose lines are left out."""
    lines = [f"TPS speed: {res['case']} on {res['device_name']} ({res['beamlets']} beamlets, "
             f"{res['opt_voxels']} optimisation voxels, nnz {res['nnz_opt']:,})", ""]
    lines.append(f"ADMM single plan, cold      {res['admm_ms']:9.2f} ms  ({res['admm_iterations']} iterations)")
    lines.append(f"ADMM single plan, warm      {res['admm_warm_ms']:9.2f} ms  "
                 f"({res['admm_warm_iterations']} iterations, from the plan one env step away)")
    lines.append(f"ADMM default TPPs, cold     {res['admm_default_ms']:9.2f} ms  "
                 f"({res['admm_default_iterations']} iterations)")
    lines.append(f"ADMM default TPPs, warm     {res['admm_default_warm_ms']:9.2f} ms  "
                 f"({res['admm_default_warm_iterations']} iterations)")
    if "admm_precond_every_10_ms" in res:
        lines.append(f"ADMM, precond_every=10      {res['admm_precond_every_10_ms']:9.2f} ms  "
                     f"(objective {100 * res['admm_precond_every_10_objective_change']:+.1f} % vs default)")
    lines.append(f"ADMM one by one (random)    {res['single_ms_per_plan']:9.2f} ms/plan")
    for b, ms in res["batch_ms_per_plan"].items():
        lines.append(f"ADMM batched B={b:<3}         {ms:9.2f} ms/plan  ({res['batch_speedup'][b]:.1f}x"
                     f"{speedup_spread(res.get('batch_speedup_rounds', {}).get(b, []))})")
    lines.append("")
    # (a JSON from before the stages' devices were recorded: its references ran on the CPU too)
    lines.append(f"frozen convex sub-problem      time (ms)   objective    gap vs Clarabel"
                 f"  (references on {res.get('reference_device', 'cpu')})")
    lines.append(f"  ADMM, default settings     {res['admm_frozen_ms']:10.2f}   {res['admm_frozen_objective']:.4e}"
                 f"   {100 * res['objective_gap']:+.2f} %")
    lines.append(f"  ADMM, 1000 iterations      {res['admm_frozen_1000_ms']:10.2f}   "
                 f"{res['admm_frozen_1000_objective']:.4e}   {100 * res['objective_gap_1000_iterations']:+.2f} %")
    for s in res["reference_ms"]:
        lines.append(f"  {s:<26} {res['reference_ms'][s]:10.2f}   {res['reference_objective'][s]:.4e}"
                     f"   {100 * res['objective_gap_reference'][s]:+.2f} %"
                     f"  (ADMM {res['speedup_vs_reference'][s]:.0f}x faster"
                     + (f"; {res['reference_status'][s]})" if "reference_status" in res else ")"))
    if "admm_frozen_to_1pct" in res:
        to1 = res["admm_frozen_to_1pct"]
        at1 = res["speedup_vs_reference_at_1pct"]
        lines.append(f"  ADMM, {to1['iterations']} iterations{'':<{15 - len(str(to1['iterations']))}}"
                     f"{to1['ms']:10.2f}   {'':10}   {100 * to1['objective_gap']:+.2f} %  "
                     + ("(matched accuracy: " + ", ".join(f"{s} {v:.2g}x" for s, v in at1.items()) + ")" if at1
                        else "(not within 1 % after 5120 iterations)"))
    lines.append("")
    lines.append(f"SpMV pair (D x + D^T y)     {res['spmv_pair_ms']:9.4f} ms")
    lines.append(f"bound: iterations x 2 SpMV  {res['spmv_bound_ms']:9.2f} ms  "
                 f"(ADMM {res['admm_over_spmv_bound']:.1f}x)")
    if "spmv_cg_bound_ms" in res:
        lines.append(f"bound: CG steps x 2 SpMV    {res['spmv_cg_bound_ms']:9.2f} ms  "
                     f"(ADMM {res['admm_over_spmv_cg_bound']:.1f}x)")
    per_iteration = (f"{res['sparse_products_per_iteration']:.2f} products" if "sparse_products_per_iteration" in res
                     else f"{res['sparse_pairs_per_iteration']:.2f} pairs")  # a JSON from before products were counted
    lines.append(f"all sparse products         {res['spmv_all_products_ms']:9.2f} ms  "
                 f"(ADMM {res['admm_over_all_products']:.1f}x; {per_iteration}/iteration)")
    if "pyradplan" in res:
        p = res["pyradplan"]
        lines += ["", f"pyRadPlan on TG119 ({p['voxels']:,} voxels x {p['beamlets']} beamlets, nnz {p['nnz']:,}; "
                      f"pyRadPlan on {p.get('pyradplan_device', 'cpu')})",
                  f"  pyRadPlan dose influence   {p['dij_ms']:10.1f} ms",
                  f"  pyRadPlan fluence opt.     {p['optimisation_ms']:10.1f} ms  (score {p['score']:.2f}; "
                  f"our ADMM on its matrix {p['optimisation_ms'] / p['admm_ms']:.0f}x faster, other objectives)",
                  f"  our ADMM, its matrix       {p['admm_ms']:10.1f} ms  ({p['admm_iterations']} iterations, "
                  f"score {p['admm_score']:.2f}; case nnz {p['case_nnz']:,})",
                  f"  our ADMM, its matrix, default TPPs {p['admm_default_ms']:8.1f} ms"]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--scenario", default="S1", choices=sorted(SCENARIOS))
    p.add_argument("--device", default="cpu")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--batches", default="8,32,64", help="comma-separated batch sizes")
    p.add_argument("--json", default=None, help="write the figures here (JSON)")
    args = p.parse_args(argv)
    try:
        batches = tuple(int(b) for b in args.batches.split(","))
    except ValueError:
        p.error(f"--batches {args.batches!r} must be comma-separated integers >= 1")
    try:
        check_settings(args.repeats, batches)
        resolve_device(args.device)
        if args.json is not None:  # run() checks it too, but main leaves run()'s own errors unwrapped
            check_output_path(args.json, "--json", "file")
    except ValueError as e:  # counts out of range, an unknown or absent device, an unusable --json path
        p.error(str(e))
    try:
        check_reference_solvers()
    except ImportError as e:  # the reference solvers' extra is not installed
        p.error(str(e))
    res = run(args.scenario, args.device, args.repeats, args.json, batches)
    print(table(res))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
