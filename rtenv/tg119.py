"""The AAPM TG-119 C-shape phantom (CORT, as shipped inside pyRadPlan) as a planning case.

TG-119 (Ezzell et al., Med. Phys. 36:5359, 2009) defines IMRT commissioning test problems; its
C-shape is a C-shaped target (``OuterTarget``, here ``PTV``) wrapped around a cylindrical core
(``Core``, an OAR) in a water-equivalent slab phantom. The CT and structures come from CORT's
``TG119.mat`` (matRad format), which the PyPI package ``pyradplan`` ships in
``pyRadPlan/data/phantoms``; this module reads that file directly (no network, no pyRadPlan
import for our own engine).

matRad layout: ``ct.cube`` is relative electron density (water = 1; converted from HU by the
file's own HLUT) indexed ``[row = y, column = x, slice = z]``; ``ct.x/y/z`` are voxel centres in
mm in DICOM patient coordinates (``y`` posterior); ``cst`` voxel lists are 1-based column-major
(Fortran) linear indices into the cube. rtenv's coordinates have ``y`` anterior, so ``y`` is
negated and the y axis reversed.

The case grid is the dose grid pyRadPlan itself uses at the same voxel size (covering the CT
extent, centred on it; 101 x 101 x 65 voxels at 5 mm), so both engines fill the same rows:

* ``engine="ours"``: :func:`rtenv.scenarios.build_case` with our pencil-beam model;
* ``engine="pyradplan"``: pyRadPlan's photon SVD pencil-beam engine (``calc_dose_influence``,
  machine ``Generic``), its rows mapped onto our grid.

Matrix rows: ``PTV``, ``Core`` and a normal-tissue ``Ring`` (body voxels within
:data:`RING_MM` of the PTV, outside PTV and core), plus the body voxels of the isocentre's axial
slice (for dose-slice figures). Entries below :data:`REL_THRESHOLD` times their beamlet's
(column's) maximum are dropped; the build records the nnz before and after and the dose error
that the truncation causes for a uniform fluence (``metadata["truncation"]``).

Cases are cached like :func:`rtenv.scenarios.load_case` (``$RTENV_CACHE_DIR/cases``) under a key
that hashes the TG119 file, the engine (and pyRadPlan's version for its engine), the scenario and
the row and truncation settings.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import math
import time
from dataclasses import asdict, dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any, Literal

import numpy as np
import scipy.io
import scipy.sparse as sp
from scipy.ndimage import distance_transform_edt, map_coordinates

from rtenv.case import Beam, CaseFormatError, PlanningCase, Structure
from rtenv.dose_engine import ENGINE_VERSION, Grid
from rtenv.phantom import Phantom
from rtenv.runlog import file_sha256
from rtenv.validation import check_real

TG119_VERSION = 1
RING_MM = 20.0  # normal-tissue ring: body voxels within 20 mm of the PTV surface
REL_THRESHOLD = 1e-3  # drop entries below 0.1 % of their beamlet's maximum
ENGINES = ("ours", "pyradplan")
Engine = Literal["ours", "pyradplan"]
# CST name -> (rtenv name, role)
CST_NAMES = {"OuterTarget": ("PTV", "target"), "Core": ("Core", "oar")}
SLIM_INSTALL = (
    "pip install --no-deps 'pyradplan>=0.5,<0.6' && pip install array_api_compat array_api_extra numpydantic "
    "SimpleITK pydicom pint pymatreader pydantic-settings jinja2 'pydantic<2.14'"
)


class PyRadPlanMissing(ImportError):
    """pyradplan (which ships the TG-119 data and its dose engine) is not installed."""


def tg119_file() -> Path:
    """Path of ``TG119.mat`` inside the installed pyRadPlan package (without importing it).

    Raises:
        PyRadPlanMissing: pyradplan is not installed or lacks the file.
    """
    spec = importlib.util.find_spec("pyRadPlan")
    if spec is None or not spec.submodule_search_locations:
        raise PyRadPlanMissing(f"the TG119 scenario needs the pyradplan package; slim install: {SLIM_INSTALL}")
    for root in spec.submodule_search_locations:
        path = Path(root) / "data" / "phantoms" / "TG119.mat"
        if path.is_file():
            return path
    raise PyRadPlanMissing(f"pyradplan is installed but has no data/phantoms/TG119.mat ({spec.origin})")


@lru_cache(maxsize=4)
def _file_digest(path: Path, size: int, mtime_ns: int) -> str:
    return file_sha256(path)  # cached by size and modification time


def _sha256(path: Path) -> str:
    st = path.stat()
    return _file_digest(path, st.st_size, st.st_mtime_ns)


def read_tg119(path: Path | None = None) -> dict[str, Any]:
    """The raw CT and structures of ``TG119.mat``.

    Returns:
        ``{"cube": (ny, nx, nz) relative electron density, "x", "y", "z": voxel centres (mm,
        DICOM), "structures": {cst name: (cst type, 0-based flat C-order indices into cube)}}``.
    """
    path = Path(path) if path is not None else tg119_file()
    if not (path.is_file() or Path(f"{path}.mat").is_file()):  # loadmat adds a missing .mat to a str path
        raise CaseFormatError(f"TG-119 file {path} does not exist")
    try:
        m = scipy.io.loadmat(str(path))
        ct = m["ct"][0, 0]
        cube = np.asarray(ct["cube"][0, 0], dtype=np.float32)
        shape = cube.shape
        structures = {}
        for row in m["cst"]:
            name, kind = str(row[1][0]), str(row[2][0])
            idx = np.asarray(row[3][0, 0], dtype=np.int64).ravel() - 1  # 1-based column-major
            structures[name] = (kind, np.ravel_multi_index(np.unravel_index(idx, shape, order="F"), shape))
        axes = {a: ct[a].ravel().astype(float) for a in ("x", "y", "z")}
    except (KeyError, IndexError, ValueError, TypeError, NotImplementedError, OSError) as exc:
        raise CaseFormatError(f"{path} is not a matRad TG-119 file with ct.cube, ct.x/y/z and cst "
                              f"({type(exc).__name__}: {exc})") from exc
    return {"cube": cube, **axes, "structures": structures}


def dose_grid(raw: dict[str, Any], voxel_mm: float) -> Grid:
    """The isotropic ``voxel_mm`` grid covering the CT extent, centred on it (pyRadPlan's own dose
    grid), in rtenv coordinates (y anterior)."""
    dims, origin = [], []
    for axis in ("x", "y", "z"):
        c = raw[axis]
        res = float(c[1] - c[0])
        n = math.ceil(c.size * res / voxel_mm - 1e-9)
        dims.append(n)
        origin.append(c[0] - (n * voxel_mm - c.size * res) / 2.0)
    ny = dims[1]
    y0_ours = -(origin[1] + (ny - 1) * voxel_mm)  # the last DICOM row is the most anterior
    return Grid((dims[2], dims[1], dims[0]), (voxel_mm,) * 3, (origin[0], y0_ours, origin[2]))


def _sample(raw: dict[str, Any], volume: np.ndarray, grid: Grid, order: int) -> np.ndarray:
    """Trilinear (``order=1``) or nearest (``0``) samples of a CT-grid ``(ny, nx, nz)`` volume at
    the centres of ``grid`` (rtenv coordinates); outside the CT: 0."""
    nz, ny, nx = grid.shape
    pts = grid.points(np.arange(nz * ny * nx))
    x, y_dicom, z = pts[:, 0], -pts[:, 1], pts[:, 2]
    coords = np.stack([(y_dicom - raw["y"][0]) / (raw["y"][1] - raw["y"][0]),
                       (x - raw["x"][0]) / (raw["x"][1] - raw["x"][0]),
                       (z - raw["z"][0]) / (raw["z"][1] - raw["z"][0])])
    out = map_coordinates(volume, coords, order=order, mode="constant", cval=0.0, prefilter=False)
    return out.reshape(grid.shape)


def make_tg119_phantom(voxel_mm: float = 5.0, ring_mm: float = RING_MM, path: Path | None = None) -> Phantom:
    """The TG-119 C-shape as a :class:`~rtenv.phantom.Phantom` on the pyRadPlan dose grid.

    Density is the CT's relative electron density, trilinearly resampled; a structure holds the
    voxels whose centre lies at least half inside it (trilinear mask fraction >= 0.5). ``Ring`` is
    the body outside PTV and core within ``ring_mm`` (mm) of the PTV.

    Args:
        voxel_mm: Isotropic dose-grid voxel (mm), 2.5 to 10.
        ring_mm: Width of the normal-tissue ring (mm), > 0.
        path: ``TG119.mat`` (default: the one inside pyRadPlan).
    """
    check_real("voxel_mm", voxel_mm, 2.5, 10.0)
    check_real("ring_mm", ring_mm, 0.0, low_inclusive=False)
    raw = read_tg119(path)
    grid = dose_grid(raw, voxel_mm)
    density = _sample(raw, raw["cube"], grid, order=1).astype(np.float32)

    def mask(cst_name: str) -> np.ndarray:
        m = np.zeros(raw["cube"].size, dtype=np.float32)
        m[raw["structures"][cst_name][1]] = 1.0
        return _sample(raw, m.reshape(raw["cube"].shape), grid, order=1) >= 0.5

    body = mask("BODY")
    ptv = mask("OuterTarget") & body
    core = mask("Core") & body & ~ptv
    ring = body & ~ptv & ~core & (distance_transform_edt(~ptv, sampling=grid.voxel_mm) <= ring_mm)
    structures = {"PTV": ("target", ptv), "Core": ("oar", core), "Ring": ("oar", ring)}
    return Phantom("tg119", 0, grid, density, body, structures)


def truncate(D: sp.csr_matrix | sp.csc_matrix, rel: float) -> sp.csr_matrix:
    """Drop entries below ``rel`` times their column's maximum; float32 CSR."""
    C = sp.csc_matrix(D, dtype=np.float32)
    C.sum_duplicates()
    colmax = np.zeros(C.shape[1], dtype=np.float32)
    nz_cols = np.diff(C.indptr) > 0
    colmax[nz_cols] = np.maximum.reduceat(C.data, C.indptr[:-1][nz_cols])
    keep = C.data >= rel * np.repeat(colmax, np.diff(C.indptr))
    C.data = np.where(keep, C.data, 0.0).astype(np.float32)
    C.eliminate_zeros()
    return sp.csr_matrix(C, dtype=np.float32)


