"""rtenv train / evaluate end to end on a tiny budget; checkpoints, resume, any SB3 model."""

import json

import numpy as np
import pytest
from stable_baselines3 import PPO

from drl.train import as_policy, latest_checkpoint, load_policy
from rtenv.cli import main
from rtenv.rollout import evaluate_cohort
from rtenv.sb3 import make_sb3_vec_env


@pytest.mark.slow
def test_train_resume_and_evaluate(tmp_path, capsys):
    out = tmp_path / "acer"
    args = ["train", "acer", "--scenario", "S1", "--train-cases", "1", "--num-envs", "4", "--checkpoint-every", "80",
            "--out", str(out)]
    assert main([*args, "--timesteps", "160"]) == 0
    assert (out / "model.zip").is_file() and (out / "logs" / "progress.csv").is_file()
    path, steps = latest_checkpoint(out)
    assert steps >= 80
    assert main([*args, "--timesteps", "320"]) == 0  # resumes from the newest checkpoint
    config = json.loads((out / "train_config.json").read_text())
    assert config["resumed_from_steps"] == steps
    assert latest_checkpoint(out)[1] > steps

    report = tmp_path / "eval.json"
    assert main(["evaluate", "--policy", f"acer:{out / 'model.zip'}", "--scenario", "S1", "--cases", "2",
                 "--max-steps", "3", "--json", str(report)]) == 0
    res = json.loads(report.read_text())
    for key in ("cases", "initial_score_mean", "final_score_mean", "final_score_sd", "steps_mean", "steps_sd",
                "full_score_rate"):
        assert key in res
    assert len(res["cases"]) == 2 and all(c["steps"] <= 3 for c in res["cases"])
    assert "full score" in capsys.readouterr().out

    kb_path = tmp_path / "kb.json"
    assert main(["knowledge", "export", "--policy", f"acer:{out / 'model.zip'}", "--scenario", "S1",
                 "--cohort", "knowledge", "--max-steps", "2", "--out", str(kb_path)]) == 0
    kb = json.loads(kb_path.read_text())
    assert kb["source"]["episodes"] == 20 and 1 <= kb["source"]["successful"] <= 20
    assert all(len(p["values"]) == kb["source"]["successful"] for p in kb["parameters"].values())
    assert main(["knowledge", "show", str(kb_path)]) == 0
    assert "lambda_rectum" in capsys.readouterr().out
    assert main(["knowledge", "plot", str(kb_path), "--out", str(tmp_path / "fig")]) == 0
    assert (tmp_path / "fig" / "knowledge_tpp_distributions.png").stat().st_size > 10_000


def test_evaluate_accepts_any_sb3_model(tmp_path):
    model = PPO("MlpPolicy", make_sb3_vec_env("S1", num_envs=2, max_steps=2), n_steps=4, batch_size=8, seed=0,
                device="cpu")
    model.learn(8)
    model.save(tmp_path / "ppo.zip")
    loaded = load_policy(f"ppo:{tmp_path / 'ppo.zip'}")
    res = evaluate_cohort(as_policy(loaded), "S1", cohort="test", cases=2, max_steps=2)
    assert len(res["cases"]) == 2 and 0 <= res["full_score_rate"] <= 1
    assert res["initial_score_mean"] == pytest.approx(np.mean([c["initial_score"] for c in res["cases"]]))


def test_bad_policy_specs():
    with pytest.raises(ValueError, match="ALGO:PATH"):
        load_policy("sac:/tmp/x.zip")
    with pytest.raises(FileNotFoundError, match="no model file"):
        load_policy("acer:/nonexistent/model.zip")
