"""Phantoms, scenarios, cohorts and the case file format."""

import dataclasses
import json
import zipfile

import numpy as np
import pytest

from rtenv.case import CaseFormatError, PlanningCase
from rtenv.evaluation import dose_at_volume_percent
from rtenv.phantom import BONE, LUNG, make_phantom
from rtenv.scenarios import COHORTS, SCENARIOS, case_seed, load_case


@pytest.fixture(scope="module")
def s1():
    return load_case("S1", "test", 0)


def test_phantom_is_deterministic_and_varies_by_seed():
    a, b, c = make_phantom("prostate", 7), make_phantom("prostate", 7), make_phantom("prostate", 8)
    assert np.array_equal(a.density, b.density)
    for name in a.structures:
        assert np.array_equal(a.structures[name][1], b.structures[name][1])
    assert not np.array_equal(a.structures["PTV"][1], c.structures["PTV"][1])
    assert a.body.sum() != c.body.sum()


def test_prostate_anatomy_overlaps_and_tissues():
    volumes = []
    for seed in range(5):
        p = make_phantom("prostate", seed)
        ptv = p.structures["PTV"][1]
        for oar in ("Bladder", "Rectum"):
            overlap = (ptv & p.structures[oar][1]).sum() / p.structures[oar][1].sum()
            assert 0.0 < overlap < 0.35, (seed, oar, overlap)
        for head in ("FemoralHead_L", "FemoralHead_R"):
            assert np.all(p.density[p.structures[head][1]] == BONE)
            assert not (p.structures[head][1] & ptv).any()
        assert p.centroid_mm("FemoralHead_L")[0] > 0 > p.centroid_mm("FemoralHead_R")[0]
        assert p.centroid_mm("Bladder")[1] > p.centroid_mm("PTV")[1] > p.centroid_mm("Rectum")[1]
        volumes.append(ptv.sum() * 0.125)
    assert 40 < min(volumes) and max(volumes) < 200 and len(set(volumes)) == 5


def test_liver_anatomy():
    p = make_phantom("liver", 3)
    ptv, liver, heart = (p.structures[n][1] for n in ("PTV", "Liver", "Heart"))
    assert not (ptv & liver).any()  # Liver is normal liver: liver minus PTV
    assert not (liver & heart).any()
    assert (p.density == LUNG).sum() > 1000
    assert p.centroid_mm("Heart")[2] > p.centroid_mm("PTV")[2]
    assert 800 < liver.sum() * 0.125 < 2500


def test_bad_phantom_arguments():
    with pytest.raises(ValueError, match="unknown site 'lung'"):
        make_phantom("lung", 0)
    with pytest.raises(ValueError, match=r"voxel_mm = 1.0 .* \[2.5, 10\]"):
        make_phantom("prostate", 0, voxel_mm=1.0)
    for seed in (-1, True, 1.5, "3", None):
        with pytest.raises(ValueError, match=rf"seed = {seed!r} must be an integer in \[0, inf\]"):
            make_phantom("prostate", seed)


def test_cohorts_are_disjoint_and_checked():
    seeds = {c: {case_seed(c, i) for i in range(20 if n is None else n)} for c, (n, _) in COHORTS.items()}
    assert len(seeds["knowledge"]) == 20 and len(seeds["test"]) == 10
    assert not (seeds["knowledge"] & seeds["test"]) and not (seeds["train"] & (seeds["knowledge"] | seeds["test"]))
    with pytest.raises(ValueError, match=r"index 10 is outside cohort 'test'.*\[0, 9\]"):
        case_seed("test", 10)
    with pytest.raises(ValueError, match="unknown cohort"):
        case_seed("validation", 0)


def test_scenario_presets():
    assert [len(SCENARIOS[s].beams) for s in ("S1", "S2", "S3")] == [7, 180, 7]
    assert [g for g, _ in SCENARIOS["S1"].beams] == [0, 32, 64, 96, 264, 296, 328]
    assert SCENARIOS["S3"].beams[4] == (216.0, 32.0)
    assert SCENARIOS["S2"].structures[-2:] == ("FemoralHead_L", "FemoralHead_R")


def test_s1_case_and_cache(s1):
    assert s1.structure_names == ["PTV", "Bladder", "Rectum"]
    assert s1.dose_influence.dtype == np.float32 and s1.dose_influence.nnz > 10_000
    assert all(b.n_beamlets > 10 for b in s1.beams)
    assert s1.metadata["build_seconds"] > 0
    again = load_case("S1", "test", 0)  # from the cache
    assert (again.dose_influence != s1.dose_influence).nnz == 0
    dose = s1.dose(np.ones(s1.n_beamlets))
    dose *= s1.coverage_scale(dose)
    ptv = np.sort(dose[s1.target.rows])[::-1]
    assert ptv[int(np.ceil(0.95 * ptv.size)) - 1] == pytest.approx(79.2, rel=1e-5)


