"""Training and loading DRL planners on the rtenv environments.

* :func:`train_acer`: ACER on a scenario's training cases through the batched vector env, with a
  progress bar, periodic checkpoints, resume after interruption and TensorBoard/CSV logs;
* :func:`load_policy`: any SB3 model from a spec ``ALGO:PATH`` (``acer``, ``ppo``, ``a2c``,
  ``dqn``);
* :func:`as_policy`: an SB3 model as a ``policy(obs, info) -> action`` callable for
  :mod:`rtenv.rollout`.
"""

from __future__ import annotations

import importlib.util
import json
import re
from pathlib import Path
from typing import Any

import numpy as np
import torch
from stable_baselines3 import A2C, DQN, PPO
from stable_baselines3.common.base_class import BaseAlgorithm
from stable_baselines3.common.callbacks import BaseCallback, CallbackList, CheckpointCallback
from stable_baselines3.common.logger import configure
from stable_baselines3.common.vec_env.base_vec_env import VecEnv
from tqdm.auto import tqdm

from drl.acer import ACER
from rtenv.rollout import Policy
from rtenv.sb3 import make_sb3_vec_env


class ConcatVecEnv(VecEnv):
    """Several SB3 ``VecEnv`` s side by side as one (e.g. default-start and random-start episodes
    of one case, for ``start="mixed"``). Seeds go to each part with consecutive offsets."""

    def __init__(self, parts: list[VecEnv]) -> None:
        if not parts:
            raise ValueError("ConcatVecEnv needs at least one VecEnv")
        self.parts = parts
        self._bounds = np.cumsum([0] + [p.num_envs for p in parts])
        super().__init__(int(self._bounds[-1]), parts[0].observation_space, parts[0].action_space)

    def reset(self) -> np.ndarray:
        obs = [p.reset() for p in self.parts]
        self.reset_infos = [info for p in self.parts for info in getattr(p, "reset_infos", [{}] * p.num_envs)]
        return np.concatenate(obs)

    def step_async(self, actions: np.ndarray) -> None:
        for p, lo, hi in zip(self.parts, self._bounds[:-1], self._bounds[1:], strict=True):
            p.step_async(actions[lo:hi])

    def step_wait(self):
        results = [p.step_wait() for p in self.parts]
        obs, rewards, dones = (np.concatenate([r[k] for r in results]) for k in range(3))
        return obs, rewards, dones, [info for r in results for info in r[3]]

    def seed(self, seed: int | None = None) -> list[int | None]:
        out: list[int | None] = []
        for p, lo in zip(self.parts, self._bounds[:-1], strict=False):
            out += p.seed(None if seed is None else seed + int(lo))
        return out

    def close(self) -> None:
        for p in self.parts:
            p.close()

    def _split(self, indices) -> list[tuple[VecEnv, list[int]]]:
        idx = range(self.num_envs) if indices is None else ([indices] if isinstance(indices, int) else indices)
        out = []
        for p, lo, hi in zip(self.parts, self._bounds[:-1], self._bounds[1:], strict=True):
            local = [int(i) - lo for i in idx if lo <= i < hi]
            if local:
                out.append((p, local))
        return out

    def get_attr(self, attr_name: str, indices=None) -> list[Any]:
        return [v for p, local in self._split(indices) for v in p.get_attr(attr_name, local)]

    def set_attr(self, attr_name: str, value: Any, indices=None) -> None:
        for p, local in self._split(indices):
            p.set_attr(attr_name, value, local)

    def env_method(self, method_name: str, *args, indices=None, **kwargs) -> list[Any]:
        return [v for p, local in self._split(indices) for v in p.env_method(method_name, *args, indices=local,
                                                                              **kwargs)]

    def env_is_wrapped(self, wrapper_class, indices=None) -> list[bool]:
        return [v for p, local in self._split(indices) for v in p.env_is_wrapped(wrapper_class, local)]


def make_train_env(scenario: str, num_envs: int, train_cases: int = 1, start: str = "mixed", device: str = "cpu",
                   **env_kwargs: Any) -> VecEnv:
    """The SB3 training env on the ``train`` cohort: ``start`` ``"default"``, ``"random"`` or
    ``"mixed"`` (half the envs, rounded up, start episodes from the SPEC default TPPs, the rest
    from SPEC random TPPs)."""
    kw = {"cohort": "train", "cases": train_cases, "device": device, **env_kwargs}
    if start != "mixed":
        return make_sb3_vec_env(scenario, num_envs=num_envs, start=start, **kw)
    if num_envs < 2:
        raise ValueError("start='mixed' needs num_envs >= 2")
    n_default = (num_envs + 1) // 2
    return ConcatVecEnv([make_sb3_vec_env(scenario, num_envs=n_default, start="default", **kw),
                         make_sb3_vec_env(scenario, num_envs=num_envs - n_default, start="random", **kw)])


ALGORITHMS: dict[str, type[BaseAlgorithm]] = {"acer": ACER, "ppo": PPO, "a2c": A2C, "dqn": DQN}

# the ACER planner's settings (SPEC section 3) where they differ from the generic defaults
PLANNER_SETTINGS: dict[str, Any] = {
    "n_steps": 20, "buffer_size": 100_000, "replay_ratio": 4.0, "replay_start": 20_000, "gamma": 0.99,
    "truncation": 10.0, "trust_region": False, "ent_coef": 1e-4, "max_grad_norm": 40.0, "learning_rate": 7e-4,
}


