"""ACER (Wang et al. 2016) for discrete actions, as a stable-baselines3 algorithm.

Read top to bottom: the policy (a shared MLP torso with a softmax policy head and a Q head), the
segment replay (each segment keeps the behaviour distribution mu(.|x) of every step, which the
importance weights need), and the algorithm: each iteration collects ``n_steps`` steps from every
environment, makes one on-policy update on that segment and ``Poisson(replay_ratio)`` off-policy
updates on segments drawn from the replay. Each update computes Retrace targets
(:func:`drl.acer_math.retrace_targets`; a time-limit truncation bootstraps from the truncated
state's value, it is not a termination), the truncated importance-weighted policy gradient with
bias correction and entropy bonus (:func:`drl.acer_math.acer_policy_loss_terms`), the critic loss
``0.5 (Q_ret - Q(x, a))^2``, and optionally projects the policy gradient with the efficient trust
region around an exponential-average policy (:func:`drl.acer_math.trust_region_step`).

Action masks: when an env's info carries ``action_mask`` (bool per action, True = allowed; the
rtenv envs mark the no-op actions of a TPP at its range clamp, and the SB3 adapter exposes the
reset infos as ``reset_infos``), ACER samples only allowed actions, stores the masks with the
segment and evaluates the policy masked in every update (a masked action has probability 0, so
its importance weight is 0). Act with :meth:`ACERPolicy.predict_masked` or :func:`drl.train.as_policy` (which passes
``info["action_mask"]``): plain ``predict()`` sees no mask and its arg max may be a masked no-op,
since masked logits get no gradient. An optional auxiliary hinge loss (``mask_coef``, off by
default because it slowed learning on S1) teaches the unmasked logits to avoid masked actions.
Why: on S1 the default start has five no-op actions (t_PTV down, t_OAR up, V_OAR up); a no-op
re-solves the same TPPs (reward about +0.001 from the warm-started TPS) and leaves the DVH
observation almost unchanged, so a deterministic DVH-only policy that picks one repeats it until
the step budget ends. Without masks ACER trained from default starts chose "t_PTV down" at every
step of every test case (final 6.13, 10 % full score); with masks it reaches full score on every
test and knowledge case in about 3 steps after 10k training steps.

Two networks: ``"MlpPolicy"`` (:class:`ACERPolicy`, the default: an MLP torso) and ``"LstmPolicy"``
(:class:`ACERLstmPolicy`, SPEC section 3's planner network: ``Linear(obs_dim, 32)`` + ReLU ->
``LSTMCell(32)`` -> softmax policy head and Q head). With the LSTM, collection keeps one hidden
state ``(h, c)`` per env, zeroed where an episode starts; each segment stores the state at its
first step and per-step episode-start flags, and every update (on-policy and replayed) unrolls the
network through the segment from that stored state, zeroing it at the episode starts inside the
segment (backpropagation through time within the segment). The replay can be saved and restored
with :meth:`ACER.save_replay_buffer` / :meth:`ACER.load_replay_buffer` (what SB3's
``CheckpointCallback(save_replay_buffer=True)`` calls).

Defaults are SPEC section 3's generic ACER settings (stable-baselines v2): ``n_steps=20``,
``q_coef=0.5``, ``ent_coef=0.01``, ``buffer_size=5000``, ``replay_ratio=4``,
``replay_start=1000``, ``truncation=10``, ``alpha=0.99``, ``delta=1``, RMSprop with
``learning_rate=7e-4`` and ``rms_alpha=0.99``, ``max_grad_norm=10``; the ACER planner's own
settings differ (see SPEC) and are passed as arguments. Two of them are read as SB3 reads its
algorithms' settings, not as stable-baselines v2 did:

- ``buffer_size`` and ``replay_start`` count transitions over all envs (as SB3's DQN counts
  ``buffer_size`` and ``learning_starts``); v2 counted them per env, so its 5000 and 1000 with
  ``n`` envs are ``5000 n`` and ``1000 n`` here.
- a float ``learning_rate`` stays constant; v2's default ``lr_schedule="linear"`` decayed it to 0
  over training (pass ``learning_rate=lambda progress_remaining: 7e-4 * progress_remaining`` for
  that).
"""

from __future__ import annotations

import copy
import io
import os
import pickle
import time
from collections import deque
from pathlib import Path
from typing import Any

import numpy as np
import torch
from gymnasium import spaces
from stable_baselines3.common.base_class import BaseAlgorithm
from stable_baselines3.common.callbacks import BaseCallback
from stable_baselines3.common.policies import BasePolicy
from stable_baselines3.common.torch_layers import FlattenExtractor
from stable_baselines3.common.type_aliases import GymEnv, MaybeCallback, Schedule
from stable_baselines3.common.utils import obs_as_tensor, safe_mean
from stable_baselines3.common.vec_env import VecEnvWrapper
from torch import nn

from drl.acer_math import acer_policy_loss_terms, retrace_targets, trust_region_step
from rtenv.validation import check_integer, check_real

_MASKED_LOGIT = -1e9  # logit of a masked action: probability 0, and 0 * log-probability stays finite
_MASK_MARGIN = 1.0  # masked logits are taught to stay this far below the best allowed one


def usable_masks(masks: np.ndarray) -> np.ndarray:
    """``masks`` (bool, ``(n, n_actions)``, changed in place and returned) with every row that
    allows nothing allowing everything: the one rule for training, acting and explaining."""
    masks[~masks.any(axis=1)] = True
    return masks


def _mask_tensor(mask: np.ndarray, n: int, device: torch.device) -> torch.Tensor:
    """``(n, n_actions)`` bool mask tensor of usable masks (:func:`usable_masks`)."""
    return torch.as_tensor(usable_masks(np.array(mask, dtype=bool).reshape(n, -1)), device=device)


