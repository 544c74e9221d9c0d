"""Tests for rtenv.evaluation: metrics, protocol loading/validation and scoring."""

import json
import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from rtenv.evaluation import (
    Protocol,
    available_protocols,
    criterion_score,
    cumulative_dvh,
    dola_reward,
    dose_at_volume_cc,
    dose_at_volume_percent,
    max_dose,
    mean_dose,
    score_plan,
    volume_at_dose_percent,
)

ONE_TO_TEN = np.arange(1.0, 11.0)
RX9 = 79.2  # prostate9 prescription, Gy


def voxels(n_hot: int, hot: float, n_total: int = 100, cold: float = 10.0) -> np.ndarray:
    """``n_total`` voxels, ``n_hot`` of them at ``hot`` Gy and the rest at ``cold`` Gy."""
    return np.array([hot] * n_hot + [cold] * (n_total - n_hot))


# ----------------------------------------------------------------------------- metrics


def test_dose_at_volume_percent():
    assert dose_at_volume_percent(ONE_TO_TEN, 20) == 9.0
    assert dose_at_volume_percent(ONE_TO_TEN, 0) == 10.0
    assert dose_at_volume_percent(ONE_TO_TEN, 100) == 1.0
    assert dose_at_volume_percent(ONE_TO_TEN, 25) == 8.0  # ceil(2.5) = 3 hottest voxels
    assert dose_at_volume_percent(np.arange(100.0), 7) == 93.0  # 7 % of 100 is exactly 7 voxels


def test_dose_at_volume_cc():
    # a 0 cc request is the hottest voxel, not the coldest; 2.1 / 0.3 = 7.000000000000001 is 7 voxels
    assert dose_at_volume_cc(ONE_TO_TEN, 0.0, 0.1) == 10.0
    assert dose_at_volume_cc(np.arange(1.0, 21.0), 2.1, 0.3) == 14.0
    assert dose_at_volume_cc(ONE_TO_TEN, 0.03, 0.125) == 10.0
    assert dose_at_volume_cc(ONE_TO_TEN, 0.3, 0.1) == 8.0
    assert dose_at_volume_cc(ONE_TO_TEN, 1.1, 0.1) == 1.0  # more than the structure: minimum
    assert max_dose(ONE_TO_TEN, "cc", voxel_cc=0.125) == 10.0


def test_volume_mean_and_max():
    assert volume_at_dose_percent(ONE_TO_TEN, 5) == 60.0
    assert volume_at_dose_percent(ONE_TO_TEN, 5.5) == 50.0
    assert volume_at_dose_percent(ONE_TO_TEN, 11) == 0.0
    assert mean_dose(ONE_TO_TEN) == 5.5
    assert max_dose(ONE_TO_TEN, "hottest_voxels") == 9.0  # mean of 10, 9, 8
    assert max_dose(ONE_TO_TEN) == 10.0  # the hottest voxel, as PortPy's max_dose
    assert max_dose(ONE_TO_TEN, "hottest_voxels", n_voxels=2) == 9.5
    assert max_dose(np.array([4.0, 2.0]), "hottest_voxels", n_voxels=3) == 3.0  # fewer voxels than n


def test_cumulative_dvh():
    dvh = cumulative_dvh(ONE_TO_TEN, [0, 1, 5.5, 10, 11])
    np.testing.assert_allclose(dvh, [1.0, 1.0, 0.5, 0.1, 0.0])
    rng = np.random.default_rng(0)
    curve = cumulative_dvh(rng.gamma(4.0, 10.0, 500), np.linspace(0, 150, 301))
    assert np.all(np.diff(curve) <= 0) and curve[0] == 1.0 and curve[-1] == 0.0


@pytest.mark.parametrize(
    "call, match",
    [
        (lambda: dose_at_volume_percent(ONE_TO_TEN, 120), r"120.*\[0, 100\]"),
        (lambda: dose_at_volume_percent(ONE_TO_TEN, -1), r"-1.*\[0, 100\]"),
        (lambda: dose_at_volume_cc(ONE_TO_TEN, 1.0, 0.0), "voxel_cc"),
        (lambda: max_dose(ONE_TO_TEN, "peak"), "peak.*hottest_voxels"),
        (lambda: max_dose(ONE_TO_TEN, "cc"), "voxel_cc"),
        (lambda: max_dose(ONE_TO_TEN, "hottest_voxels", n_voxels=0), "n_voxels"),
        (lambda: mean_dose(np.array([])), "empty"),
        (lambda: mean_dose(np.array([1.0, np.nan])), "NaN"),
        (lambda: mean_dose(np.array([1.0, np.inf])), "inf"),
        (lambda: mean_dose(np.ones((2, 2))), "1-D"),
        (lambda: volume_at_dose_percent(ONE_TO_TEN, float("nan")), "dose_gy"),
        (lambda: cumulative_dvh(ONE_TO_TEN, [1.0, np.nan]), "dose_points"),
    ],
)
def test_metric_errors(call, match):
    with pytest.raises(ValueError, match=match):
        call()


