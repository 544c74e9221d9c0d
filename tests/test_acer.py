"""ACER: learning, SB3 compatibility (save/load, callbacks, VecEnv), determinism, truncation; the LSTM
policy (sizes, unrolling stored segments, recurrent predict); replay checkpoints; the shipped planner."""

import gymnasium as gym
import numpy as np
import pytest
import torch
from stable_baselines3.common.callbacks import BaseCallback, CheckpointCallback
from stable_baselines3.common.env_util import make_vec_env
from stable_baselines3.common.evaluation import evaluate_policy
from stable_baselines3.common.monitor import Monitor

import drl.acer
from drl.acer import ACER, ACERLstmPolicy, ACERPolicy
from drl.acer_math import retrace_targets, trust_region_step
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


@pytest.mark.parametrize("policy,steps", [("MlpPolicy", 600), ("LstmPolicy", 400)])
def test_deterministic_under_seed(policy, steps):
    def params(seed):
        model = ACER(policy, make_vec_env("CartPole-v1", n_envs=2, seed=seed), seed=seed, replay_start=50,
                     device="cpu")
        model.learn(steps)
        return torch.cat([p.flatten() for p in model.policy.parameters()])

    assert torch.equal(params(3), params(3))
    assert not torch.equal(params(3), params(4))


def _cartpole_segment(**kwargs) -> tuple[ACER, dict]:
    """A model and one collected segment of 5-step CartPole episodes (time-limit truncations)."""
    venv = make_vec_env("CartPole-v1", n_envs=2, seed=0, env_kwargs={"max_episode_steps": 5})
    model = ACER("MlpPolicy", venv, seed=0, n_steps=12, device="cpu", **kwargs)
    return model, model._collect_segment(_collector(model, 100))


def test_truncation_is_recorded_apart_from_termination():
    model, seg = _cartpole_segment()
    assert seg["truncated"].any()
    assert not (seg["truncated"] & seg["terminated"]).any()
    # the truncated states are kept for bootstrapping, one row per truncation
    assert seg["trunc_obs"].shape == (seg["truncated"].sum(), 4) and np.abs(seg["trunc_obs"]).sum() > 0
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
    # a mask that allows nothing allows everything, as in training: the unmasked choice
    nothing = np.zeros((3, 18), dtype=bool)
    assert (model.policy.predict_masked(obs, nothing) == model.policy.predict(obs, deterministic=True)[0]).all()


def test_callbacks_can_stop_training():
    class StopAfter(BaseCallback):
        def _on_step(self) -> bool:
            return self.n_calls < 10

    model = ACER("MlpPolicy", make_vec_env("CartPole-v1", n_envs=2, seed=0), seed=0, device="cpu")
    model.learn(10_000, callback=StopAfter())
    assert model.num_timesteps == 20
    # stopped in the middle of a segment, the model still holds the envs' current observations,
    # so a later learn(..., reset_num_timesteps=False) goes on from where the envs are
    for i, env in enumerate(model.env.envs):
        np.testing.assert_allclose(model._last_obs[i], env.unwrapped.state, atol=1e-6)


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
    # 6 whole segments of 20 x 8 hold 960 transitions < replay_start: replay would never run
    with pytest.raises(ValueError, match="buffer_size = 1000 holds 960 transitions.*replay_start = 1000"):
        ACER("MlpPolicy", make_vec_env("CartPole-v1", n_envs=8), buffer_size=1000, replay_start=1000, device="cpu")
    ACER("MlpPolicy", make_vec_env("CartPole-v1", n_envs=8), buffer_size=1000, replay_ratio=0, device="cpu")
    for kwargs, match in (({"ent_coef": float("nan")}, "ent_coef = nan"), ({"q_coef": -1}, "q_coef = -1"),
                          ({"max_grad_norm": 0}, "max_grad_norm = 0"), ({"n_steps": 2.5}, "n_steps = 2.5 must be an")):
        with pytest.raises(ValueError, match=match):
            ACER("MlpPolicy", make_vec_env("CartPole-v1", n_envs=1), device="cpu", **kwargs)


