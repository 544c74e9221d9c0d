"""Import planning cases from user-supplied data in the field's formats.

Three formats, one entry point :func:`import_case` (``fmt`` = ``"cort"``, ``"matrad"`` or
``"portpy"``); each returns a :class:`~rtenv.case.PlanningCase` ready for the TPS, the scoring and
the plots, and to the environments (and so the DRL and LLM planners) of the scenario whose structures
it has (``TPPTuningEnv("S1", cases=[case])``).
rtenv ships none of this data: users download it themselves (see
``docs/data_sources.md`` for sources and licences). Only numpy, scipy and h5py are used.

* **CORT** (Craft et al. 2014): a case folder with per-beam dose-influence matrices
  ``Gantry{g}_Couch{c}_D.mat`` (a sparse *all grid voxels x beamlets* matrix, variable ``D``),
  structure voxel lists ``{name}_VOILIST.mat`` (1-based MATLAB linear voxel indices, variable
  ``v``) and grid information (see :func:`load_cort`). The matrix is used as given.
* **matRad / pyRadPlan phantoms** (``.mat`` with ``ct`` and ``cst``): no dose-influence matrix, so
  the phantom becomes an rtenv :class:`~rtenv.phantom.Phantom` and rtenv's own pencil-beam engine
  computes the matrix for the requested beams through :func:`rtenv.scenarios.build_case`.
* **PortPy** patient folders (JSON metadata whose ``*_File`` keys point to ``file.h5/dataset``):
  structure masks, the CT-to-optimisation-voxel map and per-beam sparse influence matrices stored
  as ``(row, column, value)`` triplets. The matrix is used as given.

Structures are chosen and given rtenv roles by a mapping ``{source name: role}`` or
``{source name: (role, rtenv name)}`` (renaming lets a structure match a protocol's names, e.g.
CORT's ``PTV_68`` -> ``PTV``); roles are rtenv's ``"target"`` (exactly one) and ``"oar"``.
Unmapped structures are ignored. The matrix rows are the union of the mapped structures' voxels.

Coordinates: every importer returns rtenv patient coordinates (x to the patient's left, y
anterior, z superior, mm; grid arrays ``(z, y, x)``). MATLAB/matRad cubes are ``(rows = y,
columns = x, slices = z)`` in LPS (y posterior) and PortPy arrays are ``(z, y, x)`` in DICOM LPS,
so both have their y axis reversed on import. matRad and PortPy grids keep the file's origin;
CORT grids start at 0 (``metadata["grid_origin_mm"]``), so a CORT isocentre is in grid-local
coordinates (the plan, which only needs positions relative to the grid, is unaffected). Values
of imported matrices are taken as Gy per unit fluence; their absolute scale does not matter to
the TPS, which normalises plans to the prescription.
"""

from __future__ import annotations

import inspect
import math
import re
import zlib
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import h5py
import numpy as np
import scipy.io
import scipy.sparse as sp

from rtenv.case import Beam, CaseFormatError, PlanningCase, Structure
from rtenv.dose_engine import BeamModel, Grid
from rtenv.evaluation import MAX_GY_PER_FRACTION, Protocol, is_protocol_path
from rtenv.phantom import Phantom
from rtenv.runlog import read_json
from rtenv.scenarios import Scenario, build_case
from rtenv.validation import check_integer, check_real, is_integer, is_real

FORMATS = ("cort", "matrad", "portpy")
ROLES = ("target", "oar")

StructureSpec = str | tuple[str, str]
"""A role (``"target"`` / ``"oar"``) or ``(role, rtenv name)``."""
BeamSpec = float | int | tuple[float, float]
"""A gantry angle (deg; any couch angle that makes it unique) or ``(gantry, couch)`` (deg)."""

_CORT_BEAM_RE = re.compile(r"^Gantry(-?\d+(?:\.\d+)?)_Couch(-?\d+(?:\.\d+)?)_D\.mat$")
_ANGLE_TOL = 1e-6


# ----------------------------------------------------------------------------- option parsing
def parse_structure_map(text: str) -> dict[str, tuple[str, str]]:
    """Parse ``"NAME=ROLE[:RTENV_NAME],..."`` (the CLI's ``--structures``).

    >>> parse_structure_map("PTV_68=target:PTV,Rectum=oar")
    {'PTV_68': ('target', 'PTV'), 'Rectum': ('oar', 'Rectum')}
    """
    out: dict[str, tuple[str, str]] = {}
    for item in (s.strip() for s in text.split(",")):
        if not item:
            continue
        name, sep, spec = item.partition("=")
        if not sep or not name.strip() or not spec.strip():
            raise ValueError(f"bad structure mapping {item!r}: expected NAME=ROLE or NAME=ROLE:NEW_NAME "
                             f"with ROLE one of {ROLES}")
        role, _, new = spec.partition(":")
        if name.strip() in out:
            raise ValueError(f"structure {name.strip()!r} is mapped twice in {text!r}")
        out[name.strip()] = _check_role(role, name.strip()), (new.strip() or name.strip())
    if not out:
        raise ValueError("empty structure mapping: expected NAME=ROLE[:NEW_NAME],...")
    return out


def parse_beams(text: str) -> list[BeamSpec]:
    """Parse ``"0,72,144"`` (gantry angles, deg) or ``"58:0,216:32"`` (gantry:couch, deg)."""
    out: list[BeamSpec] = []
    items = [s.strip() for s in text.split(",")]
    if any(items) and not all(items):
        raise ValueError(f"beam list {text!r} has an empty entry: expected GANTRY[,GANTRY...] or GANTRY:COUCH[,...]")
    for item in filter(None, items):
        try:
            angles = tuple(float(a) for a in item.split(":"))
            if len(angles) > 2 or not all(math.isfinite(a) for a in angles):
                raise ValueError
        except ValueError:
            raise ValueError(f"bad beam {item!r}: expected GANTRY or GANTRY:COUCH, finite angles in degrees") from None
        out.append(angles if len(angles) == 2 else angles[0])
    if not out:
        raise ValueError("empty beam list: expected GANTRY[,GANTRY...] or GANTRY:COUCH[,...]")
    return out


def _check_role(role: str, name: str) -> str:
    r = role.strip().lower()
    if r not in ROLES:
        raise ValueError(f"structure {name!r} has role {role!r}; valid roles: {', '.join(ROLES)}")
    return r


def _normalise_structures(structures: Mapping[str, StructureSpec] | None,
                          available: Sequence[str], source: str) -> list[tuple[str, str, str]]:
    """``[(source name, role, rtenv name)]``, target first; checks names, roles, one target."""
    if not structures:
        raise ValueError(f"no structure mapping given; {source} has structures {list(available)}. "
                         "Pass structures={NAME: 'target' | 'oar' | (ROLE, NEW_NAME)} (command line: "
                         "--structures NAME=ROLE[:NEW_NAME],...) with exactly one target")
    out = []
    for src, spec in structures.items():
        if isinstance(spec, str):
            role, new = _check_role(spec, src), src
        elif isinstance(spec, Sequence) and len(spec) == 2:
            role, new = _check_role(str(spec[0]), src), str(spec[1])
        else:
            raise ValueError(f"structure {src!r}: mapping value {spec!r} must be a role or (role, new name)")
        if src not in available:
            raise CaseFormatError(f"{source} has no structure {src!r}; it has {list(available)}")
        out.append((src, role, new))
    targets = [s for s in out if s[1] == "target"]
    if len(targets) != 1:
        raise ValueError(f"the mapping must give exactly one structure the role 'target', got "
                         f"{[t[0] for t in targets]}")
    names = [s[2] for s in out]
    if len(set(names)) != len(names):
        raise ValueError(f"the mapping gives duplicate rtenv structure names: {names}")
    return targets + [s for s in out if s[1] != "target"]


