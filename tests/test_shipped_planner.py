import numpy as np
import pytest

from drl.train import BUILTIN_POLICIES, load_policy
from drl.transfer import map_structures, policy_for_scenario
from rtenv.env import TPPTuningEnv


def test_map_structures_sees_and_moves_the_right_tpps():
    seen = {}

    def s1_policy(obs, info):
        seen["obs"], seen["mask"] = obs, info["action_mask"]
        return seen["action"]

    mapped = map_structures(s1_policy, 3, 5)
    obs = np.arange(500, dtype=np.float32)
    mask = np.arange(30) % 3 != 0
    # S1 TPP order t_PTV t_bl t_re l_PTV l_bl l_re V_PTV V_bl V_re -> S2 indices 0 1 2 5 6 7 10 11 12
    for s1_action, s2_action in [(0, 0), (1, 1), (5, 5), (6, 10), (9, 13), (12, 20), (17, 25)]:
        seen["action"] = s1_action
        assert mapped(obs, {"action_mask": mask}) == s2_action
    np.testing.assert_array_equal(seen["obs"], obs[:300])
    expected_mask = [mask[2 * t + d] for t in (0, 1, 2, 5, 6, 7, 10, 11, 12) for d in (0, 1)]
    np.testing.assert_array_equal(seen["mask"], expected_mask)
    assert map_structures(s1_policy, 3, 3) is s1_policy
    with pytest.raises(ValueError, match="source_structures"):
        map_structures(s1_policy, 4, 3)
    for count in (True, 2.0):
        with pytest.raises(ValueError, match=rf"source_structures = {count!r} must be an integer"):
            map_structures(s1_policy, count, 5)
    # an S1-sized observation or mask (3 structures) on the 5-structure wrapper: clear, not an IndexError
    with pytest.raises(ValueError, match=r"observation has shape \(300,\); an env with 5 structures gives \(500,\)"):
        mapped(obs[:300], {"action_mask": mask})
    with pytest.raises(ValueError, match=r"action_mask has shape \(18,\)"):
        mapped(obs, {"action_mask": mask[:18]})


def test_shipped_planner_runs_on_s2_and_s3():
    assert BUILTIN_POLICIES["default"].is_file()
    model = load_policy("acer:default")
    for scenario in ("S2", "S3"):
        env = TPPTuningEnv(scenario, action_mode="discrete", cohort="test", cases=[0], max_steps=2)
        obs, info = env.reset(seed=0, options={"index": 0})
        action = policy_for_scenario(model, scenario)(obs, info)
        assert 0 <= action < env.action_space.n and info["action_mask"][action]
        env.step(action)
    with pytest.raises(ValueError, match="cannot plan TG119"):
        wide = load_policy("acer:default")
        wide.observation_space = TPPTuningEnv("S2", action_mode="discrete").observation_space
        policy_for_scenario(wide, "TG119")


def test_shipped_knowledge_base_comes_from_the_shipped_planner():
    from drl.train import as_policy
    from knowledge_extraction.knowledge import export_knowledge, load_knowledge

    shipped = load_knowledge("S1-acer")
    assert shipped["source"]["policy"] == "acer:default" and shipped["source"]["successful"] == 20
    kb, summary = export_knowledge(as_policy(load_policy("acer:default")), "acer:default", "S1", "knowledge")
    assert summary["full_score_rate"] == 1.0
    for name, p in shipped["parameters"].items():
        np.testing.assert_allclose(kb["parameters"][name]["values"], p["values"], rtol=1e-6)