def test_case_roundtrip(s1, tmp_path):
    path = s1.save(tmp_path / "c.rtcase")
    back = PlanningCase.load(path)
    assert back.summary() == s1.summary()
    assert np.array_equal(back.density, s1.density)
    for a, b in zip(back.beams, s1.beams, strict=True):
        assert np.array_equal(a.beamlet_uv_mm, b.beamlet_uv_mm)
    assert (back.dose_influence != s1.dose_influence).nnz == 0


def _rewrite(src, dst, edit):
    with np.load(src) as z:
        arrays = {k: z[k] for k in z.files}
    edit(arrays)
    with open(dst, "wb") as fh:
        np.savez_compressed(fh, **arrays)


def test_corrupt_and_mismatched_files(s1, tmp_path):
    good = s1.save(tmp_path / "good.rtcase")
    junk = tmp_path / "junk.rtcase"
    junk.write_bytes(b"not a zip at all")
    with pytest.raises(CaseFormatError, match="junk.rtcase is not an rtenv case file: .* is a NumPy .npz zip archive"):
        PlanningCase.load(junk)  # (np.load itself would talk of pickles)
    truncated = tmp_path / "trunc.rtcase"
    truncated.write_bytes(good.read_bytes()[:5000])
    with pytest.raises(CaseFormatError):
        PlanningCase.load(truncated)
    with pytest.raises(FileNotFoundError):
        PlanningCase.load(tmp_path / "missing.rtcase")

    def header(arrays, **change):
        h = json.loads(arrays["header"].tobytes())
        h.update(change)
        arrays["header"] = np.frombuffer(json.dumps(h).encode(), dtype=np.uint8)

    cases = {
        "version": (lambda a: header(a, version=99), "format version 99"),
        "format": (lambda a: header(a, format="other"), "format is 'other'"),
        "array": (lambda a: a.pop("structure_1_rows"), r"array.rtcase: missing array 'structure_1_rows'$"),
        "protocol": (lambda a: header(a, protocol=None), "protocol = None must be a non-empty string"),
        "list": (lambda a: a.__setitem__("header", np.frombuffer(b"[1, 2]", dtype=np.uint8)),
                 "header is a JSON list, not an object"),
        "rows": (lambda a: a.__setitem__("structure_0_rows", a["structure_0_rows"] + 10**7), "structure 'PTV' rows"),
        "matrix": (lambda a: a.__setitem__("D_indptr", a["D_indptr"][:-5]), "matrix|dose_influence"),
        # a column index past the beamlets would read past the fluence in every dose computation
        "column": (lambda a: a["D_indices"].__setitem__(0, 10**6),
                   "dose_influence is not a valid CSR matrix: .*indices"),
        "voxel volume": (lambda a: header(a, structures=[{**st, "voxel_cc": 1.0} for st in json.loads(
            a["header"].tobytes())["structures"]]), r"voxel_cc of structure 'PTV' = 1.0 cc is not the grid's"),
    }
    for key, (edit, message) in cases.items():
        bad = tmp_path / f"{key}.rtcase"
        _rewrite(good, bad, edit)
        with pytest.raises(CaseFormatError, match=message):
            PlanningCase.load(bad)
    assert zipfile.is_zipfile(good)
    unnamed_site = tmp_path / "site.rtcase"  # a protocol file need not name its disease site
    _rewrite(good, unnamed_site, lambda a: header(a, site=""))
    assert PlanningCase.load(unnamed_site).site == ""


def test_damaged_member_is_a_case_format_error(s1, tmp_path):
    data = bytearray(s1.save(tmp_path / "c.rtcase").read_bytes())
    with zipfile.ZipFile(tmp_path / "c.rtcase") as z:
        info = z.getinfo("D_data.npy")
    start = info.header_offset + 30 + len(info.filename) + len(info.extra)  # the compressed member's bytes
    for i in range(start + 100, start + 300):
        data[i] ^= 0xFF
    bad = tmp_path / "bad.rtcase"
    bad.write_bytes(bytes(data))
    with pytest.raises(CaseFormatError, match="not a readable rtenv case file"):  # was a raw zlib.error
        PlanningCase.load(bad)
    assert [p.name for p in tmp_path.iterdir() if p.name.endswith(".tmp")] == []  # save left no temporary


def test_structure_rows_must_be_sorted_unique_integers(s1):
    ptv = s1.target
    for rows, match in ((np.r_[ptv.rows, ptv.rows[:1]], "strictly increasing"),
                        (ptv.rows[::-1].copy(), "strictly increasing"),
                        (ptv.rows.astype(float), "integer indices")):
        structures = [dataclasses.replace(ptv, rows=rows), *s1.structures[1:]]
        with pytest.raises(CaseFormatError, match=match):
            dataclasses.replace(s1, structures=structures)


