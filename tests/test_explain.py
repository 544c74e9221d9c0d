"""Integrated Gradients explanations of a DRL planner (drl.explain): completeness, outputs, determinism."""

import json

import numpy as np
import pytest
import torch

pytest.importorskip("captum")

from matplotlib.image import imread  # noqa: E402
from stable_baselines3 import PPO  # noqa: E402

from drl.acer import ACER  # noqa: E402
from drl.explain import (  # noqa: E402
    ActionLogits,
    explain_episode,
    integrated_gradients,
    policy_entropy,
    reference_dvh,
)
from rtenv.env import DVH_POINTS, TPPTuningEnv  # noqa: E402
from rtenv.sb3 import make_sb3_vec_env  # noqa: E402

STRUCTURES = ["PTV", "Bladder", "Rectum"]


@pytest.fixture(scope="module")
def model():
    """An untrained ACER planner on S1 (its weights are fixed by the seed)."""
    return ACER("MlpPolicy", make_sb3_vec_env("S1", num_envs=1, max_steps=3), seed=0, device="cpu", n_steps=5)


@pytest.fixture(scope="module")
def reference():
    return reference_dvh("S1", "knowledge", cases=2)


@pytest.fixture(scope="module")
def explained(model, tmp_path_factory):
    out = tmp_path_factory.mktemp("explain")
    # an untrained net's logit differences are small (~0.01), so its relative deltas are larger than a trained one's
    res = explain_episode(model, "S1", "test", 0, out, max_steps=3, reference_cases=2, n_steps=50, seed=0,
                          delta_tolerance=0.1)
    return res, out


def _policy_logits(model, x: np.ndarray) -> torch.Tensor:
    """The ACER policy head's logits computed through the policy's own modules (float32)."""
    p = model.policy
    with torch.no_grad():
        return p.pi_head(p.torso(p.extract_features(torch.as_tensor(x, dtype=torch.float32), p.features_extractor)))


def test_reference_dvh_is_the_mean_of_default_plans(reference):
    assert reference.shape == (3 * DVH_POINTS,)
    assert np.all((reference >= 0) & (reference <= 1))
    curves = reference.reshape(3, DVH_POINTS)
    assert np.all(np.diff(curves, axis=1) <= 1e-12)  # mean of cumulative DVHs stays non-increasing in dose
    env = TPPTuningEnv("S1", cohort="knowledge", cases=[0, 1])
    obs = [env.reset(seed=0, options={"index": i})[0] for i in (0, 1)]
    np.testing.assert_allclose(reference, np.mean(obs, axis=0), atol=1e-7)


def test_completeness_axiom(model, reference):
    env = TPPTuningEnv("S1", cohort="test", cases=[1])
    obs, _ = env.reset(seed=0, options={"index": 1})
    logits = _policy_logits(model, obs[None])[0]
    action = int(torch.argmax(logits))
    assert action == int(model.predict(obs, deterministic=True)[0])
    res = integrated_gradients(ActionLogits(model), obs, action, {"zero": np.zeros_like(reference), "mean": reference},
                               n_steps=200)
    for name, base in (("zero", np.zeros_like(reference)), ("mean", reference)):
        diff = float(logits[action] - _policy_logits(model, base[None])[0, action])
        total = float(res[name]["attribution"].sum())
        tol = 0.02 * abs(diff) + 1e-5
        assert abs(diff) > 20 * tol  # the tolerance is tight enough for a wrong attribution to fail it
        assert total == pytest.approx(diff, abs=tol)
        assert res[name]["delta"] == pytest.approx(total - (res[name]["logit"] - res[name]["baseline_logit"]),
                                                   abs=1e-9)
        assert res[name]["relative_delta"] < 0.02
    # the check can fail: another action's attributions do not complete the chosen action's logit difference
    other = (action + 1) % logits.numel()
    wrong = integrated_gradients(ActionLogits(model), obs, other, {"zero": np.zeros_like(reference)}, n_steps=200)
    diff = float(logits[action] - _policy_logits(model, np.zeros_like(reference)[None])[0, action])
    assert abs(float(wrong["zero"]["attribution"].sum()) - diff) > 0.02 * abs(diff) + 1e-5


def test_action_logits_match_the_policies(model):
    x = np.random.default_rng(0).uniform(size=(4, 3 * DVH_POINTS)).astype(np.float32)
    torch.testing.assert_close(ActionLogits(model)(torch.as_tensor(x)), _policy_logits(model, x))
    ppo = PPO("MlpPolicy", make_sb3_vec_env("S1", num_envs=1, max_steps=2), n_steps=8, batch_size=8, seed=0,
              device="cpu")
    with torch.no_grad():
        expected = ppo.policy.get_distribution(torch.as_tensor(x)).distribution.logits
        got = torch.log_softmax(ActionLogits(ppo)(torch.as_tensor(x)), dim=-1)
    torch.testing.assert_close(got, expected)


