"""Importers of user data (CORT, matRad/pyRadPlan, PortPy): small files written in each format."""

from __future__ import annotations

import json
from pathlib import Path

import h5py
import numpy as np
import pytest
import scipy.io as sio
import scipy.sparse as sp

from rtenv.case import CaseFormatError, PlanningCase
from rtenv.dose_engine import Grid
from rtenv.evaluation import Protocol, score_plan
from rtenv.importers import (
    hu_to_density,
    import_case,
    import_case_to_file,
    load_cort,
    matlab_to_grid_index,
    parse_beams,
    parse_structure_map,
)
from rtenv.phantom import Phantom
from rtenv.scenarios import Scenario, build_case

SHARED = Path("/work/shared/data")


def _ml_index(r: int, c: int, s: int, dims: tuple[int, int, int]) -> int:
    """1-based MATLAB linear index of 0-based (row, column, slice), written out by hand."""
    ny, nx, _ = dims
    return 1 + r + ny * c + ny * nx * s


# ----------------------------------------------------------------------------- parsing
def test_parse_structure_map_and_beams():
    assert parse_structure_map("PTV_68=target:PTV, Rectum=OAR") == {"PTV_68": ("target", "PTV"),
                                                                      "Rectum": ("oar", "Rectum")}
    assert parse_beams("0, 72,144") == [0.0, 72.0, 144.0]
    assert parse_beams("58:0,216:32") == [(58.0, 0.0), (216.0, 32.0)]
    for bad in ("PTV", "PTV=organ", "=target", ""):
        with pytest.raises(ValueError):
            parse_structure_map(bad)
    for bad in ("a,b", "1:2:3", "", "nan", "0:inf"):
        with pytest.raises(ValueError):
            parse_beams(bad)
    with pytest.raises(ValueError, match="'PTV_68' is mapped twice"):  # the second mapping used to win
        parse_structure_map("PTV_68=target:PTV,Rectum=oar,PTV_68=oar:Ring")


def test_matlab_index_conversion_hand_example():
    dims = (3, 4, 2)  # rows (y), columns (x), slices (z): deliberately all different
    # (row 2, column 1, slice 1): 1 + 2 + 3*1 + 12*1 = 18
    assert _ml_index(2, 1, 1, dims) == 18
    flat = matlab_to_grid_index(np.array([18, 1, 24]), dims)
    # rtenv grid (nz, ny, nx) = (2, 3, 4), y reversed: row r -> ny - 1 - r
    expected = [np.ravel_multi_index(t, (2, 3, 4)) for t in ((1, 0, 1), (0, 2, 0), (1, 0, 3))]
    assert flat.tolist() == expected
    for bad in ([0], [25], [1.5], []):
        with pytest.raises(CaseFormatError):
            matlab_to_grid_index(np.array(bad, dtype=float), dims)


def test_hu_to_density_anchor_points():
    np.testing.assert_allclose(hu_to_density(np.array([-1000.0, 0.0, 1000.0])), [0.0, 1.0, 1.55], atol=1e-6)


# ----------------------------------------------------------------------------- CORT
CORT_DIMS = (3, 4, 2)  # (ny, nx, nz)
CORT_STRUCTS = {  # 0-based (row, column, slice)
    "PTV_68": [(0, 1, 0), (0, 2, 0), (1, 1, 1)],
    "Rectum": [(2, 3, 1), (2, 0, 0), (1, 1, 1)],  # overlaps the PTV at (1, 1, 1)
    "Bladder": [(1, 3, 0)],
    "BODY": [(r, c, s) for r in range(3) for c in range(4) for s in range(2)],
}
CORT_BEAMS = {(0, 0): 2, (90, 0): 3, (90, 20): 1}  # (gantry, couch): beamlets


def _cort_matrix(g: int, c: int, nb: int) -> np.ndarray:
    n = int(np.prod(CORT_DIMS))
    m = np.arange(n)[:, None] * 10.0 + np.arange(nb)[None, :] + g / 10.0 + c / 100.0
    m[m.astype(int) % 7 == 0] = 0.0  # some structural zeros
    return m


def _write_cort(folder: Path, ct: str | None = None) -> Path:
    folder.mkdir(parents=True)
    for name, vox in CORT_STRUCTS.items():
        v = np.array([[_ml_index(r, c, s, CORT_DIMS)] for r, c, s in vox], dtype=float)
        sio.savemat(folder / f"{name}_VOILIST.mat", {"v": v})
    for (g, c), nb in CORT_BEAMS.items():
        sio.savemat(folder / f"Gantry{g}_Couch{c}_D.mat", {"D": sp.csc_matrix(_cort_matrix(g, c, nb))})
    if ct == "matrad":
        cube = np.ones(CORT_DIMS)
        cube[2, 3, 1] = 0.5
        sio.savemat(folder / f"{folder.name}.mat", {"ct": {"cube": cube, "resolution": {"x": 3.0, "y": 2.0, "z": 2.5},
                                                           "cubeDim": np.array(CORT_DIMS, float)}})
    elif ct == "info":
        ny, nx, nz = CORT_DIMS
        (folder / f"CTVOXEL_INFO_{folder.name}.txt").write_text(
            f"number of voxels x = {nx}\nnumber of voxels y = {ny}\nnumber of voxels z = {nz}\n")
    return folder


CORT_MAP = {"PTV_68": ("target", "PTV"), "Rectum": "oar", "Bladder": "oar"}