def truncation_error(full: sp.spmatrix, kept: sp.spmatrix, target_rows: np.ndarray, rx_gy: float) -> dict[str, float]:
    """Dose error of ``kept`` against ``full`` for a uniform fluence scaled to target mean = Rx.

    Returns max and mean ``|dD|`` in the target and max over all rows, in % of Rx.
    """
    ones = np.ones(full.shape[1], dtype=np.float64)
    d_full = np.asarray(full @ ones, dtype=np.float64)
    d_kept = np.asarray(kept @ ones, dtype=np.float64)
    scale = rx_gy / d_full[target_rows].mean()
    err = np.abs(d_full - d_kept) * scale / rx_gy * 100.0
    return {"target_max_pct": float(err[target_rows].max()), "target_mean_pct": float(err[target_rows].mean()),
            "all_rows_max_pct": float(err.max())}


def _rows(phantom: Phantom, structures: tuple[str, ...]) -> tuple[np.ndarray, int, np.ndarray]:
    """Dose rows (structures plus the isocentre slice's body voxels), the iso slice and the iso."""
    grid = phantom.grid
    iso = phantom.centroid_mm(structures[0])
    k_iso = int(round((iso[2] - grid.origin_mm[2]) / grid.voxel_mm[0]))
    in_rows = np.zeros(grid.shape, dtype=bool)
    in_rows[k_iso] = phantom.body[k_iso]
    for s in structures:
        in_rows |= phantom.structures[s][1]
    return np.flatnonzero(in_rows), k_iso, iso


