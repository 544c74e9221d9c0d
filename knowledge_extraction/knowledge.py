"""Knowledge bases: the final TPPs of successful plans, stored parameter-wise.

A knowledge base is a versioned JSON file::

    {"format": "rtenv-knowledge", "version": 1,
     "source": {"policy": ..., "scenario": ..., "cohort": ..., "seeds": [...], "episodes": N,
                "successful": K, "target": "PTV", "created": ISO time},
     "parameters": {"t_PTV": {"kind": "t", "values": [...K floats...], "median": ..., "q1": ...,
                              "q3": ..., "min": ..., "max": ...}, ...,
                    "lambda_bladder": {..., "geometric_mean": ..., "geometric_sd": ...}}}

Values are in the TPPs' own units (:mod:`rtenv.tpp`): ``t_*`` as fractions of the prescription
dose, ``V_*`` as fractions of the structure's volume, ``lambda_*`` unitless weights. They are kept
per parameter and sorted, so no per-patient TPP vector can be read back from the
file (the M2M seed's parameter-wise serialisation). Weights (``lambda_*``) also carry geometric
statistics. ``source.target`` names the target's key in the TPP names (files without it: the one
key not in lower case, as TPP names lower-case the organs' keys). :func:`load_knowledge` validates
the schema, each value against its TPP's range (:data:`rtenv.tpp.RANGES`, by kind and role), the
order of the values and the statistics against them, and fails with a message naming the problem.
"""

from __future__ import annotations

import itertools
import json
import math
import re
import warnings
from collections.abc import Sequence
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np

from rtenv.case import PlanningCase
from rtenv.rollout import EpisodeRecord, Policy, evaluate_cohort, logged_episodes
from rtenv.runlog import RunLog, read_json, write_atomic
from rtenv.tpp import RANGES

FORMAT = "rtenv-knowledge"
VERSION = 1


class KnowledgeFormatError(ValueError):
    """A knowledge-base file is not valid."""


def _stats(values: list[float], kind: str) -> dict[str, Any]:
    v = np.sort(np.asarray(values, dtype=np.float64))
    out: dict[str, Any] = {"kind": kind, "values": [float(x) for x in v], "median": float(np.median(v)),
                           "q1": float(np.quantile(v, 0.25)), "q3": float(np.quantile(v, 0.75)),
                           "min": float(v[0]), "max": float(v[-1])}
    if kind == "lambda":
        logs = np.log(v)
        out["geometric_mean"] = float(np.exp(logs.mean()))
        out["geometric_sd"] = float(np.exp(logs.std(ddof=1))) if v.size > 1 else 1.0
    return out


def build_knowledge(records: Sequence[EpisodeRecord], source: dict[str, Any]) -> dict[str, Any]:
    """A knowledge base from episode records: the final TPPs of the full-score ones."""
    good = [r for r in records if r.full_score]
    if not good:
        raise ValueError(f"no full-score plan among {len(records)} episodes: nothing to export")
    names = list(good[0].final_tpp)
    for r in good:
        if set(r.final_tpp) != set(names):  # e.g. records of two scenarios
            raise ValueError(f"full-score records differ in their TPPs: {r.case} has {sorted(r.final_tpp)}, "
                             f"{good[0].case} has {sorted(names)}; build one knowledge base per scenario")
    params = {n: _stats([r.final_tpp[n] for r in good], n.split("_", 1)[0]) for n in names}
    src = {**source, "episodes": len(records), "successful": len(good),
           # plans at full score before any step: their TPPs are the start's, not the policy's choice
           "full_score_at_start": sum(r.steps == 0 for r in good),
           "target": names[0].split("_", 1)[1],  # TPP names list the target first (rtenv.tpp.tpp_names)
           "created": datetime.now(timezone.utc).isoformat(timespec="seconds")}
    if src["full_score_at_start"] == len(good):
        warnings.warn(f"every full-score plan ({len(good)} of {len(records)} episodes) was at full score from its "
                      "start TPPs, so this base holds the start TPPs, not TPPs the policy chose", stacklevel=2)
    return {"format": FORMAT, "version": VERSION, "source": src, "parameters": params}


def save_knowledge(kb: dict[str, Any], path: str | Path) -> Path:
    """Validate ``kb`` and write it as JSON to ``path`` (in one piece: an interrupted save leaves
    the old file); returns the path."""
    validate_knowledge(kb)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    write_atomic(path, json.dumps(kb, indent=2))
    return path


