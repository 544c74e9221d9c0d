"""Training and loading DRL planners on the rtenv environments.

* :func:`train_acer`: ACER on a scenario's training cases through the batched vector env, with a
  progress bar, periodic checkpoints, resume after interruption and TensorBoard/CSV logs;
* :func:`load_policy`: any SB3 model from a spec ``ALGO:PATH`` (``acer``, ``ppo``, ``a2c``,
  ``dqn``), or the shipped S1 planner ``acer:default`` (:data:`BUILTIN_POLICIES`);
* :func:`as_policy`: an SB3 model as a ``policy(obs, info) -> action`` callable for
  :mod:`rtenv.rollout` (carrying a recurrent policy's hidden state through each episode).
"""

from __future__ import annotations

import bisect
import importlib.util
import inspect
import json
import re
import shutil
import warnings
import zipfile
from collections.abc import Sequence
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
from rtenv.case import PlanningCase
from rtenv.env import OWN_COHORT, own_cases
from rtenv.runlog import read_json, settings_changes, write_atomic
from rtenv.sb3 import env_indices, make_sb3_vec_env
from rtenv.tps import resolve_device
from rtenv.validation import check_integer


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
        self._gather_reset_infos()
        return np.concatenate(obs)

    def _gather_reset_infos(self) -> None:
        self.reset_infos = [info for p in self.parts for info in getattr(p, "reset_infos", [{}] * p.num_envs)]

    def step_async(self, actions: np.ndarray) -> None:
        for p, lo, hi in zip(self.parts, self._bounds[:-1], self._bounds[1:], strict=True):
            p.step_async(actions[lo:hi])

    def step_wait(self):
        results = [p.step_wait() for p in self.parts]
        obs, rewards, dones = (np.concatenate([r[k] for r in results]) for k in range(3))
        self._gather_reset_infos()  # the parts' autoresets update their reset_infos
        return obs, rewards, dones, [info for r in results for info in r[3]]

    def seed(self, seed: int | None = None) -> list[int | None]:
        out: list[int | None] = []
        for p, lo in zip(self.parts, self._bounds[:-1], strict=False):
            out += p.seed(None if seed is None else seed + int(lo))
        return out

    def set_options(self, options: list[dict] | dict | None = None) -> None:
        for p, lo, hi in zip(self.parts, self._bounds[:-1], self._bounds[1:], strict=True):
            p.set_options(options if options is None or isinstance(options, dict) else list(options)[lo:hi])

    def close(self) -> None:
        for p in self.parts:
            p.close()

    def _split(self, indices) -> list[tuple[VecEnv, list[int]]]:
        """``indices`` (as SB3 takes them: negative ones count from the end) as runs of one part's
        local indices, in the order given, so that results come back in that order."""
        out: list[tuple[VecEnv, list[int]]] = []
        for i in env_indices(indices, self.num_envs):
            k = bisect.bisect_right(self._bounds, i) - 1
            local = i - int(self._bounds[k])
            if out and out[-1][0] is self.parts[k]:
                out[-1][1].append(local)
            else:
                out.append((self.parts[k], [local]))
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


def make_train_env(scenario: str, num_envs: int, train_cases: int | Sequence[PlanningCase] = 1,
                   start: str = "mixed", device: str = "cpu", **env_kwargs: Any) -> VecEnv:
    """The SB3 training env on the first ``train_cases`` cases of the ``train`` cohort (or on your
    own cases: a sequence of :class:`~rtenv.case.PlanningCase` with the scenario's structures):
    ``start`` ``"default"``, ``"random"`` or ``"mixed"`` (half the envs, rounded up, start
    episodes from the SPEC default TPPs, the rest from SPEC random TPPs)."""
    kw = {"cohort": "train", "cases": train_cases, "device": device, **env_kwargs}
    if start != "mixed":
        return make_sb3_vec_env(scenario, num_envs=num_envs, start=start, **kw)
    if num_envs < 2:
        raise ValueError("start='mixed' needs num_envs >= 2")
    n_default = (num_envs + 1) // 2
    return ConcatVecEnv([make_sb3_vec_env(scenario, num_envs=n_default, start="default", **kw),
                         make_sb3_vec_env(scenario, num_envs=num_envs - n_default, start="random", **kw)])