@pytest.mark.parametrize("change, match", [
    ({"prescription_gy": float("inf")}, r"prescription_gy = inf is invalid; expected a finite number in \(0, inf\)"),
    ({"prescription_gy": "60"}, r"prescription_gy = '60' is invalid"),  # was a TypeError from a comparison
    ({"prescription_gy": True}, r"prescription_gy = True is invalid"),
    ({"fractions": 2.5}, r"fractions = 2.5 must be an integer in \[1, inf\]"),  # was truncated to 2 on save
    ({"voxel_mm": (5.0, -5.0, 5.0)}, r"voxel_mm\[y\] = -5.0 is invalid"),
    ({"voxel_mm": (5.0, 5.0)}, r"voxel_mm = \(5.0, 5.0\) must be 3 sizes"),
])
def test_case_refuses_bad_prescription_and_sizes(s1, change, match):
    with pytest.raises(CaseFormatError, match=match):
        dataclasses.replace(s1, **change)


def test_case_refuses_a_bad_grid_rows_beam_or_density(s1):
    for change, match in (
        ({"grid_shape": (2.0, 3, 4)}, r"grid_shape = \(2.0, 3, 4\) must be 3 voxel counts"),
        ({"grid_shape": (-2, -3, 4)}, "must be 3 voxel counts"),
        ({"dose_rows": s1.dose_rows + 0.5}, "dose_rows must be integer grid indices, got dtype float64"),
        ({"density": np.full(s1.grid_shape, np.nan, dtype=np.float32)}, "density .* non-finite"),
        ({"beams": (dataclasses.replace(s1.beams[0], beamlet_uv_mm=s1.beams[0].beamlet_uv_mm[:, 0].copy()),
                    *s1.beams[1:])}, r"beam 0 beamlet_uv_mm must be a finite \(n_beamlets, 2\) array"),
        ({"beams": (dataclasses.replace(s1.beams[0], gantry_deg=float("nan")), *s1.beams[1:])},
         "beam 0 gantry_deg = nan is invalid"),
    ):
        with pytest.raises(CaseFormatError, match=match):
            dataclasses.replace(s1, **change)


def test_case_numbers_are_stored_as_plain_python_numbers(s1, tmp_path):
    case = dataclasses.replace(s1, fractions=np.int64(44), prescription_gy=np.float32(79.2))
    assert type(case.fractions) is int and type(case.prescription_gy) is float
    assert PlanningCase.load(case.save(tmp_path / "c.rtcase")).fractions == 44  # a numpy integer failed to save


def test_case_refuses_a_negative_voxel_volume(s1):
    structures = [dataclasses.replace(s1.structures[0], voxel_cc=-0.125), *s1.structures[1:]]
    with pytest.raises(CaseFormatError, match=r"voxel_cc of structure 'PTV' = -0.125 is invalid"):
        dataclasses.replace(s1, structures=structures)


def test_coverage_scale_lands_at_or_above_the_prescription(s1):
    rng = np.random.default_rng(0)
    rx60 = dataclasses.replace(s1, prescription_gy=60.0)
    for i in range(100):
        dose = s1.dose(rng.random(s1.n_beamlets).astype(np.float32))
        case = s1
        if i % 2:  # numpy's float64: the plain ratio Rx / D95 misses in 8 of these 50
            dose, case = dose.astype(np.float64), rx60
        dose *= case.coverage_scale(dose)
        d95 = dose_at_volume_percent(dose[s1.target.rows], 95)
        assert case.prescription_gy <= d95 <= case.prescription_gy * (1 + 1e-6)
    with pytest.raises(ValueError, match="dose has shape"):
        s1.coverage_scale(np.ones(s1.n_rows + 1, dtype=np.float32))
    with pytest.raises(ValueError, match="dose has shape"):
        s1.dose_grid(np.float32(1.0))


def test_case_seed_needs_an_integer_index():
    assert case_seed("test", np.int64(1)) == case_seed("test", 1)
    for index in (1.0, True, 1.5):
        with pytest.raises(ValueError, match="must be an integer"):
            case_seed("test", index)


def test_dose_input_checks(s1):
    with pytest.raises(ValueError, match=r"fluence has shape \(3,\)"):
        s1.dose(np.ones(3))
    with pytest.raises(ValueError, match="finite and >= 0"):
        s1.dose(-np.ones(s1.n_beamlets))
    with pytest.raises(ValueError, match="dose has shape"):
        s1.structure_doses(np.ones(4))