# ----------------------------------------------------------------------------- prostate9


def prostate_doses(ptv_hot_gy: float = RX9, bladder_v80: int = 0) -> dict[str, np.ndarray]:
    """PTV at Rx with 3 voxels at ``ptv_hot_gy``; ``bladder_v80`` of 100 bladder voxels at 80 Gy."""
    return {
        "PTV": np.concatenate([np.full(3, ptv_hot_gy), np.full(50, RX9)]),
        "Bladder": voxels(bladder_v80, 80.0),
        "Rectum": voxels(0, 80.0),
        "Body": np.zeros(5),  # structures the protocol does not use are ignored
    }


def test_prostate9_full_score():
    result = Protocol.load("prostate9").evaluate(prostate_doses(), voxel_cc=0.027)
    assert result.total == 9.0 and result.max_score == 9.0
    assert result.full_score and result.violated == []
    assert [c.met for c in result.criteria] == [True] * 9


def test_prostate9_linear_ramps():
    result = Protocol.load("prostate9").evaluate(prostate_doses(1.085 * RX9, bladder_v80=17), 0.027)
    by_name = {c.name: c for c in result.criteria}
    ptv, v80 = by_name["PTV hot spot"], by_name["Bladder V80Gy"]
    assert ptv.value == pytest.approx(85.932) and ptv.unit == "Gy"
    assert (ptv.goal, ptv.limit) == pytest.approx((84.744, 87.12))
    assert ptv.score == pytest.approx(0.5)
    assert v80.value == 17.0 and v80.unit == "%" and v80.score == pytest.approx(0.6)
    assert by_name["Bladder V75Gy"].score == 1.0  # 17 % <= 25 %
    assert result.total == pytest.approx(8.1)
    assert not result.full_score
    assert [c.name for c in result.violated] == ["PTV hot spot", "Bladder V80Gy"]
    assert ptv.margin == pytest.approx(1.188) and v80.margin == pytest.approx(2.0)
    assert all(c.margin <= 0 for c in result.criteria if c.met)


def test_prostate9_binary_and_relative_modes():
    protocol = Protocol.load("prostate9")
    doses = prostate_doses(1.085 * RX9, bladder_v80=17)
    binary = protocol.evaluate(doses, 0.027, mode="binary")
    assert [c.score for c in binary.criteria] == [0.0, 0.0] + [1.0] * 7
    assert binary.total == 7.0
    relative = protocol.evaluate(doses, 0.027, mode="relative")
    assert relative.criteria[0].score == pytest.approx(1 - 1.188 / 84.744)
    assert relative.criteria[1].score == pytest.approx(1 - 2 / 15)
    assert relative.mode == "relative" and protocol.score_mode == "linear"


def test_prescription_override_and_per_structure_voxels():
    protocol = Protocol.load("prostate9")
    result = protocol.evaluate(prostate_doses(), {"PTV": 0.027, "Bladder": 0.1, "Rectum": 0.1},
                               prescription_gy=70.0)
    ptv = result.criteria[0]
    assert ptv.goal == pytest.approx(74.9) and ptv.limit == pytest.approx(77.0)
    assert ptv.score == 0.0 and result.prescription_gy == 70.0  # 79.2 Gy > 77 Gy limit


def test_result_table_and_dict():
    result = Protocol.load("prostate9").evaluate(prostate_doses(1.085 * RX9, bladder_v80=17), 0.027)
    lines = result.table().splitlines()
    assert lines[0].split() == ["criterion", "value", "goal", "limit", "score", "met"]
    assert len(lines) == 2 + 9 + 1 and len({len(line) for line in lines[:2]}) == 1
    assert "Bladder V80Gy" in lines[3] and "17.00 %" in lines[3] and "0.60/1" in lines[3]
    assert lines[-1].startswith("total") and "8.10/9" in lines[-1]
    summary = json.loads(json.dumps(result.to_dict()))
    assert summary["total"] == pytest.approx(8.1) and summary["max_score"] == 9.0
    assert summary["criteria"][1]["name"] == "Bladder V80Gy" and summary["criteria"][1]["met"] is False


