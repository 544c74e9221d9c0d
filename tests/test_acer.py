"""ACER: learning, SB3 compatibility (save/load, callbacks, VecEnv), determinism, truncation."""

import gymnasium as gym
import numpy as np
import pytest
import torch
from stable_baselines3.common.callbacks import BaseCallback
from stable_baselines3.common.env_util import make_vec_env
from stable_baselines3.common.evaluation import evaluate_policy
from stable_baselines3.common.monitor import Monitor

from drl.acer import ACER
from rtenv.sb3 import make_sb3_vec_env


@pytest.mark.slow
def test_acer_learns_cartpole():
    model = ACER("MlpPolicy", make_vec_env("CartPole-v1", n_envs=4, seed=0), seed=0, replay_start=500,
                 device="cpu")
    model.learn(40_000)
    mean, _ = evaluate_policy(model, Monitor(gym.make("CartPole-v1")), n_eval_episodes=10, deterministic=True)
    assert mean >= 195.0  # random play scores about 22


def test_save_load_roundtrip(tmp_path):
    model = ACER("MlpPolicy", make_vec_env("CartPole-v1", n_envs=2, seed=1), seed=1, replay_start=100,
                 device="cpu", policy_kwargs={"net_arch": [32]})
    model.learn(400)
    model.save(tmp_path / "acer.zip")
    loaded = ACER.load(tmp_path / "acer.zip", device="cpu")
    obs = np.random.default_rng(0).normal(size=(16, 4)).astype(np.float32)
    np.testing.assert_array_equal(model.predict(obs, deterministic=True)[0], loaded.predict(obs, deterministic=True)[0])
    for a, b in zip(model.avg_policy.parameters(), loaded.avg_policy.parameters(), strict=True):
        assert torch.equal(a, b)
    assert loaded.n_steps == model.n_steps and loaded.truncation == model.truncation
    loaded.set_env(make_vec_env("CartPole-v1", n_envs=2, seed=2))
    loaded.learn(100)  # training resumes after loading


def test_deterministic_under_seed():
    def params(seed):
        model = ACER("MlpPolicy", make_vec_env("CartPole-v1", n_envs=2, seed=seed), seed=seed, replay_start=50,
                     device="cpu")
        model.learn(600)
        return torch.cat([p.flatten() for p in model.policy.parameters()])

    assert torch.equal(params(3), params(3))
    assert not torch.equal(params(3), params(4))


def test_truncation_is_recorded_apart_from_termination():
    venv = make_vec_env("CartPole-v1", n_envs=2, seed=0, env_kwargs={"max_episode_steps": 5})
    model = ACER("MlpPolicy", venv, seed=0, n_steps=12, device="cpu")
    model._setup_learn(100)

    class Keep(BaseCallback):
        def _on_step(self) -> bool:
            return True

    cb = Keep()
    cb.init_callback(model)
    seg = model._collect_segment(cb)
    assert seg["truncated"].any()
    assert not (seg["truncated"] & seg["terminated"]).any()
    assert np.abs(seg["trunc_obs"][seg["truncated"]]).sum() > 0  # the truncated state is kept for bootstrap
    assert np.allclose(seg["mu"].sum(-1), 1.0, atol=1e-5)  # the full behaviour distribution per step


def test_acts_and_learns_with_action_masks():
    venv = make_sb3_vec_env("S1", num_envs=2, max_steps=3)
    model = ACER("MlpPolicy", venv, seed=0, n_steps=4, replay_start=8, device="cpu")
    model.learn(16)
    seg = model._replay.sample()
    assert seg["masks"].shape == (5, 2, 18) and not seg["masks"].all()  # no-ops at the default start
    assert (seg["mu"][~seg["masks"][:4]] == 0).all()  # masked actions have probability 0 ...
    assert seg["masks"][:4][np.arange(4)[:, None], np.arange(2)[None], seg["actions"]].all()  # ... and never run
    assert all(np.isfinite(p.detach()).all() for p in model.policy.parameters())
    obs = np.zeros((3, 300), dtype=np.float32)
    mask = np.zeros((3, 18), dtype=bool)
    mask[:, 7] = True
    assert (model.policy.predict_masked(obs, mask) == 7).all()
    assert model.policy.predict_masked(obs[0], mask[0]) == 7


def test_callbacks_can_stop_training():
    class StopAfter(BaseCallback):
        def _on_step(self) -> bool:
            return self.n_calls < 10

    model = ACER("MlpPolicy", make_vec_env("CartPole-v1", n_envs=2, seed=0), seed=0, device="cpu")
    model.learn(10_000, callback=StopAfter())
    assert model.num_timesteps == 20


def test_trains_on_rtenv_through_the_sb3_adapter():
    model = ACER("MlpPolicy", make_sb3_vec_env("S1", num_envs=4, max_steps=5), seed=0, n_steps=5, replay_start=40,
                 device="cpu")
    model.learn(120)
    assert model.num_timesteps >= 120
    assert model.predict(np.zeros((1, 300), dtype=np.float32))[0].shape == (1,)


def test_rejects_continuous_actions_and_bad_settings():
    with pytest.raises((ValueError, AssertionError), match="Discrete|not supported"):
        ACER("MlpPolicy", make_vec_env("Pendulum-v1", n_envs=1), device="cpu")
    with pytest.raises(ValueError, match="gamma = 1.5"):
        ACER("MlpPolicy", make_vec_env("CartPole-v1", n_envs=1), gamma=1.5, device="cpu")