@dataclass
class PyRadPlanRun:
    """One pyRadPlan photon dose calculation of the TG119 scenario's beams.

    Attributes:
        ct, cst, pln, stf, dij: pyRadPlan's objects (``dij.physical_dose.flat[0]`` is the
            ``(voxels, bixels)`` matrix over its dose grid, Gy per unit bixel weight).
        seconds: Wall time of ``load_tg119`` + ``generate_stf`` + ``calc_dose_influence`` (s).
    """

    ct: Any
    cst: Any
    pln: Any
    stf: Any
    dij: Any
    seconds: float


def run_pyradplan(scenario: Any) -> PyRadPlanRun:
    """Compute pyRadPlan's photon dose-influence matrix (machine ``Generic``, SVD pencil beam) for
    ``scenario``'s beams, bixel width (mm) and dose-grid voxel (mm) on the TG119 phantom."""
    try:
        from pyRadPlan import PhotonPlan, calc_dose_influence, generate_stf, load_tg119
    except ImportError as exc:
        raise PyRadPlanMissing(f"engine='pyradplan' needs pyRadPlan importable ({exc}); slim install: "
                               f"{SLIM_INSTALL}") from exc
    import logging
    import warnings

    logging.getLogger("pyRadPlan").setLevel(logging.WARNING)
    t0 = time.perf_counter()
    ct, cst = load_tg119()
    pln = PhotonPlan(machine="Generic")
    pln.prop_stf = {"gantry_angles": np.array([g for g, _ in scenario.beams], dtype=float),
                    "couch_angles": np.array([c for _, c in scenario.beams], dtype=float),
                    "bixel_width": float(scenario.beamlet_mm)}
    pln.prop_dose_calc = {"dose_grid": {"resolution": {a: float(scenario.voxel_mm) for a in "xyz"}}}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # its ray tracer divides by zero on axis-parallel rays
        warnings.simplefilter("ignore", UserWarning)  # "GPU not available, falling back to CPU"
        stf = generate_stf(ct, cst, pln)
        dij = calc_dose_influence(ct, cst, stf, pln)
    return PyRadPlanRun(ct, cst, pln, stf, dij, time.perf_counter() - t0)