def target_key(kb: dict[str, Any]) -> str | None:
    """The key of the knowledge base's target in its TPP names (``t_PTV`` -> ``PTV``):
    ``source.target`` where recorded, else the one key that is not in lower case (TPP names
    lower-case the organs' keys and keep the target's); ``None`` if there is none."""
    recorded = kb["source"].get("target")
    if recorded is not None:
        return recorded
    keys = {name.split("_", 1)[1] for name in kb["parameters"]}
    upper = sorted(k for k in keys if not k.islower())
    return upper[0] if len(upper) == 1 else None


def _is_number(x: Any) -> bool:
    """A finite JSON number (an integer beyond float range is not)."""
    if not isinstance(x, (int, float)) or isinstance(x, bool):
        return False
    try:
        return math.isfinite(x)
    except OverflowError:
        return False


def validate_knowledge(kb: Any, where: str = "knowledge base") -> None:
    """Raise :class:`KnowledgeFormatError` naming the first problem."""
    if not isinstance(kb, dict):
        raise KnowledgeFormatError(f"{where}: top level must be an object")
    if kb.get("format") != FORMAT:
        raise KnowledgeFormatError(f"{where}: format is {kb.get('format')!r}, expected {FORMAT!r}")
    if kb.get("version") != VERSION:
        raise KnowledgeFormatError(f"{where}: version {kb.get('version')!r} is not supported (reads {VERSION})")
    for key in ("source", "parameters"):
        if not isinstance(kb.get(key), dict):
            raise KnowledgeFormatError(f"{where}: missing object {key!r}")
    if not kb["parameters"]:
        raise KnowledgeFormatError(f"{where}: 'parameters' is empty")
    for name in kb["parameters"]:
        if not re.fullmatch(r"(t|lambda|V)_\w+", name):
            raise KnowledgeFormatError(f"{where}: parameter {name!r} is not a TPP name (t_*, lambda_* or V_*)")
    target = kb["source"].get("target")
    keys = {name.split("_", 1)[1] for name in kb["parameters"]}
    if target is not None and not isinstance(target, str):
        raise KnowledgeFormatError(f"{where}: source target must be a structure key (a string), got {target!r}")
    if target is not None and target not in keys:
        raise KnowledgeFormatError(f"{where}: source target {target!r} names no parameter's structure "
                                   f"(structures: {sorted(keys)})")
    target = target_key(kb)
    for name, p in kb["parameters"].items():
        kind, key = name.split("_", 1)
        if not isinstance(p, dict) or not isinstance(p.get("values"), list) or not p["values"]:
            raise KnowledgeFormatError(f"{where}: parameter {name!r} needs a non-empty 'values' list")
        if p.get("kind", kind) != kind:
            raise KnowledgeFormatError(f"{where}: parameter {name!r} has kind {p['kind']!r}, its name says {kind!r}")
        vals = p["values"]
        if not all(_is_number(x) for x in vals):
            raise KnowledgeFormatError(f"{where}: parameter {name!r} has values that are not finite numbers")
        lo, hi, lo_inclusive = RANGES[(kind, key == target)]
        inside = [lo <= x <= hi if lo_inclusive else lo < x <= hi for x in vals]
        if not all(inside):
            bad = vals[inside.index(False)]
            role = "target" if key == target else "organ"
            raise KnowledgeFormatError(f"{where}: parameter {name!r} has value {bad!r} outside its {role} range "
                                       f"{'[' if lo_inclusive else '('}{lo:g}, {hi:g}]")
        if any(b < a for a, b in itertools.pairwise(vals)):
            raise KnowledgeFormatError(f"{where}: parameter {name!r} has values that are not sorted in ascending "
                                       "order (a base keeps them sorted, so that no per-plan TPP vector can be "
                                       "read back)")
        for stat in ("median", "q1", "q3", "min", "max"):
            if not _is_number(p.get(stat)):
                raise KnowledgeFormatError(f"{where}: parameter {name!r} lacks statistic {stat!r} "
                                           f"(a finite number), got {p.get(stat)!r}")
        # the statistics are printed and plotted as stored: they must be those of the values
        expected = _stats(vals, kind)
        for stat, value in expected.items():
            if stat in ("kind", "values") or stat not in p:
                continue
            if not (_is_number(p[stat]) and math.isclose(p[stat], value, rel_tol=1e-9, abs_tol=1e-12)):
                raise KnowledgeFormatError(f"{where}: parameter {name!r} has {stat} {p[stat]!r}, but its values "
                                           f"give {value:.6g}")


BUILTIN_DIR = Path(__file__).parent / "data"


def builtin_knowledge() -> list[str]:
    """Names of the knowledge bases shipped with the package (usable wherever a path is)."""
    return sorted(p.stem for p in BUILTIN_DIR.glob("*.json"))


