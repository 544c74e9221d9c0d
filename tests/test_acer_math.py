"""ACER's estimators against hand-computed values."""

import math

import pytest
import torch

from drl.acer_math import acer_policy_loss_terms, retrace_targets, trust_region_step


def _segment(terminated=(False, False, False), truncated=(False, False, False), boot=None):
    col = lambda v: torch.tensor(v, dtype=torch.float64)[:, None]  # noqa: E731
    bootstrap = torch.zeros(4, 1, dtype=torch.float64)
    bootstrap[3] = 2.0
    if boot is not None:
        bootstrap[boot[0]] = boot[1]
    return dict(rewards=col([1.0, 2.0, 3.0]), q_taken=col([0.5, 1.0, 1.5]), values=col([0.4, 0.8, 1.2]),
                rho_taken=col([2.0, 0.5, 1.0]), terminated=torch.tensor(terminated)[:, None],
                truncated=torch.tensor(truncated)[:, None], bootstrap_value=bootstrap, gamma=0.9)


def test_retrace_by_hand():
    # t=2: 3 + 0.9*2 = 4.8; carried 1*(4.8-1.5)+1.2 = 4.5
    # t=1: 2 + 0.9*4.5 = 6.05; carried 0.5*(6.05-1)+0.8 = 3.325;  t=0: 1 + 0.9*3.325 = 3.9925
    q_ret = retrace_targets(**_segment())
    assert q_ret[:, 0].tolist() == pytest.approx([3.9925, 6.05, 4.8])


def test_retrace_cuts_at_termination():
    # t=1 terminal: Q_ret = 2; carried 0.5*(2-1)+0.8 = 1.3; t=0: 1 + 0.9*1.3 = 2.17
    q_ret = retrace_targets(**_segment(terminated=(False, True, False)))
    assert q_ret[:, 0].tolist() == pytest.approx([2.17, 2.0, 4.8])


def test_retrace_bootstraps_at_truncation():
    # t=1 truncated with V(next) = 5: Q_ret = 2 + 4.5 = 6.5; carried 0.5*5.5+0.8 = 3.55; t=0: 4.195
    q_ret = retrace_targets(**_segment(truncated=(False, True, False), boot=(1, 5.0)))
    assert q_ret[:, 0].tolist() == pytest.approx([4.195, 6.5, 4.8])


def test_retrace_truncates_the_trace_at_trace_max():
    # rho_1 = 3 is cut to 1: carried 1*(6.05-1)+0.8 = 5.85; t=0: 1 + 0.9*5.85 = 6.265
    seg = _segment()
    seg["rho_taken"] = torch.tensor([[2.0], [3.0], [1.0]], dtype=torch.float64)
    assert retrace_targets(**seg)[:, 0].tolist() == pytest.approx([6.265, 6.05, 4.8])
    # a higher cut lets it through: carried 3*(6.05-1)+0.8 = 15.95; t=0: 1 + 0.9*15.95 = 15.355
    assert retrace_targets(**seg, trace_max=5.0)[:, 0].tolist() == pytest.approx([15.355, 6.05, 4.8])


def test_retrace_checks_shapes():
    seg = _segment()
    seg["values"] = seg["values"][:2]
    with pytest.raises(ValueError, match="values has shape"):
        retrace_targets(**seg)


def test_policy_terms_by_hand():
    log_pi = torch.log(torch.tensor([[0.25, 0.75]], dtype=torch.float64)).requires_grad_()
    q = torch.tensor([[1.0, 3.0]], dtype=torch.float64)
    values = torch.tensor([2.5], dtype=torch.float64)  # 0.25*1 + 0.75*3
    rho = torch.tensor([[20.0, 0.5]], dtype=torch.float64)
    truncated, correction, entropy = acer_policy_loss_terms(
        log_pi, q, values, torch.tensor([4.0], dtype=torch.float64), torch.tensor([0]), rho, truncation=10.0)
    assert truncated.item() == pytest.approx(-(10 * math.log(0.25) * 1.5))
    # weights [1 - 10/20, 0]: -(0.5 * 0.25 * log 0.25 * (1 - 2.5))
    assert correction.item() == pytest.approx(-(0.5 * 0.25 * math.log(0.25) * -1.5))
    assert entropy.item() == pytest.approx(-(0.25 * math.log(0.25) + 0.75 * math.log(0.75)))
    (truncated + correction).backward()
    # d/dlog_pi[0] = -10*1.5 - 0.5*0.25*(-1.5); d/dlog_pi[1] = 0 (weight 0)
    assert log_pi.grad[0].tolist() == pytest.approx([-15.0 + 0.1875, 0.0])


def test_no_bias_correction_when_ratios_are_small():
    log_pi = torch.log(torch.tensor([[0.5, 0.5]]))
    _, correction, _ = acer_policy_loss_terms(log_pi, torch.tensor([[1.0, 2.0]]), torch.tensor([1.5]),
                                              torch.tensor([2.0]), torch.tensor([1]), torch.tensor([[1.0, 3.0]]))
    assert correction.item() == 0.0


def test_trust_region_projection():
    g = torch.tensor([[1.0, 2.0], [0.2, 1.0]])
    k = torch.tensor([[1.0, 0.0], [1.0, 0.0]])
    z = trust_region_step(g, k, delta=0.5)
    assert z[0].tolist() == pytest.approx([0.5, 2.0])  # k.g = 1 > 0.5: projected onto k.z = 0.5
    assert z[1].tolist() == pytest.approx([0.2, 1.0])  # inside the region: unchanged
    assert ((k * z).sum(-1) <= 0.5 + 1e-6).all()
    with pytest.raises(ValueError, match="delta"):
        trust_region_step(g, k, delta=-1.0)