@pytest.mark.filterwarnings("ignore:The environment is already wrapped with a `Monitor`")  # VecMonitor below
def test_masks_follow_the_sb3_vector_env_convention():
    """SB3's DummyVecEnv and rtenv's adapter alike: the finished episode's info in ``infos``, the
    new one's in ``env.reset_infos``."""
    from stable_baselines3.common.vec_env import DummyVecEnv

    from rtenv.env import TPPTuningEnv
    from rtenv.sb3 import make_sb3_vec_env

    first = np.ones(18, dtype=bool)
    first[[1, 2, 4, 14, 16]] = False  # the default start: t_PTV at 1 cannot go down, t_OAR and V_OAR not up
    for venv in (DummyVecEnv([lambda: TPPTuningEnv("S1", max_steps=1)] * 2), make_sb3_vec_env("S1", 2, max_steps=1)):
        model = ACER("MlpPolicy", venv, seed=0, n_steps=2, replay_start=4, device="cpu")
        model.learn(4)  # every step ends an episode (max_steps = 1)
        seg = model._replay.sample()
        assert (seg["masks"] == first).all()  # each step starts an episode: the reset infos' masks
    # a VecEnvWrapper keeps reset_infos of its own (empty): the masks come from the wrapped env
    from stable_baselines3.common.vec_env import VecMonitor

    model = ACER("MlpPolicy", VecMonitor(make_sb3_vec_env("S1", 2, max_steps=1)), seed=0, n_steps=2,
                 replay_start=4, device="cpu")
    model.learn(4)
    assert (model._replay.sample()["masks"] == first).all()
    # set_env makes SB3 reset the new env: the first step uses that reset's masks, not the old env's
    model.set_env(make_sb3_vec_env("S1", 2, max_steps=20, start="default"))
    model._last_masks[:] = True
    model.learn(2, reset_num_timesteps=False)
    assert (model._replay.segments[-1]["masks"][0] == first).all()
    last = np.ones(18, dtype=bool)
    last[3] = False
    dones = np.array([True, False])
    infos = [{"action_mask": list(last)}, {"action_mask": list(first)}]
    venv.reset_infos = [{"action_mask": list(first)}, {}]
    final, nxt = model._step_masks(infos, dones)
    assert (final[0] == last).all() and (nxt[0] == first).all() and (nxt[1] == first).all()


# ------------------------------------------------------------------------------ the LSTM policy


class _Continue(BaseCallback):
    def _on_step(self) -> bool:
        return True


def _collector(model: ACER, total: int = 10_000) -> _Continue:
    model._setup_learn(total)
    cb = _Continue()
    cb.init_callback(model)
    return cb


def test_an_update_bootstraps_truncations_and_moves_the_average_policy(monkeypatch):
    model, seg = _cartpole_segment(alpha=0.5, trust_region=False)
    assert seg["truncated"].any()
    with torch.no_grad():  # V of the truncated states under the policy before the update
        lp, q = model.policy.evaluate(torch.as_tensor(seg["trunc_obs"]), torch.as_tensor(seg["trunc_masks"]))
        expected = (lp.exp() * q).sum(-1)
    seen = {}

    def spy(*args, **kwargs):
        seen["truncated"], seen["boot"] = args[5].clone(), args[6].clone()
        return retrace_targets(*args, **kwargs)

    monkeypatch.setattr(drl.acer, "retrace_targets", spy)
    avg_before = [p.detach().clone() for p in model.avg_policy.parameters()]
    model._update(seg)
    T = seg["actions"].shape[0]
    assert expected.abs().min() > 0
    torch.testing.assert_close(seen["boot"][:T][seen["truncated"]], expected)  # not 0, as at a termination
    for a0, a, p in zip(avg_before, model.avg_policy.parameters(), model.policy.parameters(), strict=True):
        torch.testing.assert_close(a, 0.5 * a0 + 0.5 * p.detach())  # alpha a + (1 - alpha) p
    assert any(not torch.equal(a0, a) for a0, a in zip(avg_before, model.avg_policy.parameters(), strict=True))


def test_the_trust_region_bounds_the_step_with_the_kl_gradient(monkeypatch):
    model, seg = _cartpole_segment(delta=0.1)
    T, N = seg["actions"].shape
    with torch.no_grad():  # the KL(average || policy) gradient w.r.t. the policy's probabilities: -avg / pi
        pi = model.policy.evaluate(torch.as_tensor(seg["obs"][:T].reshape(T * N, -1)),
                                   torch.as_tensor(seg["masks"][:T].reshape(T * N, -1)))[0].exp()
        avg = model.avg_policy.evaluate(torch.as_tensor(seg["obs"][:T].reshape(T * N, -1)),
                                        torch.as_tensor(seg["masks"][:T].reshape(T * N, -1)))[0].exp()
    seen = {}

    def spy(g, k, delta):
        seen["k"], seen["delta"], seen["z"] = k.clone(), delta, trust_region_step(g, k, delta)
        return seen["z"]

    monkeypatch.setattr(drl.acer, "trust_region_step", spy)
    model._update(seg)
    torch.testing.assert_close(seen["k"], -avg / pi)
    assert seen["delta"] == 0.1 and ((seen["k"] * seen["z"]).sum(-1) <= 0.1 + 1e-5).all()


