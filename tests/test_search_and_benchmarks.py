"""The CMA-ES search baseline, and the benchmark scripts run end to end on small settings."""

import json
import platform
import statistics
from pathlib import Path

import numpy as np
import pytest

from benchmarks import calibration, env_speed, tps_speed
from benchmarks.machine import cpu_model, speedup_spread
from rtenv.env import EpisodeState, TuningCore
from rtenv.search import cma_search
from rtenv.tpp import TPP


def test_cma_search_reaches_full_score_and_is_seeded():
    core = TuningCore("S1", action_mode="continuous", cohort="test", scoring_mode="binary")
    start = TPP.default(core.structures).values
    a = cma_search(core, ("test", 4), start, budget=200, seed=3)
    b = cma_search(core, ("test", 4), start, budget=200, seed=3)
    assert a.success and a.best_score == 9 and a.evaluations <= 200
    assert a.evaluations == b.evaluations and np.array_equal(a.best_tpp, b.best_tpp)
    ep = EpisodeState(("test", 4), a.best_tpp)
    core.solve([ep], warm=[False])
    assert ep.result.full_score


def test_cma_search_budget_is_respected_and_checked():
    core = TuningCore("S1", action_mode="continuous", cohort="test", scoring_mode="binary")
    start = TPP.default(core.structures).values
    np.random.seed(12345)
    state = np.random.get_state()
    r = cma_search(core, ("test", 4), start, budget=5, popsize=4, sigma0=1e-6)
    assert r.evaluations <= 5
    after = np.random.get_state()  # cma draws from numpy's global generator; the search restores it
    assert all(np.array_equal(a, b) for a, b in zip(state, after, strict=True))
    with pytest.raises(ValueError, match="budget"):
        cma_search(core, ("test", 4), start, budget=0)
    with pytest.raises(ValueError, match="seed = -1"):  # cma would seed 0 (-1 + 1) from the clock
        cma_search(core, ("test", 4), start, seed=-1)


@pytest.mark.slow
def test_calibration_writes_resumable_json(tmp_path, capsys):
    out = tmp_path / "cal.json"
    assert calibration.main(["--scenario", "S1", "--json", str(out), "--budget", "64"]) == 0
    res = json.loads(out.read_text())
    assert len(res["cases"]) == 10 and res["max_score"] == 9
    for key in ("initial_score_mean", "initial_score_sd", "search_success_rate", "search_evaluations_mean"):
        assert key in res
    # a rerun resumes: nothing is recomputed, the figures stay
    res["cases"][0]["seconds"] = -1.0
    out.write_text(json.dumps(res))
    calibration.main(["--scenario", "S1", "--json", str(out), "--budget", "64"])
    res = json.loads(out.read_text())
    assert res["cases"][0]["seconds"] == -1.0
    assert "initial score" in capsys.readouterr().out
    # S1 test case 5 starts at full score: found without a search
    assert res["cases"][5]["initial_score"] == 9 and res["cases"][5]["search_evaluations"] == 0
    assert res["cases"][5]["search_success"] and res["cases"][5]["search_best_score"] == 9
    # a JSON made with other settings is not resumed into
    with pytest.raises(SystemExit):
        calibration.main(["--scenario", "S1", "--json", str(out), "--budget", "64", "--popsize", "8"])
    assert "other settings (popsize: 16 there, 8 now): pass --fresh" in capsys.readouterr().err
    assert not list(tmp_path.glob("*.tmp"))


def test_benchmark_outputs_are_checked_before_the_timings(tmp_path, capsys):
    from benchmarks import all as all_benchmarks

    afile = tmp_path / "afile"
    afile.write_text("")
    for main, argv in ((tps_speed.main, ["--repeats", "1", "--batches", "2"]),
                       (env_speed.main, ["--envs", "2", "--steps", "1", "--rounds", "1"]),
                       (calibration.main, ["--budget", "16", "--popsize", "8"])):
        with pytest.raises(SystemExit):
            main([*argv, "--json", str(tmp_path)])
        assert f"--json {tmp_path} is a folder; expected a file path" in capsys.readouterr().err
    for main in (tps_speed.main, env_speed.main, calibration.main):
        with pytest.raises(SystemExit):
            main(["--json", ""])  # not the working folder
        assert "--json is empty; give a file path" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        all_benchmarks.main(["--quick", "--out", str(afile / "all")])
    assert f"--out {afile / 'all'} lies under {afile}, which is a file" in capsys.readouterr().err
    done = tmp_path / "full"  # a folder of a full-size run: a quick one is not mixed in
    done.mkdir()
    (done / "settings.json").write_text(json.dumps({"quick": False, "device": "cpu"}))
    with pytest.raises(SystemExit):
        all_benchmarks.main(["--quick", "--out", str(done)])
    assert "other settings (quick: False there, True now): pass --fresh" in capsys.readouterr().err
    assert sorted(p.name for p in done.iterdir()) == ["settings.json"]
    listing = tmp_path / "list.json"
    listing.write_text("[1]")
    with pytest.raises(SystemExit):
        calibration.main(["--json", str(listing)])
    assert f"{listing} holds no calibration run (a JSON object with a 'cases' list)" in capsys.readouterr().err
    assert listing.read_text() == "[1]" and sorted(p.name for p in tmp_path.iterdir()) == ["afile", "full", "list.json"]