def load_knowledge(path: str | Path) -> dict[str, Any]:
    """Load and validate a knowledge base: a JSON file, or the name of a shipped one
    (:func:`builtin_knowledge`)."""
    file = Path(path)
    if not file.is_file() and (BUILTIN_DIR / f"{path}.json").is_file():
        file = BUILTIN_DIR / f"{path}.json"
    if not file.is_file():
        raise FileNotFoundError(f"no knowledge base at {file} (shipped ones: {', '.join(builtin_knowledge())})")
    try:
        kb = read_json(file, "knowledge base (JSON)")
    except ValueError as exc:  # not UTF-8 JSON (e.g. an image given by mistake)
        raise KnowledgeFormatError(str(exc)) from None
    validate_knowledge(kb, str(file))
    return kb


def knowledge_table(kb: dict[str, Any]) -> str:
    """A readable table: one row per TPP with its distribution."""
    src = kb["source"]
    at_start = src.get("full_score_at_start")
    lines = [f"knowledge base: {src.get('policy')} on {src.get('scenario')} {src.get('cohort')} "
             f"({src.get('successful')}/{src.get('episodes')} full-score plans"
             + (f"; {at_start} of them at full score from the start, before any step" if at_start else "") + ")",
             f"{'parameter':<18}{'n':>4}{'min':>10}{'q1':>10}{'median':>10}{'q3':>10}{'max':>10}"]
    for name, p in kb["parameters"].items():
        lines.append(f"{name:<18}{len(p['values']):>4}" + "".join(f"{p[s]:>10.4g}" for s in
                                                                 ("min", "q1", "median", "q3", "max")))
    return "\n".join(lines)


def export_search_knowledge(scenario: str = "S1", cohort: str = "knowledge", generations: int = 20,
                            popsize: int = 8, seed: int = 0, cases: int | Sequence[PlanningCase] | None = None,
                            log: RunLog | None = None, device: str = "cpu",
                            ) -> tuple[dict[str, Any], list[EpisodeRecord]]:
    """The knowledge base of CMA-ES (:func:`rtenv.search.search_episode`) from the SPEC default
    TPPs on every case of ``cohort`` (or its first ``cases``, or your own ``cases``: a sequence of
    :class:`~rtenv.case.PlanningCase` with the scenario's structures, recorded as cohort
    ``"own"``); returns it and the episode records. A ``log`` keeps each finished case's record
    and skips those already there (as in :func:`rtenv.rollout.evaluate_cohort`); ``device`` is the
    TPS's torch device."""
    from rtenv.env import TuningCore
    from rtenv.scenarios import cohort_size
    from rtenv.search import search_episode
    from rtenv.tpp import TPP

    # own cases replace the cohort (the core's cohort is then "own")
    core = TuningCore(scenario, action_mode="continuous", cohort=cohort, cases=cases or cohort_size(scenario, cohort),
                      device=device)
    cohort, n = core.cohort, len(core.case_indices)
    start = TPP.default(core.structures).values
    records = logged_episodes(
        n, lambda i: search_episode(core, (cohort, i), start, generations, popsize, seed=seed + i), log)
    kb = build_knowledge(records, {"policy": f"search:cma-es(popsize={popsize})", "scenario": scenario,
                                   "cohort": cohort, "start": "default", "max_steps": generations,
                                   "seeds": [seed + i for i in range(n)]})
    return kb, records


def export_knowledge(policy: Policy, policy_name: str, scenario: str = "S1", cohort: str = "knowledge",
                     start: str = "default", max_steps: int = 20, seed: int = 0,
                     log: RunLog | None = None, cases: Sequence[PlanningCase] | None = None,
                     device: str = "cpu") -> tuple[dict[str, Any], dict]:
    """Run ``policy`` on every case of ``cohort`` (or on your own ``cases``, a sequence of
    :class:`~rtenv.case.PlanningCase` with the scenario's structures, recorded as cohort
    ``"own"``; the base keeps no case name) and build the knowledge base of its full-score plans;
    returns the knowledge base and the evaluation summary. A ``log`` makes the run resumable
    (:func:`rtenv.rollout.evaluate_cohort`); ``device`` is the TPS's torch device (the policy's
    is the caller's)."""
    summary = evaluate_cohort(policy, scenario, cohort=cohort, cases=cases, start=start, max_steps=max_steps,
                              seed=seed, log=log, device=device)
    cohort = summary["cohort"]
    records = [EpisodeRecord(**c) for c in summary["cases"]]
    kb = build_knowledge(records, {"policy": policy_name, "scenario": scenario, "cohort": cohort, "start": start,
                                   "max_steps": max_steps, "seeds": [seed + i for i in range(len(records))]})
    return kb, summary
