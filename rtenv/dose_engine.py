"""Pencil-beam photon dose engine (6 MV, point source at 100 cm SAD).

The dose that beamlet ``j`` of a beam delivers per unit fluence to a voxel at point ``P`` is

    D_ij = K * PDD(d_rad) * (SAD / r)^2 * A(u_iso - u_j) * A(v_iso - v_j)

where

* ``r`` is the distance from the source to ``P``, ``z`` its distance along the beam axis, and
  ``(u_iso, v_iso)`` the point where the ray source -> ``P`` crosses the isocentre plane
  (divergent rays);
* ``d_rad`` is the radiological depth: the line integral of the relative electron density along
  that ray, from where it enters the density grid to ``P`` (so bone deepens and lung shallows it);
* ``PDD(d) = (1 - (1 - s0) exp(-d / l_b)) exp(-mu d)``, normalised to 1 at its maximum, is a
  build-up and attenuation curve: surface dose ``s0`` rises to a maximum at ``d_max`` and then
  falls exponentially; ``l_b`` is solved so that the maximum sits exactly at ``d_max``;
* ``A(x) = (erf((x + w/2)/(sqrt(2) s)) - erf((x - w/2)/(sqrt(2) s))) / 2`` is the square beamlet
  aperture of side ``w`` (mm at the isocentre plane) convolved with a Gaussian penumbra kernel of
  width ``s = (sigma_0 + sigma_slope * d_rad) * SAD / z`` (projected to the isocentre plane);
* ``K`` (``output_gy``) scales the whole matrix: 1 Gy per unit fluence by default.

Each lateral profile is truncated at ``w/2 + cutoff_sigmas * s`` from the beamlet axis, which keeps
the matrix sparse; the profile's value at the cut-off (0.6 % per axis with the default 2.5 sigmas)
is subtracted so that dose stays continuous as the penumbra widens with depth. The subtraction
also lowers the central value: on the axis of a wide beamlet at ``d_max`` the dose is
about 0.987 K, and an open field tiled by beamlets of width ``w`` gets less still where
neighbouring windows overlap: relative to a wide beamlet, 0.98 (10 mm beamlets) and 0.95 (5 mm)
at ``d_max``, falling to 0.96 and 0.94 at 10 cm depth, so the field's depth dose is about 1.5 %
steeper than ``PDD``. Plans are normalised to the prescription (D95 rescaling), so the offset
scales the fluence, not the scored doses.
The model has no long-range scatter tail; the 80-20 % penumbra is ``1.68 s``, about 6-7 mm at
10 cm depth with the defaults, as for a clinical 6 MV beam.

Coordinates are patient coordinates in mm: ``x`` to the patient's left, ``y`` anterior, ``z``
superior (head-first supine). At couch 0 the source of a beam at gantry ``g`` sits at
``iso + SAD (sin g, cos g, 0)`` (gantry 0 = anterior, 90 = patient left, IEC 61217); the couch
rotates the beam about the vertical (``y``) axis.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import numpy as np
import scipy.sparse as sp
from scipy.ndimage import map_coordinates
from scipy.optimize import brentq
from scipy.special import erf

from rtenv.validation import check_density, check_real

ENGINE_VERSION = 1


@dataclass(frozen=True)
class BeamModel:
    """Parameters of the 6 MV pencil-beam model (lengths in mm, densities relative to water).

    Attributes:
        sad_mm: Source-axis distance.
        d_max_mm: Depth of dose maximum.
        surface_dose: Dose at zero depth relative to the maximum (0..1).
        mu_per_mm: Effective attenuation coefficient beyond the build-up region.
        sigma0_mm: Penumbra Gaussian width at the surface.
        sigma_slope: Penumbra width growth per mm of radiological depth.
        cutoff_sigmas: Lateral truncation beyond the aperture edge, in penumbra widths.
        output_gy: Dose scale ``K`` per unit fluence (Gy); see the module docstring for the
            on-axis dose that results.
        ray_step_mm: Step of the radiological-depth ray march.
    """

    sad_mm: float = 1000.0
    d_max_mm: float = 15.0
    surface_dose: float = 0.2
    mu_per_mm: float = 0.0045
    sigma0_mm: float = 3.0
    sigma_slope: float = 0.01
    cutoff_sigmas: float = 2.5
    output_gy: float = 1.0
    ray_step_mm: float = 2.5

    def __post_init__(self) -> None:
        checks = {
            "sad_mm": (self.sad_mm, 100.0, 5000.0),
            "d_max_mm": (self.d_max_mm, 1.0, 50.0),
            "surface_dose": (self.surface_dose, 0.0, 0.99),
            "mu_per_mm": (self.mu_per_mm, 1e-4, 0.05),
            "sigma0_mm": (self.sigma0_mm, 0.1, 20.0),
            "sigma_slope": (self.sigma_slope, 0.0, 0.2),
            "cutoff_sigmas": (self.cutoff_sigmas, 1.0, 6.0),
            "output_gy": (self.output_gy, 1e-6, 1e6),
            "ray_step_mm": (self.ray_step_mm, 0.1, 10.0),
        }
        for name, (value, lo, hi) in checks.items():
            check_real(f"BeamModel.{name}", value, lo, hi)
        # d/dd [(1 - a e^{-d/l}) e^{-mu d}] = 0  <=>  a e^{-d/l} (1/l + mu) = mu has a root l < d_max
        # (the physical, steep build-up) only if its left side at l = d_max exceeds mu
        a, mu, d = 1.0 - self.surface_dose, self.mu_per_mm, self.d_max_mm
        if not a * math.exp(-1.0) * (1.0 / d + mu) > mu:
            raise ValueError(
                f"BeamModel: surface_dose = {self.surface_dose}, d_max_mm = {d} and mu_per_mm = {mu} admit no "
                f"build-up curve peaking at d_max; they need (1 - surface_dose) * (1/d_max_mm + mu_per_mm) / e "
                f"> mu_per_mm, here {a * math.exp(-1.0) * (1.0 / d + mu):.3g} <= {mu}")

    @property
    def buildup_mm(self) -> float:
        """Build-up length ``l_b`` (mm) that puts the PDD maximum at ``d_max_mm``."""
        a, mu, d = 1.0 - self.surface_dose, self.mu_per_mm, self.d_max_mm
        # of the two roots in l of the condition in __post_init__, the short one (l < d_max)
        return brentq(lambda lb: a * math.exp(-d / lb) * (1.0 / lb + mu) - mu, 1e-2, d)

    def pdd(self, depth_mm: np.ndarray) -> np.ndarray:
        """Depth-dose curve (1 at ``d_max_mm``) at radiological depths in mm (a negative depth
        counts as 0: the surface dose)."""
        d = np.maximum(np.asarray(depth_mm, dtype=np.float64), 0.0)
        lb = self.buildup_mm
        raw = (1.0 - (1.0 - self.surface_dose) * np.exp(-d / lb)) * np.exp(-self.mu_per_mm * d)
        peak = (1.0 - (1.0 - self.surface_dose) * math.exp(-self.d_max_mm / lb)) * math.exp(
            -self.mu_per_mm * self.d_max_mm
        )
        return raw / peak

    def sigma(self, depth_mm: np.ndarray) -> np.ndarray:
        """Penumbra Gaussian width (mm) at a radiological depth (mm)."""
        return self.sigma0_mm + self.sigma_slope * np.maximum(depth_mm, 0.0)

    def to_dict(self) -> dict[str, float]:
        return asdict(self)


def aperture_profile(x_mm: np.ndarray, width_mm: float, sigma_mm: np.ndarray) -> np.ndarray:
    """A square aperture of ``width_mm`` convolved with a Gaussian of ``sigma_mm`` (1 on axis for wide beams)."""
    s = np.sqrt(2.0) * sigma_mm
    return 0.5 * (erf((x_mm + width_mm / 2) / s) - erf((x_mm - width_mm / 2) / s))


def beam_frame(gantry_deg: float, couch_deg: float) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Unit vectors ``(w, u, v)``: beam axis (source -> isocentre), crossplane and inplane axes."""
    g, c = math.radians(gantry_deg), math.radians(couch_deg)
    to_source = np.array([math.sin(g) * math.cos(c), math.cos(g), -math.sin(g) * math.sin(c)])
    w = -to_source
    v = np.array([math.sin(c), 0.0, math.cos(c)])  # couch-rotated cranio-caudal axis, normal to w
    u = np.cross(v, w)
    return w, u / np.linalg.norm(u), v