def _select_beams(available: Sequence[tuple[float, float]], beams: Sequence[BeamSpec] | None,
                  source: str) -> list[int]:
    """Indices into ``available`` ((gantry, couch) deg) for the requested beams, in request order."""
    if beams is None:
        return list(range(len(available)))
    if isinstance(beams, (str, bytes)) or not isinstance(beams, Sequence) or len(beams) == 0:
        raise ValueError(f"beams must be a non-empty list of gantry angles or (gantry, couch) pairs, got {beams!r}")
    listing = ", ".join(f"{g:g}:{c:g}" for g, c in available)
    chosen = []
    for spec in beams:
        if is_real(spec):
            hits = [i for i, (g, _) in enumerate(available) if abs(g - float(spec)) < _ANGLE_TOL]
            label = f"gantry {float(spec):g}"
        elif isinstance(spec, Sequence) and len(spec) == 2:
            g, c = float(spec[0]), float(spec[1])
            hits = [i for i, (ga, ca) in enumerate(available)
                    if abs(ga - g) < _ANGLE_TOL and abs(ca - c) < _ANGLE_TOL]
            label = f"gantry {g:g} couch {c:g}"
        else:
            raise ValueError(f"beam {spec!r} must be a gantry angle or a (gantry, couch) pair")
        if not hits:
            raise CaseFormatError(f"{source} has no beam at {label}; available (gantry:couch): {listing}")
        if len(hits) > 1:
            raise ValueError(f"{label} is ambiguous in {source} (couch angles "
                             f"{[available[i][1] for i in hits]}); give (gantry, couch) pairs")
        if hits[0] in chosen:
            raise ValueError(f"beam {label} is requested twice")
        chosen.append(hits[0])
    return chosen


def _resolve_protocol(protocol: str, prescription_gy: float | None, fractions: int | None,
                      ) -> tuple[Protocol, float, int, str]:
    """The protocol, Rx (Gy), fractions, and what the case stores: a shipped protocol's name, or a
    protocol file's absolute path (a relative one would break from any other working directory)."""
    proto = Protocol.load(protocol)
    rx = check_real("prescription_gy (--rx, Gy)", proto.prescription_gy if prescription_gy is None else prescription_gy,
                    0.0, low_inclusive=False)
    fx = check_integer("fractions", proto.fractions if fractions is None else fractions, 1)
    if rx / fx > MAX_GY_PER_FRACTION:  # the protocols' own bound: a dose in cGy, or the total typed per fraction
        raise ValueError(f"prescription_gy (--rx) = {rx:g} Gy in {fx} fractions is {rx / fx:g} Gy per fraction; valid: "
                         f"up to {MAX_GY_PER_FRACTION:g} Gy per fraction (is it in cGy?)")
    reference = str(Path(protocol).resolve()) if is_protocol_path(protocol) else str(protocol)
    return proto, rx, fx, reference


def _check_protocol_structures(proto: Protocol, names: Sequence[str], protocol: str) -> None:
    missing = [s for s in proto.structures if s not in names]
    if missing:
        raise ValueError(f"protocol {protocol!r} scores structures {missing} that the imported case lacks "
                         f"(it has {list(names)}); map or rename them (SOURCE=ROLE:NEW_NAME), "
                         "choose another protocol, or pass check_protocol=False (--no-check-protocol)")


# ----------------------------------------------------------------------------- MATLAB helpers
def _loadmat(path: Path, **kwargs: Any) -> dict[str, Any]:
    if not path.is_file():
        raise CaseFormatError(f"missing file {path}")
    try:
        return scipy.io.loadmat(str(path), **kwargs)
    except NotImplementedError as exc:  # MATLAB v7.3 (HDF5) files
        raise CaseFormatError(f"{path} is a MATLAB v7.3 file, which scipy cannot read; re-save it in MATLAB "
                              f"with save(..., '-v7') ({exc})") from exc
    except (scipy.io.matlab.MatReadError, ValueError, TypeError, OSError, EOFError, IndexError, zlib.error) as exc:
        raise CaseFormatError(f"{path} is not a readable MATLAB .mat file ({type(exc).__name__}: {exc})") from exc


def _unwrap(x: Any) -> Any:
    """Strip single-element cell/object wrappers that MATLAB files often add."""
    while isinstance(x, np.ndarray) and x.dtype == object and x.size == 1:
        x = x.reshape(-1)[0]
    return x


def _field(obj: Any, name: str, where: str) -> Any:
    if not hasattr(obj, name):
        have = getattr(obj, "_fieldnames", None) or []
        raise CaseFormatError(f"{where} has no field {name!r} (fields: {list(have)})")
    return getattr(obj, name)


def matlab_to_grid_index(index_1based: np.ndarray, dims_rcs: tuple[int, int, int], where: str = "voxel list",
                         ) -> np.ndarray:
    """Flat rtenv grid indices of 1-based MATLAB linear indices into a ``(rows, columns, slices)`` cube.

    MATLAB indices run column-major (rows fastest) over ``dims_rcs = (ny, nx, nz)``; rows are y in
    LPS (posterior). The rtenv grid has shape ``(nz, ny, nx)`` (C order) with y anterior, so row
    ``r`` becomes ``ny - 1 - r``. Raises :class:`CaseFormatError` on non-integer or out-of-range
    indices.
    """
    idx = np.asarray(index_1based).reshape(-1)
    ny, nx, nz = (int(d) for d in dims_rcs)
    n = ny * nx * nz
    if idx.size == 0:
        raise CaseFormatError(f"{where} is empty")
    if not np.issubdtype(idx.dtype, np.number) or np.any(idx != np.round(idx)):
        raise CaseFormatError(f"{where} must hold integer voxel indices, got {idx.dtype} values")
    idx = idx.astype(np.int64)
    if idx.min() < 1 or idx.max() > n:
        raise CaseFormatError(f"{where} has voxel indices in [{idx.min()}, {idx.max()}]; 1-based MATLAB "
                              f"indices into a {ny} x {nx} x {nz} grid must lie in [1, {n}]")
    r, c, s = np.unravel_index(idx - 1, (ny, nx, nz), order="F")
    return np.ravel_multi_index((s, ny - 1 - r, c), (nz, ny, nx))


def hu_to_density(hu: np.ndarray) -> np.ndarray:
    """Approximate relative electron density from CT numbers (HU), bilinear.

    ``1 + HU/1000`` up to water (air -1000 -> 0), ``1 + 0.00055 HU`` above (HU 1000 -> 1.55); a
    generic calibration, not a scanner's. Values are clipped to [0, 3].
    """
    hu = np.asarray(hu, dtype=np.float64)
    rho = np.where(hu <= 0, 1.0 + hu / 1000.0, 1.0 + 0.00055 * hu)
    return np.clip(rho, 0.0, 3.0).astype(np.float32)


def _matrad_cube_to_grid(cube: np.ndarray) -> np.ndarray:
    """A MATLAB ``(rows = y posterior, columns = x, slices = z)`` cube as an rtenv ``(z, y anterior, x)`` array."""
    return np.ascontiguousarray(np.transpose(cube, (2, 0, 1))[:, ::-1, :])


def _resolution(ct: Any, where: str) -> tuple[float, float, float]:
    res = _field(ct, "resolution", where)
    try:
        xyz = tuple(float(_unwrap(_field(res, a, f"{where}.resolution"))) for a in ("x", "y", "z"))
    except (TypeError, ValueError) as exc:
        raise CaseFormatError(f"{where}.resolution.x/y/z must be numbers in mm ({exc})") from exc
    if not all(v > 0 and math.isfinite(v) for v in xyz):
        raise CaseFormatError(f"{where}.resolution must be positive (mm), got x/y/z = {xyz}")
    return xyz  # type: ignore[return-value]


def _ct_cube(ct: Any, where: str) -> np.ndarray:
    """Relative electron density cube (MATLAB order) from ``ct.cube`` or, failing that, ``ct.cubeHU``."""
    for name, convert in (("cube", False), ("cubeHU", True)):
        if hasattr(ct, name):
            cube = _unwrap(getattr(ct, name))
            if isinstance(cube, np.ndarray) and cube.dtype == object:  # several CT scenarios: take the first
                cube = _unwrap(cube.reshape(-1)[0])
            cube = np.asarray(cube)
            if cube.ndim == 2:
                cube = cube[:, :, None]
            if cube.ndim != 3 or not np.issubdtype(cube.dtype, np.number):
                raise CaseFormatError(f"{where}.{name} must be a 3-D numeric array (rows = y, columns = x, "
                                      f"slices = z), got shape {cube.shape} dtype {cube.dtype}")
            return hu_to_density(cube) if convert else cube.astype(np.float32)
    raise CaseFormatError(f"{where} has neither 'cube' (relative electron density) nor 'cubeHU'; "
                          f"fields: {list(getattr(ct, '_fieldnames', []))}")