@pytest.mark.parametrize("grid", ["options", "matrad", "info"])
def test_cort_end_to_end(tmp_path, grid):
    folder = _write_cort(tmp_path / "PROSTATE", ct=None if grid == "options" else grid)
    opts: dict = {}
    if grid == "options":
        opts = {"grid_shape": (2, 3, 4), "voxel_mm": (2.5, 2.0, 3.0)}
    elif grid == "info":
        opts = {"voxel_mm": (2.5, 2.0, 3.0)}
    case = import_case("cort", folder, structures=CORT_MAP, beams=[(90, 0), 0], protocol="prostate9", **opts)
    assert isinstance(case, PlanningCase)
    assert case.grid_shape == (2, 3, 4) and case.voxel_mm == (2.5, 2.0, 3.0)
    assert case.structure_names == ["PTV", "Rectum", "Bladder"]
    assert [s.n_voxels for s in case.structures] == [3, 3, 1]
    assert case.target.voxel_cc == pytest.approx(2.5 * 2.0 * 3.0 / 1000)
    assert case.prescription_gy == pytest.approx(79.2) and case.fractions == 44
    assert [(b.gantry_deg, b.couch_deg, b.n_beamlets) for b in case.beams] == [(90, 0, 3), (0, 0, 2)]
    assert case.n_rows == 6  # union of PTV, Rectum, Bladder (one shared voxel); BODY is not mapped
    # masks: MATLAB (row r, column c, slice s) -> rtenv (s, ny - 1 - r, c)
    for src, new in (("PTV_68", "PTV"), ("Rectum", "Rectum"), ("Bladder", "Bladder")):
        expected = np.zeros((2, 3, 4), bool)
        for r, c, s in CORT_STRUCTS[src]:
            expected[s, 2 - r, c] = True
        np.testing.assert_array_equal(case.mask(new), expected)
    # dose: the hand-built full matrices, beams in the requested order
    x = np.array([0.5, 1.0, 2.0, 0.25, 3.0])
    full = np.hstack([_cort_matrix(90, 0, 3), _cort_matrix(0, 0, 2)]) @ x
    grid_dose = case.dose_grid(case.dose(x))
    for src in ("PTV_68", "Rectum", "Bladder"):
        for r, c, s in CORT_STRUCTS[src]:
            assert grid_dose[s, 2 - r, c] == pytest.approx(full[_ml_index(r, c, s, CORT_DIMS) - 1], rel=1e-6)
    if grid == "matrad":
        assert case.density is not None and case.density[1, 0, 3] == pytest.approx(0.5)
    # save / load round trip keeps everything
    back = PlanningCase.load(case.save(tmp_path / "c.rtcase"))
    np.testing.assert_allclose(back.dose(x), case.dose(x))


def test_cort_gantry_list_and_defaults(tmp_path):
    folder = _write_cort(tmp_path / "TG", ct="matrad")
    case = load_cort(folder, {"PTV_68": "target", "Rectum": "oar"}, protocol="prostate9", check_protocol=False)
    assert [(b.gantry_deg, b.couch_deg) for b in case.beams] == [(0, 0), (90, 0), (90, 20)]  # all, couch then gantry
    with pytest.raises(ValueError, match="ambiguous"):
        load_cort(folder, CORT_MAP, [90], protocol="prostate9")
    case = load_cort(folder, CORT_MAP, [0], protocol="prostate9", prescription_gy=70.0, fractions=35)
    assert case.n_beamlets == 2 and case.prescription_gy == 70.0 and case.fractions == 35


def test_a_protocol_file_is_stored_by_absolute_path(tmp_path, monkeypatch):
    folder = _write_cort(tmp_path / "P", ct="matrad")
    (tmp_path / "work").mkdir()
    monkeypatch.chdir(tmp_path / "work")
    Path("mine.json").write_text(json.dumps({**Protocol.load("prostate9").to_dict(), "name": "mine"}))
    saved = load_cort(folder, CORT_MAP, [0], protocol="mine.json").save(tmp_path / "c.rtcase")
    monkeypatch.chdir(tmp_path)  # a relative path stored in the case would no longer resolve here
    case = PlanningCase.load(saved)
    assert case.protocol == str((tmp_path / "work" / "mine.json").resolve())
    assert score_plan(case, case.dose(np.ones(case.n_beamlets))).protocol == "mine"
    (tmp_path / "work" / "mine.json").unlink()
    with pytest.raises(FileNotFoundError, match=r"case 'P' is scored by protocol file '.*mine.json' not found"):
        score_plan(case, case.dose(np.ones(case.n_beamlets)))
    with pytest.raises(FileNotFoundError, match=r"'elsewhere/x.json' not found \(relative to the working directory"):
        Protocol.load("elsewhere/x.json")


