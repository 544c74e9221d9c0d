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

from stable_baselines3 import A2C, DQN, PPO
from stable_baselines3.common.base_class import BaseAlgorithm
from stable_baselines3.common.callbacks import BaseCallback, CallbackList, CheckpointCallback
from stable_baselines3.common.logger import configure
from tqdm.auto import tqdm

from drl.acer import ACER
from rtenv.rollout import Policy
from rtenv.sb3 import make_sb3_vec_env

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
               seed: int = 0, checkpoint_every: int = 25_000, resume: bool = True, start: str = "random",
               device: str = "cpu", progress: bool = True, **acer_kwargs: Any) -> Path:
    """Train ACER on the first ``train_cases`` cases of the ``train`` cohort; returns ``out/model.zip``.

    Episodes start from SPEC random TPPs (``start``) so that one case still yields varied
    episodes. Checkpoints go to ``out/checkpoints`` every ``checkpoint_every`` steps; with
    ``resume`` a rerun continues from the newest one (the replay restarts empty). Logs: CSV and,
    when the ``tensorboard`` package is installed, TensorBoard, under ``out/logs``.
    """
    if timesteps < 1 or train_cases < 1 or num_envs < 1:
        raise ValueError(f"timesteps ({timesteps}), train_cases ({train_cases}) and num_envs ({num_envs}) must be >= 1")
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    venv = make_sb3_vec_env(scenario, num_envs=num_envs, cohort="train", cases=train_cases, start=start,
                            device=device)
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
    """An SB3 model as a ``policy(obs, info) -> action`` callable."""
    def act(obs, info):
        action, _ = model.predict(obs, deterministic=deterministic)
        return int(action) if getattr(action, "ndim", 1) == 0 else action
    return act