def test_lstm_policy_sizes_come_from_the_spaces():
    model = ACER("LstmPolicy", make_vec_env("CartPole-v1", n_envs=1, seed=0), seed=0, device="cpu")
    p = model.policy
    assert isinstance(p, ACERLstmPolicy) and model.recurrent and isinstance(model.avg_policy, ACERLstmPolicy)
    assert (p.torso[0].in_features, p.torso[0].out_features) == (4, 32) and isinstance(p.torso[1], torch.nn.ReLU)
    assert (p.lstm.input_size, p.lstm.hidden_size) == (32, 32)
    assert (p.pi_head.in_features, p.pi_head.out_features) == (32, 2) == (p.q_head.in_features, p.q_head.out_features)
    small = ACER("LstmPolicy", make_vec_env("CartPole-v1", n_envs=1, seed=0), device="cpu",
                 policy_kwargs={"hidden_size": 8, "features_dim": 16}).policy
    assert (small.lstm.input_size, small.lstm.hidden_size, small.pi_head.in_features) == (16, 8, 8)
    with pytest.raises(ValueError, match="hidden_size = 0"):
        ACER("LstmPolicy", make_vec_env("CartPole-v1", n_envs=1), device="cpu", policy_kwargs={"hidden_size": 0})
    assert ACER.policy_aliases["MlpPolicy"] is ACERPolicy  # the default network is unchanged


def _step_by_step(policy: ACERLstmPolicy, seg: dict) -> tuple[np.ndarray, np.ndarray]:
    """Logits of every step of a segment and V of its truncated states, recomputed one step at a
    time from the stored state (an independent check of the batched unroll's indexing)."""
    state = (torch.as_tensor(seg["state_h"]), torch.as_tensor(seg["state_c"]))
    logits, trunc_v = [], []
    rows = iter(seg["trunc_obs"])
    with torch.no_grad():
        for t in range(seg["actions"].shape[0]):
            state = policy.reset_state(state, torch.as_tensor(seg["episode_starts"][t]))
            lg, _, state = policy.step(torch.as_tensor(seg["obs"][t]), state)
            logits.append(lg.numpy())
            for i in np.flatnonzero(seg["truncated"][t]):
                lp, q, _ = policy.evaluate(torch.as_tensor(next(rows)[None]),
                                           (state[0][i:i + 1], state[1][i:i + 1]))
                trunc_v.append(float((lp.exp() * q).sum()))
    return np.stack(logits), np.array(trunc_v)