def test_cort_malformed(tmp_path):
    folder = _write_cort(tmp_path / "P", ct="matrad")
    kw = {"protocol": "prostate9"}
    with pytest.raises(CaseFormatError, match="does not exist"):
        load_cort(tmp_path / "nope", CORT_MAP, **kw)
    with pytest.raises(CaseFormatError, match="no beam at gantry 45"):
        load_cort(folder, CORT_MAP, [45], **kw)
    with pytest.raises(CaseFormatError, match="no structure 'Liver'"):
        load_cort(folder, {**CORT_MAP, "Liver": "oar"}, [0], **kw)
    with pytest.raises(ValueError, match="exactly one structure the role 'target'"):
        load_cort(folder, {"PTV_68": "target", "Rectum": "target"}, [0], **kw)
    with pytest.raises(ValueError, match="valid roles"):
        load_cort(folder, {"PTV_68": "tumour"}, [0], **kw)
    with pytest.raises(ValueError, match="lacks"):  # prostate9 scores Bladder
        load_cort(folder, {"PTV_68": ("target", "PTV"), "Rectum": "oar"}, [0], **kw)
    with pytest.raises(ValueError, match="unknown protocol"):
        load_cort(folder, CORT_MAP, [0], protocol="no-such-protocol")
    # missing variable / out-of-range indices / wrong matrix shape / negative values
    sio.savemat(folder / "Bladder_VOILIST.mat", {"w": np.array([[1.0]])})
    with pytest.raises(CaseFormatError, match="no variable 'v'"):
        load_cort(folder, CORT_MAP, [0], **kw)
    sio.savemat(folder / "Bladder_VOILIST.mat", {"v": np.array([[25.0]])})
    with pytest.raises(CaseFormatError, match=r"must lie in \[1, 24\]"):
        load_cort(folder, CORT_MAP, [0], **kw)
    sio.savemat(folder / "Bladder_VOILIST.mat", {"v": np.array([[0.0]])})
    with pytest.raises(CaseFormatError, match="Bladder_VOILIST"):
        load_cort(folder, CORT_MAP, [0], **kw)
    sio.savemat(folder / "Bladder_VOILIST.mat", {"v": np.array([[2.0]])})
    sio.savemat(folder / "Gantry0_Couch0_D.mat", {"D": sp.csc_matrix(np.ones((20, 2)))})
    with pytest.raises(CaseFormatError, match="has 20 rows"):
        load_cort(folder, CORT_MAP, [0], **kw)
    sio.savemat(folder / "Gantry0_Couch0_D.mat", {"A": sp.csc_matrix(np.ones((24, 2)))})
    with pytest.raises(CaseFormatError, match="no variable 'D'"):
        load_cort(folder, CORT_MAP, [0], **kw)
    sio.savemat(folder / "Gantry0_Couch0_D.mat", {"D": sp.csc_matrix(-np.ones((24, 2)))})
    with pytest.raises(CaseFormatError, match="negative"):
        load_cort(folder, CORT_MAP, [0], **kw)
    (folder / "Gantry0_Couch0_D.mat").write_bytes(b"not a mat file")
    with pytest.raises(CaseFormatError, match="Gantry0_Couch0_D.mat"):
        load_cort(folder, CORT_MAP, [0], **kw)
    (folder / "Rectum_VOILIST.mat").unlink()
    with pytest.raises(CaseFormatError, match="no structure 'Rectum'"):
        load_cort(folder, CORT_MAP, [90.0], **kw)


def test_cort_grid_information_required(tmp_path):
    folder = _write_cort(tmp_path / "P")
    with pytest.raises(CaseFormatError, match="no grid information"):
        load_cort(folder, CORT_MAP, [0], protocol="prostate9")
    (folder / "CTVOXEL_INFO.txt").write_text("x = 4\ny = 3\nz = 2\n")
    with pytest.raises(ValueError, match="voxel_mm"):
        load_cort(folder, CORT_MAP, [0], protocol="prostate9")
    # a MATLAB v7.3 file (HDF5 behind a 128-byte MATLAB header) that is not the CT is passed over
    with h5py.File(folder / "notes.mat", "w", userblock_size=512) as h:
        h["x"] = np.zeros(3)
    with open(folder / "notes.mat", "r+b") as fh:
        fh.write(b"MATLAB 7.3 MAT-file".ljust(116) + bytes(8) + b"\x00\x02IM")
    case = load_cort(folder, CORT_MAP, [0], protocol="prostate9", voxel_mm=np.array([3.0, 3.0, 3.0]))
    assert case.grid_shape == (2, 3, 4)
    (folder / "CTVOXEL_INFO.txt").unlink()
    with pytest.raises(CaseFormatError, match=r"no grid information.*\['notes.mat'\] are MATLAB v7.3"):
        load_cort(folder, CORT_MAP, [0], protocol="prostate9")
    (folder / "CTVOXEL_INFO.txt").write_text("x = 4\ny = 3\nz = 2\n")
    sio.savemat(folder / "P.mat", {"ct": {"resolution": {"x": 3.0, "y": 3.0, "z": 3.0}}})
    with pytest.raises(CaseFormatError, match="cubeDim"):
        load_cort(folder, CORT_MAP, [0], protocol="prostate9")


# ----------------------------------------------------------------------------- matRad
MR_DIMS = (14, 12, 8)  # rows (y), columns (x), slices (z)
MR_RES = {"x": 5.0, "y": 4.0, "z": 6.0}
TARGET_BOX = [(r, c, s) for r in range(5, 9) for c in range(4, 8) for s in range(3, 6)]
ANT, POST = (1, 5, 4), (12, 5, 4)  # anterior (small LPS row) and posterior voxels under the target


def _cst_row(i: int, name: str, typ: str, vox: list[tuple[int, int, int]]) -> list:
    cell = np.empty((1, 1), dtype=object)
    cell[0, 0] = np.array([[_ml_index(r, c, s, MR_DIMS)] for r, c, s in vox], dtype=float)
    return [float(i), name, typ, cell, {"Priority": 1.0}, np.empty((0, 0), dtype=object)]


def _write_matrad(path: Path, hu: bool = False, structures: list | None = None) -> Path:
    cube = np.ones(MR_DIMS)
    cube[2, 3, 4] = 1.3  # an orientation marker
    rows = structures or [("Target", "TARGET", TARGET_BOX), ("Ant", "OAR", [ANT]), ("Post", "OAR", [POST]),
                          ("BODY", "OAR", [(r, c, s) for r in range(14) for c in range(12) for s in range(8)])]
    cst = np.empty((len(rows), 6), dtype=object)
    for i, row in enumerate(rows):
        cst[i, :] = _cst_row(i, *row)
    cell = np.empty((1, 1), dtype=object)
    cell[0, 0] = (cube - 1.0) * 1000.0 if hu else cube
    ct = {("cubeHU" if hu else "cube"): cell, "resolution": MR_RES, "cubeDim": np.array(MR_DIMS, float),
          "numOfCtScen": 1.0}
    sio.savemat(path, {"ct": ct, "cst": cst})
    return path