def test_explain_episode_json_shape_and_completeness(explained, model):
    res, out = explained
    data = json.loads((out / "attributions.json").read_text())
    assert data["structures"] == STRUCTURES and len(data["tpp_names"]) == 9
    assert set(data["baselines"]) == {"zero", "mean"}
    assert all(len(v) == DVH_POINTS for v in data["baselines"]["mean"]["dvh"].values())
    assert "knowledge" in data["baselines"]["mean"]["description"]
    assert all(len(v) == DVH_POINTS for v in data["dose_points_gy"].values())
    assert 1 <= len(data["steps"]) <= 3 and data["ig"]["n_steps"] == 50
    for t, step in enumerate(data["steps"]):
        assert step["step"] == t
        obs = np.concatenate([step["observation"][s] for s in STRUCTURES]).astype(np.float32)
        assert step["action"] == int(model.predict(obs, deterministic=True)[0])
        assert step["tpp_changed"] == data["tpp_names"][step["action"] // 2]
        assert step["direction"] == ("down" if step["action"] % 2 else "up")
        assert 0 <= step["score"] <= data["max_score"] and 0 <= step["score_after"] <= data["max_score"]
        assert step["logit"] == pytest.approx(step["logits"][step["action"]], abs=1e-5)
        # the softmax policy over the actions the mask allows: its entropy and the chosen action's probability
        allowed = np.array(step["logits"])[step["allowed"]]
        p = np.exp(allowed - allowed.max()) / np.exp(allowed - allowed.max()).sum()
        assert step["entropy"] == pytest.approx(-(p * np.log(p)).sum(), abs=1e-4)
        assert 0.0 <= step["entropy"] <= np.log(18) and step["probability"] == pytest.approx(p.max(), abs=1e-6)
        for base in ("zero", "mean"):
            attr = step["attributions"][base]
            assert list(attr) == STRUCTURES and all(len(attr[s]) == DVH_POINTS for s in STRUCTURES)
            total = sum(sum(v) for v in attr.values())
            diff = step["logit"] - step["baseline_logit"][base]
            assert total - diff == pytest.approx(step["delta"][base], abs=1e-9)
            assert abs(step["delta"][base]) <= 0.1 * abs(diff) + 1e-5  # completeness at 50 nodes
            share = step["structure_share"][base]
            assert sum(share.values()) == pytest.approx(1.0) and all(0 <= v <= 1 for v in share.values())
            assert step["top_structure"][base] == max(share, key=share.get)
            assert step["agreement"][base] == (step["top_structure"][base] in step["violated_structures"])
        assert set(step["violated_structures"]) == {c["structure"] for c in step["violated_criteria"]}
        assert [c["name"] for c in step["violated_criteria"]] == step["violated"]
    assert data["entropy_mean"] == pytest.approx(np.mean([s["entropy"] for s in data["steps"]]))
    assert policy_entropy(np.array([0.0, 0.0, -np.inf])) == pytest.approx(np.log(2))  # masked actions left out
    assert policy_entropy(np.array([50.0, 0.0])) == pytest.approx(0.0, abs=1e-15)
    for base in ("zero", "mean"):
        conv = data["convergence"][base]
        assert conv["max_abs_delta"] == pytest.approx(max(abs(s["delta"][base]) for s in data["steps"]))
        agr = data["agreement"][base]
        for key in ("rate", "chance_rate", "violated_share", "action_structure_rate"):
            assert agr[key] is not None and 0.0 <= agr[key] <= 1.0
        assert sum(agr["mean_share"].values()) == pytest.approx(1.0)
        hits = [s["agreement"][base] for s in data["steps"] if s["violated_structures"]]
        assert agr["rate"] == pytest.approx(sum(hits) / len(hits))
        assert sum(agr["top_counts"].values()) == len(data["steps"])


def test_explain_episode_figures(explained):
    res, out = explained
    names = {"attributions.json", "ig_heatmap_zero.png", "ig_heatmap_mean.png", "ig_structure_share.png",
             *(f"dvh_ig_step{t:02d}.png" for t in range(len(res["steps"])))}
    assert {p.name for p in out.iterdir()} == names
    assert sorted(res["files"]) == sorted(str(out / n) for n in names)
    for name in names - {"attributions.json"}:
        path = out / name
        assert path.stat().st_size > 10_000
        img = imread(path)[..., :3]
        assert img.std() > 0.05 and (img.min(axis=-1) < 0.9).mean() > 0.03  # drawn, not blank


def test_explain_episode_is_deterministic(explained, model, tmp_path):
    res, _ = explained
    path = tmp_path / "model.zip"
    model.save(path)
    again = explain_episode(f"acer:{path}", "S1", "test", 0, tmp_path / "again", max_steps=3, reference_cases=2,
                            n_steps=50, seed=0, plots=False, delta_tolerance=0.1)
    for key in ("steps", "agreement", "convergence", "baselines", "initial_score", "final_score"):
        assert again[key] == res[key], key
    assert again["files"] == [str(tmp_path / "again" / "attributions.json")]
    with pytest.warns(RuntimeWarning, match="convergence delta"):
        strict = explain_episode(model, "S1", "test", 0, tmp_path / "strict", max_steps=1, reference_cases=2,
                                 baselines=("zero",), plots=False, delta_tolerance=1e-9)
    assert not strict["convergence"]["zero"]["within_tolerance"] and list(strict["baselines"]) == ["zero"]


def test_explain_episode_rejects_bad_input(model, tmp_path):
    with pytest.raises(ValueError, match="baselines"):
        explain_episode(model, "S1", out_dir=tmp_path, baselines=("zero", "blur"))
    with pytest.raises(ValueError, match="expects 300 observations"):
        explain_episode(model, "S2", out_dir=tmp_path)
    with pytest.raises(ValueError, match="reference must have shape"):
        explain_episode(model, "S1", out_dir=tmp_path, max_steps=1, reference=np.zeros(10))


def test_explain_cli(model, tmp_path, capsys):
    from rtenv.cli import main

    path = tmp_path / "model.zip"
    model.save(path)
    with pytest.warns(RuntimeWarning):  # an untrained net's logit differences are tiny: the relative delta is large
        assert main(["explain", "--policy", f"acer:{path}", "--scenario", "S1", "--case", "0", "--max-steps", "1",
                     "--reference-cases", "2", "--ig-steps", "20", "--out", str(tmp_path / "xp")]) == 0
    out = capsys.readouterr().out
    assert "zero baseline: max |delta|" in out and "mean baseline" in out
    assert (tmp_path / "xp" / "attributions.json").is_file()


def test_lstm_policy_is_explained_with_the_episode_state_held_fixed(reference, tmp_path):
    lstm = ACER("LstmPolicy", make_sb3_vec_env("S1", num_envs=1, max_steps=3), seed=0, device="cpu", n_steps=5)
    p = lstm.policy
    rng = np.random.default_rng(0)
    x = rng.uniform(size=(4, 3 * DVH_POINTS)).astype(np.float32)
    state = (torch.as_tensor(rng.normal(size=(1, 32)), dtype=torch.float32),
             torch.as_tensor(rng.normal(size=(1, 32)), dtype=torch.float32))
    net = ActionLogits(lstm)
    assert net.recurrent and "hidden state held fixed" in net.kind
    net.set_state(*state)
    with torch.no_grad():
        expected = p.step(torch.as_tensor(x), (state[0].expand(4, -1), state[1].expand(4, -1)))[0]
    torch.testing.assert_close(net(torch.as_tensor(x)), expected)
    with pytest.raises(ValueError, match="units"):
        net.set_state(np.zeros(5), np.zeros(5))
    with pytest.raises(ValueError, match="recurrent"):
        ActionLogits(ACER("MlpPolicy", make_sb3_vec_env("S1", num_envs=1), device="cpu")).set_state(*state)
    # completeness holds for the function of x_t with the state held fixed
    res = integrated_gradients(net, x[0], 3, {"zero": np.zeros_like(reference)}, n_steps=100)
    with torch.no_grad():
        zero_logit = p.step(torch.zeros(1, 3 * DVH_POINTS), state)[0][0, 3]
    assert res["zero"]["baseline_logit"] == pytest.approx(float(zero_logit), abs=1e-5)
    assert float(res["zero"]["attribution"].sum()) == pytest.approx(float(expected[0, 3] - zero_logit), abs=1e-4)

    out = explain_episode(lstm, "S1", "test", 0, tmp_path, max_steps=3, baselines=("zero",), n_steps=20,
                          plots=False, delta_tolerance=1.0)
    assert "lstm" in out["policy"] and len(out["steps"]) >= 2
    carried = None  # the logits recorded at each step are the policy's with the episode's carried state
    for rec in out["steps"]:
        obs = np.concatenate([rec["observation"][s] for s in STRUCTURES]).astype(np.float32)
        with torch.no_grad():
            logits, _, carried = p.step(torch.as_tensor(obs[None]), carried or p.initial_state(1))
        np.testing.assert_allclose(rec["logits"], logits[0].numpy(), rtol=1e-5, atol=1e-5)
