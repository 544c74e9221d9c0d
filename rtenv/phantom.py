"""Procedural patient-like phantoms for the built-in cases.

Each phantom is a 3-D grid of relative electron density (water = 1) with a body outline and the
structures of the seed scenarios, drawn from a seeded random generator so that every seed is a
distinct, reproducible patient:

* ``prostate``: PTV (prostate + margin), bladder (anterior-superior, partly overlapping the PTV),
  rectum (a posterior tube curving backwards superiorly, partly overlapping the PTV), left and
  right femoral heads (bone), a sacrum (bone) behind the rectum.
* ``liver``: liver (a right lobe and a smaller left lobe), a large PTV (34-44 mm radius) inside it
  just below the heart, the heart on the diaphragm left of the liver dome (in the path of the
  left-sided beams), both lungs (density 0.25) and a vertebral body (bone). The ``Liver``
  structure is the normal liver (liver minus PTV), as the liver protocol scores it.

The organ placements (the ``*_GAP``, ``*_MM`` constants below) are calibrated so that the SPEC
start TPPs score on the test cohorts as the seed papers' plans do (``benchmarks.calibration``).

The default voxel is 5 mm: it resolves the organs' DVHs to better than 0.3 % of volume (the
smallest scored organ has >300 voxels) while keeping the dose-influence matrices small enough for
the TPS to solve a plan in milliseconds, which the DRL and benchmark workloads need.
Coordinates follow :mod:`rtenv.dose_engine` (x patient-left, y anterior, z superior, mm).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy.ndimage import distance_transform_edt

from rtenv.dose_engine import Grid
from rtenv.validation import check_density, check_integer, check_real

SOFT_TISSUE = 1.0
BONE = 1.4  # femoral head / vertebral body: trabecular bone inside a cortical shell, averaged
LUNG = 0.25

GENERATOR_VERSION = 3
# centre distance of bladder / rectum from the PTV, as a fraction of the touching distance:
# below 1 the organ presses into the PTV (overlap), as the bladder base and anterior rectal wall do
BLADDER_GAP = (0.72, 0.92)
RECTUM_GAP = (0.68, 0.86)
# liver PTV radius and the gap between its surface and the heart's (mm)
PTV_RADIUS_MM = (34.0, 44.0)
PTV_HEART_GAP_MM = (3.0, 15.0)
# the heart sits on the diaphragm left of the liver dome, so left-sided beams to the liver cross it
HEART_X_MM = (15.0, 35.0)
HEART_Z_ABOVE_DOME_MM = (0.0, 20.0)
SITES = ("prostate", "liver")


@dataclass
class Phantom:
    """A voxel phantom.

    Attributes:
        site: ``"prostate"`` or ``"liver"``.
        seed: Generator seed.
        grid: Grid geometry (shape ``(nz, ny, nx)``, voxel size mm, origin mm).
        density: Relative electron density, ``grid.shape`` float32.
        body: Body mask.
        structures: Ordered ``name -> (role, mask)``; masks may overlap.
    """

    site: str
    seed: int
    grid: Grid
    density: np.ndarray
    body: np.ndarray
    structures: dict[str, tuple[str, np.ndarray]]

    def __post_init__(self) -> None:
        """Check the arrays against the grid: boolean ``(nz, ny, nx)`` masks, a non-empty one per
        structure, and a finite non-negative density (``ValueError`` naming the array)."""
        shape = tuple(self.grid.shape)
        density = np.asarray(self.density)
        if density.shape != shape:
            raise ValueError(f"density has shape {density.shape}; the grid is (nz, ny, nx) = {shape}")
        check_density(density)
        for label, mask in [("body", self.body), *((f"structure {n!r}", m) for n, (_, m) in self.structures.items())]:
            mask = np.asarray(mask)
            if mask.dtype != bool or mask.shape != shape:
                raise ValueError(f"{label} mask must be a boolean (nz, ny, nx) = {shape} array, got dtype "
                                 f"{mask.dtype} shape {mask.shape}")
        for name, (role, mask) in self.structures.items():
            if role not in ("target", "oar"):
                raise ValueError(f"structure {name!r} has role {role!r}; valid: 'target', 'oar'")
            if not mask.any():
                raise ValueError(f"structure {name!r} has an empty mask (no voxel on the grid)")

    def centroid_mm(self, name: str) -> np.ndarray:
        """Centroid ``(x, y, z)`` in mm of a structure."""
        idx = np.flatnonzero(self.structures[name][1])
        return self.grid.points(idx).mean(axis=0)


def _grid(
    extent_mm: tuple[tuple[float, float], ...], voxel_mm: float
) -> tuple[Grid, np.ndarray, np.ndarray, np.ndarray]:
    (x0, x1), (y0, y1), (z0, z1) = extent_mm
    xs = np.arange(x0, x1 + 1e-6, voxel_mm)
    ys = np.arange(y0, y1 + 1e-6, voxel_mm)
    zs = np.arange(z0, z1 + 1e-6, voxel_mm)
    grid = Grid((zs.size, ys.size, xs.size), (voxel_mm,) * 3, (float(xs[0]), float(ys[0]), float(zs[0])))
    Z, Y, X = np.meshgrid(zs, ys, xs, indexing="ij")
    return grid, X, Y, Z


def _ellipsoid(X, Y, Z, c, a) -> np.ndarray:
    return ((X - c[0]) / a[0]) ** 2 + ((Y - c[1]) / a[1]) ** 2 + ((Z - c[2]) / a[2]) ** 2 <= 1.0


def _radius_along(a: np.ndarray, direction: np.ndarray) -> float:
    """Distance from an axis-aligned ellipsoid's centre to its surface along a unit direction."""
    return float(1.0 / np.sqrt(np.sum((direction / a) ** 2)))