@dataclass(frozen=True)
class Grid:
    """A voxel grid: ``shape = (nz, ny, nx)``, ``voxel_mm = (dz, dy, dx)``, ``origin_mm`` = centre
    ``(x, y, z)`` of voxel ``(0, 0, 0)`` in patient coordinates."""

    shape: tuple[int, int, int]
    voxel_mm: tuple[float, float, float]
    origin_mm: tuple[float, float, float]

    def points(self, flat_index: np.ndarray) -> np.ndarray:
        """Voxel centres ``(n, 3)`` as ``(x, y, z)`` mm for flat C-order indices."""
        k, j, i = np.unravel_index(flat_index, self.shape)
        dz, dy, dx = self.voxel_mm
        x0, y0, z0 = self.origin_mm
        return np.stack([x0 + i * dx, y0 + j * dy, z0 + k * dz], axis=1).astype(np.float64)

    def to_index_coords(self, xyz: np.ndarray) -> np.ndarray:
        """Fractional ``(k, j, i)`` index coordinates of points ``(..., 3)`` (x, y, z mm)."""
        dz, dy, dx = self.voxel_mm
        x0, y0, z0 = self.origin_mm
        return np.stack(
            [(xyz[..., 2] - z0) / dz, (xyz[..., 1] - y0) / dy, (xyz[..., 0] - x0) / dx], axis=0
        )