def _masked_log_probs(logits: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """Log-softmax of ``logits`` with disallowed actions (``mask`` False) at probability 0 (their
    log-probability about -1e9); ``mask`` None allows every action."""
    if mask is not None:
        logits = logits.masked_fill(~mask, _MASKED_LOGIT)
    return torch.log_softmax(logits, dim=-1)


class ACERPolicy(BasePolicy):
    """Shared MLP torso -> policy logits and Q values, one of each per discrete action (``"MlpPolicy"``).

    Args:
        observation_space: Observation space.
        action_space: A ``Discrete`` space.
        lr_schedule: Learning-rate schedule (for the optimizer).
        net_arch: Hidden layer sizes of the torso.
        activation_fn: Activation of the torso.
    """

    recurrent = False  # the network has no hidden state

    def __init__(self, observation_space: spaces.Space, action_space: spaces.Discrete, lr_schedule: Schedule,
                 net_arch: list[int] | None = None, activation_fn: type[nn.Module] = nn.ReLU,
                 optimizer_class: type[torch.optim.Optimizer] = torch.optim.RMSprop,
                 optimizer_kwargs: dict[str, Any] | None = None) -> None:
        if not isinstance(action_space, spaces.Discrete):
            raise ValueError(f"ACER needs a Discrete action space, got {action_space}")
        super().__init__(observation_space, action_space, features_extractor_class=FlattenExtractor,
                         optimizer_class=optimizer_class, optimizer_kwargs=optimizer_kwargs or {})
        self.net_arch = [64, 64] if net_arch is None else list(net_arch)
        self.activation_fn = activation_fn
        self.features_extractor = self.make_features_extractor()
        layers: list[nn.Module] = []
        width = self.features_extractor.features_dim
        for size in self.net_arch:
            layers += [nn.Linear(width, size), activation_fn()]
            width = size
        self.torso = nn.Sequential(*layers)
        self.pi_head = nn.Linear(width, int(action_space.n))
        self.q_head = nn.Linear(width, int(action_space.n))
        self.optimizer = self.optimizer_class(self.parameters(), lr=lr_schedule(1), **self.optimizer_kwargs)

    def _get_constructor_parameters(self) -> dict[str, Any]:
        data = super()._get_constructor_parameters()
        data.update(net_arch=self.net_arch, activation_fn=self.activation_fn, lr_schedule=self._dummy_schedule,
                    optimizer_class=self.optimizer_class, optimizer_kwargs=self.optimizer_kwargs)
        return data

    @staticmethod
    def _dummy_schedule(_: float) -> float:
        return 0.0

    def evaluate(self, obs: torch.Tensor, mask: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Log-probabilities and Q values, each ``(batch, n_actions)``. ``mask`` (bool, same shape;
        True = allowed) gives disallowed actions probability 0 (log-probability about -1e9)."""
        logits, q = self.logits_and_q(obs)
        return _masked_log_probs(logits, mask), q

    def logits_and_q(self, obs: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Unmasked policy logits and Q values, each ``(batch, n_actions)``."""
        h = self.torso(self.extract_features(obs, self.features_extractor))
        return self.pi_head(h), self.q_head(h)

    def predict_masked(self, observation: np.ndarray, mask: np.ndarray,
                       deterministic: bool = True) -> np.ndarray | np.integer:
        """Actions for a batch of observations (an array), or the action for one (a numpy
        integer), with disallowed actions (``mask`` False) excluded."""
        obs = np.asarray(observation, dtype=np.float32)
        single = obs.ndim == len(self.observation_space.shape)
        obs_t = torch.as_tensor(obs[None] if single else obs, device=self.device)
        mask_t = _mask_tensor(mask, obs_t.shape[0], self.device)
        with torch.no_grad():
            log_pi, _ = self.evaluate(obs_t, mask_t)
            act = log_pi.argmax(-1) if deterministic else torch.distributions.Categorical(logits=log_pi).sample()
        act = act.cpu().numpy()
        return act[0] if single else act

    def _predict(self, observation: torch.Tensor, deterministic: bool = False) -> torch.Tensor:
        log_pi, _ = self.evaluate(observation)
        if deterministic:
            return log_pi.argmax(dim=-1)
        return torch.distributions.Categorical(logits=log_pi).sample()


LstmState = tuple[torch.Tensor, torch.Tensor]  # (h, c), each (batch, hidden_size)


class ACERLstmPolicy(BasePolicy):
    """SPEC section 3's recurrent ACER network (``"LstmPolicy"``):
    ``Linear(obs_dim, features_dim)`` + activation -> ``LSTMCell(hidden_size)`` -> a policy head
    (logits; softmax) and a Q head, each with one output per discrete action.

    The hidden state is a pair ``(h, c)`` of ``(batch, hidden_size)`` tensors; a zero state starts an
    episode. :meth:`step` advances it by one observation, :meth:`unroll` through a time-major
    sequence (zeroing it where ``episode_starts`` is True, before that step's observation).
    :meth:`predict` follows SB3's recurrent convention (sb3-contrib ``RecurrentPPO``): it takes and
    returns the state as a tuple of numpy arrays ``(h, c)``, each ``(n_envs, hidden_size)``, and
    zeroes it where ``episode_start`` is True.

    Args:
        observation_space: Observation space (flattened).
        action_space: A ``Discrete`` space.
        lr_schedule: Learning-rate schedule (for the optimizer).
        hidden_size: LSTM cell size (32 in SPEC).
        features_dim: Width of the linear layer before the LSTM (32 in SPEC).
        activation_fn: Activation after the linear layer (ReLU in SPEC).
    """

    recurrent = True

    def __init__(self, observation_space: spaces.Space, action_space: spaces.Discrete, lr_schedule: Schedule,
                 hidden_size: int = 32, features_dim: int = 32, activation_fn: type[nn.Module] = nn.ReLU,
                 optimizer_class: type[torch.optim.Optimizer] = torch.optim.RMSprop,
                 optimizer_kwargs: dict[str, Any] | None = None) -> None:
        if not isinstance(action_space, spaces.Discrete):
            raise ValueError(f"ACER needs a Discrete action space, got {action_space}")
        for name, value in (("hidden_size", hidden_size), ("features_dim", features_dim)):
            check_integer(name, value, 1)
        super().__init__(observation_space, action_space, features_extractor_class=FlattenExtractor,
                         optimizer_class=optimizer_class, optimizer_kwargs=optimizer_kwargs or {})
        self.hidden_size, self.features_dim, self.activation_fn = hidden_size, features_dim, activation_fn
        self.features_extractor = self.make_features_extractor()
        self.torso = nn.Sequential(nn.Linear(self.features_extractor.features_dim, features_dim), activation_fn())
        self.lstm = nn.LSTMCell(features_dim, hidden_size)
        self.pi_head = nn.Linear(hidden_size, int(action_space.n))
        self.q_head = nn.Linear(hidden_size, int(action_space.n))
        self.optimizer = self.optimizer_class(self.parameters(), lr=lr_schedule(1), **self.optimizer_kwargs)

    def _get_constructor_parameters(self) -> dict[str, Any]:
        data = super()._get_constructor_parameters()
        data.update(hidden_size=self.hidden_size, features_dim=self.features_dim, activation_fn=self.activation_fn,
                    lr_schedule=ACERPolicy._dummy_schedule, optimizer_class=self.optimizer_class,
                    optimizer_kwargs=self.optimizer_kwargs)
        return data

    def initial_state(self, n: int) -> LstmState:
        """The zero state of ``n`` fresh episodes."""
        zeros = torch.zeros(n, self.hidden_size, device=self.device)
        return zeros, zeros.clone()

    @staticmethod
    def reset_state(state: LstmState, episode_starts: torch.Tensor) -> LstmState:
        """``state`` with the rows where ``episode_starts`` (bool, ``(batch,)``) is True zeroed."""
        keep = (~episode_starts.to(torch.bool)).to(state[0].dtype).unsqueeze(-1)
        return state[0] * keep, state[1] * keep

    def step(self, obs: torch.Tensor, state: LstmState) -> tuple[torch.Tensor, torch.Tensor, LstmState]:
        """One step: unmasked logits and Q values, each ``(batch, n_actions)``, and the next state."""
        features = self.torso(self.extract_features(obs, self.features_extractor))
        h, c = self.lstm(features, state)
        return self.pi_head(h), self.q_head(h), (h, c)

    def unroll(self, obs: torch.Tensor, state: LstmState, episode_starts: torch.Tensor
               ) -> tuple[torch.Tensor, torch.Tensor, LstmState]:
        """Run through a time-major sequence ``obs`` ``(T, batch, ...)`` from ``state``, zeroing the
        state before step ``t`` where ``episode_starts[t]`` (``(T, batch)`` bool) is True.

        Returns logits and Q values, each ``(T, batch, n_actions)``, and the states after every
        step, each ``(T, batch, hidden_size)`` (``[t]`` is the state that step ``t + 1`` receives,
        before any reset)."""
        if obs.shape[:2] != episode_starts.shape:
            raise ValueError(f"episode_starts has shape {tuple(episode_starts.shape)}; obs starts with "
                             f"{tuple(obs.shape[:2])}")
        logits, q, hs, cs = [], [], [], []
        for t in range(obs.shape[0]):
            state = self.reset_state(state, episode_starts[t])
            lg, qv, state = self.step(obs[t], state)
            logits.append(lg)
            q.append(qv)
            hs.append(state[0])
            cs.append(state[1])
        return torch.stack(logits), torch.stack(q), (torch.stack(hs), torch.stack(cs))

    def evaluate(self, obs: torch.Tensor, state: LstmState, mask: torch.Tensor | None = None
                 ) -> tuple[torch.Tensor, torch.Tensor, LstmState]:
        """One step: log-probabilities (``mask`` False: probability 0), Q values and the next state."""
        logits, q, state = self.step(obs, state)
        return _masked_log_probs(logits, mask), q, state

    def _state_in(self, state: tuple[np.ndarray, np.ndarray] | None, episode_start: np.ndarray | None,
                  n: int) -> LstmState:
        if state is None:
            st = self.initial_state(n)
        else:
            if len(state) != 2:
                raise ValueError(f"an LSTM state is a pair (h, c); got {len(state)} arrays")
            st = tuple(torch.as_tensor(np.asarray(x, dtype=np.float32), device=self.device).reshape(n, -1)
                       for x in state)
            if st[0].shape[1] != self.hidden_size or st[1].shape[1] != self.hidden_size:
                raise ValueError(f"state arrays have {st[0].shape[1]} and {st[1].shape[1]} units per env; "
                                 f"the LSTM has {self.hidden_size}")
        if episode_start is not None:
            starts = torch.as_tensor(np.asarray(episode_start, dtype=bool), device=self.device).reshape(n)
            st = self.reset_state(st, starts)
        return st  # type: ignore[return-value]

    def _act(self, observation: np.ndarray, mask: np.ndarray | None, state: tuple[np.ndarray, np.ndarray] | None,
             episode_start: np.ndarray | None, deterministic: bool
             ) -> tuple[np.ndarray, tuple[np.ndarray, np.ndarray]]:
        self.set_training_mode(False)
        obs_t, vectorized = self.obs_to_tensor(observation)
        n = obs_t.shape[0]
        st = self._state_in(state, episode_start, n)
        mask_t = None
        if mask is not None:
            mask_t = _mask_tensor(mask, n, self.device)
        with torch.no_grad():
            log_pi, _, st = self.evaluate(obs_t, st, mask_t)
            act = log_pi.argmax(-1) if deterministic else torch.distributions.Categorical(logits=log_pi).sample()
        actions = act.cpu().numpy()
        new_state = (st[0].cpu().numpy(), st[1].cpu().numpy())
        return (actions if vectorized else actions[0]), new_state

    def predict(self, observation: np.ndarray | dict[str, np.ndarray],  # type: ignore[override]
                state: tuple[np.ndarray, ...] | None = None, episode_start: np.ndarray | None = None,
                deterministic: bool = False) -> tuple[np.ndarray, tuple[np.ndarray, np.ndarray]]:
        """Actions for a batch (or one) of observations and the next hidden state (SB3's recurrent
        convention). ``state`` ``None``: zero state (fresh episodes); ``episode_start`` (bool per
        env): zero the state of those envs first. Pass the returned state back at the next step."""
        return self._act(observation, None, state, episode_start, deterministic)  # type: ignore[arg-type]

    def predict_masked(self, observation: np.ndarray, mask: np.ndarray,
                       state: tuple[np.ndarray, np.ndarray] | None = None, episode_start: np.ndarray | None = None,
                       deterministic: bool = True) -> tuple[np.ndarray, tuple[np.ndarray, np.ndarray]]:
        """Like :meth:`predict`, with disallowed actions (``mask`` False) excluded; returns
        ``(actions, state)`` (unlike :meth:`ACERPolicy.predict_masked`, which returns actions only)."""
        return self._act(observation, mask, state, episode_start, deterministic)

    def _predict(self, observation: torch.Tensor, deterministic: bool = False) -> torch.Tensor:
        """Actions from the zero state (the first step of an episode); :meth:`predict` carries the state."""
        log_pi, _, _ = self.evaluate(observation, self.initial_state(observation.shape[0]))
        if deterministic:
            return log_pi.argmax(dim=-1)
        return torch.distributions.Categorical(logits=log_pi).sample()


class SegmentReplay:
    """FIFO replay of trajectory segments (time-major arrays of ``n_steps`` x ``n_envs``; the
    states a time limit cut episodes at, ``trunc_obs`` and ``trunc_masks``, one row per True in
    ``truncated``)."""

    FORMAT_VERSION = 1

    def __init__(self, capacity_segments: int, rng: np.random.Generator) -> None:
        self.segments: deque[dict[str, np.ndarray]] = deque(maxlen=max(1, capacity_segments))
        self.rng = rng

    @property
    def capacity(self) -> int:
        """Most segments held (older ones are dropped first)."""
        return int(self.segments.maxlen or 0)

    def state_dict(self) -> dict[str, Any]:
        """The segments (oldest first), the capacity and the sampling rng's state, for saving."""
        return {"format": self.FORMAT_VERSION, "capacity": self.capacity, "segments": [dict(s) for s in self.segments],
                "rng_state": copy.deepcopy(self.rng.bit_generator.state)}

    def load_state_dict(self, data: dict[str, Any]) -> None:
        """Restore from :meth:`state_dict`: segments, capacity and the rng's state (in place, so a
        generator shared with the algorithm continues its stream too)."""
        if not isinstance(data, dict) or data.get("format") != self.FORMAT_VERSION:
            found = data.get("format") if isinstance(data, dict) else type(data).__name__
            raise ValueError(f"not an ACER replay of format {self.FORMAT_VERSION} (found {found!r})")
        capacity = int(data["capacity"])
        if capacity < 1:
            raise ValueError(f"replay capacity = {capacity} must be >= 1")
        segments: deque[dict[str, np.ndarray]] = deque(maxlen=capacity)
        for k, seg in enumerate(data["segments"]):
            n = int(np.count_nonzero(seg["truncated"]))
            if not len(seg["trunc_obs"]) == len(seg["trunc_masks"]) == n:
                raise ValueError(f"replay segment {k} has {len(seg['trunc_obs'])} truncated states and "
                                 f"{len(seg['trunc_masks'])} masks for {n} truncations")
            segments.append(dict(seg))
        self.segments = segments
        self.rng.bit_generator.state = data["rng_state"]

    def add(self, segment: dict[str, np.ndarray]) -> None:
        self.segments.append(segment)

    def sample(self) -> dict[str, np.ndarray]:
        return self.segments[int(self.rng.integers(len(self.segments)))]

    def __len__(self) -> int:
        return len(self.segments)


class ACER(BaseAlgorithm):
    """ACER for discrete actions.

    Args:
        policy: ``"MlpPolicy"`` (:class:`ACERPolicy`, default network), ``"LstmPolicy"``
            (:class:`ACERLstmPolicy`, SPEC's recurrent planner network; ``policy_kwargs``
            ``hidden_size`` and ``features_dim``, both 32 by default) or a subclass of either. With
            the LSTM, :meth:`predict` takes and returns the hidden state (``model.predict(obs,
            state, episode_start, deterministic)`` -> ``(action, state)``, as sb3-contrib's
            ``RecurrentPPO``), and :meth:`ACERLstmPolicy.predict_masked` too;
            :func:`drl.train.as_policy` carries it across an episode's steps.
        env: Environment (any Gymnasium env or SB3 ``VecEnv``; several envs supported).
        learning_rate: RMSprop learning rate (or schedule).
        n_steps: Steps per environment per segment.
        gamma: Discount factor.
        q_coef: Weight of the critic loss.
        ent_coef: Weight of the entropy bonus.
        buffer_size: Replay capacity in transitions, summed over the envs.
        replay_ratio: Mean of the Poisson number of replay updates per on-policy update.
        replay_start: Transitions collected (summed over the envs) before replay updates start.
        truncation: Importance-weight truncation ``c``.
        trust_region: Use the efficient trust region.
        delta: Trust-region size.
        alpha: Decay of the exponential-average policy.
        rms_alpha: RMSprop smoothing constant.
        rms_eps: RMSprop epsilon.
        max_grad_norm: Gradient-norm clip.
        use_action_masks: Honour ``info["action_mask"]`` (bool per action, True = allowed; absent:
            all allowed) when acting and learning, as the rtenv envs report for no-op actions.
        mask_coef: Weight of the auxiliary hinge loss ``sum_{masked a} max(0, logit_a - max_{allowed}
            logit + 1)`` (allowed logits held fixed), so that plain ``predict()``, which sees no
            mask, also avoids the masked actions in the states trained on. Off (0) by default: on
            S1 it slowed learning (60 % full score after 21k steps against 100 % at 7k without it).
        policy_kwargs: Extra policy arguments (MLP: ``net_arch``, ``activation_fn``; LSTM:
            ``hidden_size``, ``features_dim``, ``activation_fn``).
        tensorboard_log, verbose, seed, device: As in stable-baselines3.
    """

    policy_aliases = {"MlpPolicy": ACERPolicy, "LstmPolicy": ACERLstmPolicy}  # noqa: RUF012
    policy: ACERPolicy | ACERLstmPolicy

    def __init__(self, policy: str | type[ACERPolicy] | type[ACERLstmPolicy], env: GymEnv | str,
                 learning_rate: float | Schedule = 7e-4,
                 n_steps: int = 20, gamma: float = 0.99, q_coef: float = 0.5, ent_coef: float = 0.01,
                 buffer_size: int = 5000, replay_ratio: float = 4.0, replay_start: int = 1000,
                 truncation: float = 10.0, trust_region: bool = True, delta: float = 1.0, alpha: float = 0.99,
                 rms_alpha: float = 0.99, rms_eps: float = 1e-5, max_grad_norm: float = 10.0,
                 use_action_masks: bool = True, mask_coef: float = 0.0,
                 policy_kwargs: dict[str, Any] | None = None, tensorboard_log: str | None = None,
                 verbose: int = 0, seed: int | None = None, device: torch.device | str = "auto",
                 _init_setup_model: bool = True) -> None:
        super().__init__(policy, env, learning_rate, policy_kwargs=policy_kwargs, tensorboard_log=tensorboard_log,
                         verbose=verbose, device=device, support_multi_env=True, seed=seed,
                         supported_action_spaces=(spaces.Discrete,))
        for name, value, lo, hi in (("n_steps", n_steps, 1, 10**6), ("buffer_size", buffer_size, 1, 10**9),
                                    ("replay_start", replay_start, 0, 10**12)):
            check_integer(name, value, lo, hi)
        for name, value, lo, hi in (("gamma", gamma, 0, 1), ("replay_ratio", replay_ratio, 0, 1e3),
                                    ("truncation", truncation, 1e-6, 1e6), ("alpha", alpha, 0, 1),
                                    ("delta", delta, 0, 1e6), ("q_coef", q_coef, 0, 1e6),
                                    ("ent_coef", ent_coef, 0, 1e6), ("mask_coef", mask_coef, 0, 1e6),
                                    ("max_grad_norm", max_grad_norm, 1e-8, 1e12)):
            check_real(name, value, lo, hi)  # NaN fails too
        self.n_steps, self.gamma, self.q_coef, self.ent_coef = n_steps, gamma, q_coef, ent_coef
        self.buffer_size, self.replay_ratio, self.replay_start = buffer_size, replay_ratio, replay_start
        self.truncation, self.trust_region, self.delta, self.alpha = truncation, trust_region, delta, alpha
        self.rms_alpha, self.rms_eps, self.max_grad_norm = rms_alpha, rms_eps, max_grad_norm
        self.use_action_masks, self.mask_coef = use_action_masks, mask_coef
        self._last_masks: np.ndarray | None = None
        self._lstm_states: LstmState | None = None  # per env, for collection with the LSTM policy
        if _init_setup_model:
            self._setup_model()

    def _setup_model(self) -> None:
        self._setup_lr_schedule()
        self.set_random_seed(self.seed)
        kwargs = {"optimizer_kwargs": {"alpha": self.rms_alpha, "eps": self.rms_eps}, **self.policy_kwargs}
        self.policy = self.policy_class(self.observation_space, self.action_space, self.lr_schedule, **kwargs)
        self.policy = self.policy.to(self.device)
        self.avg_policy = copy.deepcopy(self.policy).requires_grad_(False)
        self._rng = np.random.default_rng(self.seed)
        segment = self.n_steps * self.n_envs
        capacity = self.buffer_size // segment
        if self.replay_ratio > 0 and capacity * segment < max(self.replay_start, 1):
            raise ValueError(f"buffer_size = {self.buffer_size} holds {capacity * segment} transitions in whole "
                             f"segments of n_steps x n_envs = {segment}, fewer than replay_start = "
                             f"{self.replay_start}: replay would never start; raise buffer_size or lower replay_start "
                             "(or set replay_ratio = 0 for on-policy ACER)")
        self._replay = SegmentReplay(capacity, self._rng)

    def _excluded_save_params(self) -> list[str]:
        return [*super()._excluded_save_params(), "_replay", "_rng", "avg_policy", "_last_masks", "_lstm_states"]

    @property
    def recurrent(self) -> bool:
        """Whether the policy is recurrent (:class:`ACERLstmPolicy`)."""
        return bool(getattr(self.policy, "recurrent", False))

    # -------------------------------------------------------------------- replay
    @property
    def replay_buffer(self) -> SegmentReplay:
        """The segment replay (what SB3's ``CheckpointCallback(save_replay_buffer=True)`` looks for)."""
        return self._replay

    def save_replay_buffer(self, path: str | Path | io.BufferedIOBase) -> None:
        """Write the replay (segments, capacity, the rng's state) to ``path`` (a pickle; written to a
        temporary file and renamed, so an interrupted save leaves no partial file), or to an open
        binary file. SB3's ``CheckpointCallback(save_replay_buffer=True)`` calls this."""
        data = self._replay.state_dict()
        data["n_actions"], data["obs_shape"] = int(self.action_space.n), tuple(self.observation_space.shape)
        data["recurrent"] = self.recurrent
        data["hidden_size"] = int(self.policy.hidden_size) if self.recurrent else None
        if isinstance(path, (str, os.PathLike)):
            path = Path(path)
            tmp = path.with_name(path.name + ".tmp")
            with open(tmp, "wb") as f:
                pickle.dump(data, f, protocol=pickle.HIGHEST_PROTOCOL)
            os.replace(tmp, path)
        else:
            pickle.dump(data, path, protocol=pickle.HIGHEST_PROTOCOL)

    def load_replay_buffer(self, path: str | Path | io.BufferedIOBase, truncate_last_traj: bool = True) -> None:
        """Restore the replay written by :meth:`save_replay_buffer` (a pickle: load only files you
        trust). The saved capacity is kept; the rng (shared by sampling, actions and the Poisson
        replay count) continues from its saved state. ``truncate_last_traj`` exists for SB3
        compatibility and is ignored (segments are self-contained)."""
        del truncate_last_traj
        if isinstance(path, (str, os.PathLike)):
            with open(path, "rb") as f:
                data = pickle.load(f)
        else:
            data = pickle.load(path)
        if not isinstance(data, dict):
            raise ValueError(f"{path} does not hold an ACER replay (found a {type(data).__name__})")
        n_actions, obs_shape = data.get("n_actions"), tuple(data.get("obs_shape", ()))
        if n_actions != int(self.action_space.n) or obs_shape != tuple(self.observation_space.shape):
            raise ValueError(f"the replay in {path} has {n_actions} actions and observations of shape {obs_shape}; "
                             f"this model has {int(self.action_space.n)} and {tuple(self.observation_space.shape)}")
        if self.recurrent and not data.get("recurrent"):
            raise ValueError(f"the replay in {path} was collected without LSTM states; the LSTM policy cannot "
                             "learn from it")
        if self.recurrent and data.get("hidden_size") != self.policy.hidden_size:
            raise ValueError(f"the replay in {path} holds LSTM states of size {data.get('hidden_size')}; "
                             f"this model's LSTM has hidden_size = {self.policy.hidden_size}")
        self._replay.load_state_dict(data)

    def _get_torch_save_params(self) -> tuple[list[str], list[str]]:
        return ["policy", "avg_policy", "policy.optimizer"], []

    # ------------------------------------------------------------------ rollouts
    def _masks_from(self, infos: Any) -> np.ndarray:
        """``(n_envs, n_actions)`` bool masks from per-env infos (all True where an info has none,
        or masks are off, or a mask allows nothing)."""
        A = int(self.action_space.n)
        masks = np.ones((self.n_envs, A), dtype=bool)
        if not self.use_action_masks or infos is None:
            return masks
        for i, info in enumerate(infos):
            m = info.get("action_mask") if isinstance(info, dict) else None
            if m is not None:
                masks[i] = np.asarray(m, dtype=bool)
        return usable_masks(masks)

    def _reset_infos(self) -> Any:
        """The new episodes' infos: a ``VecEnvWrapper`` (``VecMonitor``, ``VecNormalize``, ...)
        keeps a list of its own, so they are read from the innermost VecEnv."""
        env = self.env
        while isinstance(env, VecEnvWrapper):
            env = env.venv
        return getattr(env, "reset_infos", None)

    def _step_masks(self, infos: Any, dones: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """After a step: the masks of each finished episode's last state and of every env's next
        state. SB3 VecEnvs (``DummyVecEnv``, ``SubprocVecEnv``, :class:`rtenv.sb3.SB3VecEnv`)
        leave a finished episode's last info in ``infos`` and put the new episode's in
        ``env.reset_infos``."""
        resets = self._reset_infos()
        final_infos, next_infos = [], []
        for i, info in enumerate(infos):
            info = info or {}
            if not dones[i]:
                final_infos.append({})
                next_infos.append(info)
            else:
                final_infos.append(info)
                next_infos.append(resets[i] if resets is not None and i < len(resets) else {})
        return self._masks_from(final_infos), self._masks_from(next_infos)

    def _collect_segment(self, callback: BaseCallback) -> dict[str, np.ndarray] | None:
        """``n_steps`` steps of every env with the current policy; None if a callback stops."""
        env, T, N = self.env, self.n_steps, self.n_envs
        A = int(self.action_space.n)
        obs_shape = self.observation_space.shape
        seg = {
            "obs": np.zeros((T + 1, N, *obs_shape), dtype=np.float32),
            "masks": np.ones((T + 1, N, A), dtype=bool),
            "actions": np.zeros((T, N), dtype=np.int64),
            "rewards": np.zeros((T, N), dtype=np.float32),
            "mu": np.zeros((T, N, A), dtype=np.float32),
            "terminated": np.zeros((T, N), dtype=bool),
            "truncated": np.zeros((T, N), dtype=bool),
        }
        # the states a time limit cut episodes at, for bootstrapping: one row per True in
        # "truncated", in time-then-env order (most steps have none)
        trunc_obs: list[np.ndarray] = []
        trunc_masks: list[np.ndarray] = []
        if self._last_masks is None:
            self._last_masks = np.ones((N, A), dtype=bool)
        recurrent = self.recurrent
        if self._last_episode_starts is None:
            self._last_episode_starts = np.ones(N, dtype=bool)
        if recurrent:
            assert isinstance(self.policy, ACERLstmPolicy)
            if self._lstm_states is None or self._lstm_states[0].shape != (N, self.policy.hidden_size):
                self._lstm_states = self.policy.initial_state(N)
            # the state as held before the segment's first step; the start flags say where it is zeroed
            seg["state_h"], seg["state_c"] = (x.cpu().numpy().copy() for x in self._lstm_states)
            seg["episode_starts"] = np.zeros((T + 1, N), dtype=bool)
        callback.on_rollout_start()
        for t in range(T):
            seg["obs"][t], seg["masks"][t] = self._last_obs, self._last_masks
            obs_t = obs_as_tensor(self._last_obs, self.device)
            mask_t = torch.as_tensor(self._last_masks, device=self.device)
            with torch.no_grad():
                if recurrent:
                    starts = np.asarray(self._last_episode_starts, dtype=bool)
                    seg["episode_starts"][t] = starts
                    state = ACERLstmPolicy.reset_state(self._lstm_states, torch.as_tensor(starts, device=self.device))
                    log_pi, _, self._lstm_states = self.policy.evaluate(obs_t, state, mask_t)
                else:
                    log_pi, _ = self.policy.evaluate(obs_t, mask_t)
            probs = log_pi.exp().cpu().numpy().astype(np.float64)
            cum = np.cumsum(probs, axis=1)
            u = self._rng.random(N) * cum[:, -1]
            actions = np.minimum((cum < u[:, None]).sum(axis=1), A - 1)
            new_obs, rewards, dones, infos = env.step(actions)
            self.num_timesteps += N
            self._update_info_buffer(infos, dones)
            seg["actions"][t], seg["rewards"][t], seg["mu"][t] = actions, rewards, probs
            final_masks, next_masks = self._step_masks(infos, dones)
            for i, done in enumerate(dones):
                if done:
                    truncated = bool(infos[i].get("TimeLimit.truncated", False))
                    seg["truncated"][t, i] = truncated
                    seg["terminated"][t, i] = not truncated
                    if truncated:
                        trunc_obs.append(np.asarray(infos[i]["terminal_observation"], dtype=np.float32))
                        trunc_masks.append(np.asarray(final_masks[i], dtype=bool))
            self._last_obs, self._last_masks = new_obs, next_masks
            self._last_episode_starts = np.asarray(dones, dtype=bool)
            callback.update_locals(locals())
            if not callback.on_step():  # after the bookkeeping: a later learn() goes on from the envs' state
                return None
        seg["obs"][T], seg["masks"][T] = self._last_obs, self._last_masks
        seg["trunc_obs"] = np.array(trunc_obs, dtype=np.float32).reshape(len(trunc_obs), *obs_shape)
        seg["trunc_masks"] = np.array(trunc_masks, dtype=bool).reshape(len(trunc_masks), A)
        if recurrent:
            seg["episode_starts"][T] = self._last_episode_starts
        callback.on_rollout_end()
        return seg

    # -------------------------------------------------------------------- update
    def _segment_state(self, seg: dict[str, np.ndarray]) -> tuple[LstmState, torch.Tensor]:
        """The stored LSTM state at a segment's first step and its ``(T + 1, N)`` episode-start flags."""
        if "state_h" not in seg or "episode_starts" not in seg:
            raise ValueError("this segment has no stored LSTM state (collected with a non-recurrent policy?)")
        dev = self.device
        state = (torch.as_tensor(seg["state_h"], device=dev), torch.as_tensor(seg["state_c"], device=dev))
        return state, torch.as_tensor(seg["episode_starts"], device=dev)

    def _segment_forward(self, seg: dict[str, np.ndarray]
                         ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, LstmState | None]:
        """The policy's unmasked logits and Q values at the segment's steps, each ``(T, N, A)``
        (with gradients); the log-probabilities and Q values (no gradients) at the state after
        the last step, ``(N, A)`` each, for the bootstrap; and for the LSTM the states after every
        step (``(T + 1, N, hidden)`` each; None for the MLP). The LSTM policy is unrolled from the
        segment's stored state, zeroed at its episode starts."""
        T, N = seg["actions"].shape
        A = int(self.action_space.n)
        dev = self.device
        obs = torch.as_tensor(seg["obs"], device=dev)
        masks = torch.as_tensor(seg["masks"], device=dev)
        if self.recurrent:
            state, starts = self._segment_state(seg)
            logits_all, q_all, states = self.policy.unroll(obs, state, starts)
            logits, q = logits_all[:T], q_all[:T]
            with torch.no_grad():
                lp_last = _masked_log_probs(logits_all[T], masks[T])
                q_last = q_all[T].detach()
        else:
            states = None
            logits, q = self.policy.logits_and_q(obs[:T].reshape(T * N, *obs.shape[2:]))
            logits, q = logits.reshape(T, N, A), q.reshape(T, N, A)
            with torch.no_grad():
                lp_last, q_last = self.policy.evaluate(obs[T], masks[T])
        return logits, q, lp_last, q_last, states

    def _truncation_values(self, seg: dict[str, np.ndarray], trunc: torch.Tensor,
                           states: LstmState | None) -> torch.Tensor:
        """``V`` of the truncated (time-limit) states of a segment, one per True in ``trunc``; the
        LSTM evaluates each with the state after the step that reached it (``states``, from
        :meth:`_segment_forward`)."""
        dev = self.device
        trunc_obs = torch.as_tensor(seg["trunc_obs"], device=dev)
        trunc_masks = torch.as_tensor(seg["trunc_masks"], device=dev)
        with torch.no_grad():
            if states is not None:
                hs, cs = states
                T = trunc.shape[0]
                lp_tr, q_tr, _ = self.policy.evaluate(trunc_obs, (hs[:T][trunc].detach(), cs[:T][trunc].detach()),
                                                      trunc_masks)
            else:
                lp_tr, q_tr = self.policy.evaluate(trunc_obs, trunc_masks)
        return (lp_tr.exp() * q_tr).sum(-1)

    def _average_log_probs(self, seg: dict[str, np.ndarray]) -> torch.Tensor:
        """The average policy's masked log-probabilities at the segment's steps, ``(T, N, A)``."""
        T, N = seg["actions"].shape
        A = int(self.action_space.n)
        dev = self.device
        obs = torch.as_tensor(seg["obs"][:T], device=dev)
        masks = torch.as_tensor(seg["masks"][:T], device=dev)
        with torch.no_grad():
            if self.recurrent:
                state, starts = self._segment_state(seg)
                logits, _, _ = self.avg_policy.unroll(obs, state, starts[:T])
                return _masked_log_probs(logits, masks)
            avg_lp, _ = self.avg_policy.evaluate(obs.reshape(T * N, *obs.shape[2:]), masks.reshape(T * N, A))
            return avg_lp.reshape(T, N, A)

    def _update(self, seg: dict[str, np.ndarray]) -> dict[str, float]:
        T, N = seg["actions"].shape
        A = int(self.action_space.n)
        dev = self.device
        masks = torch.as_tensor(seg["masks"], device=dev)
        logits, q, lp_last, q_last, states = self._segment_forward(seg)
        logits, q = logits.reshape(T * N, A), q.reshape(T * N, A)
        flat_masks = masks[:T].reshape(T * N, A)
        masked_logits = logits.masked_fill(~flat_masks, _MASKED_LOGIT)
        log_pi, q = torch.log_softmax(masked_logits, dim=-1).reshape(T, N, A), q.reshape(T, N, A)
        # hinge on each masked logit above (best allowed logit - margin), the allowed logits held
        # fixed: teaches the unmasked policy (plain predict(), which sees no mask) to avoid masked
        # actions, and vanishes once it does, leaving the masked policy's learning alone
        best_allowed = masked_logits.detach().max(-1, keepdim=True).values
        mask_loss = (torch.relu(logits - best_allowed + _MASK_MARGIN) * (~flat_masks)).sum(-1).mean()
        pi = log_pi.exp()
        values = (pi * q).sum(-1)
        actions = torch.as_tensor(seg["actions"], device=dev)
        mu = torch.as_tensor(seg["mu"], device=dev).clamp(min=1e-8)
        rho = pi.detach() / mu
        q_taken = q.gather(-1, actions.unsqueeze(-1)).squeeze(-1)
        with torch.no_grad():
            boot = torch.zeros(T + 1, N, device=dev)
            boot[T] = (lp_last.exp() * q_last).sum(-1)
            trunc = torch.as_tensor(seg["truncated"], device=dev)
            if trunc.any():
                boot[:T][trunc] = self._truncation_values(seg, trunc, states)
            q_ret = retrace_targets(torch.as_tensor(seg["rewards"], device=dev), q_taken.detach(), values.detach(),
                                    rho.gather(-1, actions.unsqueeze(-1)).squeeze(-1),
                                    torch.as_tensor(seg["terminated"], device=dev), trunc, boot, self.gamma)
        value_loss = 0.5 * ((q_ret - q_taken) ** 2).mean()
        self._update_learning_rate(self.policy.optimizer)
        self.policy.optimizer.zero_grad()
        if self.trust_region:
            # gradient of the policy objective with respect to the policy's probabilities, projected
            probs = pi.detach().requires_grad_(True)
            lp = probs.clamp(min=1e-12).log()  # masked actions have probability 0
            trunc_term, corr_term, entropy = acer_policy_loss_terms(lp, q.detach(), values.detach(), q_ret, actions,
                                                                     rho, self.truncation)
            objective = -(trunc_term + corr_term) + self.ent_coef * entropy
            (g,) = torch.autograd.grad(objective * T * N, probs)
            with torch.no_grad():
                avg_lp = self._average_log_probs(seg)
                k = -(avg_lp.exp()) / probs.detach().clamp(min=1e-8)  # d KL(avg || pi) / d pi
            z = trust_region_step(g.reshape(T * N, A), k.reshape(T * N, A), self.delta).reshape(T, N, A)
            torch.autograd.backward([pi, self.q_coef * value_loss + self.mask_coef * mask_loss],
                                    [-z / (T * N), torch.ones_like(value_loss)])
        else:
            trunc_term, corr_term, entropy = acer_policy_loss_terms(log_pi, q.detach(), values.detach(), q_ret,
                                                                     actions, rho, self.truncation)
            (trunc_term + corr_term - self.ent_coef * entropy + self.q_coef * value_loss
             + self.mask_coef * mask_loss).backward()
        grad_norm = nn.utils.clip_grad_norm_(self.policy.parameters(), self.max_grad_norm)
        self.policy.optimizer.step()
        with torch.no_grad():
            for p_avg, p in zip(self.avg_policy.parameters(), self.policy.parameters(), strict=True):
                p_avg.mul_(self.alpha).add_(p, alpha=1.0 - self.alpha)
        return {"policy_loss": (trunc_term + corr_term).detach().item(), "value_loss": value_loss.detach().item(),
                "entropy": entropy.detach().item(), "mask_loss": mask_loss.detach().item(),
                "grad_norm": float(grad_norm)}

    # --------------------------------------------------------------------- learn
    def learn(self, total_timesteps: int, callback: MaybeCallback = None, log_interval: int = 10,
              tb_log_name: str = "ACER", reset_num_timesteps: bool = True, progress_bar: bool = False) -> ACER:
        resets_env = reset_num_timesteps or self._last_obs is None  # as _setup_learn decides (set_env clears it)
        total_timesteps, callback = self._setup_learn(total_timesteps, callback, reset_num_timesteps, tb_log_name,
                                                      progress_bar)
        if resets_env or self._last_masks is None:  # the env was just reset: its masks are the new episodes'
            self._last_masks = self._masks_from(self._reset_infos())
        callback.on_training_start(locals(), globals())
        iteration = 0
        while self.num_timesteps < total_timesteps:
            seg = self._collect_segment(callback)
            if seg is None:
                break
            iteration += 1
            self._update_current_progress_remaining(self.num_timesteps, total_timesteps)
            self._replay.add(seg)
            stats = self._update(seg)
            if len(self._replay) * self.n_steps * self.n_envs >= self.replay_start:
                for _ in range(int(self._rng.poisson(self.replay_ratio))):
                    stats = self._update(self._replay.sample())
            if log_interval and iteration % log_interval == 0:
                self._log(stats)
        if log_interval and iteration % log_interval:  # the last iterations, so that a short run logs too
            self._log(stats)
        callback.on_training_end()
        return self

    def _log(self, stats: dict[str, float]) -> None:
        elapsed = max((time.time_ns() - self.start_time) / 1e9, 1e-9)
        self.logger.record("time/fps", int((self.num_timesteps - self._num_timesteps_at_start) / elapsed))
        self.logger.record("time/total_timesteps", self.num_timesteps, exclude="tensorboard")
        if self.ep_info_buffer:
            self.logger.record("rollout/ep_rew_mean", safe_mean([e["r"] for e in self.ep_info_buffer]))
            self.logger.record("rollout/ep_len_mean", safe_mean([e["l"] for e in self.ep_info_buffer]))
        for key, value in stats.items():
            self.logger.record(f"train/{key}", value)
        self.logger.dump(step=self.num_timesteps)