def _hand_phantom() -> Phantom:
    """The same phantom built directly in rtenv's (z, y anterior, x) order, by explicit loops."""
    ny, nx, nz = MR_DIMS
    density = np.ones((nz, ny, nx), np.float32)
    density[4, ny - 1 - 2, 3] = 1.3
    masks = {}
    for nm, vox in (("PTV", TARGET_BOX), ("Ant", [ANT]), ("Post", [POST])):
        m = np.zeros((nz, ny, nx), bool)
        for r, c, s in vox:
            m[s, ny - 1 - r, c] = True
        masks[nm] = ("target" if nm == "PTV" else "oar", m)
    y0 = -(MR_RES["y"] + (ny - 1) * MR_RES["y"])
    grid = Grid((nz, ny, nx), (MR_RES["z"], MR_RES["y"], MR_RES["x"]), (MR_RES["x"], y0, MR_RES["z"]))
    return Phantom("prostate", 0, grid, density, np.ones((nz, ny, nx), bool), masks)


MR_MAP = {"Target": ("target", "PTV"), "Ant": "oar", "Post": "oar"}


def test_matrad_end_to_end(tmp_path):
    path = _write_matrad(tmp_path / "phantom.mat")
    case = import_case("matrad", path, structures=MR_MAP, beams=[0, (90, 0)], protocol="prostate9",
                       check_protocol=False)
    ny, nx, nz = MR_DIMS
    assert case.grid_shape == (nz, ny, nx) and case.voxel_mm == (6.0, 4.0, 5.0)
    assert [s.n_voxels for s in case.structures] == [48, 1, 1]
    assert case.density[4, ny - 1 - 2, 3] == pytest.approx(1.3)  # (row 2, col 3, slice 4) -> (4, ny-3, 3)
    assert case.mask("Ant")[ANT[2], ny - 1 - ANT[0], ANT[1]] and case.mask("Post")[4, ny - 1 - 12, 5]
    assert case.metadata["source_format"] == "matrad" and "phantom_seed" not in case.metadata
    # the matrix equals rtenv's engine on the hand-built phantom
    scenario = Scenario("x", "", "prostate", ("PTV", "Ant", "Post"), ((0.0, 0.0), (90.0, 0.0)), 79.2, 44, "prostate9")
    ref = build_case(_hand_phantom(), scenario, name="ref")
    np.testing.assert_array_equal(case.dose_rows, ref.dose_rows)
    assert (case.dose_influence != ref.dose_influence).nnz == 0
    # gantry 0 irradiates from anterior: the anterior voxel gets more dose than the posterior one
    x = np.zeros(case.n_beamlets, np.float32)
    x[: case.beams[0].n_beamlets] = 1.0
    d = case.structure_doses(case.dose(x))
    assert d["Ant"][0] > 1.05 * d["Post"][0] > 0  # 6 mm vs 50 mm deep (reversed: the opposite)


def test_matrad_hu_default_mapping_and_downsample(tmp_path):
    path = _write_matrad(tmp_path / "hu.mat", hu=True, structures=[("PTV", "TARGET", TARGET_BOX),
                                                                    ("Rectum", "OAR", [ANT])])
    case = import_case("matrad", path, beams=[0], protocol="prostate9", check_protocol=False)
    assert case.structure_names == ["PTV", "Rectum"] and case.target.n_voxels == 48
    assert case.density.max() == pytest.approx(1.0 + 0.00055 * 300) and case.density.min() == pytest.approx(1.0)
    small = import_case("matrad", path, beams=[0], protocol="prostate9", check_protocol=False,
                        structures={"PTV": "target"}, downsample=2)
    assert small.grid_shape == (4, 7, 6) and small.voxel_mm == (12.0, 8.0, 10.0)
    with pytest.raises(ValueError, match="vanishes"):
        import_case("matrad", path, beams=[0], protocol="prostate9", check_protocol=False, downsample=2)


def test_matrad_single_slice(tmp_path):
    # MATLAB's size() of a one-slice cube has 2 entries, so its cubeDim has too
    dims = (14, 12, 1)
    cst = np.empty((1, 6), dtype=object)
    cell = np.empty((1, 1), dtype=object)
    cell[0, 0] = np.array([[_ml_index(r, c, 0, dims)] for r in range(5, 9) for c in range(4, 8)], dtype=float)
    cst[0, :] = [0.0, "PTV", "TARGET", cell, {"Priority": 1.0}, np.empty((0, 0), dtype=object)]
    cube = np.empty((1, 1), dtype=object)
    cube[0, 0] = np.ones(dims[:2])
    ct = {"cube": cube, "resolution": MR_RES, "cubeDim": np.array(dims[:2], float)}
    sio.savemat(tmp_path / "slice.mat", {"ct": ct, "cst": cst})
    case = import_case("matrad", tmp_path / "slice.mat", beams=[0], protocol="prostate9", check_protocol=False)
    assert case.grid_shape == (1, 14, 12) and case.target.n_voxels == 16