def radiological_depth(
    density: np.ndarray, grid: Grid, points: np.ndarray, source: np.ndarray, step_mm: float,
    chunk: int = 4096,
) -> np.ndarray:
    """Line integral of density (mm water-equivalent) from the source to each point.

    Rays are marched from each point back towards the source in steps of ``step_mm`` with
    trilinear density interpolation; density outside the grid is 0 (air).
    """
    _check_density(density, grid)
    dz, dy, dx = grid.voxel_mm
    nz, ny, nx = grid.shape
    lo = np.array(grid.origin_mm) - 0.5 * np.array([dx, dy, dz])
    hi = lo + np.array([nx * dx, ny * dy, nz * dz])
    out = np.empty(points.shape[0])
    for start in range(0, points.shape[0], chunk):
        p = points[start:start + chunk]
        to_src = source[None, :] - p
        dist = np.linalg.norm(to_src, axis=1)
        dirn = to_src / dist[:, None]
        # distance along the ray (towards the source) at which it leaves the grid's box
        with np.errstate(divide="ignore", invalid="ignore"):
            t1 = (lo[None, :] - p) / dirn
            t2 = (hi[None, :] - p) / dirn
        t_exit = np.nanmin(np.where(np.isfinite(t1), np.maximum(t1, t2), np.inf), axis=1)
        t_exit = np.minimum(t_exit, dist)
        n_steps = max(int(math.ceil(t_exit.max() / step_mm)), 1)
        t_lo = np.arange(n_steps) * step_mm
        samples = p[:, None, :] + (t_lo + 0.5 * step_mm)[None, :, None] * dirn[:, None, :]
        rho = map_coordinates(
            density, grid.to_index_coords(samples).reshape(3, -1), order=1, mode="nearest"
        ).reshape(p.shape[0], n_steps)
        # path length of each step inside the grid's box (the last one is partial)
        length = np.clip(t_exit[:, None] - t_lo[None, :], 0.0, step_mm)
        out[start:start + chunk] = (rho * length).sum(axis=1)
    return out


def _check_density(density: np.ndarray, grid: Grid) -> None:
    if np.shape(density) != tuple(grid.shape):
        raise ValueError(f"density has shape {np.shape(density)}, but the grid is (nz, ny, nx) = {tuple(grid.shape)}")
    check_density(density)


