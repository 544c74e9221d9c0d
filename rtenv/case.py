"""Planning cases: anatomy, beams and the sparse dose-influence matrix.

A :class:`PlanningCase` is everything the TPS needs to optimise a plan and everything the
evaluation needs to score it:

* a voxel grid (shape ``(nz, ny, nx)``, voxel size in mm) and optionally its relative electron
  density (for display and for recomputing dose);
* the *dose rows*: flat grid indices of the voxels whose dose the matrix gives (the union of the
  structures plus, for built-in cases, the body voxels of the isocentre's axial slice, used for
  dose-slice figures);
* structures (name, role ``"target"`` or ``"oar"``, row indices into the dose rows, voxel volume
  in cc); structures may overlap, each keeps its full mask;
* beams (gantry and couch angles in degrees, number of beamlets, beamlet size in mm and the
  beamlet centres in the isocentre plane);
* the dose-influence matrix ``D`` (rows x beamlets, float32 CSR, Gy per unit fluence), so that
  the dose in Gy is ``D @ x`` for a fluence vector ``x >= 0``;
* the prescription (Gy, fractions) and the name of its scoring protocol.

Cases save to and load from a single compressed ``.rtcase`` file (a numpy ``.npz`` archive with
a JSON header carrying a format name and version).
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import uuid
import zipfile
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
import scipy.sparse as sp

from rtenv.evaluation import dose_at_volume_percent
from rtenv.validation import check_density, check_integer, check_real

FORMAT_NAME = "rtenv-case"
FORMAT_VERSION = 1

Role = Literal["target", "oar"]


def rounded_up_ratio(dx: np.ndarray, target: float) -> np.ndarray:
    """Per element, ``target / dx`` in ``dx``'s float type, raised by the rounding steps (a step
    or two) that make ``dx * factor``, computed in that type, at least ``target`` (``dx > 0``)."""
    kind = dx.dtype.type
    factor = (target / dx.astype(np.float64)).astype(kind)
    low = (dx * factor).astype(np.float64) < target
    while low.any():
        factor = np.where(low, np.nextafter(factor, kind(np.inf)), factor)
        low = (dx * factor).astype(np.float64) < target
    return factor


class CaseFormatError(ValueError):
    """A case file is corrupt, of another format or version, or internally inconsistent."""


@dataclass(frozen=True)
class Structure:
    """One delineated structure.

    Attributes:
        name: Structure name as protocols refer to it (e.g. ``"PTV"``, ``"Bladder"``).
        role: ``"target"`` or ``"oar"``.
        rows: Sorted row indices into the case's dose rows (and the dose-influence matrix).
        voxel_cc: Volume of one voxel in cc.
    """

    name: str
    role: Role
    rows: np.ndarray
    voxel_cc: float

    @property
    def n_voxels(self) -> int:
        return int(self.rows.size)

    @property
    def volume_cc(self) -> float:
        """Structure volume in cc."""
        return self.n_voxels * self.voxel_cc


@dataclass(frozen=True)
class Beam:
    """One static beam and its beamlet grid.

    Attributes:
        gantry_deg: Gantry angle in degrees (IEC 61217, 0 = from anterior).
        couch_deg: Couch angle in degrees.
        beamlet_mm: Beamlet side length at the isocentre plane in mm.
        beamlet_uv_mm: ``(n_beamlets, 2)`` beamlet centres in the isocentre plane in mm
            (u: crossplane, v: inplane / cranio-caudal at couch 0).
    """

    gantry_deg: float
    couch_deg: float
    beamlet_mm: float
    beamlet_uv_mm: np.ndarray

    @property
    def n_beamlets(self) -> int:
        return int(self.beamlet_uv_mm.shape[0])


@dataclass
class PlanningCase:
    """A planning case: grid, structures, beams, dose-influence matrix and prescription.

    Attributes:
        name: Case name (e.g. ``"S1-test-0"``).
        site: Anatomical site (``"prostate"``, ``"liver"``, ...).
        grid_shape: ``(nz, ny, nx)`` voxel counts.
        voxel_mm: ``(dz, dy, dx)`` voxel size in mm.
        isocenter_mm: Isocentre ``(x, y, z)`` in patient coordinates (mm).
        dose_rows: Flat (C-order) grid indices of the matrix rows, strictly increasing.
        structures: Structures (their ``rows`` index ``dose_rows``).
        beams: Beams in matrix column order.
        dose_influence: ``(len(dose_rows), n_beamlets)`` float32 CSR matrix, Gy per unit fluence.
        prescription_gy: Total prescribed dose in Gy.
        fractions: Number of fractions.
        protocol: Name (or path) of the scoring protocol.
        density: Optional ``grid_shape`` relative electron density (water = 1).
        metadata: Free-form JSON-serialisable facts (generator seed, build time, ...).
    """

    name: str
    site: str
    grid_shape: tuple[int, int, int]
    voxel_mm: tuple[float, float, float]
    isocenter_mm: tuple[float, float, float]
    dose_rows: np.ndarray
    structures: list[Structure]
    beams: list[Beam]
    dose_influence: sp.csr_matrix
    prescription_gy: float
    fractions: int
    protocol: str
    density: np.ndarray | None = None
    metadata: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.validate()
        # plain Python numbers (a numpy integer would not serialise to the header)
        self.prescription_gy, self.fractions = float(self.prescription_gy), int(self.fractions)

    # ------------------------------------------------------------------ queries
    @property
    def n_rows(self) -> int:
        return int(self.dose_rows.size)

    @property
    def n_beamlets(self) -> int:
        return int(self.dose_influence.shape[1])

    @property
    def voxel_cc(self) -> float:
        """Volume of one voxel, cm^3."""
        dz, dy, dx = self.voxel_mm
        return dz * dy * dx / 1000.0

    @property
    def structure_names(self) -> list[str]:
        return [s.name for s in self.structures]

    @property
    def target(self) -> Structure:
        """The (single) target structure."""
        return next(s for s in self.structures if s.role == "target")

    @property
    def oars(self) -> list[Structure]:
        return [s for s in self.structures if s.role == "oar"]

    def structure(self, name: str) -> Structure:
        for s in self.structures:
            if s.name == name:
                return s
        raise KeyError(f"case {self.name!r} has no structure {name!r}; it has {self.structure_names}")

    def dose(self, fluence: np.ndarray) -> np.ndarray:
        """Dose (Gy) over the dose rows for a fluence vector (one weight >= 0 per beamlet)."""
        fluence = np.asarray(fluence, dtype=np.float32)
        if fluence.shape != (self.n_beamlets,):
            raise ValueError(f"fluence has shape {fluence.shape}; case {self.name!r} needs ({self.n_beamlets},)")
        if not np.all(np.isfinite(fluence)) or fluence.min() < 0:
            raise ValueError("fluence must be finite and >= 0")
        return np.asarray(self.dose_influence @ fluence, dtype=np.float32)

    def coverage_scale(self, dose: np.ndarray, volume_pct: float = 95.0) -> float:
        """Factor that makes the target's D``volume_pct``% equal the prescription.

        Dx% is the minimum dose of the hottest x % of the target's voxels (voxel-based). The
        factor is a value of the dose's float type rounded so that ``dose * factor``, computed in
        that type, has Dx% at or just above the prescription (the plain ratio often lands one
        rounding step below it, which fails a ``D95 >= Rx`` goal).
        """
        if not (0.0 < volume_pct <= 100.0):
            raise ValueError(f"volume_pct = {volume_pct} is outside the valid range (0, 100]")
        dose = self._check_dose(dose)
        dx = dose_at_volume_percent(dose[self.target.rows], volume_pct)
        if dx <= 0:
            raise ValueError(f"target D{volume_pct:g}% is {dx} Gy: the plan gives no dose to rescale")
        kind = dose.dtype if np.issubdtype(dose.dtype, np.floating) else np.dtype(np.float64)
        return float(rounded_up_ratio(np.array([dx], dtype=kind), self.prescription_gy)[0])

    def _check_dose(self, dose: np.ndarray) -> np.ndarray:
        dose = np.asarray(dose)
        if dose.shape != (self.n_rows,):
            raise ValueError(
                f"dose has shape {dose.shape}; case {self.name!r} needs ({self.n_rows},) "
                "(one value per dose row)"
            )
        return dose

    def structure_doses(self, dose: np.ndarray) -> dict[str, np.ndarray]:
        """Split a dose vector over the dose rows (Gy) into per-structure voxel doses."""
        dose = self._check_dose(dose)
        return {s.name: dose[s.rows] for s in self.structures}

    def dose_grid(self, dose: np.ndarray, fill: float = np.nan) -> np.ndarray:
        """Scatter a dose vector over the dose rows (Gy) into a ``grid_shape`` array."""
        grid = np.full(int(np.prod(self.grid_shape)), fill, dtype=np.float32)
        grid[self.dose_rows] = self._check_dose(dose)
        return grid.reshape(self.grid_shape)

    def mask(self, name: str) -> np.ndarray:
        """Boolean ``grid_shape`` mask of a structure."""
        m = np.zeros(int(np.prod(self.grid_shape)), dtype=bool)
        m[self.dose_rows[self.structure(name).rows]] = True
        return m.reshape(self.grid_shape)

    def summary(self) -> dict[str, Any]:
        """A JSON-ready description: structures with volumes, beams, matrix size."""
        return {
            "name": self.name,
            "site": self.site,
            "prescription_gy": self.prescription_gy,
            "fractions": self.fractions,
            "protocol": self.protocol,
            "grid_shape": list(self.grid_shape),
            "voxel_mm": list(self.voxel_mm),
            "dose_rows": self.n_rows,
            "beamlets": self.n_beamlets,
            "nnz": int(self.dose_influence.nnz),
            "structures": [
                {"name": s.name, "role": s.role, "voxels": s.n_voxels, "volume_cc": round(s.volume_cc, 2)}
                for s in self.structures
            ],
            "beams": [
                {"gantry_deg": b.gantry_deg, "couch_deg": b.couch_deg, "beamlets": b.n_beamlets}
                for b in self.beams
            ],
            "metadata": self.metadata,
        }

    # --------------------------------------------------------------- validation
    def validate(self) -> None:
        """Check internal consistency; raises :class:`CaseFormatError` naming the problem."""
        for attr in ("name", "protocol"):
            value = getattr(self, attr)
            if not isinstance(value, str) or not value.strip():
                raise CaseFormatError(f"{attr} = {value!r} must be a non-empty string")
        if not isinstance(self.site, str):  # may be empty: a protocol file need not name its disease site
            raise CaseFormatError(f"site = {self.site!r} must be a string")
        shape = tuple(self.grid_shape)
        if len(shape) != 3 or not all(isinstance(n, (int, np.integer)) and n >= 1 for n in shape):
            raise CaseFormatError(f"grid_shape = {shape!r} must be 3 voxel counts (nz, ny, nx), integers >= 1")
        n_grid = int(np.prod(shape))
        rows = self.dose_rows
        if rows.ndim != 1 or rows.size == 0:
            raise CaseFormatError(f"dose_rows must be a non-empty 1-D array, got shape {rows.shape}")
        if rows.dtype.kind not in "iu":
            raise CaseFormatError(f"dose_rows must be integer grid indices, got dtype {rows.dtype}")
        if rows[0] < 0 or rows[-1] >= n_grid or np.any(np.diff(rows) <= 0):
            raise CaseFormatError(
                f"dose_rows must be strictly increasing grid indices in [0, {n_grid - 1}]"
            )
        D = self.dose_influence
        if not sp.isspmatrix_csr(D) and not isinstance(D, sp.csr_array):
            raise CaseFormatError(f"dose_influence must be CSR, got {type(D).__name__}")
        n_cols = sum(b.n_beamlets for b in self.beams)
        if D.shape != (rows.size, n_cols):
            raise CaseFormatError(
                f"dose_influence has shape {D.shape}; expected ({rows.size}, {n_cols}) "
                "= (dose rows, beamlets of all beams)"
            )
        if D.dtype != np.float32:
            raise CaseFormatError(f"dose_influence must be float32, got {D.dtype}")
        try:  # column indices within the beamlets, sorted-free but in-bounds index arrays
            D.check_format(full_check=True)
        except ValueError as exc:
            raise CaseFormatError(f"dose_influence is not a valid CSR matrix: {exc}") from None
        if D.nnz and (not np.all(np.isfinite(D.data)) or D.data.min() < 0):
            raise CaseFormatError("dose_influence has negative or non-finite entries")
        names = self.structure_names
        if len(set(names)) != len(names):
            raise CaseFormatError(f"duplicate structure names: {names}")
        if sum(s.role == "target" for s in self.structures) != 1:
            raise CaseFormatError(f"a case needs exactly one target structure, roles: "
                                  f"{[(s.name, s.role) for s in self.structures]}")
        for s in self.structures:
            if s.role not in ("target", "oar"):
                raise CaseFormatError(f"structure {s.name!r} has role {s.role!r}; valid: 'target', 'oar'")
            if s.rows.size == 0 or s.rows.dtype.kind not in "iu" or s.rows.min() < 0 or s.rows.max() >= rows.size:
                raise CaseFormatError(
                    f"structure {s.name!r} rows must be non-empty integer indices in [0, {rows.size - 1}]"
                )
            if np.any(np.diff(s.rows) <= 0):  # a repeated row would count its voxel twice
                raise CaseFormatError(f"structure {s.name!r} rows must be strictly increasing (sorted, no repeats)")
        if self.density is not None and self.density.shape != tuple(self.grid_shape):
            raise CaseFormatError(
                f"density has shape {self.density.shape}, grid_shape is {tuple(self.grid_shape)}"
            )
        if self.density is not None:
            try:
                check_density(self.density)
            except ValueError as exc:
                raise CaseFormatError(str(exc)) from None
        try:
            check_real("prescription_gy", self.prescription_gy, 0.0, low_inclusive=False)
            check_integer("fractions", self.fractions, 1)
            if len(self.voxel_mm) != 3:
                raise ValueError(f"voxel_mm = {self.voxel_mm!r} must be 3 sizes (dz, dy, dx) in mm")
            for axis, size in zip("zyx", self.voxel_mm, strict=True):
                check_real(f"voxel_mm[{axis}]", size, 0.0, low_inclusive=False)
            for st in self.structures:
                check_real(f"voxel_cc of structure {st.name!r}", st.voxel_cc, 0.0, low_inclusive=False)
                if not math.isclose(st.voxel_cc, self.voxel_cc, rel_tol=1e-9):  # the cc metrics use the structure's
                    raise ValueError(f"voxel_cc of structure {st.name!r} = {st.voxel_cc!r} cc is not the grid's voxel "
                                     f"volume, {self.voxel_cc!r} cc (voxel_mm {tuple(self.voxel_mm)})")
            for i, beam in enumerate(self.beams):
                for attr in ("gantry_deg", "couch_deg"):
                    check_real(f"beam {i} {attr}", getattr(beam, attr))
                check_real(f"beam {i} beamlet_mm", beam.beamlet_mm, 0.0, low_inclusive=False)
                uv = np.asarray(beam.beamlet_uv_mm)
                if uv.ndim != 2 or uv.shape[1] != 2 or not np.all(np.isfinite(uv)):
                    raise ValueError(f"beam {i} beamlet_uv_mm must be a finite (n_beamlets, 2) array of beamlet "
                                     f"centres in mm, got shape {uv.shape}")
        except ValueError as exc:
            raise CaseFormatError(str(exc)) from None

    def digest(self) -> str:
        """SHA-256 (hex) of what a plan of this case depends on: its dose rows, matrix,
        structures (names, roles, rows), prescription, fractions and protocol; two cases with the
        same name but other content differ here."""
        h = hashlib.sha256()
        m = self.dose_influence
        for arr in (self.dose_rows, m.indptr, m.indices, m.data, *(s.rows for s in self.structures)):
            a = np.ascontiguousarray(arr)
            h.update(f"{a.dtype.str}{a.shape}".encode())
            h.update(a.tobytes())
        h.update(json.dumps([[s.name, s.role] for s in self.structures] + [m.shape, self.prescription_gy,
                                                                           self.fractions, self.protocol]).encode())
        return h.hexdigest()

    # -------------------------------------------------------------------- I/O
    def save(self, path: str | Path) -> Path:
        """Write the case to one compressed ``.npz``-format file; returns the path."""
        path = Path(path)
        header = {
            "format": FORMAT_NAME,
            "version": FORMAT_VERSION,
            "name": self.name,
            "site": self.site,
            "grid_shape": list(self.grid_shape),
            "voxel_mm": list(self.voxel_mm),
            "isocenter_mm": list(self.isocenter_mm),
            "prescription_gy": self.prescription_gy,
            "fractions": self.fractions,
            "protocol": self.protocol,
            "structures": [{"name": s.name, "role": s.role, "voxel_cc": s.voxel_cc} for s in self.structures],
            "beams": [
                {"gantry_deg": b.gantry_deg, "couch_deg": b.couch_deg, "beamlet_mm": b.beamlet_mm}
                for b in self.beams
            ],
            "has_density": self.density is not None,
            "metadata": self.metadata,
        }
        D = self.dose_influence
        arrays: dict[str, np.ndarray] = {
            "header": np.frombuffer(json.dumps(header).encode(), dtype=np.uint8),
            "dose_rows": self.dose_rows.astype(np.int64),
            "D_data": D.data.astype(np.float32),
            "D_indices": D.indices.astype(np.int32),
            "D_indptr": D.indptr.astype(np.int64),
        }
        for i, s in enumerate(self.structures):
            arrays[f"structure_{i}_rows"] = s.rows.astype(np.int64)
        for i, b in enumerate(self.beams):
            arrays[f"beam_{i}_uv"] = b.beamlet_uv_mm.astype(np.float32)
        if self.density is not None:
            arrays["density"] = self.density.astype(np.float32)
        path.parent.mkdir(parents=True, exist_ok=True)
        # a temporary name of this writer's own, so that concurrent writers of one case (parallel
        # workers building it) each publish a whole file
        tmp = path.with_name(f"{path.name}.{os.getpid()}-{uuid.uuid4().hex[:8]}.tmp")
        try:
            with open(tmp, "wb") as fh:
                np.savez_compressed(fh, **arrays)
            tmp.replace(path)
        finally:
            tmp.unlink(missing_ok=True)
        return path

    @classmethod
    def load(cls, path: str | Path) -> PlanningCase:
        """Read a case written by :meth:`save`.

        Raises:
            FileNotFoundError: the file does not exist.
            CaseFormatError: the file is corrupt, of another format or version, or inconsistent.
        """
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"no case file at {path}")
        with path.open("rb") as f:
            if f.read(4) != b"PK\x03\x04":  # np.load would read other files as pickles or .npy arrays
                raise CaseFormatError(f"{path} is not an rtenv case file: a case file (.rtcase, as written by "
                                      "PlanningCase.save or `rtenv cases import`) is a NumPy .npz zip archive")
        try:
            with np.load(path, allow_pickle=False) as z:
                arrays = {k: z[k] for k in z.files}
        except (zipfile.BadZipFile, zlib.error, OSError, ValueError, EOFError) as exc:
            raise CaseFormatError(f"{path} is not a readable rtenv case file ({exc})") from exc
        if "header" not in arrays:
            raise CaseFormatError(f"{path} has no 'header' entry: not an rtenv case file")
        try:
            header = json.loads(arrays["header"].tobytes().decode())
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise CaseFormatError(f"{path}: header is not valid JSON ({exc})") from exc
        if not isinstance(header, dict):
            raise CaseFormatError(f"{path}: header is a JSON {type(header).__name__}, not an object")
        if header.get("format") != FORMAT_NAME:
            raise CaseFormatError(f"{path}: format is {header.get('format')!r}, expected {FORMAT_NAME!r}")
        if header.get("version") != FORMAT_VERSION:
            raise CaseFormatError(
                f"{path}: format version {header.get('version')!r} is not supported "
                f"(this rtenv reads version {FORMAT_VERSION})"
            )

        def need(key: str) -> np.ndarray:
            if key not in arrays:
                raise CaseFormatError(f"missing array {key!r}")  # the path is added below
            return arrays[key]

        try:
            dose_rows = need("dose_rows")
            beams = [
                Beam(float(b["gantry_deg"]), float(b["couch_deg"]), float(b["beamlet_mm"]),
                     need(f"beam_{i}_uv"))
                for i, b in enumerate(header["beams"])
            ]
            n_cols = sum(b.n_beamlets for b in beams)
            D = sp.csr_matrix(
                (need("D_data"), need("D_indices"), need("D_indptr")), shape=(dose_rows.size, n_cols)
            )
            structures = [
                Structure(s["name"], s["role"], need(f"structure_{i}_rows"), float(s["voxel_cc"]))
                for i, s in enumerate(header["structures"])
            ]
            return cls(
                name=header["name"],
                site=header["site"],
                grid_shape=tuple(header["grid_shape"]),
                voxel_mm=tuple(header["voxel_mm"]),
                isocenter_mm=tuple(header["isocenter_mm"]),
                dose_rows=dose_rows,
                structures=structures,
                beams=beams,
                dose_influence=D,
                prescription_gy=float(header["prescription_gy"]),
                fractions=header["fractions"],  # validated: a non-integer is refused, not truncated
                protocol=header["protocol"],
                density=need("density") if header.get("has_density") else None,
                metadata=header.get("metadata", {}),
            )
        except KeyError as exc:
            raise CaseFormatError(f"{path}: header lacks field {exc}") from exc
        except (TypeError, IndexError) as exc:  # header fields of the wrong type
            raise CaseFormatError(f"{path}: malformed header ({exc})") from exc
        except CaseFormatError as exc:
            raise CaseFormatError(f"{path}: {exc}") from exc
        except ValueError as exc:  # scipy's own shape checks
            raise CaseFormatError(f"{path}: inconsistent matrix arrays ({exc})") from exc
