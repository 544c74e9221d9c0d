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

Defaults are SPEC section 3's generic ACER settings (stable-baselines v2): ``n_steps=20``,
``q_coef=0.5``, ``ent_coef=0.01``, ``buffer_size=5000``, ``replay_ratio=4``,
``replay_start=1000``, ``truncation=10``, ``alpha=0.99``, ``delta=1``, RMSprop with
``learning_rate=7e-4`` and ``rms_alpha=0.99``, ``max_grad_norm=10``; the ACER planner's own
settings differ (see SPEC) and are passed as arguments.
"""

from __future__ import annotations

import copy
import time
from collections import deque
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
from torch import nn

from drl.acer_math import acer_policy_loss_terms, retrace_targets, trust_region_step

_MASKED_LOGIT = -1e9  # logit of a masked action: probability 0, and 0 * log-probability stays finite
_MASK_MARGIN = 1.0  # masked logits are taught to stay this far below the best allowed one


class ACERPolicy(BasePolicy):
    """Shared MLP torso -> policy logits and Q values, one of each per discrete action.

    Args:
        observation_space: Observation space.
        action_space: A ``Discrete`` space.
        lr_schedule: Learning-rate schedule (for the optimizer).
        net_arch: Hidden layer sizes of the torso.
        activation_fn: Activation of the torso.
    """

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
        if mask is not None:
            logits = logits.masked_fill(~mask, _MASKED_LOGIT)
        return torch.log_softmax(logits, dim=-1), q

    def logits_and_q(self, obs: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Unmasked policy logits and Q values, each ``(batch, n_actions)``."""
        h = self.torso(self.extract_features(obs, self.features_extractor))
        return self.pi_head(h), self.q_head(h)

    def predict_masked(self, observation: np.ndarray, mask: np.ndarray, deterministic: bool = True) -> np.ndarray:
        """Actions for a batch (or one) of observations, with disallowed actions (``mask`` False) excluded."""
        obs = np.asarray(observation, dtype=np.float32)
        single = obs.ndim == len(self.observation_space.shape)
        obs_t = torch.as_tensor(obs[None] if single else obs, device=self.device)
        mask_t = torch.as_tensor(np.asarray(mask, dtype=bool), device=self.device).reshape(obs_t.shape[0], -1)
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


class SegmentReplay:
    """FIFO replay of trajectory segments (time-major arrays of ``n_steps`` x ``n_envs``)."""

    def __init__(self, capacity_segments: int, rng: np.random.Generator) -> None:
        self.segments: deque[dict[str, np.ndarray]] = deque(maxlen=max(1, capacity_segments))
        self.rng = rng

    def add(self, segment: dict[str, np.ndarray]) -> None:
        self.segments.append(segment)

    def sample(self) -> dict[str, np.ndarray]:
        return self.segments[int(self.rng.integers(len(self.segments)))]

    def __len__(self) -> int:
        return len(self.segments)