def test_own_phantom_arrays_are_checked():
    good = _hand_phantom()
    nz, ny, nx = good.grid.shape
    ptv = good.structures["PTV"][1]
    for change, match in (
        ({"structures": {"PTV": ("target", ptv.transpose(2, 1, 0))}},
         r"structure 'PTV' mask must be a boolean \(nz, ny, nx\) = \(8, 14, 12\) array, got dtype bool shape "
         r"\(12, 14, 8\)"),
        ({"structures": {"PTV": ("target", ptv.astype(float))}}, "structure 'PTV' mask must be a boolean"),
        ({"structures": {"PTV": ("target", np.zeros_like(ptv))}}, "structure 'PTV' has an empty mask"),
        ({"structures": {"PTV": ("tumour", ptv)}}, "structure 'PTV' has role 'tumour'"),
        ({"density": np.full((nz, ny, nx), np.nan, np.float32)}, "density .* non-finite"),
        ({"density": np.ones((nz, ny), np.float32)}, r"density has shape \(8, 14\)"),
        ({"body": np.ones((nz, ny, nx), np.uint8)}, "body mask must be a boolean"),
    ):
        with pytest.raises(ValueError, match=match):
            Phantom(**{**good.__dict__, **change})


def test_matrad_malformed(tmp_path):
    one = np.empty((1, 6), dtype=object)
    one[0, :] = _cst_row(0, "PTV", "TARGET", TARGET_BOX)
    kw = {"protocol": "prostate9", "check_protocol": False, "beams": [0]}
    with pytest.raises(CaseFormatError, match="does not exist"):
        import_case("matrad", tmp_path / "none.mat", **kw)
    sio.savemat(tmp_path / "a.mat", {"ct": {"cube": np.ones((2, 2, 2))}})
    with pytest.raises(CaseFormatError, match="no variable 'cst'"):
        import_case("matrad", tmp_path / "a.mat", **kw)
    sio.savemat(tmp_path / "b.mat", {"ct": {"resolution": MR_RES}, "cst": one})
    with pytest.raises(CaseFormatError, match="neither 'cube'"):
        import_case("matrad", tmp_path / "b.mat", **kw)
    sio.savemat(tmp_path / "c.mat", {"ct": {"cube": np.ones((2, 2, 2)), "resolution": {"x": 1.0, "y": 1.0}},
                                     "cst": one})
    with pytest.raises(CaseFormatError, match="no field 'z'"):
        import_case("matrad", tmp_path / "c.mat", **kw)
    path = _write_matrad(tmp_path / "d.mat", structures=[("PTV", "TARGET", TARGET_BOX), ("PTV2", "TARGET", [ANT])])
    with pytest.raises(ValueError, match="exactly one"):
        import_case("matrad", path, **kw)
    with pytest.raises(CaseFormatError, match="no structure 'Heart'"):
        import_case("matrad", path, structures={"PTV": "target", "Heart": "oar"}, **kw)
    # out-of-range voxel index in the cst
    data = sio.loadmat(path)
    data["cst"][1, 3][0, 0] = np.array([[0.0], [5.0]])
    sio.savemat(tmp_path / "e.mat", {"ct": data["ct"], "cst": data["cst"]})
    with pytest.raises(CaseFormatError, match="cst voxel indices of 'PTV2'"):
        import_case("matrad", tmp_path / "e.mat", structures={"PTV": "target", "PTV2": "oar"}, **kw)
    with pytest.raises(ValueError, match="unknown import format"):
        import_case("dicom", path, **kw)
    # a name twice in the cst: the second row replaced the first without a word
    twice = _write_matrad(tmp_path / "twice.mat", structures=[("PTV", "TARGET", TARGET_BOX), ("Rectum", "OAR", [ANT]),
                                                              ("Rectum", "OAR", [POST])])
    with pytest.raises(CaseFormatError, match=r"cst names structure 'Rectum' twice \(rows 2 and 3\)"):
        import_case("matrad", twice, **kw)
    # a dose in cGy (or a total typed per fraction) is refused by the protocols' own bound
    with pytest.raises(ValueError, match=r"--rx\) = 5000 Gy in 44 fractions is 113.636 Gy per fraction; valid: up to "
                                         r"40 Gy per fraction \(is it in cGy\?\)"):
        import_case("matrad", path, structures={"PTV": "target"}, prescription_gy=5000, **kw)
    # density: NaN or negative values are refused before the dose engine runs
    for value, name in ((np.nan, "nan"), (-1.0, "negative")):
        data = sio.loadmat(path)
        data["ct"][0, 0]["cube"][0, 0][0, 0, 0] = value
        sio.savemat(tmp_path / f"{name}.mat", {"ct": data["ct"], "cst": data["cst"]})
        with pytest.raises(ValueError, match="density .* negative or non-finite"):
            import_case("matrad", tmp_path / f"{name}.mat", structures={"PTV": "target"}, **kw)
    good = {"structures": {"PTV": "target", "PTV2": "oar"}, "protocol": "prostate9", "check_protocol": False}
    for bad, message in (({"beams": [0, 360.0]}, r"beam 360.0 is requested twice"),
                         ({"beams": [float("nan")]}, "finite degrees"),
                         ({"beams": [0], "downsample": 2.7}, r"downsample = 2.7 must be an integer"),
                         ({"beams": [0], "prescription_gy": float("inf")}, r"prescription_gy \(--rx, Gy\) = inf"),
                         ({"beams": [0], "fractions": 2.9}, r"fractions = 2.9 must be an integer")):
        with pytest.raises(ValueError, match=message):
            import_case("matrad", path, **good | bad)
    truncated = tmp_path / "f.mat"
    sio.savemat(truncated, {"ct": data["ct"], "cst": data["cst"]}, do_compression=True)
    truncated.write_bytes(truncated.read_bytes()[:-40])
    with pytest.raises(CaseFormatError, match="not a readable MATLAB"):  # was a raw zlib.error
        import_case("matrad", truncated, **kw)


# ----------------------------------------------------------------------------- PortPy
CT_SHAPE = (2, 4, 6)  # (z, y, x) CT voxels of 1 x 1 x 2 mm (x, y, z); optimisation voxels 2 x 2 x 2 mm
PERM = np.array([7, 3, 11, 0, 5, 9, 1, 10, 2, 8, 4, 6])  # optimisation-voxel id of block (bz, by, bx)


