"""Adapter from :class:`rtenv.env.TPPTuningVectorEnv` to stable-baselines3's ``VecEnv``.

SB3 does not accept Gymnasium vector envs. :class:`SB3VecEnv` hands SB3 what its own
``DummyVecEnv`` does: reset returns observations only (each env's reset info in ``reset_infos``),
seeds and options set by ``seed()`` / ``set_options()`` apply to the next reset, and finished
sub-environments restart in the same step. A finished env's step info is that of its last step,
with ``terminal_observation``, ``TimeLimit.truncated`` (True when the episode hit ``max_steps``
without reaching full score, so SB3 bootstraps it) and ``episode`` (return, length, time: what
SB3's ``Monitor`` records, so its logger reports ``ep_rew_mean``, and ``env_is_wrapped(Monitor)``
is True, so ``evaluate_policy`` reads it); the new episode's info goes to ``reset_infos``.

    from rtenv.sb3 import make_sb3_vec_env
    venv = make_sb3_vec_env("S1", num_envs=8)
    PPO("MlpPolicy", venv, n_steps=64).learn(2048)
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import Any

import numpy as np
from stable_baselines3.common.monitor import Monitor
from stable_baselines3.common.vec_env.base_vec_env import VecEnv

from rtenv.env import TPPTuningVectorEnv


class SB3VecEnv(VecEnv):
    """stable-baselines3 view of a :class:`~rtenv.env.TPPTuningVectorEnv`."""

    def __init__(self, venv: TPPTuningVectorEnv) -> None:
        self.venv = venv
        super().__init__(venv.num_envs, venv.single_observation_space, venv.single_action_space)
        # the env's metadata (render_fps, for SB3's video recorder), with the render modes SB3's VecEnv offers
        self.metadata = {**venv.metadata, "render_modes": self.metadata["render_modes"]}
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

    def get_images(self) -> list[np.ndarray | None]:
        """Each env's DVH figure (``render_mode="rgb_array"``), which SB3's ``render()`` tiles."""
        if self.venv.render_mode != "rgb_array":
            return [None] * self.num_envs
        return self.venv.render() or [None] * self.num_envs

    def get_attr(self, attr_name: str, indices=None) -> list[Any]:
        """Sub-env ``i``'s attribute: ``case`` and ``dose`` are its current episode's,
        ``observation_space`` and ``action_space`` the single-env spaces; any other attribute
        is configuration that all sub-envs share (``render_mode``, ``core``, ...)."""
        idx = self._indices(indices)
        if attr_name in ("case", "dose"):
            values = self.venv.cases if attr_name == "case" else self.venv.doses
            return [values[i] for i in idx]
        if attr_name in ("observation_space", "action_space"):
            return [getattr(self.venv, f"single_{attr_name}")] * len(idx)
        return [getattr(self.venv, attr_name)] * len(idx)

    def set_attr(self, attr_name: str, value: Any, indices=None) -> None:
        """Set shared configuration; the sub-envs are one batched env, so only all of them at once."""
        if sorted(self._indices(indices)) != list(range(self.num_envs)):
            raise ValueError(f"set_attr({attr_name!r}) must apply to all {self.num_envs} envs (indices=None): "
                             f"the sub-envs share one batched env; got indices {indices!r}")
        setattr(self.venv, attr_name, value)

    def env_method(self, method_name: str, *args, indices=None, **kwargs) -> list[Any]:
        """Per-env ``action_masks()`` (what sb3-contrib's MaskablePPO calls) and ``render()``;
        other methods have no per-env form here (the sub-envs are one batched env)."""
        idx = self._indices(indices)
        if method_name == "action_masks":
            masks = self.venv.action_masks(*args, **kwargs)
            return [masks[i] for i in idx]
        if method_name == "render":
            frames = self.venv.render(*args, **kwargs) or [None] * self.num_envs
            return [frames[i] for i in idx]
        raise NotImplementedError(f"env_method({method_name!r}) has no per-env form on the batched rtenv env; "
                                  "supported: 'action_masks', 'render'")

    def env_is_wrapped(self, wrapper_class, indices=None) -> list[bool]:
        """True for SB3's ``Monitor`` only: the adapter writes Monitor's ``episode`` info itself,
        so ``evaluate_policy`` reads episode returns from it (and does not warn)."""
        return [wrapper_class is Monitor for _ in self._indices(indices)]

    def _indices(self, indices) -> list[int]:
        return env_indices(indices, self.num_envs)


def env_indices(indices: int | Sequence[int] | None, num_envs: int) -> list[int]:
    """A ``VecEnv`` method's ``indices`` as a list of env indices in the order given (``None``: all
    envs); negative ones count from the end, as in SB3's own VecEnvs; ``IndexError`` outside."""
    if indices is None:
        return list(range(num_envs))
    idx = [indices] if isinstance(indices, (int, np.integer)) else list(indices)
    bad = [i for i in idx if not -num_envs <= int(i) < num_envs]
    if bad:
        raise IndexError(f"env indices {bad} are outside [{-num_envs}, {num_envs - 1}]")
    return [int(i) % num_envs for i in idx]


def make_sb3_vec_env(scenario: str = "S1", num_envs: int = 8, **kwargs: Any) -> SB3VecEnv:
    """An SB3 ``VecEnv`` of ``num_envs`` batched episodes (kwargs as for the vector env)."""
    return SB3VecEnv(TPPTuningVectorEnv(num_envs=num_envs, scenario=scenario, **kwargs))