def make_phantom(site: str, seed: int, voxel_mm: float = 5.0) -> Phantom:
    """Generate the phantom of ``site`` for ``seed``.

    Args:
        site: ``"prostate"`` or ``"liver"``.
        seed: Any non-negative integer; each seed is a distinct patient.
        voxel_mm: Isotropic voxel size in mm (2.5 to 10).
    """
    if site not in SITES:
        raise ValueError(f"unknown site {site!r}; valid sites: {list(SITES)}")
    check_real("voxel_mm", voxel_mm, 2.5, 10.0)
    check_integer("seed", seed, 0)
    rng = np.random.default_rng([GENERATOR_VERSION, SITES.index(site), seed])
    return (_prostate if site == "prostate" else _liver)(rng, seed, voxel_mm)


def _prostate(rng: np.random.Generator, seed: int, voxel_mm: float) -> Phantom:
    grid, X, Y, Z = _grid(((-215, 215), (-145, 145), (-75, 95)), voxel_mm)
    ax, ay = rng.uniform(165, 200), rng.uniform(105, 130)
    body = (X / ax) ** 2 + (Y / ay) ** 2 <= 1.0

    c_ptv = np.array([rng.uniform(-5, 5), rng.uniform(-30, -15), rng.uniform(-5, 5)])
    a_ptv = np.array([rng.uniform(27, 37), rng.uniform(22, 30), rng.uniform(25, 34)])
    ptv = _ellipsoid(X, Y, Z, c_ptv, a_ptv)

    # bladder: anterior-superior, overlapping the PTV by a seed-dependent depth
    a_bl = np.array([rng.uniform(32, 46), rng.uniform(24, 33), rng.uniform(24, 33)])
    ang = np.radians(rng.uniform(30, 60))  # from the anterior axis towards superior
    d = np.array([0.0, np.cos(ang), np.sin(ang)])
    dist = rng.uniform(BLADDER_GAP[0], BLADDER_GAP[1]) * (_radius_along(a_ptv, d) + _radius_along(a_bl, d))
    bladder = _ellipsoid(X, Y, Z, c_ptv + dist * d + [rng.uniform(-5, 5), 0, 0], a_bl)

    # rectum: a tube posterior to the PTV, curving posteriorly above the PTV centre
    r_re = rng.uniform(13, 18)
    y_re = c_ptv[1] - rng.uniform(RECTUM_GAP[0], RECTUM_GAP[1]) * (a_ptv[1] + r_re)
    x_re = c_ptv[0] + rng.uniform(-4, 4)
    curve = rng.uniform(0.003, 0.008)
    z_lo, z_hi = c_ptv[2] - rng.uniform(30, 45), c_ptv[2] + rng.uniform(50, 70)
    y_line = y_re - curve * np.maximum(Z - c_ptv[2], 0.0) ** 2
    rectum = ((X - x_re) ** 2 + (Y - y_line) ** 2 <= r_re**2) & (Z >= z_lo) & (Z <= z_hi)

    # femoral heads at about the level of the prostate, lateral
    heads = {}
    for side, sign in (("FemoralHead_L", 1.0), ("FemoralHead_R", -1.0)):
        c = c_ptv + [sign * rng.uniform(80, 95), rng.uniform(0, 12), rng.uniform(-5, 15)]
        heads[side] = _ellipsoid(X, Y, Z, c, np.full(3, rng.uniform(21, 26)))
    sacrum = _ellipsoid(X, Y, Z, [0.0, -ay + rng.uniform(30, 40), 40.0], [45.0, 14.0, 70.0])

    density = np.where(body, SOFT_TISSUE, 0.0).astype(np.float32)
    for m in (*heads.values(), sacrum):
        density[m & body] = BONE
    structures = {
        "PTV": ("target", ptv & body),
        "Bladder": ("oar", bladder & body),
        "Rectum": ("oar", rectum & body),
        **{k: ("oar", m & body) for k, m in heads.items()},
    }
    return Phantom("prostate", seed, grid, density, body, structures)


