"""Adapter from :class:`rtenv.env.TPPTuningVectorEnv` to stable-baselines3's ``VecEnv``.

SB3 does not accept Gymnasium vector envs. :class:`SB3VecEnv` hands SB3 what its own
``DummyVecEnv`` does: reset returns observations only (each env's reset info in ``reset_infos``),
seeds and options set by ``seed()`` / ``set_options()`` apply to the next reset, and finished
sub-environments restart in the same step. A finished env's step info is that of its last step,
with ``terminal_observation``, ``TimeLimit.truncated`` (True when the episode hit ``max_steps``
without reaching full score, so SB3 bootstraps it) and ``episode`` (return, length, time: what
SB3's ``Monitor`` records, so its logger reports ``ep_rew_mean``); the new episode's info goes to
``reset_infos``.

    from rtenv.sb3 import make_sb3_vec_env
    venv = make_sb3_vec_env("S1", num_envs=8)
    PPO("MlpPolicy", venv, n_steps=64).learn(2048)
"""

from __future__ import annotations

import time
from typing import Any

import numpy as np
from stable_baselines3.common.vec_env.base_vec_env import VecEnv

from rtenv.env import TPPTuningVectorEnv


class SB3VecEnv(VecEnv):
    """stable-baselines3 view of a :class:`~rtenv.env.TPPTuningVectorEnv`."""

    def __init__(self, venv: TPPTuningVectorEnv) -> None:
        self.venv = venv
        super().__init__(venv.num_envs, venv.single_observation_space, venv.single_action_space)
        self._actions: Any = None
        self._returns = np.zeros(self.num_envs)
        self._lengths = np.zeros(self.num_envs, dtype=np.int64)
        self._t0 = time.time()

    def reset(self) -> np.ndarray:
        obs, self.reset_infos = self.venv.reset_episodes(list(self._seeds), [o or None for o in self._options])
        self._reset_seeds()  # seeds and options are used once, as in SB3's own VecEnvs
        self._reset_options()
        self._returns[:] = 0.0
        self._lengths[:] = 0
        return obs

    def step_async(self, actions: np.ndarray) -> None:
        self._actions = actions

    def step_wait(self):
        obs, rewards, terms, truncs, infos, finals = self.venv.step_episodes(self._actions)
        self._returns += rewards
        self._lengths += 1
        out = []
        for i, info in enumerate(infos):
            if finals[i] is not None:
                self.reset_infos[i] = {k: v for k, v in info.items() if k != "final_info"}
                info = dict(info["final_info"], terminal_observation=finals[i])
                # what SB3's Monitor wrapper would record: episode return, length, wall time
                info["episode"] = {"r": float(self._returns[i]), "l": int(self._lengths[i]),
                                   "t": round(time.time() - self._t0, 6)}
                self._returns[i], self._lengths[i] = 0.0, 0
            else:
                info = dict(info)
            info["TimeLimit.truncated"] = bool(truncs[i] and not terms[i])
            out.append(info)
        return obs, rewards.astype(np.float32), terms | truncs, out

    def close(self) -> None:
        self.venv.close()

    def get_attr(self, attr_name: str, indices=None) -> list[Any]:
        return [getattr(self.venv, attr_name) for _ in self._indices(indices)]

    def set_attr(self, attr_name: str, value: Any, indices=None) -> None:
        setattr(self.venv, attr_name, value)

    def env_method(self, method_name: str, *args, indices=None, **kwargs) -> list[Any]:
        return [getattr(self.venv, method_name)(*args, **kwargs) for _ in self._indices(indices)]

    def env_is_wrapped(self, wrapper_class, indices=None) -> list[bool]:
        return [False for _ in self._indices(indices)]

    def _indices(self, indices) -> list[int]:
        if indices is None:
            return list(range(self.num_envs))
        return [indices] if isinstance(indices, int) else list(indices)


def make_sb3_vec_env(scenario: str = "S1", num_envs: int = 8, **kwargs: Any) -> SB3VecEnv:
    """An SB3 ``VecEnv`` of ``num_envs`` batched episodes (kwargs as for the vector env)."""
    return SB3VecEnv(TPPTuningVectorEnv(num_envs=num_envs, scenario=scenario, **kwargs))