# ----------------------------------------------------------------------------- profit60 / DOLA


def profit_doses(ptv_covered: int = 100, bladder_v60: int = 0) -> dict[str, np.ndarray]:
    return {"PTV": voxels(ptv_covered, 60.0, cold=50.0),
            "Bladder": voxels(bladder_v60, 61.0, cold=0.0),
            "Rectum": np.zeros(100)}


def test_profit60_relative_score_and_dola_reward_ptv_missed():
    protocol = Protocol.load("profit60")
    assert protocol.score_mode == "relative" and protocol.prescription_gy == 60.0
    result = protocol.evaluate(profit_doses(ptv_covered=90), voxel_cc=0.05)
    ptv = result.criteria[0]
    assert ptv.value == 90.0 and ptv.sense == "lower" and ptv.primary
    assert ptv.score == pytest.approx(100 * 90 / 95) and not ptv.met
    assert ptv.margin == pytest.approx(5.0)
    assert result.total == pytest.approx(100 * 90 / 95 + 60)
    assert dola_reward(result) == -50 + 6


def test_dola_reward_ptv_met_with_one_oar_violation():
    result = Protocol.load("profit60").evaluate(profit_doses(bladder_v60=4), voxel_cc=0.05)
    bladder_v60 = result.criteria[1]
    assert bladder_v60.name == "Bladder V60Gy" and bladder_v60.value == 4.0
    assert bladder_v60.score == pytest.approx(10 * (1 - 1 / 3))
    assert result.criteria[2].met  # V56.8Gy = 4 % <= 5 %
    assert dola_reward(result) == 50 + 5
    assert dola_reward(Protocol.load("profit60").evaluate(profit_doses(), 0.05)) == 56


def test_dola_reward_needs_one_primary():
    result = Protocol.load("prostate9").evaluate(prostate_doses(), 0.027)
    with pytest.raises(ValueError, match="exactly one primary"):
        dola_reward(result)


# ----------------------------------------------------------------------------- loading


def test_shipped_protocols():
    assert available_protocols() == ["liver4", "profit60", "prostate15", "prostate9", "tg119"]
    expected = {"prostate9": (79.2, 44, 9.0), "prostate15": (79.2, 44, 15.0),
                "liver4": (50.0, 25, 4.0), "profit60": (60.0, 20, 160.0)}
    for name, (rx, fractions, max_score) in expected.items():
        protocol = Protocol.load(name)
        assert protocol.name == name
        assert (protocol.prescription_gy, protocol.fractions, protocol.max_score) == (rx, fractions, max_score)
        assert Protocol.from_dict(protocol.to_dict()) == protocol
    p15 = Protocol.load("prostate15")
    assert p15.structures == ["PTV", "Bladder", "Rectum", "FemoralHead_L", "FemoralHead_R"]
    assert all("Reconstructed" in c.note for c in p15.criteria if c.structure.startswith("FemoralHead"))
    liver = Protocol.load("liver4")
    assert [c.name for c in liver.criteria][1:] == ["Liver Dmean", "Liver V30Gy", "Heart V30Gy"]
    assert liver.criteria[0].thresholds(liver.prescription_gy) == pytest.approx((55.0, 57.5))


def test_liver4_mean_dose_ramp():
    doses = {"PTV": np.full(10, 50.0), "Liver": np.full(10, 30.0), "Heart": np.zeros(10)}
    result = Protocol.load("liver4").evaluate(doses, 0.1)
    assert [c.score for c in result.criteria] == pytest.approx([1.0, 0.5, 0.0, 1.0])  # V30 = 100 %