def pyradplan_row_order(run: PyRadPlanRun, grid: Grid) -> np.ndarray:
    """``perm`` such that row ``perm[r]`` of pyRadPlan's matrix is our flat voxel ``r`` of ``grid``.

    pyRadPlan's rows are C order over ``(z, y_dicom, x)``; ours over ``(z, y anterior, x)``.
    """
    g = run.dij.dose_grid
    nx, ny, nz = (int(v) for v in g.dimensions)
    if (nz, ny, nx) != tuple(grid.shape) or not np.allclose([g.origin[0], g.origin[2]],
                                                           [grid.origin_mm[0], grid.origin_mm[2]]):
        raise RuntimeError(f"pyRadPlan's dose grid {g.dimensions} at {g.origin} differs from ours "
                           f"{grid.shape} at {grid.origin_mm}")
    k, j, i = np.unravel_index(np.arange(nz * ny * nx), (nz, ny, nx))
    ours = np.ravel_multi_index((k, ny - 1 - j, i), (nz, ny, nx))
    perm = np.empty_like(ours)
    perm[ours] = np.arange(ours.size)
    return perm


def _pyradplan_matrix(phantom: Phantom, run: PyRadPlanRun) -> tuple[sp.csc_matrix, list[Beam], dict]:
    """pyRadPlan's matrix over our full grid (rows: flat C-order indices of ``phantom.grid``), its
    beams and facts about the run."""
    from importlib.metadata import version

    M = sp.csc_matrix(run.dij.physical_dose.flat[0], dtype=np.float32)
    M = M[pyradplan_row_order(run, phantom.grid)]
    beams = []
    for b in run.stf.beams:
        uv = np.array([[r.ray_pos_bev[0], r.ray_pos_bev[2]] for r in b.rays], dtype=np.float32)
        beams.append(Beam(float(b.gantry_angle), float(b.couch_angle), float(b.bixel_width), uv))
    info = {"pyradplan_version": version("pyradplan"), "pyradplan_seconds": round(run.seconds, 3),
            "pyradplan_voxels": int(M.shape[0]), "pyradplan_beamlets": int(M.shape[1]),
            "pyradplan_nnz": int(M.nnz)}
    return M, beams, info


def cache_key(scenario: Any, engine: str, ring_mm: float, rel_threshold: float) -> str:
    """Hash of everything that determines the TG119 case."""
    spec = {
        "tg119": TG119_VERSION,
        "file": _sha256(tg119_file()),
        "engine": engine,
        "engine_version": ENGINE_VERSION if engine == "ours" else _pyradplan_version(),
        "ring_mm": ring_mm,
        "rel_threshold": rel_threshold,
        "scenario": {k: v for k, v in asdict(scenario).items() if k not in ("name", "description")},
    }
    return hashlib.sha256(json.dumps(spec, sort_keys=True).encode()).hexdigest()[:20]


def _pyradplan_version() -> str:
    from importlib.metadata import PackageNotFoundError, version
    try:
        return version("pyradplan")
    except PackageNotFoundError as exc:  # pragma: no cover - tg119_file() already checked
        raise PyRadPlanMissing(f"pyradplan is not installed; slim install: {SLIM_INSTALL}") from exc