def _check_geometry(isocenter: np.ndarray, gantry_deg: float, couch_deg: float, beamlet_mm: float) -> None:
    """Finite angles (deg) and isocentre ``(x, y, z)`` (mm), and a positive beamlet width (mm)."""
    check_real("gantry_deg", gantry_deg)
    check_real("couch_deg", couch_deg)
    check_real("beamlet_mm", beamlet_mm, 0.0, 1000.0, low_inclusive=False)
    iso = np.asarray(isocenter)
    if iso.shape != (3,) or iso.dtype.kind not in "iuf" or not np.all(np.isfinite(iso)):
        raise ValueError(f"isocenter must be 3 finite coordinates (x, y, z) in mm, got {isocenter!r}")


def select_beamlets(
    target_points: np.ndarray, isocenter: np.ndarray, gantry_deg: float, couch_deg: float,
    beamlet_mm: float, margin_mm: float, sad_mm: float, voxel_radius_mm: float,
) -> np.ndarray:
    """Beamlet centres ``(n, 2)`` (u, v mm at the isocentre plane) covering the target's
    beam's-eye-view projection dilated by ``margin_mm`` (plus each voxel's own extent)."""
    _check_geometry(isocenter, gantry_deg, couch_deg, beamlet_mm)
    check_real("margin_mm", margin_mm, 0.0)
    if np.shape(target_points)[1:] != (3,) or len(target_points) == 0:
        raise ValueError(f"target_points must be a non-empty (n, 3) array of (x, y, z) mm, got shape "
                         f"{np.shape(target_points)}")
    w, u_hat, v_hat = beam_frame(gantry_deg, couch_deg)
    source = isocenter - sad_mm * w
    rel = target_points - source
    s = rel @ w
    uv = np.stack([rel @ u_hat, rel @ v_hat], axis=1) * (sad_mm / s)[:, None]
    reach = margin_mm + voxel_radius_mm
    k = int(math.ceil(reach / beamlet_mm)) + 1
    cells = set()
    base = np.floor(uv / beamlet_mm).astype(np.int64)
    for di in range(-k, k + 1):
        for dj in range(-k, k + 1):
            cell = base + np.array([di, dj])
            lo = cell * beamlet_mm
            # distance from each projected point to this cell's square (0 inside)
            gap = np.maximum(np.maximum(lo - uv, uv - (lo + beamlet_mm)), 0.0)
            near = np.hypot(gap[:, 0], gap[:, 1]) <= reach
            cells.update(map(tuple, cell[near]))
    idx = np.array(sorted(cells), dtype=np.float64).reshape(-1, 2)
    return (idx + 0.5) * beamlet_mm


