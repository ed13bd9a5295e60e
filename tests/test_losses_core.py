"""KDLoss and AngularDistillationLoss: values, gradients, validation."""
import math

import pytest
import torch

import kdzoo  # noqa: F401
from kdzoo.losses import AngularDistillationLoss, KDLoss
from kdzoo.registry import LOSSES, MODELS
from kdzoo.utils import ConfigError


def reference_kd(s, t, tau):
    """KL(p_t || p_s) written out: sum_c p_t (log p_t - log p_s)."""
    p_t = torch.softmax(t / tau, dim=1)
    log_p_s = torch.log_softmax(s / tau, dim=1)
    kl_per_sample = (p_t * (torch.log(p_t) - log_p_s)).sum(dim=1)
    return kl_per_sample.mean() * tau**2


def test_kd_hand_computed_two_classes():
    s = torch.tensor([[0.0, 0.0]])
    t = torch.tensor([[math.log(3.0), 0.0]])
    # tau=1: p_t=(.75,.25), p_s=(.5,.5):
    # KL = .75 ln 1.5 + .25 ln .5 = 0.1308120
    assert KDLoss(tau=1.0)(s, t).item() == pytest.approx(0.1308120, abs=1e-6)
    # tau=2: p_t=(sqrt3, 1)/(sqrt3+1) = (.6339746, .3660254):
    # KL = .6339746 ln 1.2679492 + .3660254 ln .7320508 = 0.0363408, x4
    assert KDLoss(tau=2.0)(s, t).item() == pytest.approx(0.1453631, abs=1e-6)


@pytest.mark.parametrize('tau', [1.0, 4.0])
def test_kd_matches_reference_and_weight(tau):
    s, t = torch.randn(8, 10), torch.randn(8, 10)
    expected = reference_kd(s, t, tau)
    assert KDLoss(tau=tau)(s, t).item() == pytest.approx(expected.item(),
                                                         rel=1e-5)
    weighted = KDLoss(tau=tau, loss_weight=0.5)(s, t)
    assert weighted.item() == pytest.approx(0.5 * expected.item(), rel=1e-5)


def test_kd_zero_when_equal_and_gradients():
    s = torch.randn(4, 6, requires_grad=True)
    t = s.detach().clone().requires_grad_(True)
    loss = KDLoss()(s, t)
    assert loss.item() == pytest.approx(0.0, abs=1e-6)
    loss = KDLoss()(s * 2, t)
    loss.backward()
    assert s.grad is not None and s.grad.abs().sum() > 0
    assert t.grad is None  # the teacher side is detached


def test_kd_validation():
    with pytest.raises(ValueError, match='s_logits has shape'):
        KDLoss()(torch.randn(4, 5), torch.randn(4, 6))
    with pytest.raises(ValueError, match='2-D'):
        KDLoss()(torch.randn(4), torch.randn(4))
    with pytest.raises(ValueError, match='tau'):
        KDLoss(tau=0)
    with pytest.raises(ConfigError, match='loss_weight'):
        KDLoss(loss_weight=float('nan'))


def reference_angular(s, t, p):
    s_hat = s / s.norm(dim=1, keepdim=True)
    t_hat = t / t.norm(dim=1, keepdim=True)
    return ((1 - (s_hat * t_hat).sum(1)) ** p).mean()


def test_angular_hand_computed():
    s = torch.tensor([[1.0, 0.0], [0.0, 3.0]])
    t = torch.tensor([[1.0, 1.0], [0.0, 1.0]])
    # sample 1: cos = 1/sqrt2 -> (1 - .7071068)^2 = .0857864 ; sample 2: 0
    assert AngularDistillationLoss(p=2)(s, t).item() == pytest.approx(
        0.0857864 / 2, abs=1e-6)
    # p=1: (1 - .7071068) / 2
    assert AngularDistillationLoss(p=1)(s, t).item() == pytest.approx(
        0.2928932 / 2, abs=1e-6)
    # opposite directions: (1 - (-1))^2 = 4
    assert AngularDistillationLoss()(torch.tensor([[1.0, 0]]),
                                     torch.tensor([[-2.0, 0]])).item() == \
        pytest.approx(4.0)


@pytest.mark.parametrize('p', [1.0, 2.0, 3.0])
def test_angular_matches_reference_and_is_scale_invariant(p):
    s, t = torch.randn(16, 32), torch.randn(16, 32)
    loss = AngularDistillationLoss(p=p, loss_weight=2.0)
    assert loss(s, t).item() == pytest.approx(
        2.0 * reference_angular(s, t, p).item(), rel=1e-5)
    assert loss(s * 7.0, t * 0.1).item() == pytest.approx(
        loss(s, t).item(), rel=1e-5)


def test_angular_gradients_student_only():
    s = torch.randn(4, 8, requires_grad=True)
    t = torch.randn(4, 8, requires_grad=True)
    AngularDistillationLoss()(s, t).backward()
    assert torch.isfinite(s.grad).all() and s.grad.abs().sum() > 0
    assert t.grad is None
    # gradient of (1-cos)^2 vanishes when aligned; no NaN at cos = 1
    s2 = t.detach().clone().requires_grad_(True)
    AngularDistillationLoss()(s2, t).backward()
    assert torch.isfinite(s2.grad).all()


def test_angular_validation_names_the_fix():
    with pytest.raises(ValueError, match='connector'):
        AngularDistillationLoss()(torch.randn(4, 8), torch.randn(4, 16))
    with pytest.raises(ValueError, match='p must be'):
        AngularDistillationLoss(p=0)


def test_registry_builds_after_import():
    assert isinstance(LOSSES.build(dict(type='KDLoss', tau=2)), KDLoss)
    assert MODELS.get('AngularDistillationLoss') is AngularDistillationLoss
