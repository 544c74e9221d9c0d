"""The rtenv command line, run in-process."""

import dataclasses
import json
import subprocess
import sys
from pathlib import Path

import pytest

from rtenv.case import PlanningCase
from rtenv.cli import _install_hint, main
from rtenv.scenarios import load_case


def test_cases_list(capsys):
    assert main(["cases", "list"]) == 0
    out = capsys.readouterr().out
    for token in ("S1", "S2", "S3", "prostate15", "knowledge", "1000-1019"):
        assert token in out


@pytest.mark.parametrize("scenario,n_structures,n_beams", [("S1", 3, 7), ("S2", 5, 180), ("S3", 3, 7)])
def test_cases_show(capsys, scenario, n_structures, n_beams):
    assert main(["cases", "show", scenario, "--case", "1", "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert len(info["structures"]) == n_structures and len(info["beams"]) == n_beams
    assert info["nnz"] > 0 and info["metadata"]["build_seconds"] > 0
    assert main(["cases", "show", scenario, "--case", "1"]) == 0
    assert "nnz" in capsys.readouterr().out


def test_dose_uniform_writes_figures(capsys, tmp_path):
    assert main(["dose", "S1", "--case", "0", "--uniform", "--out", str(tmp_path), "--mode", "binary"]) == 0
    out = capsys.readouterr().out
    assert "PTV hot spot" in out and "total" in out
    for name in ("dvh.png", "dose_slice.png"):
        assert (tmp_path / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    result = json.loads((tmp_path / "result.json").read_text())
    assert result["mode"] == "binary"
    assert all(c["score"] in (0, 1) for c in result["criteria"])


def test_bad_arguments_exit_with_usage(capsys):
    with pytest.raises(SystemExit):
        main(["cases", "show", "S9"])
    assert "invalid choice" in capsys.readouterr().err


def test_plan_writes_json_and_figures(capsys, tmp_path):
    tpp = tmp_path / "tpp.json"
    tpp.write_text(json.dumps({"structures": ["PTV", "Bladder", "Rectum"], "tpp": {
        "t_PTV": 1.05, "t_bladder": 0.8, "t_rectum": 0.8, "lambda_PTV": 2.0, "lambda_bladder": 1.0,
        "lambda_rectum": 1.0, "V_PTV": 0.2, "V_bladder": 0.7, "V_rectum": 0.7}}))
    out = tmp_path / "plan"
    assert main(["plan", "S1", "--case", "2", "--tpp", str(tpp), "--out", str(out)]) == 0
    text = capsys.readouterr().out
    assert "ADMM iterations" in text and "Rectum V75Gy" in text
    record = json.loads((out / "plan.json").read_text())
    assert record["tpp"]["t_PTV"] == 1.05 and len(record["fluence"]) > 100
    assert 0 <= record["score"]["total"] <= 9
    assert (out / "dvh.png").stat().st_size > 10_000 and (out / "dose_slice.png").stat().st_size > 10_000


def test_commands_take_a_saved_case(capsys, tmp_path):
    case = load_case("S1", "test", 3)
    path = str(dataclasses.replace(case, name="my-patient").save(tmp_path / "mine.rtcase"))
    assert main(["plan", "--case-file", path, "--out", str(tmp_path / "plan")]) == 0
    record = json.loads((tmp_path / "plan" / "plan.json").read_text())
    assert record["case"] == "my-patient" and record["case_file"] == str(Path(path).resolve())
    assert "my-patient: TPPs SPEC default" in capsys.readouterr().out
    report = tmp_path / "eval.json"
    assert main(["evaluate", "--policy", "acer:default", "--scenario", "S1", "--case-file", path, "--case-file", path,
                 "--max-steps", "2", "--json", str(report)]) == 0
    res = json.loads(report.read_text())
    assert res["cohort"] == "own" and [c["case"] for c in res["cases"]] == ["my-patient"] * 2
    kb_path = tmp_path / "kb.json"  # a site's knowledge from its own patients: no case name goes into it
    assert main(["knowledge", "export", "--policy", "search", "--max-steps", "2", "--case-file", path,
                 "--out", str(kb_path)]) == 0
    assert json.loads(kb_path.read_text())["source"]["cohort"] == "own" and "my-patient" not in kb_path.read_text()
    assert main(["explain", "--policy", "acer:default", "--scenario", "S1", "--case-file", path, "--ig-steps", "16",
                 "--max-steps", "2", "--baselines", "zero", "--out", str(tmp_path / "xp")]) == 0
    explained = json.loads((tmp_path / "xp" / "attributions.json").read_text())
    assert (explained["cohort"], explained["case"], explained["case_name"]) == ("own", 0, "my-patient")
    out = ["--out", str(tmp_path / "x")]
    for args, message in ((["plan", "S2", "--case-file", path, *out], "scenario S2 works on ('PTV', 'Bladder', "),
                          (["plan", *out], "name a scenario (S1, S2, S3, TG119) or a saved case (--case-file FILE)"),
                          (["llm", "plan", "--no-guidance", *out], "name a scenario (S1, S2, S3, TG119) or a saved"),
                          (["plan", "--case-file", path, "--case", "2", *out], "--case-file replaces --case: give one"),
                          (["evaluate", "--policy", "acer:default", "--case-file", path, "--cases", "2"],
                           "--case-file replaces --cases: give one or the other"),
                          (["knowledge", "export", "--policy", "search", "--case-file", path, "--cohort", "test", *out],
                           "--case-file replaces --cohort"),
                          (["train", "acer", "--case-file", path, "--train-cases", "3", "--timesteps", "8", *out],
                           "--case-file replaces --train-cases"),
                          (["evaluate", "--policy", "acer:default", "--scenario", "S3", "--case-file", path],
                           "scenario S3 works on ('PTV', 'Liver', 'Heart')")):
        assert main(args) == 2, args
        assert message in capsys.readouterr().err
    assert not (tmp_path / "x").exists()


def test_training_on_saved_cases(tmp_path):
    from drl.train import make_train_env, train_acer

    paths = [str(dataclasses.replace(load_case("S1", "test", i), name=f"pt{i}").save(tmp_path / f"pt{i}.rtcase"))
             for i in (1, 2)]
    out = tmp_path / "run"
    assert main(["train", "acer", "--case-file", paths[0], "--case-file", paths[1], "--timesteps", "40",
                 "--num-envs", "2", "--checkpoint-every", "40", "--out", str(out)]) == 0
    config = json.loads((out / "train_config.json").read_text())
    assert config["train_cohort"] == "own" and config["train_cases"] == ["pt1", "pt2"]
    assert (out / "model.zip").is_file()
    # resuming on another patient under the same name is noticed by the cases' content
    other = dataclasses.replace(load_case("S1", "test", 5), name="pt1")
    with pytest.warns(RuntimeWarning, match=r"another set-up \(train_case_sha256: \[.+\] there, \[.+\] now\)"):
        train_acer("S1", out, 60, train_cases=[other, PlanningCase.load(paths[1])], num_envs=2, checkpoint_every=40,
                   progress=False)
    # a finished run asked again with another set-up has nothing to train: refused, not relabelled
    before = (out / "train_config.json").read_text()
    assert main(["train", "acer", "--case-file", paths[0], "--case-file", paths[1], "--timesteps", "60",
                 "--num-envs", "2", "--out", str(out)]) == 2
    assert (out / "train_config.json").read_text() == before
    # the envs it trains on are those cases' (mixed starts: two vector envs)
    venv = make_train_env("S1", 4, train_cases=[PlanningCase.load(p) for p in paths])
    venv.seed(0)
    venv.reset()
    assert {info["case"] for info in venv.reset_infos} == {"pt1", "pt2"}
    # indices as SB3 takes them, across the two parts: in the order given, negative from the end
    names = [c.name for c in venv.get_attr("case")]
    assert [c.name for c in venv.get_attr("case", indices=[3, 0, 2])] == [names[3], names[0], names[2]]
    assert venv.get_attr("case", indices=-1)[0].name == names[3]
    assert venv.env_method("action_masks", indices=[-4])[0].shape == (venv.action_space.n,)
    with pytest.raises(IndexError, match=r"env indices \[4\] are outside \[-4, 3\]"):
        venv.get_attr("case", indices=[0, 4])


def test_plan_takes_solver_settings(capsys, tmp_path):
    out = tmp_path / "plan"
    assert main(["plan", "S1", "--max-iter", "3", "--tol", "1e-6", "--precond-every", "2", "--out", str(out)]) == 0
    assert "3 ADMM iterations, NOT converged (max_iter 3)" in capsys.readouterr().out
    record = json.loads((out / "plan.json").read_text())
    assert record["iterations"] == 3 and not record["converged"]
    assert record["settings"]["max_iter"] == 3 and record["settings"]["precond_every"] == 2
    assert main(["plan", "S1", "--cg-steps", "0", "--out", str(tmp_path / "bad")]) == 2
    assert "rtenv: error: cg_steps = 0 must be an integer in [1, 1000]" in capsys.readouterr().err
    assert not (tmp_path / "bad").exists()


def test_plan_rejects_bad_tpp_file(capsys, tmp_path):
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"structures": ["PTV", "Bladder", "Rectum"], "tpp": {
        "t_PTV": 1.5, "t_bladder": 0.8, "t_rectum": 0.8, "lambda_PTV": 2.0, "lambda_bladder": 1.0,
        "lambda_rectum": 1.0, "V_PTV": 0.2, "V_bladder": 0.7, "V_rectum": 0.7}}))
    assert main(["plan", "S1", "--tpp", str(bad), "--out", str(tmp_path / "o")]) == 2
    assert f"rtenv: error: {bad}: TPP t_PTV = 1.5 is outside its valid range [1, 1.2]" in capsys.readouterr().err
    assert main(["plan", "S1", "--tpp", str(tmp_path / "missing.json"), "--out", str(tmp_path / "o")]) == 2
    assert main(["plan", "S1", "--case", "99", "--out", str(tmp_path / "o")]) == 2
    assert not (tmp_path / "o").exists()  # bad input leaves no empty output folder behind