ALGORITHMS: dict[str, type[BaseAlgorithm]] = {"acer": ACER, "ppo": PPO, "a2c": A2C, "dqn": DQN}

# the ACER planner's settings (SPEC section 3) where they differ from the generic defaults; n_steps
# stays at the generic 20 (SPEC's trajectory length is 100; docs/drl.md lists the differences)
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


#: ``rtenv train acer --policy-net`` names -> ACER policy names.
POLICY_NETS: dict[str, str] = {"mlp": "MlpPolicy", "lstm": "LstmPolicy"}


class ReplayCheckpointCallback(CheckpointCallback):
    """SB3's ``CheckpointCallback`` with the replay saved beside each model checkpoint
    (``save_replay_buffer=True``: ``<prefix>_replay_buffer_<N>_steps.pkl``, see
    :func:`replay_checkpoint`); older replay files are removed once the new one is written (only
    the newest checkpoint's replay is needed to resume, and each can be hundreds of MB)."""

    def __init__(self, save_freq: int, save_path: str, name_prefix: str = "acer", verbose: int = 0) -> None:
        super().__init__(save_freq, save_path, name_prefix=name_prefix, save_replay_buffer=True, verbose=verbose)

    def _on_step(self) -> bool:
        keep_going = super()._on_step()
        if self.n_calls % self.save_freq == 0:
            _keep_newest_replay(Path(self.save_path), self.num_timesteps, self.name_prefix)
        return keep_going


def _keep_newest_replay(folder: Path, steps: int, prefix: str = "acer") -> None:
    """Once the replay of the checkpoint at ``steps`` is written, remove the older ones."""
    newest = folder / f"{prefix}_replay_buffer_{steps}_steps.pkl"
    if newest.is_file():
        for old in folder.glob(f"{prefix}_replay_buffer_*_steps.pkl"):
            if old != newest:
                old.unlink(missing_ok=True)


def replay_checkpoint(out: Path, steps: int) -> Path:
    """Where :func:`train_acer` keeps the replay of the checkpoint at ``steps`` steps."""
    return Path(out) / "checkpoints" / f"acer_replay_buffer_{steps}_steps.pkl"


def checkpoints(out: Path) -> list[tuple[Path, int]]:
    """The model checkpoints under ``out/checkpoints`` with their step counts, newest first."""
    found = []
    for p in (Path(out) / "checkpoints").glob("acer_*_steps.zip"):
        m = re.fullmatch(r"acer_(\d+)_steps\.zip", p.name)
        if m:
            found.append((p, int(m.group(1))))
    return sorted(found, key=lambda item: item[1], reverse=True)


def latest_checkpoint(out: Path) -> tuple[Path, int] | None:
    """The checkpoint with the most steps under ``out/checkpoints``, and its step count."""
    found = checkpoints(out)
    return found[0] if found else None