def _axis_origin(ct: Any, axis: str, n: int, res: float) -> float:
    """First voxel-centre coordinate (mm) along a MATLAB axis, from ``ct.x/y/z`` if given."""
    if hasattr(ct, axis):
        v = np.asarray(_unwrap(getattr(ct, axis)), dtype=np.float64).reshape(-1)
        if v.size == n:
            return float(v[0])
    return res  # matRad's default world axes start at one voxel size


# ----------------------------------------------------------------------------- CORT
def _cort_grid(folder: Path, grid_shape: Sequence[int] | None, voxel_mm: float | Sequence[float] | None,
               ct_file: str | Path | None) -> tuple[tuple[int, int, int], tuple[float, float, float],
                                                    np.ndarray | None, str]:
    """``((ny, nx, nz) MATLAB dims, (dz, dy, dx) mm, density or None, source description)``."""

    def as_voxel(v: float | Sequence[float]) -> tuple[float, float, float]:
        t = (v,) * 3 if is_real(v) else tuple(v) if isinstance(v, Sequence | np.ndarray) and np.ndim(v) == 1 else ()
        if len(t) != 3 or not all(is_real(a) and math.isfinite(a) and a > 0 for a in t):
            raise ValueError(f"voxel_mm must be a finite positive number or (dz, dy, dx) in mm, got {v!r}")
        return tuple(float(a) for a in t)  # type: ignore[return-value]

    if grid_shape is not None:
        if (isinstance(grid_shape, (str, bytes)) or not isinstance(grid_shape, Sequence | np.ndarray)
                or np.ndim(grid_shape) != 1 or len(grid_shape) != 3
                or not all(is_integer(a) and a >= 1 for a in grid_shape)):
            raise ValueError(f"grid_shape must be (nz, ny, nx) positive integer voxel counts, got {grid_shape!r}")
        shape = tuple(int(a) for a in grid_shape)
        if voxel_mm is None:
            raise ValueError("grid_shape needs voxel_mm (mm) as well")
        nz, ny, nx = shape
        return (ny, nx, nz), as_voxel(voxel_mm), None, "options grid_shape/voxel_mm"

    candidates = [Path(ct_file)] if ct_file is not None else (
        [folder / f"{folder.name}.mat"] + sorted(p for p in folder.glob("*.mat")
                                                 if not p.name.endswith(("_D.mat", "_VOILIST.mat", "_BEAMINFO.mat"))
                                                 and p.name != f"{folder.name}.mat"))
    v73 = []  # MATLAB v7.3 files (unreadable by scipy) among the candidates
    for path in candidates:
        if not path.is_file():
            if ct_file is not None:
                raise CaseFormatError(f"missing CT file {path}")
            continue
        try:
            names = {n for n, _, _ in scipy.io.whosmat(str(path))}
        except NotImplementedError:
            if ct_file is not None:
                _loadmat(path)  # raises the MATLAB v7.3 re-save hint
            v73.append(path.name)
            names = set()
        except (ValueError, TypeError, OSError, EOFError, IndexError, zlib.error):
            names = set()
        if "ct" not in names:
            if ct_file is not None:
                raise CaseFormatError(f"{path} has no variable 'ct' (matRad format: ct.cube or ct.cubeDim, "
                                      f"ct.resolution.x/y/z in mm); variables: {sorted(names)}")
            continue
        ct = _loadmat(path, squeeze_me=True, struct_as_record=False)["ct"]
        where = f"{path.name}: ct"
        rx, ry, rz = _resolution(ct, where)
        density = None
        if hasattr(ct, "cube") or hasattr(ct, "cubeHU"):
            cube = _ct_cube(ct, where)
            dims = cube.shape
            density = _matrad_cube_to_grid(cube)
        else:
            d = np.asarray(_field(ct, "cubeDim", where)).reshape(-1)
            if d.size != 3:
                raise CaseFormatError(f"{where}.cubeDim must have 3 entries (rows, columns, slices), got {d}")
            dims = tuple(int(a) for a in d)
        if voxel_mm is not None:
            raise ValueError(f"voxel_mm is given but {path.name} defines the voxel size; drop one of them")
        return tuple(int(a) for a in dims), (rz, ry, rx), density, f"{path.name} (matRad ct)"  # type: ignore

    info = sorted(folder.glob("CTVOXEL_INFO*.txt"))
    if info:
        counts = []
        for line in info[0].read_text(errors="replace").splitlines()[:3]:
            tok = line.strip().split()
            try:
                counts.append(int(float(tok[-1].strip("[]=,;"))))
            except (IndexError, ValueError):
                raise CaseFormatError(f"{info[0]}: the first three lines must end with the voxel counts along "
                                      f"x, y and z, got {line!r}") from None
        if len(counts) != 3 or min(counts) < 1:
            raise CaseFormatError(f"{info[0]}: expected voxel counts along x, y, z on its first three lines")
        if voxel_mm is None:
            raise ValueError(f"{info[0].name} gives the grid's voxel counts but not the voxel size: pass "
                             "voxel_mm (mm, e.g. 3.0 or (dz, dy, dx); command line: --voxel-mm)")
        nx, ny, nz = counts
        return (ny, nx, nz), as_voxel(voxel_mm), None, info[0].name
    raise CaseFormatError(
        f"{folder} has no grid information: expected a matRad-format {folder.name}.mat (variable 'ct' with "
        "cube or cubeDim and resolution), a CTVOXEL_INFO*.txt (voxel counts x, y, z) plus voxel_mm, "
        "or the options grid_shape=(nz, ny, nx) and voxel_mm of rtenv.importers.load_cort"
        + (f"; {v73} are MATLAB v7.3 files, which scipy cannot read: re-save a CT file among them in MATLAB "
           "with save(..., '-v7')" if v73 else ""))


def _cort_beams(folder: Path) -> list[tuple[float, float, Path]]:
    found = []
    for p in folder.iterdir():
        m = _CORT_BEAM_RE.match(p.name)
        if m:
            found.append((float(m.group(1)), float(m.group(2)), p))
    return sorted(found, key=lambda t: (t[1], t[0]))


def _cort_voilist(folder: Path, name: str) -> np.ndarray:
    path = folder / f"{name}_VOILIST.mat"
    data = _loadmat(path)
    if "v" not in data:
        raise CaseFormatError(f"{path} has no variable 'v' (1-based voxel indices); variables: "
                              f"{sorted(k for k in data if not k.startswith('__'))}")
    v = _unwrap(data["v"])
    if isinstance(v, np.ndarray) and v.dtype == object:
        raise CaseFormatError(f"{path}: variable 'v' must be a numeric vector of voxel indices, got a cell array")
    return np.asarray(v)