def build_tg119_case(scenario: Any, engine: Engine = "ours", ring_mm: float = RING_MM,
                     rel_threshold: float = REL_THRESHOLD, name: str = "TG119",
                     progress: bool = False, run: PyRadPlanRun | None = None) -> PlanningCase:
    """Build the TG-119 C-shape case (no cache).

    Args:
        scenario: The ``TG119`` :class:`~rtenv.scenarios.Scenario` (beams, beamlet and voxel size
            in mm, prescription in Gy, protocol).
        engine: ``"ours"`` (:mod:`rtenv.dose_engine`) or ``"pyradplan"`` (pyRadPlan photons).
        ring_mm: Normal-tissue ring width (mm).
        rel_threshold: Entries below this fraction of their beamlet's maximum are dropped.
        name: Case name.
        progress: Progress bar over beams (our engine).
        run: A :func:`run_pyradplan` result to reuse (``engine="pyradplan"``).
    """
    from rtenv.scenarios import build_case  # scenarios imports this module lazily

    if engine not in ENGINES:
        raise ValueError(f"unknown engine {engine!r}; valid: {list(ENGINES)}")
    if not (0.0 <= rel_threshold < 1.0):
        raise ValueError(f"rel_threshold = {rel_threshold} is outside [0, 1)")
    t0 = time.perf_counter()
    phantom = make_tg119_phantom(scenario.voxel_mm, ring_mm)
    rows, k_iso, iso = _rows(phantom, scenario.structures)
    facts: dict[str, Any] = {"engine": engine, "ring_mm": ring_mm, "rel_threshold": rel_threshold}
    if engine == "ours":
        case = build_case(phantom, scenario, name=name, progress=progress)
        full = case.dose_influence
        facts["matrix_seconds"] = case.metadata["build_seconds"]
        facts["nnz_full"] = int(full.nnz)
        if not np.array_equal(case.dose_rows, rows):  # pragma: no cover - same row rule
            raise RuntimeError("build_case chose other dose rows than the TG119 row rule")
        beams = case.beams
    else:
        M, beams, info = _pyradplan_matrix(phantom, run if run is not None else run_pyradplan(scenario))
        facts.update(info)
        facts["matrix_seconds"] = info["pyradplan_seconds"]
        facts["nnz_full"] = int(M.nnz)
        full = sp.csr_matrix(M[rows], dtype=np.float32)
    facts["nnz_rows"] = int(full.nnz)
    D = truncate(full, rel_threshold) if rel_threshold > 0 else sp.csr_matrix(full, dtype=np.float32)
    facts["nnz"] = int(D.nnz)
    row_of = np.full(int(np.prod(phantom.grid.shape)), -1, dtype=np.int64)
    row_of[rows] = np.arange(rows.size)
    voxel_cc = float(np.prod(phantom.grid.voxel_mm)) / 1000.0
    structures = [Structure(s, phantom.structures[s][0], row_of[np.flatnonzero(phantom.structures[s][1])], voxel_cc)
                  for s in scenario.structures]
    facts["truncation"] = truncation_error(full, D, structures[0].rows, scenario.prescription_gy)
    grid = phantom.grid
    return PlanningCase(
        name=name, site="tg119", grid_shape=grid.shape, voxel_mm=grid.voxel_mm,
        isocenter_mm=tuple(float(v) for v in iso), dose_rows=rows, structures=structures, beams=beams,
        dose_influence=D, prescription_gy=scenario.prescription_gy, fractions=scenario.fractions,
        protocol=scenario.protocol, density=phantom.density,
        metadata={"scenario": scenario.name, "source": "TG-119 C-shape, CORT TG119.mat (pyRadPlan)",
                  "tg119_version": TG119_VERSION, "engine_version": ENGINE_VERSION,
                  "grid_origin_mm": list(grid.origin_mm), "iso_slice": k_iso,
                  "beam_model": scenario.beam_model.to_dict() if engine == "ours" else "pyRadPlan photons Generic",
                  **facts, "build_seconds": round(time.perf_counter() - t0, 3)},
    )


def load_tg119_case(scenario: Any, cohort: str = "test", index: int = 0, *, engine: Engine = "ours",
                    ring_mm: float = RING_MM, rel_threshold: float = REL_THRESHOLD, cache: bool = True,
                    progress: bool = False) -> PlanningCase:
    """The single TG-119 case (any cohort, index 0), from the disk cache if present.

    Raises:
        ValueError: ``index`` is not 0 or the cohort is unknown.
        PyRadPlanMissing: pyradplan is not installed.
    """
    from rtenv.scenarios import COHORTS, cache_dir

    if cohort not in COHORTS:
        raise ValueError(f"unknown cohort {cohort!r}; valid: {sorted(COHORTS)}")
    if index != 0:
        raise ValueError(f"scenario {scenario.name} has a single case (index 0), got index {index}")
    if engine not in ENGINES:
        raise ValueError(f"unknown engine {engine!r}; valid: {list(ENGINES)}")
    name = scenario.name if engine == "ours" else f"{scenario.name}-pyradplan"
    path = cache_dir() / "cases" / f"{name}-{cache_key(scenario, engine, ring_mm, rel_threshold)}.rtcase"
    if cache and path.is_file():
        try:
            return PlanningCase.load(path)
        except CaseFormatError:
            path.unlink(missing_ok=True)  # another worker may have removed the torn entry already
    case = build_tg119_case(scenario, engine, ring_mm, rel_threshold, name=name, progress=progress)
    if cache:
        case.save(path)
    return case