def train_acer(scenario: str, out: str | Path, timesteps: int, train_cases: int | Sequence[PlanningCase] = 1,
               num_envs: int = 16,
               seed: int = 0, checkpoint_every: int = 25_000, resume: bool = True, start: str = "mixed",
               device: str = "cpu", progress: bool = True, num_threads: int | None = None,
               policy: str = "MlpPolicy", **acer_kwargs: Any) -> Path:
    """Train ACER on the first ``train_cases`` cases of the ``train`` cohort, or on your own cases
    (a sequence of :class:`~rtenv.case.PlanningCase` with the scenario's structures, e.g.
    imported ones); returns ``out/model.zip``.

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
    threads (``None``: leave as is). ``policy``: ``"MlpPolicy"`` (default) or ``"LstmPolicy"``
    (SPEC's recurrent planner network, :class:`drl.acer.ACERLstmPolicy`).

    Checkpoints go to ``out/checkpoints`` every ``checkpoint_every`` steps: the model
    (``acer_<N>_steps.zip``) and its replay (``acer_replay_buffer_<N>_steps.pkl``, only the newest
    kept; see :class:`ReplayCheckpointCallback`). With ``resume`` a rerun continues from the newest
    model checkpoint with its replay and rng state restored (:func:`replay_checkpoint`; if that
    file is missing, e.g. after an interruption between the two writes, a warning says the replay
    restarts empty). Resuming a run of the other ``policy`` is an error; a resumed run keeps the
    checkpoint's ACER settings (``acer_kwargs`` that differ are warned about), and
    ``train_config.json`` records those. Without ``resume`` the folder's old checkpoints are
    deleted, so that a later resume cannot pick up the earlier run. The envs' random state is not
    checkpointed: a run resumed at step N seeds its envs with ``seed + N``. Logs: CSV and, when the
    ``tensorboard`` package is installed, TensorBoard, under ``out/logs`` (a resumed run's under
    ``out/logs/resumed_<N>_steps``). The end of a run is a checkpoint as well, so the same command
    run again finds the run finished; a checkpoint that cannot be loaded (cut short by a kill)
    is passed over with a warning for the one before it. A resumed run can end a few steps past
    an uninterrupted one: checkpoints fall inside a rollout segment, whose partial data is lost.
    """
    own = own_cases(train_cases)
    for name, value in (("timesteps", timesteps), ("train_cases", len(own) if own else train_cases),
                        ("num_envs", num_envs), ("checkpoint_every", checkpoint_every)):
        check_integer(name, value, 1)
    if policy not in ACER.policy_aliases:
        raise ValueError(f"policy = {policy!r} is not an ACER policy; choose from {sorted(ACER.policy_aliases)}")
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    if num_threads is not None:
        torch.set_num_threads(num_threads)
    venv = make_train_env(scenario, num_envs, train_cases=train_cases, start=start, device=device)
    venv.seed(seed)
    settings = {**PLANNER_SETTINGS, **acer_kwargs}
    done = 0
    if not resume:  # a fresh run replaces the folder's checkpoints: a later resume must not find the old run's
        for old in (out / "checkpoints").glob("acer_*_steps.*"):
            old.unlink()
        for old in (out / "logs").glob("resumed_*_steps"):
            shutil.rmtree(old)
    previous, model = None, None
    for candidate in checkpoints(out) if resume else []:
        try:  # a checkpoint cut short (a kill while it was written) gives way to the one before it
            model = ACER.load(candidate[0], env=venv, device=device)
        except (ValueError, AssertionError, EOFError, KeyError, RuntimeError, zipfile.BadZipFile) as exc:
            warnings.warn(f"cannot load checkpoint {candidate[0]} ({type(exc).__name__}: {exc}); trying an older one",
                          RuntimeWarning, stacklevel=2)
            continue
        previous = candidate
        break
    if previous is not None:
        done = previous[1]
        if not isinstance(model.policy, ACER.policy_aliases[policy]):
            raise ValueError(f"the checkpoint {previous[0]} holds a {type(model.policy).__name__}, not the requested "
                             f"policy {policy!r}; train into another folder or start fresh (resume=False, --fresh)")
        # the checkpoint's hyperparameters stay in force: record those, not the ones asked for
        ignored = sorted(k for k, v in acer_kwargs.items() if getattr(model, k, v) != v)
        if ignored:
            warnings.warn(f"resuming {previous[0]}: its settings {ignored} stay as they were saved",
                          RuntimeWarning, stacklevel=2)
        settings = {k: getattr(model, k, v) for k, v in settings.items()}
        # the env's random state is not in the checkpoint: seed the resumed episodes apart from the
        # first run's (with `seed` they would repeat its opening episodes), still by the seed alone
        venv.seed(seed + done)
        replay = replay_checkpoint(out, done)
        if replay.is_file():
            model.load_replay_buffer(replay)
        else:
            warnings.warn(f"no replay checkpoint {replay} beside {previous[0]}; the resumed run's replay starts empty",
                          RuntimeWarning, stacklevel=2)
    else:
        model = ACER(policy, venv, seed=seed, device=device, **settings)
    assert model is not None
    config = {"algorithm": "acer", "scenario": scenario, "train_cohort": OWN_COHORT if own else "train",
              "train_cases": [c.name for c in own] if own else train_cases,
              **({"train_case_sha256": [c.digest() for c in own]} if own else {}),
              "start": start, "num_envs": num_envs, "seed": seed, "timesteps": timesteps, "policy": policy,
              "settings": settings, "resumed_from_steps": done}
    config_path = out / "train_config.json"
    if previous is not None and config_path.is_file():  # the run's own set-up, not its ACER settings
        before = read_json(config_path, "training config")
        before = before if isinstance(before, dict) else {}  # not a config: every set-up key counts as changed
        changed = settings_changes(before, config, keys=("scenario", "train_cases", "train_case_sha256", "start",
                                                          "num_envs", "seed"))
        if changed and done >= timesteps:  # nothing would train, yet the model would be saved under the new set-up
            raise ValueError(f"{out} holds a run finished at {done} steps with another set-up ({'; '.join(changed)}); "
                             f"raise --timesteps past {done} to train on with this set-up, or use another --out")
        if changed:
            warnings.warn(f"resuming {previous[0]} with another set-up ({'; '.join(changed)}): its replay holds the "
                          "earlier set-up's episodes", RuntimeWarning, stacklevel=2)
    write_atomic(config_path, json.dumps(config, indent=2, default=str))
    formats = ["csv"] + (["tensorboard"] if importlib.util.find_spec("tensorboard") else [])
    # a resumed run logs beside the earlier ones (SB3's CSV writer truncates its file)
    logs = out / "logs" if previous is None else out / "logs" / f"resumed_{done}_steps"
    model.set_logger(configure(str(logs), formats))
    callbacks: list[BaseCallback] = [ReplayCheckpointCallback(max(checkpoint_every // num_envs, 1),
                                                              str(out / "checkpoints"), name_prefix="acer")]
    if progress:
        callbacks.append(ProgressBar(timesteps, initial=done))
    if done < timesteps:
        model.learn(timesteps - done, callback=CallbackList(callbacks), reset_num_timesteps=previous is None,
                    log_interval=10)
        # the end is a checkpoint too, so that the same command run again finds the run finished
        # (from an earlier checkpoint it would train past the end and replace model.zip). It is
        # written even where a periodic checkpoint has the same step count: that one was saved
        # during the last rollout, before its update, and resuming from it would replace model.zip
        model.save(out / "checkpoints" / f"acer_{model.num_timesteps}_steps.zip")
        model.save_replay_buffer(replay_checkpoint(out, model.num_timesteps))
        _keep_newest_replay(out / "checkpoints", model.num_timesteps)
    path = out / "model.zip"
    model.save(path)
    return path


#: Planners shipped in the package, by the name ``acer:NAME`` gives them. ``default``: ACER on S1,
#: trained on ONE train case (train-0) with ``rtenv train acer --scenario S1 --train-cases 1
#: --timesteps 100000 --num-envs 16 --seed 0 --start mixed --out DIR`` (about 19 min on a 2-core
#: CPU); figures in ``docs/drl.md``.
BUILTIN_POLICIES: dict[str, Path] = {"default": Path(__file__).parent / "data" / "acer_S1.zip"}


def policy_file(spec: str) -> Path:
    """The model file of an ``ALGO:PATH`` spec (``acer:NAME`` names a shipped one), without loading it.

    Raises:
        ValueError: ``ALGO`` is not one of :data:`ALGORITHMS`.
        FileNotFoundError: no file at the path.
    """
    algo, sep, path = spec.partition(":")
    if not sep or algo not in ALGORITHMS:
        raise ValueError(f"policy spec {spec!r} must be ALGO:PATH with ALGO in {sorted(ALGORITHMS)}")
    file = BUILTIN_POLICIES[path] if algo == "acer" and path in BUILTIN_POLICIES else Path(path)
    if not file.is_file():
        raise FileNotFoundError(f"no model file at {file} (from policy spec {spec!r}; shipped: "
                                f"{', '.join('acer:' + k for k in BUILTIN_POLICIES)})")
    return file


def load_policy(spec: str, device: str | torch.device = "cpu") -> BaseAlgorithm:
    """Load an SB3 model from ``ALGO:PATH``, or a shipped one from ``acer:NAME`` (``acer:default``),
    onto ``device`` (``"cpu"``, ``"cuda"``, ``"cuda:N"``; an absent CUDA raises ``ValueError``
    rather than SB3's silent fall-back to the CPU)."""
    device = resolve_device(device)
    file = policy_file(spec)
    algo = spec.partition(":")[0]
    try:
        return ALGORITHMS[algo].load(file, device=device)
    except (TypeError, KeyError, AttributeError, ValueError, zipfile.BadZipFile) as exc:  # another algorithm's zip
        saved_by = saved_algorithm(file)
        if saved_by is not None and saved_by != algo:
            raise ValueError(f"{file} was saved by {saved_by.upper()}, not {algo.upper()} (from policy spec "
                             f"{spec!r}): use {saved_by}:{file}") from exc
        raise ValueError(f"{file} is not a loadable {algo} model (from policy spec {spec!r}): "
                         f"{type(exc).__name__}: {exc}") from exc


#: How many of its own settings an algorithm's zip may lack (see :func:`saved_algorithm`).
_SETTINGS_SLACK = 3


def saved_algorithm(file: str | Path) -> str | None:
    """The :data:`ALGORITHMS` key of the algorithm that saved the SB3 zip ``file``; None if the zip
    is unreadable or none of them clearly did (e.g. a SAC zip).

    SB3 stores a model's attributes, which include its constructor's settings: the algorithm is
    the one whose own settings (beyond those every algorithm has) the zip lacks at most
    :data:`_SETTINGS_SLACK` of, and fewer than any other's (A2C keeps two of its settings only in
    its optimizer; zips of older SB3 versions lack settings added since). PPO and A2C zips load as
    each other in SB3, so this reads the settings rather than trying to load.
    """
    try:
        with zipfile.ZipFile(file) as archive:
            data = json.loads(archive.read("data"))
    except (OSError, KeyError, ValueError, zipfile.BadZipFile):
        return None
    if not isinstance(data, dict):
        return None
    common = {"self", "policy", "env", "device", "_init_setup_model", "verbose", "seed", "policy_kwargs",
              "tensorboard_log", "stats_window_size", "kwargs"}
    missing = sorted((len(set(inspect.signature(cls.__init__).parameters) - common - set(data)), name)
                     for name, cls in ALGORITHMS.items())
    (fewest, best), (runner_up, _) = missing[0], missing[1]
    return best if fewest <= _SETTINGS_SLACK and fewest < runner_up else None


class SB3Policy:
    """An SB3 model as a ``policy(obs, info) -> action`` callable (see :func:`as_policy`).

    A recurrent model's hidden state is carried from step to step and zeroed at each episode's
    first step: where ``info["steps"] == 0`` (the rtenv envs' reset info, so
    :func:`rtenv.rollout.run_episode` and the wrappers that pass ``info`` on need nothing else), at
    the first call, and after :meth:`reset` (call it between episodes of envs whose info has no
    ``steps``). An :class:`ACER` model that learned with action masks acts with
    ``info["action_mask"]`` when the info carries one.
    """

    def __init__(self, model: BaseAlgorithm, deterministic: bool = True) -> None:
        self.model, self.deterministic = model, deterministic
        self.state: Any = None
        self._fresh = True

    def reset(self) -> None:
        """Start a new episode: the next call acts from a zero hidden state."""
        self.state, self._fresh = None, True

    def __call__(self, obs: np.ndarray, info: dict[str, Any] | None) -> Any:
        model = self.model
        if info is not None and info.get("steps") == 0:
            self.reset()
        start = np.array([self._fresh])
        mask = info.get("action_mask") if info else None
        if isinstance(model, ACER) and model.use_action_masks and mask is not None:
            # ACER learns with no-op actions masked (rtenv's info["action_mask"]); act the same way
            if model.recurrent:
                action, self.state = model.policy.predict_masked(obs, mask, state=self.state, episode_start=start,
                                                                 deterministic=self.deterministic)
            else:
                action = model.policy.predict_masked(obs, mask, deterministic=self.deterministic)
        else:
            action, self.state = model.predict(obs, state=self.state, episode_start=start,
                                               deterministic=self.deterministic)
        self._fresh = False
        return int(action) if getattr(action, "ndim", 1) == 0 else action


def as_policy(model: BaseAlgorithm, deterministic: bool = True) -> SB3Policy:
    """An SB3 model as a ``policy(obs, info) -> action`` callable (an :class:`ACER` model that learned
    with action masks also acts with ``info["action_mask"]`` when the info carries one; a
    recurrent model carries its hidden state through each episode, see :class:`SB3Policy`)."""
    return SB3Policy(model, deterministic=deterministic)