def load_cort(
    path: str | Path, structures: Mapping[str, StructureSpec] | None = None,
    beams: Sequence[BeamSpec] | None = None, *, protocol: str, prescription_gy: float | None = None,
    fractions: int | None = None, name: str | None = None, site: str | None = None,
    grid_shape: Sequence[int] | None = None, voxel_mm: float | Sequence[float] | None = None,
    ct_file: str | Path | None = None, variable: str = "D", beamlet_mm: float = 10.0,
    check_protocol: bool = True,
) -> PlanningCase:
    """Import a CORT case folder (e.g. ``PROSTATE/``, ``LIVER/``, ``HEAD_AND_NECK/``, ``TG119/``).

    Required in the folder: ``{name}_VOILIST.mat`` for each mapped structure (variable ``v``: 1-based
    MATLAB linear voxel indices) and ``Gantry{g}_Couch{c}_D.mat`` for each chosen beam (variable
    ``variable``, default ``D``: sparse, one row per grid voxel, one column per beamlet). Grid
    information, first found of: the options ``grid_shape=(nz, ny, nx)`` and ``voxel_mm``; a
    matRad-format ``{FOLDER}.mat`` (or ``ct_file``) with ``ct.cube``/``ct.cubeDim`` and
    ``ct.resolution`` (mm; its density is kept as the case's density); ``CTVOXEL_INFO*.txt`` whose
    first three lines end with the voxel counts along x, y, z, plus ``voxel_mm``.

    Voxel indices follow matRad's convention for the CORT cases (column-major over rows = y,
    columns = x, slices = z). Beam columns are in the order of ``beams`` (gantry angles or
    ``(gantry, couch)`` pairs in degrees; default: every beam file, sorted by couch then gantry).
    ``Gantry{g}_Couch{c}_BEAMINFO.mat`` (variables ``x``, ``y``: beamlet lattice positions), when
    present, places the beamlets at ``beamlet_mm`` (nominal, mm) pitch; otherwise beamlet positions
    are a nominal row (they do not enter the dose, which the matrix gives).

    Args:
        path: The case folder.
        structures: ``{VOILIST name: role | (role, rtenv name)}``; exactly one target.
        beams: Beam subset.
        protocol: Scoring protocol (shipped name or JSON path); Rx (Gy) and fractions default to it.
        prescription_gy: Total prescribed dose in Gy.
        fractions: Number of fractions.
        name: Case name (default: the folder name).
        site: Anatomical site (default: the protocol's disease site, lower case).
        grid_shape: ``(nz, ny, nx)`` voxel counts of the matrices' grid.
        voxel_mm: Voxel size in mm (one number or ``(dz, dy, dx)``).
        ct_file: A matRad-format ``.mat`` with the case's ``ct``.
        variable: The dose-matrix variable in the beam files.
        beamlet_mm: Nominal beamlet size (mm) recorded in the beams.
        check_protocol: Require the protocol's structures to be among the imported ones.
    """
    folder = Path(path)
    if not folder.is_dir():
        raise CaseFormatError(f"CORT case folder {folder} does not exist or is not a directory")
    proto, rx, fx, protocol = _resolve_protocol(protocol, prescription_gy, fractions)
    available = sorted(p.name[: -len("_VOILIST.mat")] for p in folder.glob("*_VOILIST.mat"))
    mapping = _normalise_structures(structures, available, f"CORT folder {folder}")
    if check_protocol:
        _check_protocol_structures(proto, [m[2] for m in mapping], protocol)
    beam_files = _cort_beams(folder)
    if not beam_files:
        raise CaseFormatError(f"{folder} has no beam files named Gantry{{g}}_Couch{{c}}_D.mat")
    chosen = [beam_files[i] for i in _select_beams([(g, c) for g, c, _ in beam_files], beams, f"CORT folder {folder}")]

    dims, (dz, dy, dx), density, grid_source = _cort_grid(folder, grid_shape, voxel_mm, ct_file)
    ny, nx, nz = dims
    n_grid = ny * nx * nz
    # the MATLAB row index of rtenv flat index f, to pick the matrix rows
    masks = {}
    for src, _, _ in mapping:
        masks[src] = np.unique(matlab_to_grid_index(_cort_voilist(folder, src), dims, f"{src}_VOILIST.mat 'v'"))
    dose_rows = np.unique(np.concatenate(list(masks.values())))
    k, j, i = np.unravel_index(dose_rows, (nz, ny, nx))
    matlab_rows = np.ravel_multi_index((ny - 1 - j, i, k), (ny, nx, nz), order="F")

    blocks, beam_objs = [], []
    for g, c, p in chosen:
        data = _loadmat(p, variable_names=[variable])
        if variable not in data:
            raise CaseFormatError(f"{p} has no variable {variable!r} (the voxels x beamlets dose matrix)")
        D = data[variable]
        if not (sp.issparse(D) or (isinstance(D, np.ndarray) and D.ndim == 2 and np.issubdtype(D.dtype, np.number))):
            raise CaseFormatError(f"{p}: {variable!r} must be a 2-D (sparse) numeric matrix, got {type(D).__name__}")
        if D.shape[0] != n_grid:
            raise CaseFormatError(f"{p}: {variable!r} has {D.shape[0]} rows; the grid ({grid_source}) has "
                                  f"{ny} x {nx} x {nz} = {n_grid} voxels, one row each")
        block = sp.csr_matrix(D)[matlab_rows].astype(np.float32)
        if block.nnz and (not np.all(np.isfinite(block.data)) or block.data.min() < 0):
            raise CaseFormatError(f"{p}: {variable!r} has negative or non-finite entries")
        nb = D.shape[1]
        if nb == 0:
            raise CaseFormatError(f"{p}: {variable!r} has no beamlet columns")
        blocks.append(block)
        beam_objs.append(Beam(g, c, float(beamlet_mm), _cort_beamlets(p, nb, beamlet_mm)))
    D_all = sp.hstack(blocks, format="csr", dtype=np.float32)

    row_of = np.full(n_grid, -1, dtype=np.int64)
    row_of[dose_rows] = np.arange(dose_rows.size)
    voxel_cc = dz * dy * dx / 1000.0
    structs = [Structure(new, role, row_of[masks[src]], voxel_cc) for src, role, new in mapping]  # type: ignore[arg-type]
    target_pts = Grid((nz, ny, nx), (dz, dy, dx), (0.0, 0.0, 0.0)).points(dose_rows[structs[0].rows])
    return PlanningCase(
        name=name or folder.name, site=site if site is not None else proto.disease_site.lower(),
        grid_shape=(nz, ny, nx), voxel_mm=(dz, dy, dx),
        isocenter_mm=tuple(float(v) for v in target_pts.mean(axis=0)),  # type: ignore[arg-type]
        dose_rows=dose_rows, structures=structs, beams=beam_objs, dose_influence=D_all,
        prescription_gy=rx, fractions=fx, protocol=protocol, density=density,
        metadata={"source_format": "cort", "source_path": str(folder), "grid_source": grid_source,
                  "grid_origin_mm": [0.0, 0.0, 0.0],
                  "structure_map": {src: [role, new] for src, role, new in mapping},
                  "beam_files": [p.name for _, _, p in chosen]},
    )


def _cort_beamlets(d_file: Path, n: int, beamlet_mm: float) -> np.ndarray:
    info = d_file.with_name(d_file.name[: -len("_D.mat")] + "_BEAMINFO.mat")
    if info.is_file():
        data = _loadmat(info)
        if "x" in data and "y" in data:
            x, y = np.asarray(data["x"], float).reshape(-1), np.asarray(data["y"], float).reshape(-1)
            if x.size == n and y.size == n:
                return (np.stack([x, y], axis=1) * beamlet_mm).astype(np.float32)
            raise CaseFormatError(f"{info}: has {x.size} beamlet positions, {d_file.name} has {n} beamlets")
    return np.stack([(np.arange(n) + 0.5) * beamlet_mm, np.zeros(n)], axis=1).astype(np.float32)


