"""Gymnasium environments: API conformance, dynamics, vector env, SB3 adapter and training."""

import copy
import dataclasses
import math
import re

import gymnasium as gym
import numpy as np
import pytest
from gymnasium.utils.env_checker import check_env as gym_check_env
from stable_baselines3 import A2C, DQN, PPO
from stable_baselines3.common.env_checker import check_env as sb3_check_env

import rtenv  # registers the ids
from rtenv.case import PlanningCase
from rtenv.env import ACTION_FACTORS, TPPTuningEnv, TPPTuningVectorEnv, fine_score
from rtenv.evaluation import Protocol, cumulative_dvh
from rtenv.rollout import evaluate_cohort
from rtenv.sb3 import make_sb3_vec_env
from rtenv.scenarios import load_case
from rtenv.tpp import TPP

IDS = ["rtenv/Prostate7Beam-v0", "rtenv/Prostate180Beam-v0", "rtenv/Liver7Beam-v0"]


@pytest.mark.slow
@pytest.mark.parametrize("env_id", IDS)
@pytest.mark.parametrize("mode", ["discrete", "continuous"])
def test_gymnasium_and_sb3_checkers(env_id, mode):
    env = gym.make(env_id, action_mode=mode, max_steps=3)
    gym_check_env(env.unwrapped, skip_render_check=False)
    sb3_check_env(gym.make(env_id, action_mode=mode, max_steps=3).unwrapped, warn=True)


def test_spaces_and_reset_info():
    env = TPPTuningEnv("S1")
    obs, info = env.reset(seed=0)
    assert env.observation_space.shape == (300,) and env.action_space.n == 18
    assert obs.dtype == np.float32 and obs.shape == (300,)
    assert obs[0] == pytest.approx(1.0, abs=0.06)  # ~95 % of the PTV gets >= Rx (D95 = Rx)
    assert info["tpp"] == TPP.default(["PTV", "Bladder", "Rectum"]).to_dict()
    assert info["score"] == info["initial_score"] and 0 <= info["score"] <= 9
    assert set(info["dv_metrics"]) == set(info["criteria"]) and info["case"] == "S1-train-0"
    assert rtenv.TPPTuningEnv is TPPTuningEnv and rtenv.TPPTuningVectorEnv is TPPTuningVectorEnv


def test_action_mask_marks_no_ops_at_the_clamps():
    env = TPPTuningEnv("S1")
    _, info = env.reset(seed=0)
    names = env.core.names
    no_ops = {2 * names.index("t_PTV") + 1, 2 * names.index("t_bladder"), 2 * names.index("t_rectum"),
              2 * names.index("V_bladder"), 2 * names.index("V_rectum")}  # at the default start
    assert info["action_mask"] == [a not in no_ops for a in range(18)]
    _, _, _, _, info = env.step(2 * names.index("t_rectum") + 1)  # t_rectum 1 -> 0.6: up is allowed again
    assert info["action_mask"][2 * names.index("t_rectum")]
    assert "action_mask" not in TPPTuningEnv("S1", action_mode="continuous").reset(seed=0)[1]
    venv = make_sb3_vec_env("S1", num_envs=2)
    venv.reset()
    assert [i["action_mask"] for i in venv.reset_infos] == [[a not in no_ops for a in range(18)]] * 2


def test_discrete_actions_follow_spec_factors():
    env = TPPTuningEnv("S1")
    env.reset(seed=0)
    names = env.core.names
    before = env.core.info(env._ep)["tpp"]
    _, _, _, _, info = env.step(2 * names.index("lambda_bladder"))  # up
    up = ACTION_FACTORS[("lambda", False)][0]
    assert info["tpp"]["lambda_bladder"] == pytest.approx(before["lambda_bladder"] * up)
    _, _, _, _, info = env.step(2 * names.index("t_PTV") + 1)  # down from 1: clamped at 1
    assert info["tpp"]["t_PTV"] == 1.0
    _, _, _, _, info = env.step(2 * names.index("V_PTV"))  # 0.1 * 1.25
    assert info["tpp"]["V_PTV"] == pytest.approx(0.125)
    with pytest.raises(ValueError, match=r"not an integer in \[0, 17\]"):
        env.step(18)


def test_reward_is_spec_delta_and_episode_truncates():
    env = TPPTuningEnv("S1", max_steps=3, cohort="test", cases=[1])
    _, info = env.reset(seed=1)
    prev_fine, prev_score = info["fine_score"], info["score"]
    for _ in range(3):
        _, reward, terminated, truncated, info = env.step(2 * 4)  # raise lambda_bladder
        assert reward == pytest.approx(info["fine_score"] - prev_fine + 4 * (info["score"] - prev_score), abs=1e-9)
        prev_fine, prev_score = info["fine_score"], info["score"]
        if terminated:
            assert info["full_score"]
            break
    assert terminated or truncated
    assert truncated == (not terminated)