def _block_id(bz: int, by: int, bx: int) -> int:
    return int(PERM[bz * 6 + by * 3 + bx])


PP_MATRICES = {0: np.random.default_rng(0).uniform(0, 1, (12, 3)),
               1: np.random.default_rng(1).uniform(0, 1, (12, 2)),
               2: np.random.default_rng(2).uniform(0, 1, (12, 2))}
PP_ANGLES = {0: (0.0, 0.0), 1: (120.0, 0.0), 2: (240.0, 10.0)}


def _write_portpy(folder: Path) -> Path:
    (folder / "Beams").mkdir(parents=True)
    vmap = np.zeros(CT_SHAPE, np.int32)
    for z in range(2):
        for y in range(4):
            for x in range(6):
                vmap[z, y, x] = _block_id(z, y // 2, x // 2)
    masks = {"PTV": [(0, 0, 0), (0, 1, 1), (1, 2, 4)], "LUNG_L": [(0, 3, 5), (1, 3, 5)], "BODY": [(0, 0, 0)]}
    with h5py.File(folder / "OptimizationVoxels_Data.h5", "w") as h:
        h["ct_to_dose_voxel_map"] = vmap
    with h5py.File(folder / "StructureSet_Data.h5", "w") as h:
        for nm, vox in masks.items():
            m = np.zeros(CT_SHAPE, np.uint8)
            for t in vox:
                m[t] = 1
            h[nm] = m
    with h5py.File(folder / "CT_Data.h5", "w") as h:
        h["ct_hu_3d"] = np.zeros(CT_SHAPE, np.int16)
    (folder / "CT_MetaData.json").write_text(json.dumps({
        "origin_xyz_mm": [-3.0, -2.0, 10.0], "resolution_xyz_mm": [1, 1, 2], "size_xyz_mm": [6, 4, 2],
        "ct_hu_3d_File": "CT_Data.h5/ct_hu_3d"}))
    (folder / "OptimizationVoxels_MetaData.json").write_text(json.dumps({
        "ct_origin_xyz_mm": [-3.0, -2.0, 10.0], "ct_voxel_resolution_xyz_mm": [1, 1, 2],
        "dose_voxel_resolution_xyz_mm": [2, 2, 2],
        "ct_to_dose_voxel_map_File": "OptimizationVoxels_Data.h5/ct_to_dose_voxel_map"}))
    (folder / "StructureSet_MetaData.json").write_text(json.dumps([
        {"name": nm, "volume_cc": 1.0, "structure_mask_3d_File": f"StructureSet_Data.h5/{nm}"} for nm in masks]))
    (folder / "PlannerBeams.json").write_text(json.dumps({"IDs": [0, 1]}))
    for bid, A in PP_MATRICES.items():
        nb = A.shape[1]
        r, c = np.nonzero(A > 0.3)
        with h5py.File(folder / "Beams" / f"Beam_{bid}_Data.h5", "w") as h:
            h["inf_matrix_sparse"] = np.stack([r, c, A[r, c]], axis=1)
            h["beamlets/position_x_mm"] = (np.arange(nb) * 2.5)[None, :]
            h["beamlets/position_y_mm"] = np.zeros((1, nb))
            h["beamlets/width_mm"] = np.full((1, nb), 2.5)
        g, cc = PP_ANGLES[bid]
        (folder / "Beams" / f"Beam_{bid}_MetaData.json").write_text(json.dumps({
            "ID": bid, "gantry_angle": g, "couch_angle": cc, "iso_center": {"x_mm": 1.0, "y_mm": 2.0, "z_mm": 3.0},
            "beamlets": {f"{k}_File": f"Beam_{bid}_Data.h5/beamlets/{k}" for k in ("position_x_mm", "position_y_mm",
                                                                                   "width_mm")},
            "influenceMatrixSparse_File": f"Beam_{bid}_Data.h5/inf_matrix_sparse"}))
    return folder


PP_MAP = {"PTV": "target", "LUNG_L": ("oar", "Lung")}


def test_portpy_end_to_end(tmp_path):
    folder = _write_portpy(tmp_path / "Lung_Patient_1")
    case = import_case("portpy", folder, structures=PP_MAP, protocol="prostate9", check_protocol=False)
    assert case.grid_shape == (2, 2, 3) and case.voxel_mm == (2.0, 2.0, 2.0)
    assert case.metadata["beam_ids"] == [0, 1]  # PlannerBeams.json
    assert [(b.gantry_deg, b.n_beamlets) for b in case.beams] == [(0.0, 3), (120.0, 2)]
    assert case.isocenter_mm == (1.0, -2.0, 3.0)  # LPS y -> anterior
    # PTV: blocks (0,0,0) and (1,1,2); Lung: blocks (0,1,2) and (1,1,2) (shared with the PTV)
    assert [s.n_voxels for s in case.structures] == [2, 2] and case.n_rows == 3
    ids = case.metadata["optimization_voxel_ids"]  # row i is PortPy optimisation voxel ids[i]
    assert ids == [_block_id(bz, by, bx) for bz, by, bx in ((0, 1, 2), (0, 0, 0), (1, 1, 2))]
    assert case.target.voxel_cc == pytest.approx(0.008)
    expected = np.zeros((2, 2, 3), bool)
    expected[0, 1, 0] = expected[1, 0, 2] = True  # block (bz, by, bx) -> (bz, 1 - by, bx)
    np.testing.assert_array_equal(case.mask("PTV"), expected)
    x = np.array([1.0, 0.5, 2.0, 0.25, 1.5])
    A = np.hstack([PP_MATRICES[0], PP_MATRICES[1]])
    A = np.where(A > 0.3, A, 0.0)
    full = A @ x
    grid = case.dose_grid(case.dose(x))
    for bz, by, bx in ((0, 0, 0), (1, 1, 2), (0, 1, 2)):
        assert grid[bz, 1 - by, bx] == pytest.approx(full[_block_id(bz, by, bx)], rel=1e-6)
    assert case.density is not None and case.density.shape == (2, 2, 3)
    # the grid geometry: block (0, 0, 0)'s centre is x = -3 + 0.5, y(LPS) = -2 + 0.5, z = 10
    origin = case.metadata["grid_origin_mm"]
    assert origin[0] == pytest.approx(-2.5) and origin[2] == pytest.approx(10.0)
    assert origin[1] == pytest.approx(-(-1.5 + 2.0))
    # beam subsets by angle and by ID
    by_angle = import_case("portpy", folder, structures=PP_MAP, beams=[(240, 10)], protocol="prostate9",
                           check_protocol=False)
    assert by_angle.metadata["beam_ids"] == [2]
    by_id = import_case("portpy", folder, structures=PP_MAP, beam_ids=[2, 0], protocol="prostate9",
                        check_protocol=False)
    assert [b.gantry_deg for b in by_id.beams] == [240.0, 0.0]


def test_portpy_malformed(tmp_path):
    kw = {"structures": PP_MAP, "protocol": "prostate9", "check_protocol": False}
    with pytest.raises(CaseFormatError, match="does not exist"):
        import_case("portpy", tmp_path / "x", **kw)
    folder = _write_portpy(tmp_path / "P")
    with pytest.raises(CaseFormatError, match="no beam with ID 7"):
        import_case("portpy", folder, beam_ids=[7], **kw)
    with pytest.raises(CaseFormatError, match="no beam at gantry 90"):
        import_case("portpy", folder, beams=[90], **kw)
    for ids in ([0, 0], [1.7], [], [True]):
        with pytest.raises(ValueError, match="beam_ids must be a non-empty list of distinct integer"):
            import_case("portpy", folder, beam_ids=ids, **kw)
    ov_path = folder / "OptimizationVoxels_MetaData.json"
    ov = json.loads(ov_path.read_text())
    for key, value in (("ct_voxel_resolution_xyz_mm", [1.0, float("nan"), 2.0]), ("ct_origin_xyz_mm", [0.0, 0.0])):
        ov_path.write_text(json.dumps({**ov, key: value}))
        with pytest.raises(CaseFormatError, match="finite"):
            import_case("portpy", folder, **kw)
    # dose voxels of 2.5 CT voxels: blocks of 2 and 3 were taken as blocks of 2 (wrong grid, wrong volumes)
    ov_path.write_text(json.dumps({**ov, "dose_voxel_resolution_xyz_mm": [2.5, 2.5, 2]}))
    with pytest.raises(CaseFormatError, match=r"dose voxels \(\[2.5, 2.5, 2.0\] mm, x y z\) are not whole blocks"):
        import_case("portpy", folder, **kw)
    ov_path.write_text(json.dumps(ov))
    ss_path = folder / "StructureSet_MetaData.json"
    ss = json.loads(ss_path.read_text())
    ss_path.write_text(json.dumps([*ss, {**ss[0]}]))  # the PTV listed twice
    with pytest.raises(CaseFormatError, match=r"names structures \['PTV'\] more than once"):
        import_case("portpy", folder, **kw)
    ss_path.write_text(json.dumps(ss))
    meta_path = folder / "Beams" / "Beam_0_MetaData.json"
    meta = json.loads(meta_path.read_text())
    meta_path.write_text(json.dumps({**meta, "gantry_angle": None}))
    with pytest.raises(ValueError, match="Beam_0_MetaData.json: gantry_angle = None is invalid"):
        import_case("portpy", folder, **kw)
    meta_path.write_text(json.dumps(meta))
    meta = json.loads(meta_path.read_text())
    meta_path.write_text(json.dumps({k: v for k, v in meta.items() if k != "influenceMatrixSparse_File"}))
    with pytest.raises(CaseFormatError, match="lacks field 'influenceMatrixSparse_File'"):
        import_case("portpy", folder, **kw)
    meta_path.write_text(json.dumps({**meta, "influenceMatrixSparse_File": "Beam_0_Data.h5/missing"}))
    with pytest.raises(CaseFormatError, match="no dataset '/missing'"):
        import_case("portpy", folder, **kw)
    meta_path.write_text(json.dumps(meta))
    with h5py.File(folder / "Beams" / "Beam_0_Data.h5", "a") as h:
        good = h["inf_matrix_sparse"][()]
        del h["inf_matrix_sparse"]
        h["inf_matrix_sparse"] = good[:, :2]
    with pytest.raises(CaseFormatError, match="N x 3"):
        import_case("portpy", folder, **kw)
    with h5py.File(folder / "Beams" / "Beam_0_Data.h5", "a") as h:
        del h["inf_matrix_sparse"]
        bad = good.copy()
        bad[0, 0] = 12
        h["inf_matrix_sparse"] = bad
    with pytest.raises(CaseFormatError, match="out of range"):
        import_case("portpy", folder, **kw)
    with h5py.File(folder / "StructureSet_Data.h5", "a") as h:
        del h["LUNG_L"]
        h["LUNG_L"] = np.zeros((2, 4, 5), np.uint8)
    with pytest.raises(CaseFormatError, match="mask has shape"):
        import_case("portpy", folder, **kw)
    (folder / "OptimizationVoxels_Data.h5").unlink()
    with pytest.raises(CaseFormatError, match="missing file .*OptimizationVoxels_Data.h5"):
        import_case("portpy", folder, **kw)
    (folder / "StructureSet_MetaData.json").unlink()
    with pytest.raises(CaseFormatError, match="missing file .*StructureSet_MetaData.json"):
        import_case("portpy", folder, **kw)


# ----------------------------------------------------------------------------- CLI helper
def test_import_case_to_file(tmp_path):
    folder = _write_cort(tmp_path / "PROSTATE", ct="matrad")
    case, out = import_case_to_file("cort", folder, tmp_path / "out" / "p.rtcase", beams="0,90:20",
                                    structures="PTV_68=target:PTV,Rectum=oar,Bladder=oar", protocol="prostate9",
                                    prescription_gy=None)
    assert out.is_file() and PlanningCase.load(out).n_beamlets == case.n_beamlets == 3
    # the helper speaks the command line's options
    cort_options = "its options: --structures, --beams, --protocol, --rx, --fractions, --name, --voxel-mm, "
    with pytest.raises(ValueError, match=f"^--beam-ids does not apply to cort imports; {cort_options}"):
        import_case_to_file("cort", folder, tmp_path / "q.rtcase", beam_ids="1", protocol="prostate9")
    with pytest.raises(ValueError, match="^--beam-ids, --downsample do not apply to cort imports"):
        import_case_to_file("cort", folder, tmp_path / "q.rtcase", protocol="prostate9", downsample=2, beam_ids="1")
    with pytest.raises(ValueError, match=r"option\(s\) \['downsample'\] do not apply to the cort format"):
        import_case("cort", folder, structures=CORT_MAP, protocol="prostate9", downsample=2)
    for beams, message in (("", "empty beam list"), (" , ", "empty beam list"),
                           ("0,,90", "beam list '0,,90' has an empty entry")):
        with pytest.raises(ValueError, match=message):
            import_case_to_file("cort", folder, tmp_path / "q.rtcase", beams=beams, protocol="prostate9")
    with pytest.raises(ValueError, match=r"bad beam IDs '0,,1': expected integers"):  # checked before any reading
        import_case_to_file("portpy", tmp_path / "nowhere", tmp_path / "q.rtcase", beam_ids="0,,1",
                            protocol="prostate9")
    assert not (tmp_path / "q.rtcase").exists()
    with pytest.raises(ValueError, match="needs protocol"):
        import_case("cort", folder, structures=CORT_MAP)


def test_cli_cases_import(tmp_path, capsys):
    from rtenv.cli import main

    folder = _write_cort(tmp_path / "PROSTATE", ct="matrad")
    out = tmp_path / "cli.rtcase"
    assert main(["cases", "import", "cort", str(folder), "--beams", "0,90:20", "--protocol", "prostate9",
                 "--structures", "PTV_68=target:PTV,Rectum=oar,Bladder=oar", "--out", str(out)]) == 0
    assert "3 beamlets" in capsys.readouterr().out and PlanningCase.load(out).n_beamlets == 3
    assert main(["cases", "import", "cort", str(tmp_path / "nowhere"), "--protocol", "prostate9",
                 "--out", str(out)]) == 2
    assert "rtenv: error:" in capsys.readouterr().err


# ----------------------------------------------------------------------------- real data (optional)
def _dirs(sub: str) -> list[Path]:
    root = SHARED / sub
    return sorted(p for p in root.iterdir() if p.is_dir()) if root.is_dir() else []


@pytest.mark.skipif(not _dirs("cort"), reason="no CORT data under /work/shared/data/cort")
@pytest.mark.parametrize("folder", _dirs("cort"), ids=lambda p: p.name)
def test_real_cort(folder):
    names = sorted(p.name[: -len("_VOILIST.mat")] for p in folder.glob("*_VOILIST.mat"))
    target = next(n for n in names if "PTV" in n.upper())
    oars = [n for n in names if "PTV" not in n.upper() and n.upper() not in ("BODY", "SKIN")][:2]
    first = sorted(folder.glob("Gantry*_Couch*_D.mat"))[0].name
    g = float(first.split("_")[0][len("Gantry"):])
    c = float(first.split("_")[1][len("Couch"):])
    case = load_cort(folder, {target: "target", **{o: "oar" for o in oars}}, [(g, c)], protocol="prostate9",
                     check_protocol=False, voxel_mm=3.0 if list(folder.glob("CTVOXEL_INFO*.txt")) else None)
    assert case.n_beamlets > 0 and case.dose(np.ones(case.n_beamlets)).max() > 0


@pytest.mark.skipif(not (SHARED / "matrad").is_dir(), reason="no matRad phantoms under /work/shared/data/matrad")
def test_real_matrad():
    for path in sorted((SHARED / "matrad").glob("*.mat")):
        case = import_case("matrad", path, beams=[0], protocol="prostate9", check_protocol=False, downsample=2)
        assert case.n_beamlets > 0


@pytest.mark.skipif(not _dirs("portpy"), reason="no PortPy data under /work/shared/data/portpy")
@pytest.mark.parametrize("folder", _dirs("portpy"), ids=lambda p: p.name)
def test_real_portpy(folder):
    names = [s["name"] for s in json.loads((folder / "StructureSet_MetaData.json").read_text())]
    oars = [n for n in names if n in ("ESOPHAGUS", "HEART", "CORD", "RECTUM", "BLADDER")][:2]
    case = import_case("portpy", folder, structures={"PTV": "target", **{o: "oar" for o in oars}},
                       beam_ids=[0], protocol="prostate9", check_protocol=False)
    assert case.n_rows > 0 and case.dose(np.ones(case.n_beamlets)).max() > 0
