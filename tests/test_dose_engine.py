"""Physics of the pencil-beam engine, checked in water boxes."""

import numpy as np
import pytest

from rtenv.dose_engine import BeamModel, Grid, beam_influence, radiological_depth, select_beamlets

MODEL = BeamModel()


def water_box(half_mm=(60.0, 120.0, 30.0), voxel=(2.5, 2.5, 2.5), density=1.0):
    """A water box centred on the origin; ``voxel`` is (dz, dy, dx) mm."""
    dz, dy, dx = voxel
    hx, hy, hz = half_mm
    shape = (int(2 * hz / dz) + 1, int(2 * hy / dy) + 1, int(2 * hx / dx) + 1)
    grid = Grid(shape, voxel, (-hx, -hy, -hz))
    return grid, np.full(shape, density, dtype=np.float32)


def rows_where(grid, pred):
    idx = np.arange(int(np.prod(grid.shape)))
    pts = grid.points(idx)
    return idx[pred(pts)], pts[pred(pts)]


def field(width_mm, beamlet_mm=10.0):
    """Beamlet centres of a square field of side ``width_mm`` at the isocentre plane."""
    c = (np.arange(width_mm / beamlet_mm) + 0.5) * beamlet_mm - width_mm / 2
    u, v = np.meshgrid(c, c, indexing="ij")
    return np.stack([u.ravel(), v.ravel()], axis=1)


def axis_dose(grid, density, iso=(0.0, 0.0, 0.0), gantry=0.0, width=60.0, beamlet=10.0):
    rows, pts = rows_where(grid, lambda p: (np.abs(p[:, 0]) < 1e-6) & (np.abs(p[:, 2]) < 1e-6))
    D = beam_influence(density, grid, rows, np.array(iso), gantry, 0.0, field(width, beamlet), beamlet, MODEL)
    return pts[:, 1], np.asarray(D.sum(axis=1)).ravel()


def test_depth_dose_peaks_at_buildup_then_falls():
    grid, rho = water_box()
    y, dose = axis_dose(grid, rho)
    depth = grid.origin_mm[1] * -1 + 1.25 - y  # box surface at y = +121.25 mm
    order = np.argsort(depth)
    depth, dose = depth[order], dose[order]
    peak = depth[np.argmax(dose)]
    assert 10.0 <= peak <= 20.0, f"depth of maximum {peak} mm, expected about 15 mm"
    assert dose[0] < 0.5 * dose.max()  # build-up: low surface dose
    beyond = dose[depth > 25.0]
    assert np.all(np.diff(beyond) < 0)  # monotone fall-off past the build-up
    assert 0.55 < dose[np.argmin(np.abs(depth - 100.0))] / dose.max() < 0.8  # ~PDD(10 cm) of 6 MV


def test_inverse_square_with_distance_at_fixed_depth():
    grid, rho = water_box()
    y, d_near = axis_dose(grid, rho, iso=(0.0, 0.0, 0.0), width=40.0, beamlet=40.0)
    _, d_far = axis_dose(grid, rho, iso=(0.0, 200.0, 0.0), width=40.0, beamlet=40.0)
    # the box (and the point) stay fixed while the source moves 200 mm further away
    point = np.argmin(np.abs(y - 60.0))  # ~61 mm depth
    r_near = 1000.0 - y[point]
    r_far = 1200.0 - y[point]
    assert d_far[point] / d_near[point] == pytest.approx((r_near / r_far) ** 2, rel=0.01)


def test_lateral_penumbra_width():
    grid, rho = water_box(half_mm=(60.0, 120.0, 10.0), voxel=(2.5, 2.5, 0.5))
    y0 = 20.0  # a row of voxel centres ~10 cm deep
    depth_target = 121.25 - y0
    rows, pts = rows_where(grid, lambda p: (np.abs(p[:, 1] - y0) < 1e-6) & (np.abs(p[:, 2]) < 1e-6))
    iso = np.array([0.0, y0, 0.0])  # isocentre at 10 cm depth: no magnification at the profile
    D = beam_influence(rho, grid, rows, iso, 0.0, 0.0, np.zeros((1, 2)), 60.0, MODEL)
    prof = np.asarray(D.sum(axis=1)).ravel()
    x = pts[:, 0]
    prof = prof / prof[np.argmin(np.abs(x))]
    edge = x > 0
    x80 = np.interp(0.8, prof[edge][::-1], x[edge][::-1])
    x20 = np.interp(0.2, prof[edge][::-1], x[edge][::-1])
    sigma = MODEL.sigma0_mm + MODEL.sigma_slope * depth_target
    assert x20 - x80 == pytest.approx(2 * 0.8416 * sigma, rel=0.05)  # erf edge: 1.68 sigma
    assert abs(0.5 * (x20 + x80) - 30.0) < 0.5  # 50 % at the geometric edge
    assert prof[np.abs(x) > 30 + 2.5 * sigma + 1].max() == 0.0  # truncated tails keep it sparse