def test_terminates_at_full_score():
    # a full-score TPP vector for S1 test case 4 (default start 4/9), found by benchmarks.calibration's CMA-ES
    found = {"t_PTV": 1.0042, "t_bladder": 0.9046, "t_rectum": 0.9116, "lambda_PTV": 3.1567,
             "lambda_bladder": 0.2103, "lambda_rectum": 4.5534, "V_PTV": 0.0566, "V_bladder": 0.9245,
             "V_rectum": 0.8949}
    env = TPPTuningEnv("S1", action_mode="continuous", cohort="test", cases=[4], scoring_mode="binary", max_steps=1)
    _, start = env.reset(seed=0)
    assert not start["full_score"] and start["score"] < 9
    _, reward, terminated, truncated, info = env.step(env.core.tpp_to_action(np.array(list(found.values()))))
    assert info["full_score"] and info["score"] == 9 and info["violated"] == []
    assert terminated and not truncated  # full score on the last allowed step ends the episode, not the time limit
    # SPEC reward: fine-score delta + 4 x score delta (here the score rises, so the weight shows)
    assert reward == pytest.approx(info["fine_score"] - start["fine_score"] + 4 * (9 - start["score"]), abs=1e-9)


def test_continuous_map_roundtrip():
    env = TPPTuningEnv("S1", action_mode="continuous")
    tpp = np.array([1.05, 0.6, 0.5, 5.0, 0.5, 2.0, 0.1, 0.5, 0.8])
    np.testing.assert_allclose(env.core.action_to_tpp(env.core.tpp_to_action(tpp)), tpp, rtol=1e-5)
    for edge in (1.0, -1.0):  # actions beyond the Box act as its edge
        beyond, at = env.core.action_to_tpp(np.full(9, 3 * edge)), env.core.action_to_tpp(np.full(9, edge))
        np.testing.assert_array_equal(beyond, at)
    env.reset(seed=0)
    _, _, _, _, info = env.step(env.core.tpp_to_action(tpp))
    np.testing.assert_allclose(list(info["tpp"].values()), tpp, rtol=1e-5)


def test_determinism_under_seed():
    def rollout(seed):
        env = TPPTuningEnv("S1", cases=2, start="random")
        obs, _ = env.reset(seed=seed)
        trace = [obs]
        rng = np.random.default_rng(7)
        for _ in range(4):
            obs, reward, term, trunc, _ = env.step(int(rng.integers(18)))
            trace += [obs, np.array([reward])]
            if term or trunc:
                break
        return np.concatenate(trace)

    a, b, c = rollout(3), rollout(3), rollout(4)
    np.testing.assert_array_equal(a, b)
    assert a.shape != c.shape or not np.array_equal(a, c)


def test_vector_env_matches_single_envs_and_autoresets():
    venv = gym.make_vec("rtenv/Prostate7Beam-v0", num_envs=4, vectorization_mode="vector_entry_point",
                        cases=2, start="random", max_steps=2)
    assert isinstance(venv.unwrapped, TPPTuningVectorEnv) or isinstance(venv, TPPTuningVectorEnv)
    obs, infos = venv.reset(seed=10)
    episodes = venv.unwrapped._eps
    singles = [TPPTuningEnv("S1", cases=2, start="random", max_steps=2) for _ in range(4)]
    actions = np.array([0, 5, 9, 13])
    rewards = np.zeros(4)
    for step in range(2):
        for i, env in enumerate(singles):
            if step == 0:
                o, info = env.reset(seed=10 + i)
            else:
                o, r, _, _, info = env.step(int(actions[i]))
                assert rewards[i] == r
            # batched solves are bitwise equal to single ones on CPU: identical episodes
            assert episodes[i].case_key == env._ep.case_key
            np.testing.assert_array_equal(episodes[i].tpp, env._ep.tpp)
            np.testing.assert_array_equal(obs[i], o)
        if step == 0:
            obs, rewards, terms, truncs, infos = venv.step(actions)
    obs, rewards, terms, truncs, infos = venv.step(actions)  # second step: every episode ends
    assert np.all(terms | truncs)
    assert infos["_final_obs"].all() and infos["final_obs"][0].shape == (300,)
    assert set(infos["final_info"]["steps"][infos["_final_info"]]) <= {1, 2}
    assert np.all(infos["steps"] == 0)  # already reset (same-step autoreset)


