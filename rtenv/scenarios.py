"""The seed papers' planning scenarios as named presets, their patient cohorts, and case building.

=========  ===========================================  ==========================  ========
name       structures                                   beams                       protocol
=========  ===========================================  ==========================  ========
``S1``     PTV, Bladder, Rectum                          7 coplanar (ACER planner)   prostate9
``S2``     S1 + FemoralHead_L, FemoralHead_R             180 coplanar, every 2 deg   prostate15
``S3``     PTV, Liver, Heart                             7 non-coplanar (CORT liver) liver4
``TG119``  PTV (C-shape), Core, Ring                     9 coplanar, every 40 deg    tg119
=========  ===========================================  ==========================  ========

``TG119`` is the AAPM TG-119 C-shape phantom from CORT as shipped in pyRadPlan: a single case
(index 0 of any cohort), built by :mod:`rtenv.tg119` (needs the ``pyradplan`` extra).

Cohorts (deterministic by seed, disjoint): ``knowledge`` (20 cases: the DRL agent's successful
plans become the knowledge base), ``test`` (10 cases: the Table 3 cases), ``train`` (an unbounded
pool). S1 and S2 share their prostate patients: case ``i`` of a cohort is the same anatomy in both.

Building a case computes its dose-influence matrix with :mod:`rtenv.dose_engine`; the result is
cached on disk (``$RTENV_CACHE_DIR`` or ``~/.cache/rtenv``) under a key that hashes everything
that determines it.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import scipy.sparse as sp
from tqdm.auto import tqdm

from rtenv.case import Beam, CaseFormatError, PlanningCase, Structure
from rtenv.dose_engine import ENGINE_VERSION, BeamModel, beam_influence, select_beamlets
from rtenv.phantom import GENERATOR_VERSION, Phantom, make_phantom
from rtenv.validation import is_integer


@dataclass(frozen=True)
class Scenario:
    """A planning scenario: site, structures, beam arrangement, prescription and protocol.

    Attributes:
        name: ``"S1"``, ``"S2"``, ``"S3"``.
        description: One line for listings.
        site: Phantom site.
        structures: Structures planned and scored (the first is the target).
        beams: ``(gantry_deg, couch_deg)`` per beam.
        prescription_gy: Total prescribed dose (Gy).
        fractions: Number of fractions.
        protocol: Scoring protocol name.
        beamlet_mm: Beamlet size at the isocentre plane (mm).
        margin_mm: Beamlet coverage margin around the target's beam's-eye view (mm).
        voxel_mm: Phantom voxel size (mm).
    """

    name: str
    description: str
    site: str
    structures: tuple[str, ...]
    beams: tuple[tuple[float, float], ...]
    prescription_gy: float
    fractions: int
    protocol: str
    beamlet_mm: float = 10.0
    margin_mm: float = 5.0
    voxel_mm: float = 5.0
    beam_model: BeamModel = field(default_factory=BeamModel)


ACER_PROSTATE_GANTRY = (0.0, 32.0, 64.0, 96.0, 264.0, 296.0, 328.0)
TG119_BEAMS = tuple((float(g), 0.0) for g in range(0, 360, 40))  # TG-119 C-shape: 9 fields, 40 deg apart
CORT_LIVER_BEAMS = ((58.0, 0.0), (106.0, 0.0), (212.0, 0.0), (328.0, 0.0), (216.0, 32.0), (226.0, -13.0), (296.0, 17.0))

SCENARIOS: dict[str, Scenario] = {
    "S1": Scenario(
        "S1", "prostate IMRT, PTV + bladder + rectum, 7 coplanar beams", "prostate",
        ("PTV", "Bladder", "Rectum"), tuple((g, 0.0) for g in ACER_PROSTATE_GANTRY), 79.2, 44, "prostate9",
    ),
    "S2": Scenario(
        "S2", "prostate IMRT, PTV + bladder + rectum + femoral heads, 180 coplanar beams", "prostate",
        ("PTV", "Bladder", "Rectum", "FemoralHead_L", "FemoralHead_R"),
        tuple((float(g), 0.0) for g in range(0, 360, 2)), 79.2, 44, "prostate15",
    ),
    "S3": Scenario(
        "S3", "liver IMRT, PTV + liver + heart, 7 non-coplanar beams (CORT liver angles)", "liver",
        ("PTV", "Liver", "Heart"), CORT_LIVER_BEAMS, 50.0, 25, "liver4",
    ),
    "TG119": Scenario(
        "TG119", "TG-119 C-shape phantom (CORT, via pyRadPlan), PTV + core + ring, 9 coplanar beams", "tg119",
        ("PTV", "Core", "Ring"), TG119_BEAMS, 50.0, 25, "tg119", beamlet_mm=5.0,
    ),
}

# cohort -> (size or None for unbounded, first phantom seed)
COHORTS: dict[str, tuple[int | None, int]] = {
    "knowledge": (20, 1000),
    "test": (10, 2000),
    "train": (None, 100_000),
}


def get_scenario(name: str) -> Scenario:
    """The preset named ``name`` (``S1``, ``S2``, ``S3``, ``TG119``)."""
    if not isinstance(name, str):
        hint = (" (an imported case goes to the environments as cases=[case], with the scenario whose "
                "structures it has)") if isinstance(name, PlanningCase) else ""
        raise ValueError(f"scenario must be a scenario name, one of {sorted(SCENARIOS)}; got a "
                         f"{type(name).__name__}{hint}")
    try:
        return SCENARIOS[name]
    except KeyError:
        raise ValueError(f"unknown scenario {name!r}; valid: {sorted(SCENARIOS)}") from None


def check_case_for_scenario(case: PlanningCase, scenario: str | Scenario) -> None:
    """Raise ``ValueError`` unless ``case`` (e.g. an imported one) has the scenario's structures,
    in its order (target first): what its TPPs, actions and observations are made of."""
    sc = get_scenario(scenario) if isinstance(scenario, str) else scenario
    if not isinstance(case, PlanningCase):
        raise TypeError(f"expected a PlanningCase, got {type(case).__name__}")
    if tuple(case.structure_names) != tuple(sc.structures):
        raise ValueError(
            f"case {case.name!r} has structures {tuple(case.structure_names)}; scenario {sc.name} works on "
            f"{tuple(sc.structures)}: import the case with these names, its OARs mapped in this order "
            "(rtenv.importers: structures={SOURCE: (ROLE, NAME)}; rtenv cases import --structures "
            "SOURCE=ROLE:NAME,...)")


def scenario_for_case(case: PlanningCase) -> str:
    """The name of the built-in scenario whose structures ``case`` has (in its order)."""
    names = tuple(case.structure_names)
    found = [sc.name for sc in SCENARIOS.values() if tuple(sc.structures) == names]
    if len(found) != 1:
        known = "; ".join(f"{sc.name}: {', '.join(sc.structures)}" for sc in SCENARIOS.values())
        raise ValueError(f"case {case.name!r} has structures {names}, which no scenario tunes; name a scenario or "
                         f"import the case with one scenario's structure names, in its order ({known})")
    return found[0]


def cohort_size(scenario: str | Scenario, cohort: str) -> int | None:
    """Number of cases of ``cohort`` for ``scenario`` (``None``: unbounded); ``TG119`` has one."""
    sc = get_scenario(scenario) if isinstance(scenario, str) else scenario
    if cohort not in COHORTS:
        raise ValueError(f"unknown cohort {cohort!r}; valid: {sorted(COHORTS)}")
    return 1 if sc.site == "tg119" else COHORTS[cohort][0]


def case_seed(cohort: str, index: int) -> int:
    """Phantom seed of case ``index`` of ``cohort``; raises on an unknown cohort or index."""
    if cohort not in COHORTS:
        raise ValueError(f"unknown cohort {cohort!r}; valid: {sorted(COHORTS)}")
    size, first = COHORTS[cohort]
    if not is_integer(index):
        raise ValueError(f"case index {index!r} must be an integer")
    index = int(index)
    if index < 0 or (size is not None and index >= size):
        hi = "inf" if size is None else size - 1
        raise ValueError(f"case index {index} is outside cohort {cohort!r}'s range [0, {hi}]")
    return first + index


def cache_dir() -> Path:
    """Where built cases are cached: ``$RTENV_CACHE_DIR`` or ``~/.cache/rtenv``."""
    return Path(os.environ.get("RTENV_CACHE_DIR", Path.home() / ".cache" / "rtenv"))


def _cache_key(scenario: Scenario, seed: int) -> str:
    spec = {
        "generator": GENERATOR_VERSION,
        "engine": ENGINE_VERSION,
        "seed": seed,
        "scenario": {k: v for k, v in asdict(scenario).items() if k not in ("name", "description")},
    }
    return hashlib.sha256(json.dumps(spec, sort_keys=True).encode()).hexdigest()[:20]


def load_case(
    scenario: str | Scenario, cohort: str = "test", index: int = 0, *, cache: bool = True,
    progress: bool = False,
) -> PlanningCase:
    """The built-in case ``index`` of ``cohort`` for ``scenario``, from the disk cache if present.

    Args:
        scenario: Scenario name or preset.
        cohort: ``"knowledge"``, ``"test"`` or ``"train"``.
        index: Case index within the cohort.
        cache: Read and write the on-disk cache.
        progress: Show a progress bar over beams while building.
    """
    sc = get_scenario(scenario) if isinstance(scenario, str) else scenario
    if sc.site == "tg119":  # the single real-phantom case
        from rtenv.tg119 import load_tg119_case
        return load_tg119_case(sc, cohort, index, cache=cache, progress=progress)
    seed = case_seed(cohort, index)
    name = f"{sc.name}-{cohort}-{index}"
    path = cache_dir() / "cases" / f"{name}-{_cache_key(sc, seed)}.rtcase"
    if cache and path.is_file():
        try:
            return PlanningCase.load(path)
        except CaseFormatError:
            path.unlink(missing_ok=True)  # a stale or torn cache entry (maybe removed by another worker): rebuild
    case = build_case(make_phantom(sc.site, seed, sc.voxel_mm), sc, name=name, progress=progress)
    if cache:
        case.save(path)
    return case


def build_case(phantom: Phantom, scenario: Scenario, name: str, progress: bool = False) -> PlanningCase:
    """Compute the dose-influence matrix of ``phantom`` under ``scenario``'s beams.

    The matrix rows are the union of the scenario's structures plus the body voxels of the axial
    slice through the isocentre (the PTV centroid), which figures use for dose slices.
    """
    t0 = time.perf_counter()
    grid = phantom.grid
    missing = [s for s in scenario.structures if s not in phantom.structures]
    if missing:
        raise ValueError(f"phantom ({phantom.site}) lacks structures {missing}; it has {list(phantom.structures)}")
    iso = phantom.centroid_mm(scenario.structures[0])
    k_iso = int(round((iso[2] - grid.origin_mm[2]) / grid.voxel_mm[0]))
    in_rows = np.zeros(grid.shape, dtype=bool)
    in_rows[k_iso] = phantom.body[k_iso]
    for s in scenario.structures:
        in_rows |= phantom.structures[s][1]
    dose_rows = np.flatnonzero(in_rows)
    row_of = np.full(in_rows.size, -1, dtype=np.int64)
    row_of[dose_rows] = np.arange(dose_rows.size)
    voxel_cc = float(np.prod(grid.voxel_mm)) / 1000.0
    structures = [
        Structure(s, phantom.structures[s][0], row_of[np.flatnonzero(phantom.structures[s][1])], voxel_cc)
        for s in scenario.structures
    ]
    target_pts = grid.points(np.flatnonzero(phantom.structures[scenario.structures[0]][1]))
    model = scenario.beam_model
    voxel_radius = 0.5 * float(np.linalg.norm(grid.voxel_mm))
    beams, blocks = [], []
    for gantry, couch in tqdm(scenario.beams, desc=f"dose {name}", disable=not progress, unit="beam"):
        uv = select_beamlets(target_pts, iso, gantry, couch, scenario.beamlet_mm, scenario.margin_mm,
                             model.sad_mm, voxel_radius)
        beams.append(Beam(gantry, couch, scenario.beamlet_mm, uv.astype(np.float32)))
        blocks.append(beam_influence(phantom.density, grid, dose_rows, iso, gantry, couch, uv,
                                     scenario.beamlet_mm, model))
    D = sp.hstack(blocks, format="csr", dtype=np.float32)
    return PlanningCase(
        name=name,
        site=phantom.site,
        grid_shape=grid.shape,
        voxel_mm=grid.voxel_mm,
        isocenter_mm=tuple(float(v) for v in iso),
        dose_rows=dose_rows,
        structures=structures,
        beams=beams,
        dose_influence=D,
        prescription_gy=scenario.prescription_gy,
        fractions=scenario.fractions,
        protocol=scenario.protocol,
        density=phantom.density,
        metadata={
            "scenario": scenario.name,
            "phantom_seed": phantom.seed,
            "generator_version": GENERATOR_VERSION,
            "engine_version": ENGINE_VERSION,
            "grid_origin_mm": list(grid.origin_mm),
            "iso_slice": k_iso,
            "beam_model": model.to_dict(),
            "build_seconds": round(time.perf_counter() - t0, 3),
        },
    )