def test_load_from_path(tmp_path):
    path = tmp_path / "mine.json"
    path.write_text(json.dumps({k: v for k, v in Protocol.load("liver4").to_dict().items() if k != "name"}))
    assert Protocol.load(path).name == "mine" and Protocol.load(str(path)).max_score == 4.0
    # a repeated key is refused (JSON keeps the last one: "dose_gy": 80, "dose_gy": 8 scored V8Gy)
    text = path.read_text().replace('"dose_gy": 30', '"dose_gy": 30, "dose_gy": 3', 1)
    assert text != path.read_text()
    path.write_text(text)
    with pytest.raises(ValueError, match="not valid JSON \\(repeated key 'dose_gy'\\)"):
        Protocol.load(path)
    with pytest.raises(ValueError, match="unknown protocol 'nope'.*prostate9"):
        Protocol.load("nope")


def test_protocol_round_trip_keeps_the_prescription():
    # the dose per fraction was written rounded to 9 decimals: 8 Gy in 3 fx came back 8.000000001 Gy
    base = Protocol.load("liver4").to_dict()
    for rx, fx in ((8.0, 3), (7.0, 3), (13.0, 7), (79.2, 44), (50.0, 25), (60.0, 20), (5.0, 6)):
        p = Protocol.from_dict({**base, "pres_per_fraction_gy": rx / fx, "num_of_fractions": fx})
        assert p.prescription_gy == rx and Protocol.from_dict(p.to_dict()) == p


def test_score_plan_reads_an_edited_protocol_file_again(tmp_path):
    from rtenv.scenarios import load_case

    case = load_case("S1", "test", 0)
    dose = case.dose(np.ones(case.n_beamlets))
    path = tmp_path / "mine.json"
    data = Protocol.load("prostate9").to_dict()
    path.write_text(json.dumps(data))
    assert score_plan(case, dose, protocol=str(path)).max_score == 9
    data["criteria"] = data["criteria"][:3]
    path.write_text(json.dumps(data))
    assert score_plan(case, dose, protocol=str(path)).max_score == 3
    path.write_text("{not json")
    with pytest.raises(ValueError, match=f"protocol {path}: not valid JSON"):
        Protocol.load(path)


def test_portpy_earlier_layout_and_split_goal_and_limit():
    # PortPy's earlier files name the type in "name"; some give a structure's limit and goal as two
    # criteria, whose generated names repeat
    protocol = Protocol.from_dict({
        "pres_per_fraction_gy": 2, "num_of_fractions": 30,
        "criteria": [
            {"name": "max_dose", "parameters": {"structure_name": "CORD"}, "constraints": {"limit_dose_gy": 50}},
            {"name": "max_dose", "parameters": {"structure_name": "CORD"}, "constraints": {"goal_dose_gy": 48}},
            {"type": "mean_dose", "parameters": {"structure_name": "HEART", "weight": 10},
             "constraints": {"limit_dose_gy": 27, "goal_dose_gy": 20}},
        ],
    })
    assert [(c.name, c.type, c.goal, c.limit) for c in protocol.criteria] == [
        ("CORD Dmax", "max_dose", 50, 50), ("CORD Dmax #2", "max_dose", 48, 48), ("HEART Dmean", "mean_dose", 20, 27)]
    # a given name is kept, in either order, and generated ones take the next free number
    given = {"type": "max_dose", "name": "CORD Dmax", "parameters": {"structure_name": "CORD"},
             "constraints": {"limit_dose_gy": 50}}
    given2 = {**given, "name": "CORD Dmax #2"}
    plain = {k: v for k, v in given.items() if k != "name"}
    for order in ([plain, given, plain, given2], [given, given2, plain, plain]):
        names = [c.name for c in Protocol.from_dict({"pres_per_fraction_gy": 2, "num_of_fractions": 30,
                                                     "criteria": order}).criteria]
        assert sorted(names) == ["CORD Dmax", "CORD Dmax #2", "CORD Dmax #3", "CORD Dmax #4"]
    # PortPy may give the sense inside the constraints
    (c,) = Protocol.from_dict({"pres_per_fraction_gy": 2, "num_of_fractions": 30, "criteria": [
        {"type": "dose_volume_V", "parameters": {"structure_name": "R", "dose_gy": 5},
         "constraints": {"limit_volume_perc": 84, "constraint_type": "lower"}}]}).criteria
    assert c.sense == "lower"
    result = protocol.evaluate({"CORD": np.full(10, 49.0), "HEART": np.full(10, 10.0)}, 0.1)
    assert [c.met for c in result.criteria] == [True, False, True]
    assert Protocol.from_dict(protocol.to_dict()) == protocol


