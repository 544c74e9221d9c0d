"""The ACER estimators (Wang et al. 2016, "Sample Efficient Actor-Critic with Experience Replay").

Pure tensor functions, independent of any network, so each can be checked by hand:

* :func:`retrace_targets`: the Retrace action-value targets ``Q_ret`` of a trajectory segment;
* :func:`acer_policy_loss_terms`: the truncated importance-weighted policy gradient term and its
  bias correction, with the entropy bonus;
* :func:`trust_region_step`: the efficient trust-region projection of the gradient with respect to
  the policy statistics onto the half-space of a KL linearisation around an average policy.

Shapes follow the time-major convention ``(T, N)`` for ``T`` steps of ``N`` parallel trajectories,
and ``(T, N, A)`` for per-action quantities over ``A`` discrete actions.
"""

from __future__ import annotations

import torch


def retrace_targets(
    rewards: torch.Tensor, q_taken: torch.Tensor, values: torch.Tensor, rho_taken: torch.Tensor,
    terminated: torch.Tensor, truncated: torch.Tensor, bootstrap_value: torch.Tensor, gamma: float,
    trace_max: float = 1.0,
) -> torch.Tensor:
    """Retrace targets ``Q_ret`` for every step of a segment.

    Backwards from the last step, with ``Q_ret`` initialised to the bootstrap value::

        Q_ret_t     = r_t + gamma * next_t
        next_{t-1}  = rhobar_t (Q_ret_t - Q(x_t, a_t)) + V(x_t),   rhobar_t = min(trace_max, rho_t)

    where ``next_t`` is the value carried into step ``t`` from step ``t + 1``. At a termination the
    carried value is 0; at a truncation (time limit) it is the bootstrap value of the truncated
    state, which is *not* a termination. Every step that ends an episode cuts the trace.

    Args:
        rewards: ``(T, N)`` rewards.
        q_taken: ``(T, N)`` ``Q(x_t, a_t)`` of the current critic.
        values: ``(T, N)`` ``V(x_t) = sum_a pi(a|x_t) Q(x_t, a)``.
        rho_taken: ``(T, N)`` importance ratios ``pi(a_t|x_t) / mu(a_t|x_t)``.
        terminated: ``(T, N)`` bool, the episode ended at a terminal state after step ``t``.
        truncated: ``(T, N)`` bool, the episode was cut by the time limit after step ``t``.
        bootstrap_value: ``(T + 1, N)``: ``[t]`` is ``V`` of the state reached after step ``t``
            where that state is a truncation point (used only there), and ``[T]`` the value of
            the state after the segment's last step (used when that step does not end an episode).
        gamma: Discount factor in [0, 1].
        trace_max: Trace truncation (``c`` in Retrace; 1 in ACER).
    """
    T = rewards.shape[0]
    if not (0.0 <= gamma <= 1.0):
        raise ValueError(f"gamma = {gamma} is outside [0, 1]")
    for name, x in (("q_taken", q_taken), ("values", values), ("rho_taken", rho_taken),
                    ("terminated", terminated), ("truncated", truncated)):
        if x.shape != rewards.shape:
            raise ValueError(f"{name} has shape {tuple(x.shape)}; rewards have {tuple(rewards.shape)}")
    if bootstrap_value.shape != (T + 1, *rewards.shape[1:]):
        raise ValueError(f"bootstrap_value has shape {tuple(bootstrap_value.shape)}; expected ({T + 1}, ...)")
    rhobar = rho_taken.clamp(max=trace_max)
    targets = torch.empty_like(rewards)
    carried = bootstrap_value[T]
    for t in reversed(range(T)):
        next_value = torch.where(terminated[t], torch.zeros_like(carried),
                                 torch.where(truncated[t], bootstrap_value[t], carried))
        q_ret = rewards[t] + gamma * next_value
        targets[t] = q_ret
        carried = rhobar[t] * (q_ret - q_taken[t]) + values[t]
    return targets


def acer_policy_loss_terms(
    log_pi: torch.Tensor, q: torch.Tensor, values: torch.Tensor, q_ret: torch.Tensor, actions: torch.Tensor,
    rho: torch.Tensor, truncation: float = 10.0,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The two terms of ACER's policy gradient, as losses to minimise (means over steps).

    * truncated term: ``-min(c, rho_a) * log pi(a) * (Q_ret - V)``;
    * bias correction: ``-sum_b [1 - c / rho_b]_+ * pi(b) * log pi(b) * (Q(b) - V)``, with the
      policy probabilities ``pi(b)`` detached (they weight the score-function term);
    * entropy: ``-sum_b pi(b) log pi(b)`` (returned as a mean, to be maximised).

    Advantages and weights are constants (detached); gradients flow through ``log_pi`` only.

    Args:
        log_pi: ``(..., A)`` log-probabilities of the current policy.
        q: ``(..., A)`` critic values.
        values: ``(...)`` ``V = sum pi Q``.
        q_ret: ``(...)`` Retrace targets.
        actions: ``(...)`` long, the actions taken.
        rho: ``(..., A)`` ratios ``pi(b) / mu(b)`` for every action.
        truncation: ``c``, the importance-weight truncation (10 in ACER).
    """
    pi = log_pi.exp()
    adv_taken = (q_ret - values).detach()
    rho_taken = rho.gather(-1, actions.unsqueeze(-1)).squeeze(-1).detach()
    log_pi_taken = log_pi.gather(-1, actions.unsqueeze(-1)).squeeze(-1)
    truncated_term = -(rho_taken.clamp(max=truncation) * log_pi_taken * adv_taken).mean()
    correction_weight = (1.0 - truncation / rho.detach().clamp(min=1e-8)).clamp(min=0.0)
    adv_all = (q - values.unsqueeze(-1)).detach()
    bias_correction = -((correction_weight * pi.detach() * log_pi * adv_all).sum(-1)).mean()
    entropy = -(pi * log_pi).sum(-1).mean()
    return truncated_term, bias_correction, entropy


def trust_region_step(g: torch.Tensor, k: torch.Tensor, delta: float) -> torch.Tensor:
    """ACER's efficient trust-region projection, per row:

        z* = g - max(0, (k . g - delta) / ||k||^2) k

    ``g`` is the gradient of the objective with respect to the policy statistics, ``k`` the
    gradient of ``KL(average policy || current policy)`` with respect to the same statistics, and
    ``delta`` the trust-region size. The result satisfies ``k . z* <= delta``.
    """
    if delta < 0:
        raise ValueError(f"delta = {delta} must be >= 0")
    kg = (k * g).sum(-1, keepdim=True)
    kk = (k * k).sum(-1, keepdim=True).clamp(min=1e-12)
    return g - ((kg - delta) / kk).clamp(min=0.0) * k