def test_plan_rejects_bad_device_and_paths(capsys, tmp_path):
    assert main(["plan", "S1", "--device", "gpu", "--out", str(tmp_path / "o")]) == 2
    assert "rtenv: error: device 'gpu' is not a device; valid: 'cpu', 'cuda', 'cuda:N'" in capsys.readouterr().err
    assert main(["plan", "S1", "--tpp", str(tmp_path), "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err
    assert "rtenv: error:" in err and "Is a directory" in err
    taken = tmp_path / "afile"
    taken.write_text("")
    assert main(["plan", "S1", "--out", str(taken)]) == 2
    captured = capsys.readouterr()  # the --out check comes before the solve runs
    assert f"rtenv: error: --out {taken} is an existing file; expected a folder" in captured.err
    assert "optimised" not in captured.out


def test_every_command_checks_seed_device_and_outputs_before_work(capsys, tmp_path):
    taken = tmp_path / "afile"
    taken.write_text("")
    for argv, message in (
            (["evaluate", "--policy", "acer:default", "--seed", "-1"],
             "--seed -1 must be an integer in [0, 4294967295]"),
            (["train", "acer", "--out", str(tmp_path / "x"), "--timesteps", "40", "--seed", str(2 ** 32)],
             f"--seed {2 ** 32} must be"),
            # an empty value is not "not given": it planned the default case and recorded the cwd as its file
            (["plan", "S1", "--case-file", "", "--out", str(tmp_path / "x")], "--case-file is empty"),
            (["plan", "S1", "--tpp", "", "--out", str(tmp_path / "x")], "--tpp is empty"),
            (["llm", "plan", "S1", "--knowledge", "S1-acer", "--model", "", "--out", str(tmp_path / "x")],
             "--model is empty"),
            (["explain", "--policy", "acer:default", "--out", str(tmp_path / "x"), "--ig-steps", "99999999999"],
             "--ig-steps = 99999999999 must be an integer in [2, 10000]"),
            (["llm", "plan", "S1", "--knowledge", "S1-acer", "--backend", "openai", "--base-url",
              "http://127.0.0.1:1/v1", "--timeout", "inf", "--out", str(tmp_path / "x")],
             "--timeout (seconds) = inf is invalid; expected a finite number in (0, 86400]"),
            (["explain", "--policy", "acer:default", "--out", str(tmp_path / "x"), "--seed", "-3"], "--seed -3"),
            (["evaluate", "--policy", "acer:default", "--device", "gpu"], "device 'gpu' is not a device"),
            (["explain", "--policy", "acer:default", "--out", str(tmp_path / "x"), "--device", "cuda:7"],
             "device 'cuda:7'"),
            (["dose", "S1", "--uniform", "--out", str(taken)], f"--out {taken} is an existing file; expected a folder"),
            (["dose", "S1", "--uniform", "--out", ""], "--out is empty; give a folder path"),
            (["explain", "--policy", "acer:default", "--out", str(taken / "x")],
             f"lies under {taken}, which is a file"),
            (["knowledge", "export", "--policy", "search", "--max-steps", "-1", "--out", str(tmp_path / "k.json")],
             "generations (--max-steps) = -1 must be an integer in [1, inf]"),
            (["cases", "show", "--case-file", str(taken)], f"{taken} is not an rtenv case file"),
            (["bench", "table3", "--policies", "random,acer:/nonexistent.zip", "--out", str(tmp_path / "t3")],
             "no model file at /nonexistent.zip"),
            (["evaluate", "--policy", "acer:default", "--json", str(tmp_path)], f"--json {tmp_path} is a folder"),
            (["knowledge", "export", "--policy", "search", "--out", str(tmp_path)], "is a folder; expected a file"),
            (["knowledge", "plot", "S1-acer", "--out", str(taken)], "is an existing file"),
            (["bench", "table3", "--policies", "default", "--seed", "-1", "--out", str(tmp_path / "t3")], "--seed -1"),
            (["dose", "S1", "--out", str(tmp_path / "d")], "rtenv dose needs --uniform")):
        assert main(argv) == 2, argv
        captured = capsys.readouterr()
        assert "rtenv: error: " in captured.err and message in captured.err, (argv, captured.err)
        assert captured.out == ""  # refused before any work
    assert not (tmp_path / "x").exists() and not (tmp_path / "t3").exists() and not (tmp_path / "d").exists()


def test_version_and_python_m_rtenv(capsys):
    import subprocess
    import sys

    from rtenv import __version__

    with pytest.raises(SystemExit):
        main(["--version"])
    assert capsys.readouterr().out.strip() == f"rtenv {__version__}"
    run = subprocess.run([sys.executable, "-m", "rtenv", "cases", "list"], capture_output=True, text=True, check=True)
    assert "prostate15" in run.stdout


def test_cases_tables_read_plainly(capsys):
    assert main(["cases", "list"]) == 0
    assert "79.2 Gy / 44 fx" in capsys.readouterr().out
    assert main(["cases", "show", "S2", "--case", "0"]) == 0
    rows = capsys.readouterr().out.split("beamlets\n")[1].splitlines()
    assert [r.split()[0] for r in rows[:8]] == ["0", "1", "2", "3", "4", "...", "178", "179"]


def test_bad_numbers_and_model_files_are_clean_errors(capsys, tmp_path):
    from benchmarks import env_speed, table3, tps_speed
    from drl.train import BUILTIN_POLICIES

    assert main(["train", "acer", "--checkpoint-every", "0", "--timesteps", "8", "--out", str(tmp_path / "t")]) == 2
    assert "checkpoint_every = 0 must be an integer in [1, inf]" in capsys.readouterr().err
    # an ACER zip loaded as PPO raised a TypeError traceback
    assert main(["evaluate", "--policy", f"ppo:{BUILTIN_POLICIES['default']}", "--scenario", "S1"]) == 2
    assert "was saved by ACER, not PPO" in capsys.readouterr().err
    # and a PPO zip loaded as ACER raised the optimizer's TypeError, naming neither algorithm
    import gymnasium as gym
    from stable_baselines3 import PPO
    PPO("MlpPolicy", gym.make("CartPole-v1"), n_steps=8, batch_size=8).save(tmp_path / "ppo.zip")
    assert main(["evaluate", "--policy", f"acer:{tmp_path / 'ppo.zip'}", "--scenario", "S1"]) == 2
    err = capsys.readouterr().err
    assert f"was saved by PPO, not ACER (from policy spec 'acer:{tmp_path / 'ppo.zip'}'): use ppo:" in err
    (tmp_path / "junk.zip").write_text("not a zip")
    assert main(["evaluate", "--policy", f"ppo:{tmp_path / 'junk.zip'}", "--scenario", "S1"]) == 2
    assert "is not a loadable ppo model" in capsys.readouterr().err
    for module, args, message in ((table3, ["--scenarios", "S9", "--out", str(tmp_path / "t3")], "S9"),
                                  (table3, ["--workers", "0", "--out", str(tmp_path / "t3")], "workers = 0"),
                                  (table3, ["--temperature", "3", "--out", str(tmp_path / "t3")],
                                   "temperature (--temperature) = 3.0 must be a number in [0, 2]"),
                                  (env_speed, ["--envs", "0"], r"env counts (--envs) [0]"),
                                  (env_speed, ["--envs", "x"], "comma-separated integers"),
                                  (env_speed, ["--steps", "0"], "calls (--steps) = 0"),
                                  (tps_speed, ["--device", "cuda:7"], "device 'cuda:7'"),
                                  (table3, ["--device", "cuda:7", "--out", str(tmp_path / "t3")], "device 'cuda:7'")):
        with pytest.raises(SystemExit) as exit_info:
            module.main(args)
        assert exit_info.value.code == 2 and message in capsys.readouterr().err
    assert not (tmp_path / "t3").exists()


def test_an_absent_gpu_is_refused_by_every_layer_before_any_work(tmp_path):
    # SB3 alone would fall back to the CPU without a word; every rtenv entry point refuses instead
    import torch

    from benchmarks.table3 import run_table3
    from drl.train import load_policy
    from knowledge_extraction.knowledge import export_search_knowledge
    from llm_policy.backends import make_backend
    from rtenv.env import TPPTuningEnv

    if torch.cuda.is_available():
        pytest.skip("a GPU is present")
    for make in (lambda: TPPTuningEnv("S1", device="cuda"), lambda: load_policy("acer:default", device="cuda"),
                 lambda: make_backend("llama_cpp", device="cuda"), lambda: make_backend("transformers", device="cuda"),
                 lambda: export_search_knowledge("S1", cases=1, generations=1, device="cuda"),
                 lambda: run_table3(["S1"], ["random"], tmp_path / "t3", device="cuda", progress=False)):
        with pytest.raises(ValueError, match="device 'cuda' requested but CUDA is not available"):
            make()
    assert not (tmp_path / "t3").exists()


def test_a_missing_optional_package_names_its_extra():
    # sb3 left out of the environment (as in an install without the sb3 extra): a traceback before
    code = ("import sys; sys.modules['stable_baselines3'] = None; from rtenv.cli import main; "
            "sys.exit(main(['evaluate', '--policy', 'acer:default', '--scenario', 'S1', '--cases', '1']))")
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert run.returncode == 2, run.stderr
    assert run.stderr.strip() == "rtenv: error: stable_baselines3 is not installed: pip install 'rtenv[sb3]'"
    # the TPS benchmark needs cvxpy for its reference solvers: it says so before any timing
    code = ("import sys; sys.modules['cvxpy'] = None; from benchmarks.tps_speed import main; "
            "sys.exit(main(['--scenario', 'S1']))")
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert run.returncode == 2 and run.stdout == "", run.stderr
    assert "error: the CVXPY reference solvers need cvxpy: pip install 'rtenv[bench]'" in run.stderr
    code = code.replace("sys.modules['cvxpy'] = None", "import importlib.util as u; f = u.find_spec; "
                        "u.find_spec = lambda n, *a: None if n == 'osqp' else f(n, *a)")
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert run.returncode == 2 and "the osqp reference solver is not installed" in run.stderr, run.stderr
    # an import error that is not a missing optional package is a bug: it keeps its traceback
    assert _install_hint(ModuleNotFoundError("No module named 'rtenv.installer'", name="rtenv.installer")) is None
    assert _install_hint(ModuleNotFoundError("No module named 'stable_baselines3.common.x'",
                                             name="stable_baselines3.common.x")) is None  # sb3 is installed
    assert _install_hint(ImportError("cannot import name 'install_hooks' from 'rtenv.tps'")) is None
    # the package's own hint, raised from the missing package, is kept as it is
    try:
        try:
            import captum_not_here  # noqa: F401
        except ModuleNotFoundError as exc:
            exc.name = "captum"
            raise ImportError("drl.explain needs captum: pip install captum") from exc
    except ImportError as exc:
        assert _install_hint(exc) == "drl.explain needs captum: pip install captum"
    from rtenv.tg119 import PyRadPlanMissing
    assert _install_hint(PyRadPlanMissing("the TG119 scenario needs pyradplan")) == "the TG119 scenario needs pyradplan"


def test_llm_plan_says_which_endpoint_options_a_local_backend_does_not_use(capsys, tmp_path):
    argv = ["llm", "plan", "S1", "--knowledge", str(tmp_path / "none.json"), "--base-url", "http://127.0.0.1:1/v1",
            "--timeout", "5", "--out", str(tmp_path / "x")]
    assert main(argv) == 2  # the missing knowledge base stops it after the warning
    err = capsys.readouterr().err
    assert "--base-url, --timeout are not used: the llama_cpp backend runs the model in this process" in err