def beam_influence(
    density: np.ndarray, grid: Grid, rows: np.ndarray, isocenter: np.ndarray, gantry_deg: float,
    couch_deg: float, beamlet_uv_mm: np.ndarray, beamlet_mm: float, model: BeamModel,
) -> sp.csr_matrix:
    """Dose-influence matrix ``(len(rows), n_beamlets)`` of one beam (Gy per unit fluence).

    ``rows`` are flat C-order indices into ``grid`` and ``beamlet_uv_mm`` the ``(n, 2)`` distinct
    beamlet centres (mm at the isocentre plane) on a lattice of pitch ``beamlet_mm``.
    """
    _check_density(density, grid)
    _check_geometry(isocenter, gantry_deg, couch_deg, beamlet_mm)
    rows = np.asarray(rows)
    n_grid = int(np.prod(grid.shape))
    if rows.ndim != 1 or rows.dtype.kind not in "iu" or (rows.size and not (0 <= rows.min() and rows.max() < n_grid)):
        raise ValueError(f"rows must be a 1-D array of flat voxel indices in [0, {n_grid - 1}]")
    beamlet_uv_mm = np.asarray(beamlet_uv_mm, dtype=np.float64)
    if beamlet_uv_mm.ndim != 2 or beamlet_uv_mm.shape[1] != 2 or beamlet_uv_mm.shape[0] == 0:
        raise ValueError(f"beamlet_uv_mm must be a non-empty (n, 2) array of (u, v) mm, got shape "
                         f"{beamlet_uv_mm.shape}")
    if not np.all(np.isfinite(beamlet_uv_mm)):
        raise ValueError("beamlet_uv_mm contains NaN or inf")
    w, u_hat, v_hat = beam_frame(gantry_deg, couch_deg)
    source = isocenter - model.sad_mm * w
    pts = grid.points(rows)
    rel = pts - source
    s = rel @ w
    r = np.linalg.norm(rel, axis=1)
    scale = model.sad_mm / s
    u_iso, v_iso = (rel @ u_hat) * scale, (rel @ v_hat) * scale
    depth = radiological_depth(density, grid, pts, source, model.ray_step_mm)
    sig_iso = model.sigma(depth) * scale
    central = model.output_gy * model.pdd(depth) * (model.sad_mm / r) ** 2
    in_air = map_coordinates(density, grid.to_index_coords(pts), order=0, mode="nearest") <= 0
    central[in_air] = 0.0  # no dose deposited in air

    # beamlet lookup table: centres must lie on a lattice of pitch beamlet_mm (any offset)
    offset = np.mod(beamlet_uv_mm[0], beamlet_mm)
    lattice = (beamlet_uv_mm - offset) / beamlet_mm
    cell = np.round(lattice).astype(np.int64)
    off = np.abs(lattice - cell).max(axis=1) > 1e-3
    if off.any():
        raise ValueError(f"beamlet centres must lie on a regular {beamlet_mm} mm lattice; centre "
                         f"{beamlet_uv_mm[np.argmax(off)].tolist()} is off the lattice through "
                         f"{beamlet_uv_mm[0].tolist()}")
    unique, first = np.unique(cell, axis=0, return_index=True)
    if unique.shape[0] != cell.shape[0]:
        dup = np.setdiff1d(np.arange(cell.shape[0]), first)[0]
        raise ValueError(f"beamlet centre {beamlet_uv_mm[dup].tolist()} (index {dup}) is given twice")
    c0 = cell.min(axis=0)
    table = -np.ones(tuple(cell.max(axis=0) - c0 + 1), dtype=np.int64)
    table[cell[:, 0] - c0[0], cell[:, 1] - c0[1]] = np.arange(cell.shape[0])

    reach = beamlet_mm / 2 + model.cutoff_sigmas * sig_iso
    # the profile minus its value at the cut-off: continuous at the cut, so dose stays smooth in depth
    floor = aperture_profile(reach, beamlet_mm, sig_iso)
    k = int(math.ceil(reach.max() / beamlet_mm)) + 1
    base_u = np.round((u_iso - offset[0]) / beamlet_mm).astype(np.int64)
    base_v = np.round((v_iso - offset[1]) / beamlet_mm).astype(np.int64)
    row_idx, col_idx, vals = [], [], []
    for du in range(-k, k + 1):
        cu = base_u + du
        xu = u_iso - (offset[0] + cu * beamlet_mm)
        ok_u = (np.abs(xu) <= reach) & (central > 0)
        if not ok_u.any():
            continue
        pu = np.maximum(aperture_profile(xu, beamlet_mm, sig_iso) - floor, 0.0)
        for dv in range(-k, k + 1):
            cv = base_v + dv
            xv = v_iso - (offset[1] + cv * beamlet_mm)
            ok = ok_u & (np.abs(xv) <= reach)
            ti, tj = cu - c0[0], cv - c0[1]
            ok &= (ti >= 0) & (ti < table.shape[0]) & (tj >= 0) & (tj < table.shape[1])
            sel = np.nonzero(ok)[0]
            col = table[ti[sel], tj[sel]]
            has = col >= 0
            sel, col = sel[has], col[has]
            if sel.size == 0:
                continue
            row_idx.append(sel)
            col_idx.append(col)
            pv = np.maximum(aperture_profile(xv[sel], beamlet_mm, sig_iso[sel]) - floor[sel], 0.0)
            vals.append(central[sel] * pu[sel] * pv)
    n_rows, n_cols = rows.size, beamlet_uv_mm.shape[0]
    if not row_idx:
        return sp.csr_matrix((n_rows, n_cols), dtype=np.float32)
    m = sp.coo_matrix(
        (np.concatenate(vals).astype(np.float32), (np.concatenate(row_idx), np.concatenate(col_idx))),
        shape=(n_rows, n_cols),
    ).tocsr()
    m.sum_duplicates()
    return m
