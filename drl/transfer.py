"""Running a discrete-action planner on a scenario with more structures than it was trained on.

A planner trained on S1 (PTV, bladder, rectum: 300 observations, 18 actions) runs unchanged on S3
(PTV, liver, heart: the same shapes; structures map by position, the target to the target and the
OARs in order). S2 adds two femoral heads (500 observations, 30 actions): :func:`map_structures`
shows the planner the DVHs of the target's first ``k`` structures (PTV, bladder, rectum), maps
its action "TPP kind ``c`` of structure ``s``, up or down" to the same kind and structure of the
larger TPP vector, and leaves the TPPs of the other structures where they start. The env's
``info["action_mask"]`` is mapped the same way.

TPP and action layout (see :class:`rtenv.env.TPPTuningEnv`): the TPP vector holds all
thresholds, then all weights, then all volume fractions, each in structure order; action
``2 j`` raises TPP ``j`` and ``2 j + 1`` lowers it.
"""

from __future__ import annotations

from typing import Any

import numpy as np
from stable_baselines3.common.base_class import BaseAlgorithm

from drl.train import as_policy
from rtenv.env import DVH_POINTS
from rtenv.rollout import Policy
from rtenv.scenarios import get_scenario
from rtenv.tpp import KINDS
from rtenv.validation import check_integer

#: TPP kinds per structure (threshold t, weight lambda, volume fraction V), in vector order.
TPP_KINDS = len(KINDS)


def map_structures(policy: Policy, source_structures: int, target_structures: int) -> Policy:
    """Wrap a discrete ``policy(obs, info) -> action`` trained on ``source_structures`` structures
    so it acts on an env with ``target_structures >= source_structures`` structures (the first
    ``source_structures`` of the target are the ones it sees and tunes)."""
    n = check_integer("target_structures", target_structures, 1)
    k = check_integer("source_structures", source_structures, 1, n)
    if source_structures == target_structures:
        return policy
    # source TPP j = c k + s  ->  target TPP c n + s; actions 2 j + d -> 2 (c n + s) + d
    tpp_map = np.array([c * n + s for c in range(TPP_KINDS) for s in range(k)])
    action_map = np.array([2 * t + d for t in tpp_map for d in (0, 1)])
    seen = slice(0, k * DVH_POINTS)

    def act(obs: np.ndarray, info: dict[str, Any] | None) -> int:
        obs = np.asarray(obs)
        if obs.shape != (n * DVH_POINTS,):
            raise ValueError(f"observation has shape {obs.shape}; an env with {n} structures gives "
                             f"({n * DVH_POINTS},)")
        sub_info = dict(info or {})
        if sub_info.get("action_mask") is not None:
            mask = np.asarray(sub_info["action_mask"], bool)
            if mask.shape != (2 * TPP_KINDS * n,):
                raise ValueError(f"action_mask has shape {mask.shape}; an env with {n} structures gives "
                                 f"({2 * TPP_KINDS * n},)")
            sub_info["action_mask"] = mask[action_map]
        return int(action_map[int(policy(obs[seen], sub_info))])

    return act


def policy_for_scenario(model: BaseAlgorithm, scenario: str, deterministic: bool = True) -> Policy:
    """``model`` (an SB3 discrete-action planner) as a policy on ``scenario``'s discrete env:
    unchanged where the spaces match, through :func:`map_structures` where the scenario has more
    structures than the model observes; a clear error otherwise."""
    n_target = len(get_scenario(scenario).structures)
    obs_dim = int(np.prod(model.observation_space.shape))
    n_actions = int(getattr(model.action_space, "n", -1))
    k, rest = divmod(obs_dim, DVH_POINTS)
    if rest or n_actions != 2 * TPP_KINDS * k or not 1 <= k <= n_target:
        raise ValueError(f"a model observing {obs_dim} values with {n_actions} actions cannot plan {scenario} "
                         f"({n_target} structures: it needs {DVH_POINTS} DVH points and {2 * TPP_KINDS} actions "
                         f"per structure, for at most {n_target} structures)")
    return map_structures(as_policy(model, deterministic=deterministic), k, n_target)