def test_opposed_beams_are_symmetric():
    grid, rho = water_box()
    y, d0 = axis_dose(grid, rho, gantry=0.0)
    y2, d180 = axis_dose(grid, rho, gantry=180.0)
    assert np.array_equal(y, y2)
    mirrored = d180[np.argsort(-y)][np.argsort(np.argsort(y))]  # d180 at -y, aligned with y
    np.testing.assert_allclose(d0, mirrored, rtol=1e-4, atol=1e-7)
    total = d0 + d180
    np.testing.assert_allclose(total, total[::-1], rtol=1e-4, atol=1e-7)


def test_bone_insert_lowers_dose_behind_it():
    grid, water = water_box()
    y, d_water = axis_dose(grid, water)
    bone = water.copy()
    pts_y = grid.origin_mm[1] + grid.voxel_mm[1] * np.arange(grid.shape[1])
    slab = (pts_y < 121.25 - 30.0) & (pts_y > 121.25 - 60.0)  # 30 mm of bone at 3-6 cm depth
    bone[:, slab, :] = 1.8
    _, d_bone = axis_dose(grid, bone)
    behind = np.argmin(np.abs(y - (121.25 - 100.0)))
    ratio = d_bone[behind] / d_water[behind]
    assert ratio < 0.97
    # the bone adds 0.8 x 30 mm of water-equivalent depth
    expected = MODEL.pdd(np.array([100.0 + 24.0]))[0] / MODEL.pdd(np.array([100.0]))[0]
    assert ratio == pytest.approx(expected, rel=0.01)


def test_radiological_depth_is_density_line_integral():
    grid, rho = water_box()
    rho[:] = 0.5
    pts = np.array([[0.0, 21.25, 0.0]])  # 100 mm below the surface at y = 121.25
    d = radiological_depth(rho, grid, pts, np.array([0.0, 1000.0, 0.0]), step_mm=1.0)
    assert d[0] == pytest.approx(50.0, abs=1.5)


def test_beamlets_cover_target_projection_with_margin():
    pts = np.array([[x, 0.0, z] for x in np.arange(-20, 21, 5.0) for z in np.arange(-10, 11, 5.0)])
    uv = select_beamlets(pts, np.zeros(3), 0.0, 0.0, 10.0, 5.0, 1000.0, voxel_radius_mm=0.0)
    assert uv[:, 0].min() < -20 and uv[:, 0].max() > 20
    assert uv[:, 1].min() < -10 and uv[:, 1].max() > 10
    assert len(uv) == len({tuple(p) for p in uv.tolist()})  # no duplicates


def test_beam_model_rejects_bad_parameters():
    with pytest.raises(ValueError, match="sigma0_mm"):
        BeamModel(sigma0_mm=-1.0)
    with pytest.raises(ValueError, match="surface_dose"):
        BeamModel(surface_dose=1.5)
    # in range one by one, but together no build-up curve peaks at d_max (brentq found no root)
    with pytest.raises(ValueError, match="admit no build-up curve"):
        BeamModel(d_max_mm=35.0, mu_per_mm=0.02)


@pytest.mark.parametrize("change, message", [
    (dict(density=np.ones((5, 5, 5), np.float32)), r"density has shape \(5, 5, 5\)"),
    (dict(gantry=float("nan")), "gantry_deg = nan"),
    (dict(isocenter=np.array([np.nan, 0.0, 0.0])), "isocenter must be 3 finite"),
    (dict(beamlet_mm=-10.0), r"beamlet_mm = -10.0 .* \(0, 1000\]"),
    (dict(uv=np.zeros((0, 2))), "beamlet_uv_mm must be a non-empty"),
    (dict(uv=np.array([[5.0, 5.0], [5.0, 5.0]])), r"beamlet centre \[5.0, 5.0\] \(index 1\) is given twice"),
    (dict(uv=np.array([[5.0, 5.0], [11.0, 5.0]])), r"centre \[11.0, 5.0\] is off the lattice"),
    (dict(rows=np.array([10**7])), "rows must be a 1-D array of flat voxel indices"),
])
def test_beam_influence_rejects_bad_input(change, message):
    grid, rho = water_box(half_mm=(20.0, 20.0, 10.0), voxel=(5.0, 5.0, 5.0))
    args = dict(density=rho, rows=np.arange(int(np.prod(grid.shape))), isocenter=np.zeros(3), gantry=0.0,
                uv=np.array([[5.0, 5.0]]), beamlet_mm=10.0) | change
    with pytest.raises(ValueError, match=message):
        beam_influence(args["density"], grid, args["rows"], args["isocenter"], args["gantry"], 0.0, args["uv"],
                       args["beamlet_mm"], MODEL)