class ACER(BaseAlgorithm):
    """ACER for discrete actions.

    Args:
        policy: ``"MlpPolicy"`` or an :class:`ACERPolicy` subclass.
        env: Environment (any Gymnasium env or SB3 ``VecEnv``; several envs supported).
        learning_rate: RMSprop learning rate (or schedule).
        n_steps: Steps per environment per segment.
        gamma: Discount factor.
        q_coef: Weight of the critic loss.
        ent_coef: Weight of the entropy bonus.
        buffer_size: Replay capacity in transitions.
        replay_ratio: Mean of the Poisson number of replay updates per on-policy update.
        replay_start: Transitions collected before replay updates start.
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
        policy_kwargs: Extra policy arguments (``net_arch``, ``activation_fn``).
        tensorboard_log, verbose, seed, device: As in stable-baselines3.
    """

    policy_aliases = {"MlpPolicy": ACERPolicy}  # noqa: RUF012
    policy: ACERPolicy

    def __init__(self, policy: str | type[ACERPolicy], env: GymEnv | str, learning_rate: float | Schedule = 7e-4,
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
        for name, value, lo, hi in (("n_steps", n_steps, 1, 1e6), ("gamma", gamma, 0, 1),
                                    ("replay_ratio", replay_ratio, 0, 1e3), ("truncation", truncation, 1e-6, 1e6),
                                    ("alpha", alpha, 0, 1), ("delta", delta, 0, 1e6)):
            if not (lo <= value <= hi):
                raise ValueError(f"{name} = {value} is outside its valid range [{lo}, {hi}]")
        self.n_steps, self.gamma, self.q_coef, self.ent_coef = n_steps, gamma, q_coef, ent_coef
        self.buffer_size, self.replay_ratio, self.replay_start = buffer_size, replay_ratio, replay_start
        self.truncation, self.trust_region, self.delta, self.alpha = truncation, trust_region, delta, alpha
        self.rms_alpha, self.rms_eps, self.max_grad_norm = rms_alpha, rms_eps, max_grad_norm
        self.use_action_masks, self.mask_coef = use_action_masks, mask_coef
        self._last_masks: np.ndarray | None = None
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
        self._replay = SegmentReplay(self.buffer_size // (self.n_steps * self.n_envs), self._rng)

    def _excluded_save_params(self) -> list[str]:
        return [*super()._excluded_save_params(), "_replay", "_rng", "avg_policy", "_last_masks"]

    def _get_torch_save_params(self) -> tuple[list[str], list[str]]:
        return ["policy", "avg_policy", "policy.optimizer"], []

    # ------------------------------------------------------------------ rollouts
    def _masks_from(self, infos: Any, final: bool = False) -> np.ndarray:
        """``(n_envs, n_actions)`` bool masks from per-env infos (``final``: of the finished episode)."""
        A = int(self.action_space.n)
        masks = np.ones((self.n_envs, A), dtype=bool)
        if not self.use_action_masks or infos is None:
            return masks
        for i, info in enumerate(infos):
            info = (info or {}).get("final_info", {}) if final else (info or {})
            m = info.get("action_mask") if isinstance(info, dict) else None
            if m is not None:
                masks[i] = np.asarray(m, dtype=bool)
                if not masks[i].any():
                    masks[i] = True
        return masks

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
            "trunc_obs": np.zeros((T, N, *obs_shape), dtype=np.float32),
            "trunc_masks": np.ones((T, N, A), dtype=bool),
        }
        if self._last_masks is None:
            self._last_masks = np.ones((N, A), dtype=bool)
        callback.on_rollout_start()
        for t in range(T):
            seg["obs"][t], seg["masks"][t] = self._last_obs, self._last_masks
            with torch.no_grad():
                log_pi, _ = self.policy.evaluate(obs_as_tensor(self._last_obs, self.device),
                                                 torch.as_tensor(self._last_masks, device=self.device))
            probs = log_pi.exp().cpu().numpy().astype(np.float64)
            cum = np.cumsum(probs, axis=1)
            u = self._rng.random(N) * cum[:, -1]
            actions = np.minimum((cum < u[:, None]).sum(axis=1), A - 1)
            new_obs, rewards, dones, infos = env.step(actions)
            self.num_timesteps += N
            callback.update_locals(locals())
            if not callback.on_step():
                return None
            self._update_info_buffer(infos, dones)
            seg["actions"][t], seg["rewards"][t], seg["mu"][t] = actions, rewards, probs
            final_masks = self._masks_from(infos, final=True)
            for i, done in enumerate(dones):
                if done:
                    truncated = bool(infos[i].get("TimeLimit.truncated", False))
                    seg["truncated"][t, i] = truncated
                    seg["terminated"][t, i] = not truncated
                    if truncated:
                        seg["trunc_obs"][t, i] = infos[i]["terminal_observation"]
                        seg["trunc_masks"][t, i] = final_masks[i]
            self._last_obs, self._last_masks = new_obs, self._masks_from(infos)
        seg["obs"][T], seg["masks"][T] = self._last_obs, self._last_masks
        callback.on_rollout_end()
        return seg

    # -------------------------------------------------------------------- update
    def _update(self, seg: dict[str, np.ndarray]) -> dict[str, float]:
        T, N = seg["actions"].shape
        A = int(self.action_space.n)
        dev = self.device
        obs = torch.as_tensor(seg["obs"], device=dev)
        masks = torch.as_tensor(seg["masks"], device=dev)
        logits, q = self.policy.logits_and_q(obs[:T].reshape(T * N, *obs.shape[2:]))
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
            lp_last, q_last = self.policy.evaluate(obs[T], masks[T])
            boot[T] = (lp_last.exp() * q_last).sum(-1)
            trunc = torch.as_tensor(seg["truncated"], device=dev)
            if trunc.any():
                lp_tr, q_tr = self.policy.evaluate(torch.as_tensor(seg["trunc_obs"], device=dev)[trunc],
                                                   torch.as_tensor(seg["trunc_masks"], device=dev)[trunc])
                boot[:T][trunc] = (lp_tr.exp() * q_tr).sum(-1)
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
                avg_lp, _ = self.avg_policy.evaluate(obs[:T].reshape(T * N, *obs.shape[2:]),
                                                     masks[:T].reshape(T * N, A))
                k = -(avg_lp.exp().reshape(T, N, A)) / probs.detach().clamp(min=1e-8)  # d KL(avg || pi) / d pi
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
        total_timesteps, callback = self._setup_learn(total_timesteps, callback, reset_num_timesteps, tb_log_name,
                                                      progress_bar)
        if reset_num_timesteps or self._last_masks is None:  # _setup_learn has just reset the env
            self._last_masks = self._masks_from(getattr(self.env, "reset_infos", None))
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