# ----------------------------------------------------------------------------- matRad / pyRadPlan
def _block_reduce(a: np.ndarray, f: int) -> np.ndarray:
    """Mean over ``f x f x f`` blocks (edges padded with the edge-block's own voxels only)."""
    shape = tuple(math.ceil(s / f) * f for s in a.shape)
    pad = np.zeros(shape, dtype=np.float64)
    cnt = np.zeros(shape, dtype=np.float64)
    pad[: a.shape[0], : a.shape[1], : a.shape[2]] = a
    cnt[: a.shape[0], : a.shape[1], : a.shape[2]] = 1.0
    new = tuple(s // f for s in shape)
    sums = pad.reshape(new[0], f, new[1], f, new[2], f).sum(axis=(1, 3, 5))
    n = cnt.reshape(new[0], f, new[1], f, new[2], f).sum(axis=(1, 3, 5))
    return sums / np.maximum(n, 1.0)


def load_matrad(
    path: str | Path, structures: Mapping[str, StructureSpec] | None = None,
    beams: Sequence[BeamSpec] | None = None, *, protocol: str, prescription_gy: float | None = None,
    fractions: int | None = None, name: str | None = None, site: str | None = None,
    body: str | None = None, downsample: int = 1, beamlet_mm: float = 10.0, margin_mm: float = 5.0,
    beam_model: BeamModel | None = None, check_protocol: bool = True, progress: bool = False,
) -> PlanningCase:
    """Import a matRad / pyRadPlan phantom ``.mat`` (``ct``, ``cst``) and compute its dose matrix.

    ``ct.cube`` (relative electron density; or ``ct.cubeHU``, converted by :func:`hu_to_density`) is
    a MATLAB ``(rows = y, columns = x, slices = z)`` array, ``ct.resolution.x/y/z`` in mm. Each
    ``cst`` row is ``(index, name, type 'TARGET'/'OAR', {1-based column-major voxel indices}, ...)``.
    The phantom becomes an rtenv :class:`~rtenv.phantom.Phantom` and
    :func:`rtenv.scenarios.build_case` computes the dose-influence matrix (Gy per unit fluence) with
    rtenv's pencil-beam engine for ``beams`` (gantry angles with couch 0, or ``(gantry, couch)``
    pairs in degrees; default: 7 equispaced coplanar beams), beamlets of ``beamlet_mm`` covering the
    target plus ``margin_mm``, isocentre at the target centroid.

    Args:
        path: The ``.mat`` file (e.g. matRad's ``phantoms/TG119.mat``).
        structures: ``{cst name: role | (role, rtenv name)}``; default: every cst row by its type
            (needs exactly one TARGET row).
        beams: Beam directions.
        protocol: Scoring protocol (shipped name or JSON path); Rx (Gy) and fractions default to it.
        prescription_gy: Total prescribed dose in Gy.
        fractions: Number of fractions.
        name: Case name (default: the file's stem).
        site: Anatomical site (default: the protocol's disease site, lower case).
        body: cst name of the body outline (default: a row named body/external, any case; else
            density > 0.05). Only its isocentre slice is added to the rows, for dose figures.
        downsample: Integer factor to coarsen the grid (density averaged, a coarse voxel belongs to
            a structure when at least half of its fine voxels do), to keep the matrix small.
        beamlet_mm: Beamlet size at the isocentre plane (mm).
        margin_mm: Beamlet coverage margin around the target's beam's-eye view (mm).
        beam_model: Pencil-beam model parameters (default: rtenv's 6 MV model).
        check_protocol: Require the protocol's structures to be among the imported ones.
        progress: Show a progress bar over beams.
    """
    file = Path(path)
    if not file.is_file():
        raise CaseFormatError(f"matRad phantom file {file} does not exist")
    data = _loadmat(file, squeeze_me=True, struct_as_record=False)
    for var in ("ct", "cst"):
        if var not in data:
            raise CaseFormatError(f"{file} has no variable {var!r} (a matRad phantom holds 'ct' and 'cst'); "
                                  f"variables: {sorted(k for k in data if not k.startswith('__'))}")
    ct = data["ct"]
    cube = _ct_cube(ct, f"{file.name}: ct")
    rx_mm, ry_mm, rz_mm = _resolution(ct, f"{file.name}: ct")
    dims = cube.shape  # (ny, nx, nz)
    if hasattr(ct, "cubeDim"):
        cd = tuple(int(a) for a in np.asarray(ct.cubeDim).reshape(-1))
        if len(cd) == 2:  # MATLAB's size() of a one-slice cube
            cd = (*cd, 1)
        if cd != tuple(dims):
            raise CaseFormatError(f"{file.name}: ct.cubeDim {cd} does not match the cube's shape {tuple(dims)}")

    cst = data["cst"]
    if not isinstance(cst, np.ndarray) or cst.dtype != object:
        raise CaseFormatError(f"{file.name}: cst must be a cell array (rows: index, name, type, voxel indices, ...)")
    if cst.ndim == 1:
        cst = cst[None, :]
    if cst.ndim != 2 or cst.shape[1] < 4:
        raise CaseFormatError(f"{file.name}: cst has shape {cst.shape}; expected one row per structure with at least "
                              "4 columns (index, name, type, voxel indices)")
    rows_by_name: dict[str, tuple[str, Any, int]] = {}
    for r in range(cst.shape[0]):
        nm, typ = _unwrap(cst[r, 1]), _unwrap(cst[r, 2])
        if not isinstance(nm, str) or not isinstance(typ, str):
            raise CaseFormatError(f"{file.name}: cst row {r + 1} must have a name and a type string in columns 2-3, "
                                  f"got {nm!r}, {typ!r}")
        if nm in rows_by_name:  # a second row of that name would replace the first
            raise CaseFormatError(f"{file.name}: cst names structure {nm!r} twice (rows {rows_by_name[nm][2] + 1} and "
                                  f"{r + 1}); give each structure its own name")
        rows_by_name[nm] = (typ, cst[r, 3], r)
    if structures is None:
        structures = {}
        for nm, (typ, _, _) in rows_by_name.items():
            if typ.upper() not in ("TARGET", "OAR"):
                raise CaseFormatError(f"{file.name}: cst structure {nm!r} has type {typ!r}; expected 'TARGET' or 'OAR'")
            structures[nm] = typ.lower()
    mapping = _normalise_structures(structures, list(rows_by_name), f"{file.name} cst")
    proto, rx, fx, protocol = _resolve_protocol(protocol, prescription_gy, fractions)
    if check_protocol:
        _check_protocol_structures(proto, [m[2] for m in mapping], protocol)

    ny, nx, nz = dims
    density = _matrad_cube_to_grid(cube)
    n_grid = density.size

    def mask_of(nm: str) -> np.ndarray:
        vox = _unwrap(rows_by_name[nm][1])
        if isinstance(vox, np.ndarray) and vox.dtype == object:  # one list per CT scenario: the first
            vox = _unwrap(vox.reshape(-1)[0])
        m = np.zeros(n_grid, dtype=bool)
        m[matlab_to_grid_index(np.asarray(vox), dims, f"{file.name}: cst voxel indices of {nm!r}")] = True
        return m.reshape(density.shape)

    masks = {new: (role, mask_of(src)) for src, role, new in mapping}
    body_name = body
    if body_name is None:
        body_name = next((n for n in rows_by_name if n.lower() in ("body", "external", "skin")), None)
    elif body_name not in rows_by_name:
        raise CaseFormatError(f"{file.name} cst has no body structure {body_name!r}; it has {list(rows_by_name)}")
    body_mask = mask_of(body_name) if body_name is not None else density > 0.05

    # voxel-centre coordinates: x and z as in the file, y reversed (LPS posterior -> anterior)
    x0 = _axis_origin(ct, "x", nx, rx_mm)
    z0 = _axis_origin(ct, "z", nz, rz_mm)
    y_first = _axis_origin(ct, "y", ny, ry_mm)
    y0 = -(y_first + (ny - 1) * ry_mm)
    voxel = (rz_mm, ry_mm, rx_mm)
    f = check_integer("downsample", downsample, 1)
    if f > 1:
        density = _block_reduce(density, f).astype(np.float32)
        body_mask = _block_reduce(body_mask, f) >= 0.5
        coarse = {}
        for nm, (role, m) in masks.items():
            cm = _block_reduce(m, f) >= 0.5
            if not cm.any():
                raise ValueError(f"structure {nm!r} vanishes at downsample={f}; use a smaller factor")
            coarse[nm] = (role, cm)
        masks = coarse
        shift = (f - 1) / 2.0
        x0, y0, z0 = x0 + shift * rx_mm, y0 + shift * ry_mm, z0 + shift * rz_mm
        voxel = (rz_mm * f, ry_mm * f, rx_mm * f)
    grid = Grid(tuple(int(s) for s in density.shape), voxel, (x0, y0, z0))  # type: ignore[arg-type]
    phantom = Phantom(site=site if site is not None else proto.disease_site.lower(), seed=0, grid=grid,
                      density=density, body=body_mask, structures=masks)

    if beams is None:
        pairs = [(round(i * 360.0 / 7, 1), 0.0) for i in range(7)]
    else:
        if isinstance(beams, (str, bytes)) or not isinstance(beams, Sequence) or not beams:
            raise ValueError(f"beams must be a non-empty list of gantry angles or (gantry, couch) pairs, got {beams!r}")
        pairs = []
        for b in beams:
            pair = (b, 0.0) if is_real(b) else tuple(b) if isinstance(b, Sequence) and len(b) == 2 else ()
            if not (pair and all(is_real(a) and math.isfinite(a) for a in pair)):
                raise ValueError(f"beam {b!r} must be a gantry angle or a (gantry, couch) pair, finite degrees")
            pair = (float(pair[0]), float(pair[1]))
            if any(all(abs((a - q + 180.0) % 360.0 - 180.0) < _ANGLE_TOL for a, q in zip(pair, p, strict=True))
                   for p in pairs):
                raise ValueError(f"beam {b!r} is requested twice")
            pairs.append(pair)
    scenario = Scenario(
        name="import", description=f"imported from {file.name}", site=phantom.site,
        structures=tuple(masks), beams=tuple(pairs), prescription_gy=rx, fractions=fx, protocol=protocol,
        beamlet_mm=float(beamlet_mm), margin_mm=float(margin_mm), voxel_mm=float(max(voxel)),
        beam_model=beam_model or BeamModel(),
    )
    case = build_case(phantom, scenario, name=name or file.stem, progress=progress)
    for key in ("scenario", "phantom_seed", "generator_version"):
        case.metadata.pop(key, None)
    case.metadata.update({
        "source_format": "matrad", "source_path": str(file), "downsample": f,
        "structure_map": {src: [role, new] for src, role, new in mapping}, "body_structure": body_name,
        "beamlet_mm": float(beamlet_mm), "margin_mm": float(margin_mm),
    })
    return case


# ----------------------------------------------------------------------------- PortPy
def _read_json(path: Path) -> Any:
    if not path.is_file():
        raise CaseFormatError(f"missing file {path}")
    try:
        return read_json(path, "PortPy JSON file")
    except ValueError as exc:
        raise CaseFormatError(str(exc)) from None


def _need(meta: Mapping[str, Any], key: str, where: Path) -> Any:
    if not isinstance(meta, Mapping) or key not in meta:
        raise CaseFormatError(f"{where} lacks field {key!r}")
    return meta[key]


def _h5_dataset(ref: Any, base: Path, where: str) -> np.ndarray:
    """Read a PortPy ``"file.h5/dataset/path"`` reference, relative to ``base`` (the JSON's folder)."""
    if not isinstance(ref, str) or ".h5" not in ref:
        raise CaseFormatError(f"{where}: expected a 'file.h5/dataset' reference, got {ref!r}")
    fname, _, dset = ref.partition(".h5")
    file = base / (fname + ".h5")
    if not file.is_file():
        raise CaseFormatError(f"{where}: missing file {file}")
    try:
        with h5py.File(file, "r") as h:
            key = dset.strip("/")
            if not key or key not in h or not isinstance(h[key], h5py.Dataset):
                raise CaseFormatError(f"{where}: {file.name} has no dataset {dset!r}")
            return h[key][()]
    except (OSError, KeyError, RuntimeError) as exc:
        raise CaseFormatError(f"{where}: {file} is not a readable HDF5 file ({type(exc).__name__}: {exc})") from exc


def _portpy_beams(folder: Path) -> list[tuple[int, dict[str, Any], Path]]:
    beam_dir = folder / "Beams"
    if not beam_dir.is_dir():
        raise CaseFormatError(f"{folder} has no Beams/ folder (Beam_{{id}}_MetaData.json files)")
    out = []
    for p in beam_dir.glob("Beam_*_MetaData.json"):
        meta = _read_json(p)
        bid = _need(meta, "ID", p)
        out.append((int(bid), meta, p))
    if not out:
        raise CaseFormatError(f"{beam_dir} has no Beam_{{id}}_MetaData.json files")
    return sorted(out, key=lambda t: t[0])


def load_portpy(
    path: str | Path, structures: Mapping[str, StructureSpec] | None = None,
    beams: Sequence[BeamSpec] | None = None, *, protocol: str, prescription_gy: float | None = None,
    fractions: int | None = None, name: str | None = None, site: str | None = None,
    beam_ids: Sequence[int] | None = None, matrix: str = "sparse", load_ct: bool = True,
    check_protocol: bool = True,
) -> PlanningCase:
    """Import a PortPy patient folder (e.g. ``Lung_Patient_6/``).

    Reads ``StructureSet_MetaData.json`` (list of ``{name, structure_mask_3d_File}``; masks are
    ``(z, y, x)`` CT-grid arrays), ``OptimizationVoxels_MetaData.json`` (``ct_to_dose_voxel_map_File``:
    a ``(z, y, x)`` array giving each CT voxel's optimisation-voxel index or -1;
    ``ct_voxel_resolution_xyz_mm``; ``dose_voxel_resolution_xyz_mm``; ``ct_origin_xyz_mm``),
    ``Beams/Beam_{id}_MetaData.json`` (``gantry_angle``, ``couch_angle``, ``iso_center``,
    ``beamlets`` with ``position_x_mm_File``/``position_y_mm_File``/``width_mm_File``, and
    ``influenceMatrixSparse_File``: ``N x 3`` (optimisation voxel, beamlet of the beam, value)
    triplets, or ``influenceMatrixFull_File`` with ``matrix="full"``), optionally
    ``PlannerBeams.json`` (``IDs``: the default beam choice) and ``CT_MetaData.json``
    (``ct_hu_3d_File``: HU, converted with :func:`hu_to_density`). ``*_File`` paths are relative to
    the JSON file's folder.

    Each optimisation voxel becomes one rtenv voxel on the grid of optimisation voxels (CT voxels
    grouped in blocks of ``dose / CT resolution``); an optimisation voxel belongs to a structure when
    any of its CT voxels does (PortPy's rule); every rtenv voxel has the optimisation voxel's volume.

    Args:
        path: The patient folder.
        structures: ``{PortPy name: role | (role, rtenv name)}``; exactly one target.
        beams: Beam subset by gantry angle or ``(gantry, couch)`` (deg).
        protocol: Scoring protocol (shipped name or JSON path); Rx (Gy) and fractions default to it.
        prescription_gy: Total prescribed dose in Gy.
        fractions: Number of fractions.
        name: Case name (default: the folder name).
        site: Anatomical site (default: the protocol's disease site, lower case).
        beam_ids: Beam subset by PortPy beam ID (default: ``PlannerBeams.json`` if present, else all).
        matrix: ``"sparse"`` (truncated triplets, default) or ``"full"`` influence matrices.
        load_ct: Read the CT (if referenced) for the case's density.
        check_protocol: Require the protocol's structures to be among the imported ones.
    """
    folder = Path(path)
    if not folder.is_dir():
        raise CaseFormatError(f"PortPy patient folder {folder} does not exist or is not a directory")
    if matrix not in ("sparse", "full"):
        raise ValueError(f"matrix must be 'sparse' or 'full', got {matrix!r}")
    proto, rx, fx, protocol = _resolve_protocol(protocol, prescription_gy, fractions)

    ss_path = folder / "StructureSet_MetaData.json"
    ss = _read_json(ss_path)
    if not isinstance(ss, list) or not all(isinstance(s, Mapping) for s in ss):
        raise CaseFormatError(f"{ss_path} must be a list of structure objects")
    names = [str(_need(s, "name", ss_path)) for s in ss]
    twice = sorted({n for n in names if names.count(n) > 1})
    if twice:  # a later entry of that name would replace the earlier one
        raise CaseFormatError(f"{ss_path} names structures {twice} more than once; give each structure its own name")
    by_name = dict(zip(names, ss, strict=True))
    mapping = _normalise_structures(structures, list(by_name), f"{ss_path.name}")
    if check_protocol:
        _check_protocol_structures(proto, [m[2] for m in mapping], protocol)

    ov_path = folder / "OptimizationVoxels_MetaData.json"
    ov = _read_json(ov_path)
    vmap = np.asarray(_h5_dataset(_need(ov, "ct_to_dose_voxel_map_File", ov_path), folder, ov_path.name))
    if vmap.ndim != 3 or not np.issubdtype(vmap.dtype, np.integer):
        raise CaseFormatError(f"{ov_path.name}: ct_to_dose_voxel_map must be a 3-D integer (z, y, x) array, got "
                              f"shape {vmap.shape} dtype {vmap.dtype}")
    ct_res = np.asarray(_need(ov, "ct_voxel_resolution_xyz_mm", ov_path), dtype=np.float64)
    dose_res = np.asarray(ov.get("dose_voxel_resolution_xyz_mm", ct_res), dtype=np.float64)
    if not all(r.shape == (3,) and np.all(np.isfinite(r)) and np.all(r > 0) for r in (ct_res, dose_res)):
        raise CaseFormatError(f"{ov_path.name}: ct/dose voxel resolutions must be 3 finite positive numbers (x, y, z "
                              f"mm), got {ct_res.tolist()} and {dose_res.tolist()}")
    ct_meta_path = folder / "CT_MetaData.json"
    ct_meta = _read_json(ct_meta_path) if ct_meta_path.is_file() else {}
    origin = np.asarray(ov.get("ct_origin_xyz_mm", ct_meta.get("origin_xyz_mm", [0.0, 0.0, 0.0])), dtype=np.float64)
    if origin.shape != (3,) or not np.all(np.isfinite(origin)):
        raise CaseFormatError(f"{ov_path.name}: the CT origin must be 3 finite numbers (x, y, z mm), got "
                              f"{origin.tolist()}")
    n_opt = int(vmap.max()) + 1
    if n_opt <= 0:
        raise CaseFormatError(f"{ov_path.name}: ct_to_dose_voxel_map has no optimisation voxels (all < 0)")

    # structure -> optimisation voxels
    opt_sets = {}
    for src, _, _ in mapping:
        mask = np.asarray(_h5_dataset(_need(by_name[src], "structure_mask_3d_File", ss_path), folder,
                                      f"{ss_path.name} structure {src!r}"))
        if mask.shape != vmap.shape:
            raise CaseFormatError(f"structure {src!r}: mask has shape {mask.shape}, the CT-to-voxel map has "
                                  f"{vmap.shape} (both (z, y, x))")
        ids = np.unique(vmap[(mask != 0) & (vmap >= 0)])
        if ids.size == 0:
            raise CaseFormatError(f"structure {src!r} has no optimisation voxels (outside the calculation box?)")
        opt_sets[src] = ids
    opt_rows = np.unique(np.concatenate(list(opt_sets.values())))

    # optimisation-voxel grid: blocks of k CT voxels per axis, aligned to the first block
    k_xyz = np.maximum(np.round(dose_res / ct_res).astype(np.int64), 1)
    if not np.allclose(k_xyz * ct_res, dose_res, rtol=1e-3, atol=0.0):  # blocks of 2 and 3 voxels would pass for 2
        raise CaseFormatError(f"{ov_path.name}: the dose voxels ({dose_res.tolist()} mm, x y z) are not whole blocks "
                              f"of CT voxels ({ct_res.tolist()} mm); the importer needs a whole number per axis")
    k_zyx = k_xyz[::-1]
    flat = vmap.reshape(-1)
    in_rows = np.zeros(n_opt, dtype=bool)
    in_rows[opt_rows] = True
    sel = np.flatnonzero(flat >= 0)
    ids_all = flat[sel]
    coords_all = np.unravel_index(sel, vmap.shape)
    offset = np.array([int(c.min()) % int(kk) for c, kk in zip(coords_all, k_zyx, strict=True)])
    keep = in_rows[ids_all]
    ids = ids_all[keep]
    counts = np.bincount(ids, minlength=n_opt).astype(np.float64)
    cell = []
    for axis in range(3):
        centre = np.bincount(ids, weights=coords_all[axis][keep], minlength=n_opt)[opt_rows] / counts[opt_rows]
        cell.append(np.floor((centre - offset[axis]) / k_zyx[axis] + 1e-9).astype(np.int64))
    shape = tuple(int(math.ceil((vmap.shape[a] - offset[a]) / k_zyx[a])) for a in range(3))
    nz, ny, nx = shape
    flat_idx = np.ravel_multi_index((cell[0], ny - 1 - cell[1], cell[2]), shape)  # y reversed: LPS -> anterior
    if np.unique(flat_idx).size != flat_idx.size:
        raise CaseFormatError(f"{ov_path.name}: the optimisation voxels do not form a regular grid of "
                              f"{tuple(k_xyz)} CT-voxel blocks (x, y, z); two voxels share a block")
    order = np.argsort(flat_idx)
    dose_rows = flat_idx[order]
    opt_sorted = opt_rows[order]
    row_of_opt = np.full(n_opt, -1, dtype=np.int64)
    row_of_opt[opt_sorted] = np.arange(opt_sorted.size)
    voxel_xyz = k_xyz * ct_res
    voxel_cc = float(np.prod(voxel_xyz)) / 1000.0
    structs = [Structure(new, role, np.sort(row_of_opt[opt_sets[src]]), voxel_cc)  # type: ignore[arg-type]
               for src, role, new in mapping]
    first_xyz = origin + (offset[::-1] + (k_xyz - 1) / 2.0) * ct_res
    grid_origin = (float(first_xyz[0]), float(-(first_xyz[1] + (ny - 1) * voxel_xyz[1])), float(first_xyz[2]))

    # beams
    all_beams = _portpy_beams(folder)
    pairs = [(check_real(f"{p.name}: gantry_angle", _need(m, "gantry_angle", p)),
              check_real(f"{p.name}: couch_angle", m.get("couch_angle", 0.0))) for _, m, p in all_beams]
    if beam_ids is not None and beams is not None:
        raise ValueError("give beams (angles) or beam_ids, not both")
    if beam_ids is not None or (beams is None and (folder / "PlannerBeams.json").is_file()):
        if beam_ids is None:
            pb_path = folder / "PlannerBeams.json"
            beam_ids = _need(_read_json(pb_path), "IDs", pb_path)
        id_list = [b[0] for b in all_beams]
        if (isinstance(beam_ids, (str, bytes)) or not isinstance(beam_ids, Sequence | np.ndarray)
                or np.ndim(beam_ids) != 1 or len(beam_ids) == 0
                or not all(is_integer(b) for b in beam_ids) or len(set(beam_ids)) != len(beam_ids)):
            raise ValueError(f"beam_ids must be a non-empty list of distinct integer beam IDs, got {beam_ids!r}; "
                             f"beam IDs: {id_list}")
        chosen = []
        for bid in beam_ids:
            if int(bid) not in id_list:
                raise CaseFormatError(f"{folder} has no beam with ID {bid}; beam IDs: {id_list}")
            chosen.append(id_list.index(int(bid)))
    else:
        chosen = _select_beams(pairs, beams, f"PortPy folder {folder}")

    key = "influenceMatrixSparse_File" if matrix == "sparse" else "influenceMatrixFull_File"
    blocks, beam_objs, iso = [], [], None
    for ci in chosen:
        bid, meta, p = all_beams[ci]
        base = p.parent
        bl = _need(meta, "beamlets", p)
        px = np.asarray(_h5_dataset(_need(bl, "position_x_mm_File", p), base, p.name), dtype=np.float64).reshape(-1)
        py = np.asarray(_h5_dataset(_need(bl, "position_y_mm_File", p), base, p.name), dtype=np.float64).reshape(-1)
        if px.size != py.size or px.size == 0:
            raise CaseFormatError(f"{p.name}: beamlet position arrays have sizes {px.size} and {py.size}")
        n_b = px.size
        width = (np.asarray(_h5_dataset(bl["width_mm_File"], base, p.name), dtype=np.float64).reshape(-1)
                 if "width_mm_File" in bl else np.array([2.5]))
        raw = np.asarray(_h5_dataset(_need(meta, key, p), base, f"{p.name} {key}"))
        if matrix == "sparse":
            if raw.ndim != 2 or raw.shape[1] != 3:
                raise CaseFormatError(f"{p.name}: {key} must be an N x 3 array of (voxel, beamlet, value) triplets, "
                                      f"got shape {raw.shape}")
            r_i, c_i, vals = raw[:, 0], raw[:, 1], raw[:, 2]
            if raw.size and (np.any(r_i != np.round(r_i)) or np.any(c_i != np.round(c_i))):
                raise CaseFormatError(f"{p.name}: {key} voxel/beamlet indices must be integers")
            r_i, c_i = r_i.astype(np.int64), c_i.astype(np.int64)
            if raw.size and (r_i.min() < 0 or r_i.max() >= n_opt or c_i.min() < 0 or c_i.max() >= n_b):
                raise CaseFormatError(
                    f"{p.name}: {key} indices out of range: voxels [{r_i.min()}, {r_i.max()}] "
                    f"(valid [0, {n_opt - 1}]), beamlets [{c_i.min()}, {c_i.max()}] (valid [0, {n_b - 1}])")
            A = sp.csr_matrix((vals.astype(np.float64), (r_i, c_i)), shape=(n_opt, n_b))
        else:
            if raw.ndim != 2 or raw.shape != (n_opt, n_b):
                raise CaseFormatError(f"{p.name}: {key} has shape {raw.shape}; expected ({n_opt}, {n_b}) "
                                      "(optimisation voxels x beamlets)")
            A = sp.csr_matrix(raw.astype(np.float64))
        block = A[opt_sorted].astype(np.float32)
        if block.nnz and (not np.all(np.isfinite(block.data)) or block.data.min() < 0):
            raise CaseFormatError(f"{p.name}: {key} has negative or non-finite values")
        blocks.append(block)
        beam_objs.append(Beam(pairs[ci][0], pairs[ci][1], float(np.median(width)),
                              np.stack([px, py], axis=1).astype(np.float32)))
        if iso is None and isinstance(meta.get("iso_center"), Mapping):
            c = meta["iso_center"]
            try:
                iso = (float(c["x_mm"]), -float(c["y_mm"]), float(c["z_mm"]))
            except (KeyError, TypeError, ValueError):
                raise CaseFormatError(f"{p.name}: iso_center must have numeric x_mm, y_mm, z_mm") from None
    D = sp.hstack(blocks, format="csr", dtype=np.float32)
    grid = Grid(shape, (float(voxel_xyz[2]), float(voxel_xyz[1]), float(voxel_xyz[0])), grid_origin)  # type: ignore
    if iso is None:
        iso = tuple(float(v) for v in grid.points(dose_rows[structs[0].rows]).mean(axis=0))

    density = None
    if load_ct and "ct_hu_3d_File" in ct_meta:
        hu = np.asarray(_h5_dataset(ct_meta["ct_hu_3d_File"], folder, ct_meta_path.name))
        if hu.shape != vmap.shape:
            raise CaseFormatError(f"{ct_meta_path.name}: CT has shape {hu.shape}, the voxel map {vmap.shape}")
        centre = tuple(slice(int(offset[a] + k_zyx[a] // 2), None, int(k_zyx[a])) for a in range(3))
        sampled = hu[centre][:nz, :ny, :nx]
        full = np.full(shape, -1000.0)
        full[: sampled.shape[0], : sampled.shape[1], : sampled.shape[2]] = sampled
        density = hu_to_density(full[:, ::-1, :])

    return PlanningCase(
        name=name or folder.name, site=site if site is not None else proto.disease_site.lower(),
        grid_shape=shape, voxel_mm=grid.voxel_mm, isocenter_mm=iso, dose_rows=dose_rows,  # type: ignore[arg-type]
        structures=structs, beams=beam_objs, dose_influence=D, prescription_gy=rx, fractions=fx,
        protocol=protocol, density=density,
        metadata={"source_format": "portpy", "source_path": str(folder), "matrix": matrix,
                  "grid_origin_mm": list(grid_origin), "ct_voxels_per_voxel_xyz": [int(v) for v in k_xyz],
                  "structure_map": {src: [role, new] for src, role, new in mapping},
                  "beam_ids": [all_beams[ci][0] for ci in chosen],
                  "optimization_voxel_ids": opt_sorted.tolist(),  # row i is PortPy optimisation voxel [i]
                  "n_optimization_voxels": n_opt},
    )


# ----------------------------------------------------------------------------- entry points
_LOADERS = {"cort": load_cort, "matrad": load_matrad, "portpy": load_portpy}


def import_case(fmt: str, path: str | Path, **options: Any) -> PlanningCase:
    """Import a planning case from ``path`` in format ``fmt`` (``"cort"``, ``"matrad"``, ``"portpy"``).

    ``options`` are those of :func:`load_cort`, :func:`load_matrad` or :func:`load_portpy`
    (``structures``, ``beams``, ``protocol`` (required), ``prescription_gy`` (Gy), ``fractions``, ...).

    Raises:
        CaseFormatError: missing or malformed files, variables or fields (the message names them).
        ValueError: invalid options (unknown format or role, no single target, ...).
    """
    valid = import_options(fmt)
    if "protocol" not in options or not options["protocol"]:
        raise ValueError("import_case needs protocol= (a shipped protocol name or a JSON file path)")
    key = fmt.lower().strip()
    unknown = sorted(set(options) - set(valid))
    if unknown:
        raise ValueError(f"option(s) {unknown} do not apply to the {key} format; valid: {valid}")
    return _LOADERS[key](path, **options)


def import_options(fmt: str) -> list[str]:
    """The options :func:`import_case` takes for format ``fmt`` (the loader's keyword arguments)."""
    key = fmt.lower().strip()
    if key not in _LOADERS:
        raise ValueError(f"unknown import format {fmt!r}; valid formats: {', '.join(FORMATS)}")
    return [p for p in inspect.signature(_LOADERS[key]).parameters if p != "path"]


#: The command-line option of each :func:`import_case_to_file` argument.
IMPORT_FLAGS = {"beams": "--beams", "structures": "--structures", "beam_ids": "--beam-ids", "protocol": "--protocol",
                "prescription_gy": "--rx", "fractions": "--fractions", "name": "--name", "voxel_mm": "--voxel-mm",
                "downsample": "--downsample", "check_protocol": "--no-check-protocol"}


def import_case_to_file(
    fmt: str, path: str | Path, out: str | Path, *, beams: str | None = None, structures: str | None = None,
    beam_ids: str | None = None, **options: Any,
) -> tuple[PlanningCase, Path]:
    """CLI helper: parse the string options, import, and save the case to ``out`` (``.rtcase``).

    ``beams``: ``"0,72,144"`` or ``"58:0,216:32"`` (deg); ``structures``:
    ``"NAME=ROLE[:NEW_NAME],..."``; ``beam_ids``: ``"0,1,2"`` (PortPy only). Options left as ``None``
    are dropped so the loader's defaults apply. Returns the case and the written path.
    """
    given = {k: v for k, v in {"beams": beams, "structures": structures, "beam_ids": beam_ids, **options}.items()
             if v is not None}
    valid = import_options(fmt)
    unknown = [IMPORT_FLAGS.get(k, k) for k in given if k not in valid]
    if unknown:
        raise ValueError(f"{', '.join(unknown)} {'does' if len(unknown) == 1 else 'do'} not apply to {fmt} imports; "
                         "its options: "
                         f"{', '.join(IMPORT_FLAGS[k] for k in valid if k in IMPORT_FLAGS)}")
    opts = {k: v for k, v in options.items() if v is not None}
    if beams is not None:
        opts["beams"] = parse_beams(beams)
    if structures is not None:
        opts["structures"] = parse_structure_map(structures)
    if beam_ids is not None:
        try:
            opts["beam_ids"] = [int(b) for b in beam_ids.split(",")]  # int() takes surrounding blanks, not ''
        except ValueError:
            raise ValueError(f"bad beam IDs {beam_ids!r}: expected integers separated by commas") from None
    case = import_case(fmt, path, **opts)
    return case, case.save(out)