def test_a_goal_reached_exactly_is_met():
    doses = {"PTV": np.full(53, 79.2), "Bladder": np.array([80.0] * 15 + [10.0] * 85),  # V80Gy = 15 % = its goal
             "Rectum": np.full(100, 10.0)}
    result = Protocol.load("prostate9").evaluate(doses, 0.027)
    v80 = next(c for c in result.criteria if c.name == "Bladder V80Gy")
    assert v80.value == v80.goal == 15.0 and v80.met and v80.margin == 0 and v80.score == 1.0
    assert result.full_score


def test_v_criteria_in_cc():
    # PortPy files give some V goals as absolute volumes (goal_volume_cc / limit_volume_cc)
    protocol = Protocol.from_dict({"pres_per_fraction_gy": 2, "num_of_fractions": 30, "criteria": [
        {"type": "dose_volume_V", "parameters": {"structure_name": "ESOPHAGUS", "dose_gy": 18},
         "constraints": {"goal_volume_cc": 2.5, "limit_volume_cc": 5}}]})
    (c,) = protocol.criteria
    assert (c.unit, c.goal, c.limit) == ("cc", 2.5, 5.0)
    dose = np.array([30.0, 20.0, 18.0, 17.9] + [5.0] * 96)  # 3 voxels at >= 18 Gy
    r = protocol.evaluate({"ESOPHAGUS": dose}, 0.5).criteria[0]
    assert (r.value, r.unit, r.met) == (1.5, "cc", True)
    r = protocol.evaluate({"ESOPHAGUS": dose}, 1.5).criteria[0]  # 4.5 cc: between goal and limit
    assert r.value == 4.5 and r.score == pytest.approx((5 - 4.5) / 2.5) and not r.met
    assert Protocol.from_dict(protocol.to_dict()) == protocol
    r = protocol.evaluate({"ESOPHAGUS": np.array([20.0] * 5 + [5.0] * 95)}, 0.5).criteria[0]
    assert r.value == 2.5 and r.met  # 5 x 0.5 cc exactly at the goal (3 x 0.1 was a hair above 0.3)
    assert protocol.evaluate({"ESOPHAGUS": np.array([20.0] * 3 + [5.0] * 7)}, 0.1).criteria[0].value == 0.3
    with pytest.raises(ValueError, match=r"mix units"):
        Protocol.from_dict({**protocol.to_dict(), "criteria": [{**protocol.to_dict()["criteria"][0], "constraints": {
            "goal_volume_cc": 2.5, "limit_volume_perc": 5}}]})
    # a limit-only criterion's bad value is reported under the key it was given as
    with pytest.raises(ValueError, match=r"limit_volume_cc = -1 is invalid"):
        Protocol.from_dict({**protocol.to_dict(), "criteria": [{**protocol.to_dict()["criteria"][0], "constraints": {
            "limit_volume_cc": -1}}]})


def test_criterion_score_rejects_what_a_protocol_rejects():
    for kwargs, match in (({"value": float("nan")}, "not finite"), ({"points": 0.0}, "points = 0.0"),
                          ({"goal": 10.0, "limit": 5.0}, "wrong side of goal 10")):
        with pytest.raises(ValueError, match=match):
            criterion_score(**{"value": 12.0, "goal": 5.0, "limit": 10.0, **kwargs})
    assert criterion_score(12.0, 10.0, 5.0, sense="lower") == 1.0
    for kwargs, match in (({"goal": float("nan"), "limit": float("nan")}, "goal nan and limit nan must be finite"),
                          ({"limit": float("inf")}, "limit inf must be finite"),
                          ({"points": float("inf")}, "points = inf must be a finite number > 0")):
        with pytest.raises(ValueError, match=match):
            criterion_score(**{"value": 12.0, "goal": 5.0, "limit": 10.0, **kwargs})
    # a goal missed by one ulp on a wide ramp: (l - v) / (l - g) rounds to 1.0, the score must not
    hair = math.nextafter(1.0, 2.0)
    assert (10.0 - hair) / (10.0 - 1.0) == 1.0 and criterion_score(hair, 1.0, 10.0) < 1.0