def _liver(rng: np.random.Generator, seed: int, voxel_mm: float) -> Phantom:
    grid, X, Y, Z = _grid(((-215, 215), (-155, 155), (-90, 200)), voxel_mm)
    ax, ay = rng.uniform(160, 195), rng.uniform(110, 135)
    body = (X / ax) ** 2 + (Y / ay) ** 2 <= 1.0

    c_liv = np.array([-rng.uniform(45, 65), rng.uniform(-10, 10), 0.0])
    a_liv = np.array([rng.uniform(66, 80), rng.uniform(54, 66), rng.uniform(50, 62)])
    liver = _ellipsoid(X, Y, Z, c_liv, a_liv)
    liver |= _ellipsoid(X, Y, Z, c_liv + [a_liv[0] * 0.9, 15, 10], [45, 30, 30])

    dome = c_liv[2] + a_liv[2]
    c_heart = np.array([rng.uniform(*HEART_X_MM), rng.uniform(15, 35), dome + rng.uniform(*HEART_Z_ABOVE_DOME_MM)])
    heart = _ellipsoid(X, Y, Z, c_heart, [rng.uniform(48, 58), rng.uniform(38, 46), rng.uniform(42, 50)])
    diaphragm = _ellipsoid(X, Y, Z, c_heart, [62, 52, 56])  # heart + ~8 mm: liver stays below it
    liver &= ~diaphragm
    lungs = np.zeros_like(body)
    for sign in (1.0, -1.0):
        lungs |= _ellipsoid(X, Y, Z, [sign * rng.uniform(75, 95), 0.0, dome + 75], [60, 70, 95])
    lungs &= ~diaphragm & ~liver & (Z > dome - 20)
    spine = ((X**2 + (Y + ay - 45) ** 2) <= 18.0**2)

    # PTV inside the liver under the heart: its surface PTV_HEART_GAP_MM from the heart's, with at
    # least 70 % of its radius of liver around its centre
    r_ptv = rng.uniform(*PTV_RADIUS_MM)
    gap = rng.uniform(*PTV_HEART_GAP_MM)
    to_heart = distance_transform_edt(~heart, sampling=grid.voxel_mm)
    depth = distance_transform_edt(liver, sampling=grid.voxel_mm)
    candidates = np.flatnonzero(liver & (np.abs(to_heart - (r_ptv + gap)) <= voxel_mm) & (depth >= 0.7 * r_ptv))
    if candidates.size == 0:  # pragma: no cover - the ranges above always leave room
        raise RuntimeError(f"liver phantom seed {seed}: no room for the PTV under the heart")
    i = candidates[rng.integers(candidates.size)]
    c_ptv = np.array([X.flat[i], Y.flat[i], Z.flat[i]])
    ptv = _ellipsoid(X, Y, Z, c_ptv, [r_ptv, r_ptv * rng.uniform(0.85, 1.1), r_ptv * rng.uniform(0.85, 1.1)])
    ptv &= body

    density = np.where(body, SOFT_TISSUE, 0.0).astype(np.float32)
    density[lungs & body] = LUNG
    density[spine & body] = BONE
    structures = {
        "PTV": ("target", ptv),
        "Liver": ("oar", liver & body & ~ptv),
        "Heart": ("oar", heart & body),
    }
    return Phantom("liver", seed, grid, density, body, structures)