@pytest.mark.parametrize("trust_region", [True, False])
def test_lstm_update_unrolls_segments_as_collected(trust_region):
    venv = make_vec_env("CartPole-v1", n_envs=3, seed=0, env_kwargs={"max_episode_steps": 5})
    model = ACER("LstmPolicy", venv, seed=0, n_steps=12, trust_region=trust_region, device="cpu")
    cb = _collector(model)
    segs = [model._collect_segment(cb) for _ in range(2)]  # no update in between: mu is the current policy's
    for k, seg in enumerate(segs):
        T = seg["actions"].shape[0]
        assert seg["state_h"].shape == seg["state_c"].shape == (3, 32)
        assert seg["episode_starts"].shape == (T + 1, 3) and seg["episode_starts"][1:T].any()  # starts mid-segment
        assert seg["truncated"].any()
        if k == 0:
            assert seg["episode_starts"][0].all()
        else:
            assert np.abs(seg["state_h"]).sum() > 0  # the second segment starts from a carried state
        logits, _, _, _, states = model._segment_forward(seg)
        # what _update unrolls reproduces the behaviour distribution computed step by step in collection
        np.testing.assert_allclose(torch.softmax(logits, -1).detach().numpy(), seg["mu"], rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(model._average_log_probs(seg).exp().numpy(), seg["mu"], rtol=1e-5, atol=1e-6)
        ref_logits, ref_trunc = _step_by_step(model.policy, seg)
        np.testing.assert_allclose(logits.detach().numpy(), ref_logits, rtol=1e-5, atol=1e-6)
        trunc = torch.as_tensor(seg["truncated"])
        np.testing.assert_allclose(model._truncation_values(seg, trunc, states).numpy(), ref_trunc, rtol=1e-5,
                                   atol=1e-6)
        # the resets matter: unrolling through the episode starts without them gives other logits
        no_reset = dict(seg, episode_starts=np.zeros_like(seg["episode_starts"]))
        assert not np.allclose(model._segment_forward(no_reset)[0].detach().numpy(), ref_logits, atol=1e-4)
    before = [p.detach().clone() for p in model.policy.parameters()]
    stats = model._update(segs[1])
    assert np.isfinite(list(stats.values())).all()
    assert any(not torch.equal(a, b) for a, b in zip(before, model.policy.parameters(), strict=True))


def test_lstm_predict_carries_and_resets_the_state():
    model = ACER("LstmPolicy", make_vec_env("CartPole-v1", n_envs=2, seed=0), seed=0, device="cpu")
    obs = np.random.default_rng(1).normal(size=(5, 2, 4)).astype(np.float32)
    state, expected = None, []
    for t in range(5):
        action, state = model.predict(obs[t], state=state, episode_start=np.array([t == 0, t == 3]),
                                      deterministic=True)
        assert action.shape == (2,) and state[0].shape == state[1].shape == (2, 32)
        expected.append(action)
    seq = torch.as_tensor(obs)
    starts = torch.as_tensor(np.array([[1, 1], [0, 0], [0, 0], [0, 1], [0, 0]], dtype=bool))
    with torch.no_grad():
        logits, _, (hs, cs) = model.policy.unroll(seq, model.policy.initial_state(2), starts)
    np.testing.assert_array_equal(np.stack(expected), logits.argmax(-1).numpy())
    np.testing.assert_allclose(state[0], hs[-1].numpy(), atol=1e-6)
    single, single_state = model.predict(obs[0, 0], deterministic=True)  # one observation, zero state
    assert np.ndim(single) == 0 and single_state[0].shape == (1, 32) and single == expected[0][0]
    masked, _ = model.policy.predict_masked(obs[0], np.array([[False, True], [False, True]]))
    assert (masked == 1).all()
    with pytest.raises(ValueError, match="units per env"):
        model.predict(obs[0], state=(np.zeros((2, 5)), np.zeros((2, 5))))


def test_lstm_save_load_roundtrip(tmp_path):
    model = ACER("LstmPolicy", make_vec_env("CartPole-v1", n_envs=2, seed=1), seed=1, replay_start=100,
                 device="cpu", policy_kwargs={"hidden_size": 16})
    model.learn(400)
    model.save(tmp_path / "acer.zip")
    loaded = ACER.load(tmp_path / "acer.zip", device="cpu")
    assert isinstance(loaded.policy, ACERLstmPolicy) and loaded.policy.hidden_size == 16
    obs = np.random.default_rng(0).normal(size=(6, 8, 4)).astype(np.float32)
    s1 = s2 = None
    for t in range(6):
        a1, s1 = model.predict(obs[t], state=s1, episode_start=np.full(8, t == 0), deterministic=True)
        a2, s2 = loaded.predict(obs[t], state=s2, episode_start=np.full(8, t == 0), deterministic=True)
        np.testing.assert_array_equal(a1, a2)
        np.testing.assert_array_equal(s1[0], s2[0])
    for a, b in zip(model.avg_policy.parameters(), loaded.avg_policy.parameters(), strict=True):
        assert torch.equal(a, b)
    loaded.set_env(make_vec_env("CartPole-v1", n_envs=2, seed=2))
    loaded.learn(100)  # training resumes after loading


@pytest.mark.slow
def test_lstm_acer_learns_cartpole():
    model = ACER("LstmPolicy", make_vec_env("CartPole-v1", n_envs=4, seed=0), seed=0, replay_start=500,
                 device="cpu")
    model.learn(40_000)  # about 25 s on one CPU thread
    mean, _ = evaluate_policy(model, Monitor(gym.make("CartPole-v1")), n_eval_episodes=10, deterministic=True)
    assert mean >= 100.0  # random play scores about 22; this seed reaches about 195


def test_lstm_acts_and_learns_with_action_masks():
    model = ACER("LstmPolicy", make_sb3_vec_env("S1", num_envs=2, max_steps=3), seed=0, n_steps=4, replay_start=8,
                 device="cpu")
    p = model.policy
    assert (p.torso[0].in_features, p.lstm.hidden_size, p.pi_head.out_features) == (300, 32, 18)  # SPEC's sizes
    cb = _collector(model)
    seg = model._collect_segment(cb)
    assert not seg["masks"].all() and (seg["mu"][~seg["masks"][:4]] == 0).all()
    logits = model._segment_forward(seg)[0].detach()
    probs = torch.softmax(logits.masked_fill(~torch.as_tensor(seg["masks"][:4]), -1e9), -1).numpy()
    np.testing.assert_allclose(probs, seg["mu"], rtol=1e-5, atol=1e-6)
    model.learn(16, reset_num_timesteps=False)
    assert all(np.isfinite(q.detach()).all() for q in model.policy.parameters())


# ------------------------------------------------------------------------------------ the replay


def test_replay_save_load_roundtrip(tmp_path):
    venv = make_vec_env("CartPole-v1", n_envs=2, seed=0, env_kwargs={"max_episode_steps": 7})
    model = ACER("LstmPolicy", venv, seed=0, n_steps=5, replay_start=20, device="cpu")
    model.learn(200)
    model.save_replay_buffer(tmp_path / "replay.pkl")
    assert not (tmp_path / "replay.pkl.tmp").exists()
    other = ACER("LstmPolicy", make_vec_env("CartPole-v1", n_envs=2, seed=5), seed=5, n_steps=5, device="cpu")
    other.load_replay_buffer(tmp_path / "replay.pkl")
    assert len(other.replay_buffer) == len(model.replay_buffer) == 20
    assert other.replay_buffer.capacity == model.replay_buffer.capacity
    for a, b in zip(model.replay_buffer.segments, other.replay_buffer.segments, strict=True):
        assert a.keys() == b.keys()
        for key in a:
            np.testing.assert_array_equal(a[key], b[key], err_msg=key)
    assert any(s["truncated"].any() for s in other.replay_buffer.segments)  # the compacted rows come back
    assert other._rng.random() == model._rng.random()  # the rng continues where it was saved
    torn = model.replay_buffer.state_dict()
    k = next(i for i, seg in enumerate(torn["segments"]) if seg["truncated"].any())
    torn["segments"][k] = {**torn["segments"][k], "trunc_obs": torn["segments"][k]["trunc_obs"][1:]}
    with pytest.raises(ValueError, match=f"replay segment {k} has .* truncated states"):
        other.replay_buffer.load_state_dict(torn)
    mlp = ACER("MlpPolicy", make_vec_env("CartPole-v1", n_envs=2), device="cpu")
    mlp.load_replay_buffer(tmp_path / "replay.pkl")  # LSTM segments also serve the MLP
    mlp.save_replay_buffer(tmp_path / "mlp.pkl")
    with pytest.raises(ValueError, match="without LSTM states"):
        other.load_replay_buffer(tmp_path / "mlp.pkl")
    wide = ACER("LstmPolicy", make_vec_env("CartPole-v1", n_envs=2), n_steps=5, device="cpu",
                policy_kwargs={"hidden_size": 16})
    with pytest.raises(ValueError, match="LSTM states of size 32.*hidden_size = 16"):
        wide.load_replay_buffer(tmp_path / "replay.pkl")
    with pytest.raises(ValueError, match="observations of shape"):
        ACER("MlpPolicy", make_vec_env("Acrobot-v1", n_envs=1), device="cpu").load_replay_buffer(tmp_path / "mlp.pkl")


def test_sb3_checkpoint_callback_saves_the_replay(tmp_path):
    model = ACER("MlpPolicy", make_vec_env("CartPole-v1", n_envs=2, seed=0), seed=0, n_steps=5, device="cpu")
    model.learn(40, callback=CheckpointCallback(10, str(tmp_path), name_prefix="acer", save_replay_buffer=True))
    assert (tmp_path / "acer_20_steps.zip").is_file()
    fresh = ACER("MlpPolicy", make_vec_env("CartPole-v1", n_envs=2), device="cpu")
    fresh.load_replay_buffer(tmp_path / "acer_replay_buffer_40_steps.pkl")
    assert len(fresh.replay_buffer) == 3  # saved at the 4th segment's last step, before that segment is stored


# ------------------------------------------------------------------------- the shipped planner


def test_shipped_mlp_checkpoint_still_loads_and_acts():
    from drl.train import BUILTIN_POLICIES, as_policy

    model = ACER.load(BUILTIN_POLICIES["default"], device="cpu")
    assert type(model.policy) is ACERPolicy and not model.recurrent
    venv = make_sb3_vec_env("S1", num_envs=1, max_steps=2)
    obs = venv.reset()
    mask = np.asarray(venv.reset_infos[0]["action_mask"], dtype=bool)
    action, state = model.predict(obs, deterministic=True)
    assert state is None and action.shape == (1,) and 0 <= action[0] < 18
    with torch.no_grad():  # the MLP's forward pass, written out
        p = model.policy
        logits = p.pi_head(p.torso(torch.as_tensor(obs))).numpy()
    assert action[0] == logits.argmax()
    assert model.policy.predict_masked(obs[0], mask) == np.where(mask, logits[0], -np.inf).argmax()
    assert as_policy(model)(obs[0], {"action_mask": mask.tolist(), "steps": 0}) == model.policy.predict_masked(obs[0],
                                                                                                              mask)