def test_portpy_style_dict_with_unknown_keys():
    protocol = Protocol.from_dict({
        "protocol_name": "Lung_2Gy_30Fx", "disease_site": "Lung", "num_of_fractions": 30,
        "pres_per_fraction_gy": 2, "some_portpy_field": {"x": 1},
        "criteria": [
            {"type": "max_dose", "parameters": {"structure_name": "CORD", "structure_def": "CORD"},
             "constraints": {"limit_dose_gy": 50}, "display_name": "cord"},
            {"type": "dose_volume_V", "parameters": {"structure_name": "LUNGS_NOT_GTV", "dose_gy": 20},
             "constraints": {"limit_volume_perc": 37, "goal_volume_perc": 30}},
            {"type": "dose_volume_D", "parameters": {"structure_name": "PTV", "volume_perc": 95},
             "constraints": {"goal_dose_perc": 100, "limit_dose_perc": 90}, "sense": "lower"},
        ],
    })
    assert protocol.name == "Lung_2Gy_30Fx" and protocol.prescription_gy == 60.0
    assert Protocol.from_dict({**base_protocol(), "num_of_fractions": np.int64(30)}).fractions == 30
    cord, lungs, ptv = protocol.criteria
    assert (cord.name, cord.goal, cord.limit) == ("CORD Dmax", 50, 50)
    assert cord.parameters == {"method": "max"}  # PortPy's max_dose: the hottest voxel
    assert (lungs.name, lungs.goal, lungs.limit) == ("LUNGS_NOT_GTV V20Gy", 30, 37)
    assert ptv.name == "PTV D95%" and ptv.thresholds(60.0) == pytest.approx((60.0, 54.0))
    ptv_dose = np.linspace(55.0, 62.0, 100)
    d95 = np.sort(ptv_dose)[::-1][94]  # 95 hottest of 100 voxels
    doses = {"CORD": np.full(20, 52.0), "LUNGS_NOT_GTV": voxels(30, 25.0), "PTV": ptv_dose}
    result = protocol.evaluate(doses, 0.1)
    assert [c.score for c in result.criteria] == pytest.approx([0.0, 1.0, (d95 - 54.0) / 6.0])
    assert result.criteria[2].margin == pytest.approx(60.0 - d95)


def base_protocol(**criterion):
    raw = {"type": "dose_volume_V", "parameters": {"structure_name": "Bladder", "dose_gy": 80},
           "constraints": {"goal_volume_perc": 15, "limit_volume_perc": 20}}
    raw.update(criterion)
    return {"pres_per_fraction_gy": 2.0, "num_of_fractions": 30, "criteria": [raw]}