def _same_infos(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for k in a:
        if isinstance(a[k], dict):
            _same_infos(a[k], b[k])
        else:
            assert type(a[k]) is type(b[k]) and a[k].dtype == b[k].dtype and a[k].shape == b[k].shape, k
            for x, y in zip(a[k], b[k], strict=True):
                assert np.array_equal(x, y) if isinstance(x, (list, np.ndarray)) else x == y, k


def test_vector_infos_equal_gymnasiums_fold():
    """The vector env stacks infos key by key; the result must equal folding Gymnasium's
    ``_add_info`` over the envs, also with keys that only some envs have."""
    venv = TPPTuningVectorEnv(num_envs=3, scenario="S1")
    venv.reset(seed=0)
    per_env = [venv.core.info(ep) for ep in venv._eps]
    per_env[1] = {**per_env[1], "final_info": dict(per_env[2]), "extra": np.ones(3, dtype=np.float32)}
    folded: dict = {}
    for i, info in enumerate(per_env):
        folded = venv._add_info(folded, info, i)
    _same_infos(venv._stack_infos(per_env), folded)
    assert list(venv._stack_infos(per_env)["_extra"]) == [False, True, False]


def test_vector_env_equals_gymnasiums_sync_vector_env():
    """Same-step autoreset as Gymnasium's own SyncVectorEnv over single envs: the same
    observations, rewards, flags and infos, ``final_obs`` / ``final_info`` layout included."""
    kw = {"cases": 2, "start": "random", "max_steps": 2}
    ours = TPPTuningVectorEnv(num_envs=3, scenario="S1", **kw)
    sync = gym.vector.SyncVectorEnv([lambda: TPPTuningEnv("S1", **kw) for _ in range(3)],
                                    autoreset_mode=gym.vector.AutoresetMode.SAME_STEP)
    (o1, i1), (o2, i2) = ours.reset(seed=5), sync.reset(seed=5)
    np.testing.assert_array_equal(o1, o2)
    _same_infos(i1, i2)
    compared_final = False
    for actions in ([0, 4, 9], [2, 7, 12], [1, 1, 1]):  # every episode ends at the second step
        a, b = ours.step(np.array(actions)), sync.step(np.array(actions))
        for x, y in zip(a[:4], b[:4], strict=True):
            np.testing.assert_array_equal(x, y)
        _same_infos(a[4], b[4])
        compared_final |= "final_info" in a[4]
    assert compared_final


def test_next_step_autoreset_equals_gymnasiums_sync_vector_env():
    """``autoreset_mode=NEXT_STEP`` as Gymnasium's SyncVectorEnv in that mode: the step after an
    episode ends restarts it (action ignored, reward 0); Gymnasium's vector observation wrappers,
    which refuse same-step autoreset, take it."""
    kw = {"cases": 2, "start": "random", "max_steps": 2}
    mode = gym.vector.AutoresetMode.NEXT_STEP
    ours = gym.make_vec("rtenv/Prostate7Beam-v0", num_envs=3, vectorization_mode="vector_entry_point",
                        autoreset_mode="NextStep", **kw)
    sync = gym.vector.SyncVectorEnv([lambda: TPPTuningEnv("S1", **kw) for _ in range(3)], autoreset_mode=mode)
    assert ours.metadata["autoreset_mode"] == mode
    (o1, i1), (o2, i2) = ours.reset(seed=5), sync.reset(seed=5)
    np.testing.assert_array_equal(o1, o2)
    _same_infos(i1, i2)
    restarted = False
    for actions in ([0, 4, 9], [2, 7, 12], [1, 1, 1], [3, 5, 8], [6, 0, 2]):  # episodes end at every second step
        a, b = ours.step(np.array(actions)), sync.step(np.array(actions))
        for x, y in zip(a[:4], b[:4], strict=True):
            np.testing.assert_array_equal(x, y)
        _same_infos(a[4], b[4])
        restarted |= bool(np.all(a[1] == 0) and np.all(a[4]["steps"] == 0))
    assert restarted
    ours.reset(seed=5)  # a reset clears the pending restarts
    assert not ours.unwrapped._ended.any()
    wrapped = gym.wrappers.vector.NormalizeObservation(ours)
    wrapped.reset(seed=0)
    wrapped.step(np.array([0, 1, 2]))
    with pytest.raises(ValueError, match=r"autoreset_mode 'Disabled' is not supported; valid: AutoresetMode.SAME_STEP"):
        TPPTuningVectorEnv(2, autoreset_mode=gym.vector.AutoresetMode.DISABLED.value)


def test_async_vector_env_forked_after_the_parent_solved_a_plan():
    """Gymnasium's AsyncVectorEnv with the fork start method, from a process whose torch thread
    pool has run (a forked child used to wait forever in the TPS's first sparse product)."""
    kw = {"cases": 2, "max_steps": 2}
    TPPTuningEnv("S1", **kw).reset(seed=0)  # the parent solves a plan first
    forked = gym.vector.AsyncVectorEnv([lambda: TPPTuningEnv("S1", **kw) for _ in range(2)], context="fork")
    sync = gym.vector.SyncVectorEnv([lambda: TPPTuningEnv("S1", **kw) for _ in range(2)])
    try:
        forked.reset_async(seed=3)
        (o1, _), (o2, _) = forked.reset_wait(timeout=120), sync.reset(seed=3)
        np.testing.assert_array_equal(o1, o2)
        forked.step_async(np.array([0, 5]))
        a, b = forked.step_wait(timeout=120), sync.step(np.array([0, 5]))
        for x, y in zip(a[:4], b[:4], strict=True):
            np.testing.assert_array_equal(x, y)
    finally:
        forked.close(terminate=True)
        sync.close()


def test_deepcopy_of_a_running_env_continues_alike_and_apart():
    import copy

    env = gym.make("rtenv/Prostate7Beam-v0", cases=2, max_steps=4)
    env.reset(seed=1)
    env.step(3)
    twin = copy.deepcopy(env)
    a, b = env.step(5), twin.step(5)
    for x, y in zip(a[:4], b[:4], strict=True):
        np.testing.assert_array_equal(x, y)
    assert a[4]["tpp"] == b[4]["tpp"]
    dose = env.unwrapped.dose.copy()
    twin.step(0)  # the copy moves alone
    assert np.array_equal(env.unwrapped.dose, dose) and not np.array_equal(twin.unwrapped.dose, dose)
    venv = TPPTuningVectorEnv(num_envs=2, scenario="S1", cases=2, max_steps=4)
    venv.reset(seed=1)
    vtwin = copy.deepcopy(venv)
    for x, y in zip(venv.step(np.array([1, 2]))[:4], vtwin.step(np.array([1, 2]))[:4], strict=True):
        np.testing.assert_array_equal(x, y)


def test_envs_of_a_process_share_each_cases_tps():
    """A SyncVectorEnv's sub-envs hold one TPS per case between them, not one each; other
    settings get their own, and a TPS no env uses is freed."""
    import gc
    import weakref

    from rtenv.tps import ADMMSettings

    sync = gym.vector.SyncVectorEnv([lambda: TPPTuningEnv("S1", cohort="test", cases=2) for _ in range(3)])
    sync.reset(seed=0)
    cores = [e.unwrapped.core for e in sync.envs]
    for key in (("test", 0), ("test", 1)):
        assert len({id(core.tps(key)) for core in cores}) == 1
    other = TPPTuningEnv("S1", cohort="test", cases=2, tps_settings=ADMMSettings(max_iter=30))
    assert other.core.tps(("test", 0)) is not cores[0].tps(("test", 0))
    assert other.core.tps(("test", 0)).settings.max_iter == 30
    gone = weakref.ref(cores[0].tps(("test", 1)))
    del sync, cores
    gc.collect()
    assert gone() is None


def test_a_core_keeps_running_cases_and_the_recent_ones_loaded():
    """A pass over many cases holds only ``recent_cases`` of them besides the running ones; a
    running case stays loaded even when more recent ones push it out of that list."""
    import gc
    import weakref

    venv = TPPTuningVectorEnv(num_envs=3, scenario="S1", cohort="test", cases=6, max_steps=2)
    venv.core.recent_cases = 1
    venv.reset(seed=0, options={"index": 0})
    env = TPPTuningEnv("S1", cohort="test", cases=6)
    env.core.recent_cases = 2
    seen = []
    for i in range(6):
        env.reset(seed=0, options={"index": i})
        seen.append(weakref.ref(env.core.tps(("test", i))))
    gc.collect()
    assert [r() is not None for r in seen] == [True, False, False, False, True, True]  # case 0: venv's
    assert len(env.core._recent) == 2
    # venv's three episodes on case 0 outlive its list, which the other cases took over
    for i in (1, 2):
        venv.core.tps(("test", i))
    assert ("test", 0) not in venv.core._recent and venv._eps[0].tps is seen[0]()
    obs, *_ = venv.step(np.array([0, 1, 2]))
    assert obs.shape == (3, venv.single_observation_space.shape[0])
    env.core.recent_cases = 0
    with pytest.raises(ValueError, match=r"recent_cases = 0 must be an integer in \[1, inf\]"):
        env.reset(seed=0, options={"index": 1})


def test_partial_reset_equals_gymnasiums_sync_vector_env():
    """``options["reset_mask"]`` resets only the marked envs, as in Gymnasium's vector envs."""
    kw = {"cases": 3, "start": "random", "max_steps": 5}
    ours = TPPTuningVectorEnv(num_envs=3, scenario="S1", **kw)
    sync = gym.vector.SyncVectorEnv([lambda: TPPTuningEnv("S1", **kw) for _ in range(3)],
                                    autoreset_mode=gym.vector.AutoresetMode.SAME_STEP)
    ours.reset(seed=3), sync.reset(seed=3)
    ours.step(np.array([0, 4, 9])), sync.step(np.array([0, 4, 9]))
    for steps_before, seed in enumerate((None, 11), start=1):
        mask = np.array([True, False, True])
        (o1, i1), (o2, i2) = (v.reset(seed=seed, options={"reset_mask": mask}) for v in (ours, sync))
        np.testing.assert_array_equal(o1, o2)
        _same_infos(i1, i2)
        assert not i1["_score"][1] and ours._eps[1].steps == steps_before  # env 1 goes on
        a, b = ours.step(np.array([2, 7, 12])), sync.step(np.array([2, 7, 12]))
        for x, y in zip(a[:4], b[:4], strict=True):
            np.testing.assert_array_equal(x, y)
    for bad in (np.array([1, 0, 1]), np.array([True, False]), [True, False, True], np.zeros(3, dtype=bool)):
        with pytest.raises(ValueError, match="reset_mask"):
            ours.reset(options={"reset_mask": bad})
    with pytest.raises(RuntimeError, match="without a reset_mask first"):
        TPPTuningVectorEnv(num_envs=2, scenario="S1").reset(options={"reset_mask": np.array([True, False])})


def test_a_failed_vector_reset_changes_nothing():
    venv = TPPTuningVectorEnv(num_envs=2, scenario="S1", cohort="test", cases=3, start="random")
    twin = TPPTuningVectorEnv(num_envs=2, scenario="S1", cohort="test", cases=3, start="random")
    venv.reset(seed=4), twin.reset(seed=4)
    with pytest.raises(ValueError, match="outside cohort 'test'"):
        venv.reset(seed=9, options=[None, {"index": 99}])
    (o1, i1), (o2, i2) = venv.reset(), twin.reset()  # both continue the seed-4 generators
    np.testing.assert_array_equal(o1, o2)
    assert i1["case"].tolist() == i2["case"].tolist()


def test_a_masked_reset_before_the_first_reset_is_refused_and_changes_nothing():
    venv = TPPTuningVectorEnv(num_envs=2, scenario="S1")
    with pytest.raises(RuntimeError, match="call reset\\(\\) without a reset_mask first"):
        venv.reset_episodes(seed=0, mask=np.array([True, False]))
    obs, _ = venv.reset(seed=0)
    assert obs.shape == (2, 300) and venv.step(np.array([0, 1]))[0].shape == (2, 300)


def test_make_vec_max_episode_steps_sets_the_episode_length():
    venv = gym.make_vec("rtenv/Prostate7Beam-v0", num_envs=2, max_episode_steps=2)
    venv.reset(seed=0)
    truncated = [venv.step(np.array([1, 3]))[3] for _ in range(2)]
    assert not truncated[0].any() and truncated[1].all()  # (no default start of S1-train-0 is at full score)


def test_reset_without_seed_keeps_the_generators():
    venv = TPPTuningVectorEnv(num_envs=2, scenario="S1", cases=4, start="random")
    single = [TPPTuningEnv("S1", cases=4, start="random") for _ in range(2)]
    venv.reset(seed=1)
    for i, env in enumerate(single):
        env.reset(seed=1 + i)
    # later resets continue each env's seeded stream, as Gymnasium's envs do; a seed list may
    # reseed some envs and leave the others (None) going
    for seeds in (None, None, [None, 7]):
        venv.reset(seed=seeds)
        for i, env in enumerate(single):
            env.reset(seed=None if seeds is None else seeds[i])
            assert venv._eps[i].case_key == env._ep.case_key
            np.testing.assert_array_equal(venv._eps[i].tpp, env._ep.tpp)


def test_reset_into_another_cohort_draws_from_that_cohort():
    env = TPPTuningEnv("S1", cohort="knowledge")  # 20 cases; the test cohort has 10
    cases = {env.reset(seed=seed, options={"cohort": "test"})[1]["case"] for seed in range(3)}
    assert all(c.startswith("S1-test-") and int(c.rsplit("-", 1)[1]) < 10 for c in cases)
    with pytest.raises(ValueError, match="unknown cohort 'validation'"):
        env.reset(options={"cohort": "validation"})


def test_own_cases_tune_as_the_built_in_ones(tmp_path):
    built = [load_case("S1", "test", i) for i in (3, 4)]
    saved = PlanningCase.load(built[1].save(tmp_path / "mine.rtcase"))  # as `rtenv cases import` leaves it
    own = [built[0], dataclasses.replace(saved, name="my-patient")]
    env, ref = TPPTuningEnv("S1", cases=own), TPPTuningEnv("S1", cohort="test", cases=[4])
    (obs, info), (ref_obs, ref_info) = env.reset(seed=0, options={"index": 1}), ref.reset(seed=0)
    assert (info["case"], ref_info["case"]) == ("my-patient", "S1-test-4")
    np.testing.assert_array_equal(obs, ref_obs)
    for action in (0, 3, 5):
        step, ref_step = env.step(action), ref.step(action)
        np.testing.assert_array_equal(step[0], ref_step[0])
        assert step[1:4] == ref_step[1:4] and step[4]["tpp"] == ref_step[4]["tpp"]
    # resets draw from the own cases; a built-in cohort is still a reset option away
    assert {env.reset(seed=seed)[1]["case"] for seed in range(8)} == {"S1-test-3", "my-patient"}
    assert env.reset(options={"cohort": "test", "index": 2})[1]["case"] == "S1-test-2"
    vec = TPPTuningVectorEnv(4, "S1", cases=own)
    assert set(vec.reset(seed=1)[1]["case"]) == {"S1-test-3", "my-patient"}
    assert vec.core.tps(("own", 1)) is env.core.tps(("own", 1))  # envs given one case object share its TPS
    assert info["prescription_gy"] == 79.2
    # an own case is scored with its own protocol: the S1 anatomy at DOLA's 60 Gy / 20 fx
    dola = dataclasses.replace(built[0], name="dola", protocol="profit60", prescription_gy=60.0, fractions=20)
    _, info = TPPTuningEnv("S1", cases=[dola]).reset(seed=0)
    assert info["max_score"] == 160 and "PTV V58.5Gy" in info["criteria"] and info["prescription_gy"] == 60.0
    with pytest.raises(ValueError, match=r"scenario S3 works on \('PTV', 'Liver', 'Heart'\)"):
        TPPTuningEnv("S3", cases=own)
    with pytest.raises(ValueError, match=r"case index 2 is outside the range \[0, 1\] of the 2 own cases"):
        env.reset(options={"index": 2})


def test_fine_score_is_smooth_beyond_the_ramp():
    env = TPPTuningEnv("S1")
    _, info = env.reset(seed=0)
    assert abs(fine_score(env._ep.result) - info["score"]) < 1.0
    # the hot-spot ramp at its goal (3 hottest PTV voxels at 107 % Rx): 1/2 - arctan(2 (g - m) / h) / pi with
    # g - m = -h, the half-width; the 8 OAR criteria are met
    rx = 79.2
    doses = {"PTV": np.concatenate([np.full(3, 1.07 * rx), np.full(50, rx)]), "Bladder": np.full(100, 10.0),
             "Rectum": np.full(100, 10.0)}
    result = Protocol.load("prostate9").evaluate(doses, 0.027)
    assert fine_score(result) == pytest.approx(8 + 0.5 + math.atan(2.0) / math.pi)
    # TG-119's hot spot is the PTV's D10 (goal 55 Gy, limit 57.5 Gy): smoothed the same way, where the
    # linear score was used as it is (no reward beyond its goal or limit)
    doses = {"PTV": np.full(100, 55.0), "Core": np.full(100, 10.0)}
    result = Protocol.load("tg119").evaluate(doses, 0.027)
    assert result.total == 3.0 and fine_score(result) == pytest.approx(2 + 0.5 + math.atan(2.0) / math.pi)


def test_a_failed_reset_leaves_the_env_as_it_was():
    env = TPPTuningEnv("S1", cohort="test", start="random")
    _, info = env.reset(seed=0)
    state = copy.deepcopy(env.np_random.bit_generator.state)
    for seed in (123, None):  # a new seed, or the running generator, whose draws the failed reset used
        with pytest.raises(ValueError, match="index"):
            env.reset(seed=seed, options={"index": 99})
        assert env.np_random.bit_generator.state == state and env.case.name == info["case"]
    twin = TPPTuningEnv("S1", cohort="test", start="random")
    twin.reset(seed=0)
    assert env.reset()[1]["tpp"] == twin.reset()[1]["tpp"]  # as if the failed resets had not happened


def test_solve_warm_starts_each_episode_as_asked_across_cases():
    from rtenv.env import EpisodeState, TuningCore
    from rtenv.tpp import TPP

    core = TuningCore("S1", cohort="test", cases=2)
    episodes = [EpisodeState(("test", i), TPP.default(core.structures).values.copy()) for i in (0, 1)]
    core.reset_batch(episodes)
    a, b = episodes
    b.tpp = core.apply_action(b.tpp, 9)
    alone, pair = copy.copy(b), copy.copy(b)
    core.solve([alone], warm=[True])
    core.solve([copy.copy(a), pair], warm=[False, True])  # the flag of b's own position, not its place in its case
    np.testing.assert_array_equal(pair.dose, alone.dose)


def test_steps_warm_start_from_the_previous_solve():
    env = TPPTuningEnv("S1")
    env.reset(seed=0)
    warm = env._ep.warm_start.copy()
    env.step(2 * 4)  # raise lambda_bladder
    tps, tpp = env._ep.tps, env._ep.tpp
    np.testing.assert_array_equal(env.dose, tps.optimize(tpp, x0=warm).dose[0])
    assert not np.array_equal(env.dose, tps.optimize(tpp).dose[0])  # a cold start ends elsewhere


def test_observation_is_the_cumulative_dvh_over_specs_ranges():
    env = TPPTuningEnv("S1")
    obs, _ = env.reset(seed=0)
    case, rx = env.case, env.case.prescription_gy
    ranges = {"PTV": (1.0, 1.15), "Bladder": (0.6, 1.1), "Rectum": (0.6, 1.1)}  # SPEC section 3, relative to Rx
    expected = np.concatenate([cumulative_dvh(env.dose[case.structure(s).rows], np.linspace(*ranges[s], 100) * rx)
                               for s in case.structure_names])
    np.testing.assert_allclose(obs, expected, atol=1e-6)


def test_render_modes():
    env = TPPTuningEnv("S1", render_mode="rgb_array")
    env.reset(seed=0)
    img = env.render()
    assert img.shape == (360, 720, 3) and img.dtype == np.uint8 and img.std() > 0
    env = TPPTuningEnv("S1", render_mode="ansi")
    env.reset(seed=0)
    assert "Rectum V75Gy" in env.render()
    venv = TPPTuningVectorEnv(2, scenario="S1", render_mode="ansi")
    venv.reset(seed=0)
    frames = venv.render()  # Gymnasium's VectorEnv.render returns a tuple of frames
    assert isinstance(frames, tuple) and len(frames) == 2 and "Rectum V75Gy" in frames[0]


def test_a_step_down_never_raises_a_tpp_below_the_floor():
    env = TPPTuningEnv("S1")
    start = TPP.default(["PTV", "Bladder", "Rectum"]).replace(V_PTV=5e-4).values  # below the 1e-3 floor
    _, info = env.reset(seed=0, options={"tpp": start})
    down = 2 * env.core.names.index("V_PTV") + 1
    assert not info["action_mask"][down] and info["action_mask"][down - 1]
    _, _, _, _, info = env.step(down)
    assert info["tpp"]["V_PTV"] == 5e-4


def test_bad_arguments():
    with pytest.raises(ValueError, match="action_mode 'box'"):
        TPPTuningEnv("S1", action_mode="box")
    with pytest.raises(ValueError, match="unknown scenario 'S9'"):
        TPPTuningEnv("S9")
    with pytest.raises(ValueError, match=r"got a PlanningCase \(an imported case goes to the environments as cases="):
        TPPTuningEnv(load_case("S1", "test", 0))  # was an unhashable-type TypeError
    with pytest.raises(ValueError, match=r"cases = a dict must be a number of cases, a sequence of case indices or "):
        TPPTuningEnv("S1", cases={i: i for i in range(100)})  # a long value is named by its type
    # and a list of case indices is not a list of own cases: evaluate_cohort takes a count or cases
    with pytest.raises(ValueError, match=r"cases = \[0, 1\] must be an integer"):
        evaluate_cohort(lambda obs, info: 0, "S1", cohort="test", cases=[0, 1])
    with pytest.raises(ValueError, match="unknown reset options"):
        TPPTuningEnv("S1").reset(options={"case": 1})
    with pytest.raises(ValueError, match="t_PTV"):
        TPPTuningEnv("S1").reset(options={"tpp": np.full(9, 5.0)})
    for index in (1.7, "2", True):
        with pytest.raises(ValueError, match=f"index = {index!r} must be an integer case index"):
            TPPTuningEnv("S1", cases=3).reset(options={"index": index})
    with pytest.raises(ValueError, match="start 'bogus' is invalid"):
        TPPTuningEnv("S1").reset(options={"start": "bogus", "tpp": np.array([1, 1, 1, 1, 1, 1, 0.1, 1, 1])})
    with pytest.raises(ValueError, match="render_mode 'human' is invalid"):
        TPPTuningVectorEnv(2, render_mode="human")
    with pytest.raises(ValueError, match=r"num_envs = True must be an integer in \[1, inf\]"):
        TPPTuningVectorEnv(True)
    assert TPPTuningVectorEnv(np.int64(2)).num_envs == 2
    with pytest.raises(ValueError, match="max_steps = 5 and max_episode_steps = 7 name the same episode length"):
        TPPTuningVectorEnv(2, max_steps=5, max_episode_steps=7)
    with pytest.raises(ValueError, match=r"reset option tpp is for structures \('PTV', 'Liver', 'Heart'\)"):
        TPPTuningEnv("S1").reset(options={"tpp": TPP.default(("PTV", "Liver", "Heart"))})
    with pytest.raises(ValueError, match="cases = 5.0 must be a number of cases, a sequence of case indices or"):
        TPPTuningEnv("S1", cohort="test", cases=5.0)
    with pytest.raises(ValueError, match=r"case indices \[12\] are outside the range \[0, 9\] of cohort 'test'"):
        TPPTuningEnv("S1", cohort="test", cases=[0, 12])
    assert TPPTuningEnv("S1", cohort="test", cases=np.int64(2)).core.case_indices == [0, 1]
    assert TPPTuningEnv("S1", max_steps=np.int64(5)).core.max_steps == 5
    with pytest.raises(ValueError, match="scoring_mode 'bogus' is invalid"):  # at construction, not reset
        TPPTuningEnv("S1", scoring_mode="bogus")
    env = TPPTuningEnv("S1")
    env.reset(seed=0)
    for action in (8.9, "8", np.array([8]), True, np.float32(-0.5), 18):
        assert action is True or not env.action_space.contains(action)  # (Discrete takes bools as ints)
        with pytest.raises(ValueError, match=rf"action {re.escape(repr(action))} is not an integer in \[0, 17\]"):
            env.step(action)
    env.step(np.array(8))  # a 0-d integer array is a valid action
    cont = TPPTuningEnv("S1", action_mode="continuous")
    cont.reset(seed=0)
    with pytest.raises(ValueError, match=r"9 finite values, got \[0.0, nan, "):
        cont.step(np.array([0.0, np.nan, 0, 0, 0, 0, 0, 0, 0]))
    with pytest.raises(ValueError, match=r"9 finite values, got shape \(8,\)"):
        cont.step(np.zeros(8))


def test_a_bad_vector_action_changes_no_env():
    venv = TPPTuningVectorEnv(3, scenario="S1")
    venv.reset(seed=0)
    before = [(ep.tpp.copy(), ep.steps) for ep in venv._eps]
    for actions, pattern in (([8, 8, 99], "action np.int64(99) is not an integer"),
                             ([8, 8], "got 2 actions for 3 envs"),
                             (3, "actions array(3) must hold one action per env, shape (3,)")):
        with pytest.raises(ValueError, match=re.escape(pattern)):
            venv.step(np.array(actions))
        assert all(np.array_equal(ep.tpp, t) and ep.steps == n for ep, (t, n) in zip(venv._eps, before, strict=True))


@pytest.mark.slow
@pytest.mark.parametrize("algo", [PPO, A2C, DQN])
def test_sb3_algorithms_train_through_vector_adapter(algo):
    venv = make_sb3_vec_env("S1", num_envs=4, max_steps=5)
    kwargs = {"n_steps": 16} if algo in (PPO, A2C) else {"learning_starts": 32, "buffer_size": 1000}
    if algo is PPO:
        kwargs["batch_size"] = 32
    model = algo("MlpPolicy", venv, seed=0, device="cpu", **kwargs)
    model.learn(total_timesteps=256)
    assert model.num_timesteps >= 256
    action, _ = model.predict(venv.reset(), deterministic=True)
    assert action.shape == (4,)


def test_sb3_adapter_hands_over_terminal_observations():
    venv = make_sb3_vec_env("S1", num_envs=2, max_steps=1)
    venv.seed(0)
    first = venv.reset()
    venv.step_async(np.array([0, 1]))
    obs, rewards, dones, infos = venv.step_wait()
    assert dones.all() and obs.shape == (2, 300)
    for i, info in enumerate(infos):  # the finished episode's last observation, as a single env gives it
        single = TPPTuningEnv("S1", max_steps=1)
        single.reset(seed=i)
        np.testing.assert_array_equal(info["terminal_observation"], single.step(i)[0])
    np.testing.assert_array_equal(obs, first)  # and the new episodes' first ones (default start)
    for info, new in zip(infos, venv.reset_infos, strict=True):  # as SB3's DummyVecEnv hands them over
        assert info["terminal_observation"].shape == (300,)
        assert info["TimeLimit.truncated"] == (not info["full_score"])
        assert info["episode"]["l"] == 1 and info["steps"] == 1 and "final_info" not in info
        assert new["steps"] == 0 and new["score"] == new["initial_score"]
    venv.step_async(np.array([2, 3]))
    _, rewards, _, infos = venv.step_wait()
    assert [info["episode"]["r"] for info in infos] == pytest.approx(rewards.tolist())
    venv.set_options({"index": 1})  # options reach the next reset only, one dict or one per env
    venv.reset()
    assert [i["case"] for i in venv.reset_infos] == ["S1-train-1"] * 2
    assert [i["case"] for i in (venv.reset(), venv.reset_infos)[1]] == ["S1-train-0"] * 2
    venv.set_options([{"index": 1}, {"index": 0}])
    venv.reset()
    assert [i["case"] for i in venv.reset_infos] == ["S1-train-1", "S1-train-0"]
    randomised = make_sb3_vec_env("S1", num_envs=2, start="random")  # seeds too reach the next reset only
    starts = []
    for seed in (3, 3, 4):
        randomised.seed(seed)
        starts.append(randomised.reset())
    np.testing.assert_array_equal(starts[0], starts[1])
    assert not np.array_equal(starts[0], starts[2]) and not np.array_equal(randomised.reset(), starts[0])


def test_sb3_evaluate_policy_reads_the_adapters_episode_info():
    import warnings

    from stable_baselines3.common.evaluation import evaluate_policy
    from stable_baselines3.common.monitor import Monitor

    class Raise:  # raises t_rectum each step: the episodes end at max_steps
        def predict(self, obs, state=None, episode_start=None, deterministic=True):
            return np.full(len(obs), 4), None

    venv = make_sb3_vec_env("S1", num_envs=2, max_steps=2)
    assert venv.env_is_wrapped(Monitor) == [True, True] and venv.env_is_wrapped(gym.Wrapper) == [False, False]
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no "not wrapped with a Monitor" warning
        returns, lengths = evaluate_policy(Raise(), venv, n_eval_episodes=2, return_episode_rewards=True)
    single = TPPTuningEnv("S1", max_steps=2)
    single.reset(seed=0)
    expected = sum(single.step(4)[1] for _ in range(2))
    assert lengths == [2, 2] and returns == pytest.approx([expected, expected])


def test_sb3_adapter_per_env_attributes_methods_and_images():
    venv = make_sb3_vec_env("S1", num_envs=2, cases=2, render_mode="rgb_array")
    venv.set_options([{"index": 1}, {"index": 0}])
    venv.reset()
    venv.step_async(np.array([2 * 2 + 1, 0]))  # env 0 lowers t_rectum: its up action is allowed again
    infos = venv.step_wait()[3]
    assert [c.name for c in venv.get_attr("case")] == ["S1-train-1", "S1-train-0"]
    assert venv.get_attr("case", indices=1)[0].name == "S1-train-0"
    assert venv.get_attr("action_space") == [venv.action_space] * 2
    assert venv.get_attr("render_mode") == ["rgb_array"] * 2
    assert infos[0]["action_mask"] != infos[1]["action_mask"]
    assert [m.tolist() for m in venv.env_method("action_masks")] == [i["action_mask"] for i in infos]
    assert venv.env_method("action_masks", indices=[1])[0].tolist() == infos[1]["action_mask"]
    assert venv.metadata["render_fps"] == 2  # the env's, as SB3's DummyVecEnv hands on
    frames = venv.get_images()
    assert len(frames) == 2 and frames[0].ndim == 3 and frames[0].dtype == np.uint8
    assert venv.render().shape[2] == 3  # SB3 tiles the frames
    with pytest.raises(NotImplementedError, match="env_method\\('reset_episodes'\\) has no per-env form"):
        venv.env_method("reset_episodes", indices=[1])
    with pytest.raises(ValueError, match="must apply to all 2 envs"):
        venv.set_attr("render_mode", None, indices=[0])
    with pytest.raises(IndexError, match=r"env indices \[5\] are outside \[-2, 1\]"):
        venv.get_attr("case", indices=[5])
    assert venv.get_attr("case", indices=-1)[0].name == "S1-train-0"  # from the end, as in DummyVecEnv
    single = TPPTuningEnv("S1")
    _, info = single.reset(seed=0)
    assert single.action_masks().tolist() == info["action_mask"]


def test_run_episode_takes_gym_make_envs():
    from rtenv.rollout import run_episode

    record = run_episode(gym.make("rtenv/Prostate7Beam-v0", max_steps=2), lambda obs, info: 0, seed=0)
    assert record.case == "S1-train-0" and record.steps == 2
    with pytest.raises(TypeError, match="needs a TPPTuningEnv"):
        run_episode(gym.make("CartPole-v1"), lambda obs, info: 0)