def test_the_machine_is_named_by_its_cpu_model(tmp_path):
    info = tmp_path / "cpuinfo"
    arch = platform.machine() or "unknown CPU"
    for text, name in (
            ("processor\t: 0\nvendor_id\t: AuthenticAMD\nmodel name\t: AMD EPYC 7B13\n\n"
             "processor\t: 1\nmodel name\t: AMD EPYC 7B13\n", "AMD EPYC 7B13"),  # x86
            ("processor\t: 0\ncpu\t\t: POWER9, altivec supported\nclock\t\t: 2300.000000MHz\n",
             "POWER9, altivec supported"),
            ("processor\t: 0\nBogoMIPS\t: 243.75\nCPU implementer\t: 0x41\nCPU architecture: 8\n"
             "CPU part\t: 0xd0c\n", f"{arch} (CPU implementer 0x41, part 0xd0c)"),  # an ARM server
            ("processor\t: 0\nmodel name\t:\n", arch)):  # an empty name is no name
        info.write_text(text)
        assert cpu_model(info) == name
    assert cpu_model(tmp_path / "absent") == (platform.processor() or arch)  # not Linux
    assert speedup_spread([7.6, 6.2, 7.0]) == "; rounds 6.2-7.6x" and speedup_spread([7.0]) == ""


def test_tables_of_the_committed_speed_jsons_render():
    """Every committed tps_speed JSON, the earlier benchmark versions' included (the H100 ones lack
    stages added since), prints as a table with its device and the figures it has."""
    files = sorted(Path(__file__).parents[1].glob("benchmarks/results/tps_speed_*.json"))
    assert len(files) >= 7
    for path in files:
        res = json.loads(path.read_text())
        text = tps_speed.table(res)
        assert res["device_name"] in text.splitlines()[0] and f"{res['admm_ms']:9.2f} ms" in text
        assert ("precond_every=10" in text) == ("admm_precond_every_10_ms" in res)


@pytest.mark.slow
def test_speed_benchmarks_write_their_keys(tmp_path, capsys):
    out = tmp_path / "env.json"
    # 21 steps: every episode ends (truncation at 20) and its step solve is read from final_info
    args = ["--scenario", "S1", "--envs", "4", "--steps", "21", "--rounds", "2", "--json", str(out)]
    assert env_speed.main(args) == 0
    res = json.loads(out.read_text())
    assert res["single_steps_per_s"] > 0 and res["vector_steps_per_s"]["4"] > 0 and res["device"] == "cpu"
    tps = res["vector_tps"]["4"]  # the 4 plans of a step leave the batch as they converge
    assert 1.0 <= tps["working_set"] <= 4.0 and 1.0 <= tps["iterations_mean"] <= 40.0
    assert 0.0 <= tps["converged_fraction"] <= 1.0
    # the machine and each round's speedup are kept beside the median (the spread is printed)
    rounds = res["vector_speedup_rounds"]["4"]
    assert res["device_name"] == res["cpu_model"] == cpu_model() and len(rounds) == 2 and min(rounds) > 0
    assert res["vector_speedup"]["4"] == pytest.approx(statistics.median(rounds))
    assert f"rounds {min(rounds):.1f}-{max(rounds):.1f}x" in capsys.readouterr().out
    out = tmp_path / "tps.json"
    assert tps_speed.main(["--scenario", "S1", "--repeats", "1", "--batches", "4", "--json", str(out)]) == 0
    res = json.loads(out.read_text())
    for key in ("admm_ms", "admm_warm_ms", "batch_ms_per_plan", "reference_ms", "speedup_vs_reference",
                "objective_gap", "spmv_bound_ms", "device"):
        assert key in res
    assert res["spmv_cg_bound_ms"] == pytest.approx(3 * res["spmv_bound_ms"])  # 3 CG steps per outer iteration
    assert res["batch_rounds"] == 1 and res["batch_speedup_rounds"]["4"] == [res["batch_speedup"]["4"]]
    assert res["batch_speedup"]["4"] > 0 and res["device_name"] == res["cpu_model"] == cpu_model()
    assert res["objective_gap_reference"]["clarabel"] == 0.0 and res["admm_frozen_objective"] > 0
    # matched accuracy: the doubling stops at the first iteration count within 1 % (or at 5120)
    to1, at1 = res["admm_frozen_to_1pct"], res["speedup_vs_reference_at_1pct"]
    assert to1["iterations"] in [40 * 2 ** k for k in range(8)]
    assert (to1["objective_gap"] <= 0.01) == (at1 is not None) and (at1 is not None or to1["iterations"] == 5120)
    assert set(res["reference_status"]) == {"clarabel", "osqp", "lbfgsb"} and res["reference_converged"]["clarabel"]
    assert res["device"] == "cpu" and res["reference_device"] == "cpu"
    for s in at1 or {}:  # matched accuracy only against references that are accurate themselves
        assert res["reference_converged"][s] and res["objective_gap_reference"][s] <= 0.01
    # warm start from the plan one step away (t_PTV up) needs fewer iterations than cold for the defaults
    assert res["admm_default_warm_iterations"] < res["admm_default_iterations"]
    assert "TPS speed" in capsys.readouterr().out