@pytest.mark.parametrize(
    "data, match",
    [
        (base_protocol(type="conformity_index"), r"criteria\[0\].*'conformity_index'.*dose_volume_D"),
        (base_protocol(constraints={"goal_volume_perc": 20, "limit_volume_perc": 15}),
         r"criteria\[0\].*limit_volume_perc \(15\) < goal_volume_perc \(20\)"),
        (base_protocol(sense="lower", name="cov"), r"criteria\[0\] \('cov'\).*sense 'lower' needs limit <= goal"),
        (base_protocol(constraints={"goal_volume_perc": -5}), r"goal_volume_perc = -5"),
        (base_protocol(constraints={"goal_volume_perc": 150}), r"goal_volume_perc = 150.*\[0, 100\]"),
        (base_protocol(constraints={"goal_dose_gy": 5}), r"goal_volume_perc, limit_volume_perc"),
        (base_protocol(constraints={}), "no goal or limit"),
        (base_protocol(type="mean_dose", parameters={"structure_name": "Bladder"},
                       constraints={"goal_dose_gy": 5, "limit_dose_perc": 9}), "mix units"),
        (base_protocol(type="mean_dose", constraints={"goal_dose_gy": 5}),
         r"parameters \['dose_gy'\] do not apply to this mean_dose criterion"),
        (base_protocol(constraints={"goal_volume_perc": 15, "limit_dose_gy": 20}),  # was dropped: limit = goal
         r"constraints \['limit_dose_gy'\] do not apply to a dose_volume_V criterion"),
        (base_protocol(parameters={"structure_name": "Bladder", "dose_gy": -80}), r"dose_gy = -80"),
        (base_protocol(parameters={"structure_name": "Bladder"}), "dose_gy / dose_perc"),
        (base_protocol(parameters={"dose_gy": 80}), "structure_name"),
        (base_protocol(sense="sideways"), "sideways.*upper, lower"),
        (base_protocol(points=0), r"points = 0"),
        (base_protocol(primary="yes"), "primary"),
        ({"num_of_fractions": 30, "criteria": []}, "pres_per_fraction_gy"),
        ({**base_protocol(), "num_of_fractions": 2.5}, r"num_of_fractions = 2.5 must be an integer in \[1, inf\]"),
        (base_protocol(type="max_dose",
                       parameters={"structure_name": "B", "method": "hottest_voxels", "n_voxels": True},
                       constraints={"goal_dose_gy": 5}), r"criteria\[0\]: n_voxels = True must be an integer"),
        ({**base_protocol(), "criteria": [{**base_protocol()["criteria"][0], "name": "bladder"}] * 2},
         r"criterion names \['bladder'\] appear more than once"),
        ({**base_protocol(), "score_mode": "fancy"}, "fancy.*linear, binary, relative"),
        ({**base_protocol(), "criteria": []}, "non-empty"),
        # settings that were silently dropped: a misspelt key, a parameter of another method, a
        # total dose typed as the per-fraction one
        (base_protocol(sence="lower"), r"criteria\[0\]: unknown field 'sence'; did you mean 'sense'\?"),
        (base_protocol(type="dose_volume_D", parameters={"structure_name": "B", "volume_pec": 5},
                       constraints={"goal_dose_gy": 5}), r"'volume_pec'; did you mean 'volume_perc'\?"),  # the closest
        (base_protocol(sense="upper", constraints={"goal_volume_perc": 15, "constraint_type": "lower"}),
         r"sense 'upper' contradicts constraints.constraint_type 'lower'"),
        (base_protocol(type="max_dose", parameters={"structure_name": "B", "methd": "cc"},
                       constraints={"goal_dose_gy": 5}), r"unknown parameter 'methd'; did you mean 'method'\?"),
        (base_protocol(type="max_dose", parameters={"structure_name": "B", "n_voxels": 5},
                       constraints={"goal_dose_gy": 5}), r"parameters \['n_voxels'\] do not apply to this max_dose "
                                                         r"method 'max'"),
        ({**base_protocol(), "score_mod": "binary"}, r"protocol: unknown field 'score_mod'; did you mean 'score_mode'"),
        ({**base_protocol(), "pres_per_fraction_gy": 60}, r"pres_per_fraction_gy = 60 .* \(0, 40\] \(the dose per "
                                                          r"fraction"),
    ],
)
def test_bad_protocols(data, match):
    with pytest.raises(ValueError, match=match):
        Protocol.from_dict(data)


# ----------------------------------------------------------------------------- bad plan inputs


@pytest.mark.parametrize(
    "change, kwargs, match",
    [
        (lambda d: d.pop("Rectum"), {}, r"'Rectum'.*available: 'PTV', 'Bladder', 'Body'"),
        (lambda d: d.__setitem__("Bladder", np.array([1.0, np.nan])), {}, "'Bladder' contains NaN"),
        (lambda d: d.__setitem__("Rectum", np.ones((10, 10))), {}, "'Rectum' must be a 1-D"),
        (lambda d: d.__setitem__("PTV", np.array([])), {}, "'PTV' is empty"),
        (lambda d: None, {"mode": "fancy"}, "'fancy'.*linear, binary, relative"),
        (lambda d: None, {"prescription_gy": -1.0}, "prescription_gy"),
        (lambda d: None, {"voxel_cc": {"PTV": 0.1}}, "voxel_cc.*'Bladder'"),
    ],
)
def test_bad_evaluate_inputs(change, kwargs, match):
    doses = prostate_doses()
    change(doses)
    kwargs = {"voxel_cc": 0.027, **kwargs}
    with pytest.raises(ValueError, match=match):
        Protocol.load("prostate9").evaluate(doses, **kwargs)


# ----------------------------------------------------------------------------- properties

finite = st.floats(0.0, 1e4, allow_nan=False)


@settings(max_examples=200, deadline=None)
@given(goal=finite, width=finite, points=st.floats(0.1, 100.0), v1=finite, v2=finite)
def test_linear_score_bounded_and_monotone(goal, width, points, v1, v2):
    limit = goal + width
    lo, hi = sorted((v1, v2))
    s_lo = criterion_score(lo, goal, limit, points, "upper", "linear")
    s_hi = criterion_score(hi, goal, limit, points, "upper", "linear")
    assert 0.0 <= s_hi <= s_lo <= points
    assert (criterion_score(lo, goal, limit, points, "upper", "binary") == points) == (lo <= goal)
    assert (s_lo == points) == (lo <= goal)  # full points exactly when the goal is met