class ProgressBar(BaseCallback):
    """A tqdm bar over environment steps."""

    def __init__(self, total: int, initial: int = 0) -> None:
        super().__init__()
        self.total, self.initial = total, initial
        self.bar: tqdm | None = None

    def _on_training_start(self) -> None:
        self.bar = tqdm(total=self.total, initial=self.initial, unit="step", desc="train")

    def _on_step(self) -> bool:
        assert self.bar is not None
        self.bar.update(self.model.num_timesteps - self.bar.n)
        return True

    def _on_training_end(self) -> None:
        if self.bar is not None:
            self.bar.close()


def latest_checkpoint(out: Path) -> tuple[Path, int] | None:
    """The checkpoint with the most steps under ``out/checkpoints``, and its step count."""
    found = []
    for p in (out / "checkpoints").glob("acer_*_steps.zip"):
        m = re.fullmatch(r"acer_(\d+)_steps\.zip", p.name)
        if m:
            found.append((int(m.group(1)), p))
    if not found:
        return None
    steps, path = max(found)
    return path, steps


def train_acer(scenario: str, out: str | Path, timesteps: int, train_cases: int = 1, num_envs: int = 16,
               seed: int = 0, checkpoint_every: int = 25_000, resume: bool = True, start: str = "default",
               device: str = "cpu", progress: bool = True, num_threads: int | None = None,
               **acer_kwargs: Any) -> Path:
    """Train ACER on the first ``train_cases`` cases of the ``train`` cohort; returns ``out/model.zip``.

    ``start`` (see :func:`make_train_env`): episodes start from the SPEC default TPPs
    (``"default"``, the start the cohorts are evaluated from), SPEC random TPPs (``"random"``,
    the seed paper's training starts) or half and half (``"mixed"``). Measured on S1 (one train
    case, 16 envs, masked no-op actions, evaluated from default starts): default starts reach
    full score on the whole test and knowledge cohorts from 7k steps on (about 3 steps per plan:
    a learned t_rectum down, up, up recipe that fails from random starts); random starts stay at
    a final score of about 7.8 after 10k steps; mixed starts learn slower (10 % full score at
    10k steps, 100 % of test and knowledge cases at 50k in about 7 steps, and 70 % of test cases
    from random starts). ACER acts and learns with the env's ``info["action_mask"]`` (no-op actions
    at a TPP's clamp masked; see :class:`drl.acer.ACER`). ``num_threads`` sets torch's CPU
    threads (``None``: leave as is). Checkpoints go to ``out/checkpoints`` every ``checkpoint_every`` steps; with
    ``resume`` a rerun continues from the newest one (the replay restarts empty). Logs: CSV and,
    when the ``tensorboard`` package is installed, TensorBoard, under ``out/logs``.
    """
    if timesteps < 1 or train_cases < 1 or num_envs < 1:
        raise ValueError(f"timesteps ({timesteps}), train_cases ({train_cases}) and num_envs ({num_envs}) must be >= 1")
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    if num_threads is not None:
        torch.set_num_threads(num_threads)
    venv = make_train_env(scenario, num_envs, train_cases=train_cases, start=start, device=device)
    venv.seed(seed)
    settings = {**PLANNER_SETTINGS, **acer_kwargs}
    done = 0
    previous = latest_checkpoint(out) if resume else None
    if previous is not None:
        model = ACER.load(previous[0], env=venv, device=device)
        done = previous[1]
    else:
        model = ACER("MlpPolicy", venv, seed=seed, device=device, **settings)
    (out / "train_config.json").write_text(json.dumps({
        "algorithm": "acer", "scenario": scenario, "train_cohort": "train", "train_cases": train_cases,
        "start": start, "num_envs": num_envs, "seed": seed, "timesteps": timesteps, "settings": settings,
        "resumed_from_steps": done}, indent=2, default=str))
    formats = ["csv"] + (["tensorboard"] if importlib.util.find_spec("tensorboard") else [])
    model.set_logger(configure(str(out / "logs"), formats))
    callbacks: list[BaseCallback] = [CheckpointCallback(max(checkpoint_every // num_envs, 1),
                                                        str(out / "checkpoints"), name_prefix="acer")]
    if progress:
        callbacks.append(ProgressBar(timesteps, initial=done))
    if done < timesteps:
        model.learn(timesteps - done, callback=CallbackList(callbacks), reset_num_timesteps=previous is None,
                    log_interval=10)
    path = out / "model.zip"
    model.save(path)
    return path


def load_policy(spec: str, device: str = "cpu") -> BaseAlgorithm:
    """Load an SB3 model from ``ALGO:PATH``."""
    algo, sep, path = spec.partition(":")
    if not sep or algo not in ALGORITHMS:
        raise ValueError(f"policy spec {spec!r} must be ALGO:PATH with ALGO in {sorted(ALGORITHMS)}")
    file = Path(path)
    if not file.is_file():
        raise FileNotFoundError(f"no model file at {file} (from policy spec {spec!r})")
    return ALGORITHMS[algo].load(file, device=device)


def as_policy(model: BaseAlgorithm, deterministic: bool = True) -> Policy:
    """An SB3 model as a ``policy(obs, info) -> action`` callable (an :class:`ACER` model that learned
    with action masks also acts with ``info["action_mask"]`` when the info carries one)."""
    def act(obs, info):
        if isinstance(model, ACER) and model.use_action_masks and info and info.get("action_mask") is not None:
            # ACER learns with no-op actions masked (rtenv's info["action_mask"]); act the same way
            action = model.policy.predict_masked(obs, info["action_mask"], deterministic=deterministic)
        else:
            action, _ = model.predict(obs, deterministic=deterministic)
        return int(action) if getattr(action, "ndim", 1) == 0 else action
    return act
