"""DKDLoss, DISTLoss, MarginKDLoss: values, gradients, validation."""
import math

import numpy as np
import pytest
import torch
from mmengine.logging import MessageHub

from kdzoo.heads.arcface import ArcFace
from kdzoo.heads.cosface import CosFace
from kdzoo.losses.logit import DISTLoss, DKDLoss, KDLoss, MarginKDLoss
from kdzoo.registry import LOSSES
from kdzoo.utils import ConfigError


@pytest.fixture
def epoch():
    """Set the MessageHub epoch; restore the previous state afterwards."""
    hub = MessageHub.get_current_instance()
    had, old = 'epoch' in hub.runtime_info, hub.get_info('epoch')

    def set_epoch(k):
        hub.update_info('epoch', k)

    yield set_epoch
    if had:
        hub.update_info('epoch', old)
    else:
        hub.pop_info('epoch')


# ------------------------------------------------------------------ helpers
def np_softmax(z):
    z = z - z.max()
    e = np.exp(z)
    return e / e.sum()


def np_kl(p, q):
    """KL(p || q) for probability vectors; 0·log 0 = 0."""
    mask = p > 0
    return float((p[mask] * (np.log(p[mask]) - np.log(q[mask]))).sum())


def reference_dkd(s, t, y, alpha, beta, tau):
    """mdistiller's recipe written per sample in float64 numpy: softmax,
    [p_y, 1 - p_y], and the non-target softmax via z_y/tau - 1000."""
    s, t, y = s.double().numpy(), t.double().numpy(), y.numpy()
    total = 0.0
    for i in range(s.shape[0]):
        ps, pt = np_softmax(s[i] / tau), np_softmax(t[i] / tau)
        b_s = np.array([ps[y[i]], 1 - ps[y[i]]])
        b_t = np.array([pt[y[i]], 1 - pt[y[i]]])
        tckd = np_kl(b_t, b_s)
        zs, zt = s[i] / tau, t[i] / tau
        zs[y[i]] -= 1000.0
        zt[y[i]] -= 1000.0
        nckd = np_kl(np_softmax(zt), np_softmax(zs))
        total += tau**2 * (alpha * tckd + beta * nckd)
    return total / s.shape[0]


def reference_dist(s, t, beta, gamma, tau):
    """np.corrcoef per row (inter) and per column (intra), float64."""
    ys = np.stack([np_softmax(r) for r in s.double().numpy() / tau])
    yt = np.stack([np_softmax(r) for r in t.double().numpy() / tau])
    inter = np.mean([np.corrcoef(ys[i], yt[i])[0, 1]
                     for i in range(ys.shape[0])])
    intra = np.mean([np.corrcoef(ys[:, c], yt[:, c])[0, 1]
                     for c in range(ys.shape[1])])
    return tau**2 * (beta * (1 - inter) + gamma * (1 - intra))


def reference_margin_kd(s_logits, t_logits, y, tau, s, m, margin):
    """Margin applied per row with math.acos/math.cos, then Hinton KD."""
    def apply(logits):
        z = logits.double().numpy().copy()
        for i in range(z.shape[0]):
            c = z[i, y[i]] / s
            if margin == 'cosface':
                z[i, y[i]] = s * (c - m)
            else:
                c = min(max(c, -1 + 1e-7), 1 - 1e-7)
                z[i, y[i]] = s * math.cos(math.acos(c) + m)
        return z
    zs, zt = apply(s_logits), apply(t_logits)
    kl = [np_kl(np_softmax(zt[i] / tau), np_softmax(zs[i] / tau))
          for i in range(zs.shape[0])]
    return float(np.mean(kl)) * tau**2


# ------------------------------------------------------------------ DKD
def test_dkd_hand_computed():
    s = torch.zeros(1, 3)
    y = torch.tensor([0])
    # t=(ln2,0,0), tau=1: p_t=(.5,.25,.25), p_s=(1/3,)*3
    # TCKD = .5 ln 1.5 + .5 ln .75 = .0588915; NCKD = KL((.5,.5)||(.5,.5)) = 0
    t = torch.tensor([[math.log(2.0), 0.0, 0.0]])
    assert DKDLoss(tau=1.0, warmup=0)(s, t, y).item() == pytest.approx(
        0.0588915, abs=1e-6)
    # t=(0,ln3,0): p_t=(.2,.6,.2); TCKD = .2 ln .6 + .8 ln 1.2 = .0436922;
    # NCKD = .75 ln 1.5 + .25 ln .5 = .1308120 -> .0436922 + 8 * .1308120
    t = torch.tensor([[0.0, math.log(3.0), 0.0]])
    assert DKDLoss(tau=1.0, warmup=0)(s, t, y).item() == pytest.approx(
        1.0901882, abs=1e-6)
    # tau=2 only rescales logits; alpha/beta weight the two parts
    t2 = t * 2
    assert DKDLoss(alpha=2.0, beta=0.5, tau=2.0, warmup=0)(
        s, t2, y).item() == pytest.approx(
            4 * (2 * 0.0436922 + 0.5 * 0.1308120), abs=1e-5)


@pytest.mark.parametrize('alpha,beta,tau', [(1.0, 8.0, 4.0), (0.5, 2.0, 1.0)])
def test_dkd_matches_mdistiller_reference(alpha, beta, tau):
    s, t = torch.randn(6, 7) * 3, torch.randn(6, 7) * 3
    y = torch.randint(0, 7, (6, ))
    loss = DKDLoss(alpha=alpha, beta=beta, tau=tau, warmup=0)(s, t, y)
    assert loss.item() == pytest.approx(
        reference_dkd(s, t, y, alpha, beta, tau), rel=1e-5)
    # face-scale logits (s*cos, |z| <= 64) stay finite and still match
    s64, t64 = torch.rand(4, 9) * 128 - 64, torch.rand(4, 9) * 128 - 64
    y = torch.randint(0, 9, (4, ))
    loss = DKDLoss(alpha=alpha, beta=beta, tau=tau, warmup=0)(s64, t64, y)
    assert torch.isfinite(loss)
    assert loss.item() == pytest.approx(
        reference_dkd(s64, t64, y, alpha, beta, tau), rel=1e-4)


def test_dkd_recovers_kd_decomposition():
    # Eq. (7): KD = TCKD + (1 - p_y^T) NCKD (per sample, hence B = 1)
    s, t = torch.randn(1, 5), torch.randn(1, 5)
    y = torch.tensor([2])
    p_y = torch.softmax(t / 4.0, dim=1)[0, 2].item()
    dkd = DKDLoss(alpha=1.0, beta=1.0 - p_y, tau=4.0, warmup=0)(s, t, y)
    assert dkd.item() == pytest.approx(KDLoss(tau=4.0)(s, t).item(),
                                       rel=1e-5)


def test_dkd_warmup_ramp(epoch):
    s, t = torch.randn(4, 6), torch.randn(4, 6)
    y = torch.randint(0, 6, (4, ))
    full = DKDLoss(warmup=0)(s, t, y).item()
    loss = DKDLoss(warmup=20)
    epoch(0)  # first epoch (mmengine 0-based): 1/20, not 0
    assert loss(s, t, y).item() == pytest.approx(full / 20, rel=1e-5)
    epoch(9)
    assert loss(s, t, y).item() == pytest.approx(full * 10 / 20, rel=1e-5)
    epoch(19)
    assert loss(s, t, y).item() == pytest.approx(full, rel=1e-5)
    epoch(50)
    assert loss(s, t, y).item() == pytest.approx(full, rel=1e-5)
    assert DKDLoss(warmup=0)(s, t, y).item() == pytest.approx(full, rel=1e-6)


def test_dkd_gradients_and_weight():
    s = torch.randn(4, 6, requires_grad=True)
    t = torch.randn(4, 6, requires_grad=True)
    y = torch.randint(0, 6, (4, ))
    loss = DKDLoss(warmup=0)(s, t, y)
    loss.backward()
    assert torch.isfinite(s.grad).all() and s.grad.abs().sum() > 0
    assert t.grad is None
    weighted = DKDLoss(warmup=0, loss_weight=0.25)(s, t, y)
    assert weighted.item() == pytest.approx(0.25 * loss.item(), rel=1e-6)
    assert DKDLoss(warmup=0)(t, t, y).item() == pytest.approx(0, abs=1e-6)


def test_dkd_validation():
    s, t, y = torch.randn(4, 5), torch.randn(4, 5), torch.tensor([0, 1, 2, 3])
    with pytest.raises(ValueError, match='t_logits'):
        DKDLoss()(s, torch.randn(4, 6), y)
    with pytest.raises(ValueError, match='labels'):
        DKDLoss()(s, t, y[:3])
    with pytest.raises(ValueError, match=r'labels must lie in \[0, 5\)'):
        DKDLoss()(s, t, torch.tensor([0, 1, 2, 5]))
    with pytest.raises(ValueError, match='labels must be an integer'):
        DKDLoss()(s, t, y.float())
    with pytest.raises(ValueError, match='at least 2 classes'):
        DKDLoss()(torch.randn(4, 1), torch.randn(4, 1), torch.zeros(4).long())
    for kw in (dict(alpha=-1), dict(beta=float('nan')), dict(tau=0),
               dict(warmup=-1)):
        name = next(iter(kw))
        with pytest.raises(ConfigError, match=f'DKDLoss: {name}'):
            DKDLoss(**kw)
    # check_shapes as the distiller calls it (shapes only)
    with pytest.raises(ValueError, match='labels has shape'):
        DKDLoss().check_shapes(dict(s_logits=torch.Size([2, 5]),
                                    t_logits=torch.Size([2, 5]),
                                    labels=torch.Size([2, 1])))


# ------------------------------------------------------------------ DIST
def test_dist_hand_computed():
    # teacher = student with the rows swapped: every rho is -1
    s = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    t = torch.tensor([[0.0, 1.0], [1.0, 0.0]])
    assert DISTLoss()(s, t).item() == pytest.approx(4.0, abs=1e-5)
    assert DISTLoss(beta=1.0, gamma=0.0)(s, t).item() == pytest.approx(
        2.0, abs=1e-5)
    assert DISTLoss(tau=2.0)(s, t).item() == pytest.approx(16.0, abs=1e-4)
    # same relations (a positive affine change keeps rho = 1)
    assert DISTLoss()(s, s).item() == pytest.approx(0.0, abs=1e-5)


@pytest.mark.parametrize('beta,gamma,tau', [(1.0, 1.0, 1.0), (2.0, 0.5, 4.0)])
def test_dist_matches_corrcoef(beta, gamma, tau):
    s, t = torch.randn(8, 10) * 2, torch.randn(8, 10) * 2
    loss = DISTLoss(beta=beta, gamma=gamma, tau=tau)(s, t)
    assert loss.item() == pytest.approx(
        reference_dist(s, t, beta, gamma, tau), rel=1e-4)


def test_dist_gradients_weight_and_batch_of_one():
    s = torch.randn(5, 6, requires_grad=True)
    t = torch.randn(5, 6, requires_grad=True)
    loss = DISTLoss()(s, t)
    loss.backward()
    assert torch.isfinite(s.grad).all() and s.grad.abs().sum() > 0
    assert t.grad is None
    assert DISTLoss(loss_weight=3.0)(s, t).item() == pytest.approx(
        3.0 * loss.item(), rel=1e-6)
    # B = 1: the intra term is degenerate (rho = 0), finite, no NaN grad
    s1 = torch.randn(1, 6, requires_grad=True)
    out = DISTLoss()(s1, torch.randn(1, 6))
    out.backward()
    assert torch.isfinite(out) and torch.isfinite(s1.grad).all()


def test_dist_validation():
    with pytest.raises(ValueError, match='s_logits has shape'):
        DISTLoss()(torch.randn(4, 5), torch.randn(4, 6))
    with pytest.raises(ValueError, match='2-D'):
        DISTLoss()(torch.randn(4), torch.randn(4))
    for kw in (dict(beta=-0.1), dict(gamma='1'), dict(tau=0.0)):
        name = next(iter(kw))
        with pytest.raises(ConfigError, match=f'DISTLoss: {name}'):
            DISTLoss(**kw)


# ------------------------------------------------------------------ margin KD
def test_margin_kd_hand_computed():
    # cosface, s=2, m=0.5, tau=1: student (0,0) -> (-1, 0);
    # teacher (1+ln3, 0) -> (ln3, 0): p_t=(.75,.25), p_s=(1/(1+e), e/(1+e))
    s = torch.zeros(1, 2)
    t = torch.tensor([[1.0 + math.log(3.0), 0.0]])
    y = torch.tensor([0])
    p_s0 = 1 / (1 + math.e)
    expected = .75 * math.log(.75 / p_s0) + .25 * math.log(.25 / (1 - p_s0))
    loss = MarginKDLoss(tau=1.0, s=2.0, m=0.5)(s, t, y)
    assert loss.item() == pytest.approx(expected, abs=1e-6)
    # arcface, s=1, m=pi/3, tau=1 (theta + m < pi: no fallback):
    # student target cos 0.5 (theta = pi/3) -> cos(2pi/3) = -.5;
    # teacher target cos 0 (theta = pi/2) -> cos(5pi/6) = -.8660254
    s = torch.tensor([[0.5, 0.0]])
    t = torch.tensor([[0.0, 0.0]])
    m = math.pi / 3
    z_s = torch.tensor([-0.5, 0.0])
    z_t = torch.tensor([-math.sqrt(3) / 2, 0.0])
    p_t, lp_s = torch.softmax(z_t, 0), torch.log_softmax(z_s, 0)
    expected = (p_t * (p_t.log() - lp_s)).sum().item()
    loss = MarginKDLoss(tau=1.0, s=1.0, m=m, margin='arcface')(s, t, y)
    assert loss.item() == pytest.approx(expected, abs=1e-6)


@pytest.mark.parametrize('margin,m', [('cosface', 0.4), ('arcface', 0.5)])
def test_margin_kd_matches_reference(margin, m):
    scale = 64.0
    # cosines in (-0.8, 1): away from ArcFace's theta + m > pi fallback
    cs, ct = torch.rand(6, 9) * 1.8 - 0.8, torch.rand(6, 9) * 1.8 - 0.8
    y = torch.randint(0, 9, (6, ))
    loss = MarginKDLoss(tau=4.0, s=scale, m=m, margin=margin)(
        scale * cs, scale * ct, y)
    expected = reference_margin_kd(scale * cs, scale * ct, y, 4.0, scale, m,
                                   margin)
    assert loss.item() == pytest.approx(expected, rel=1e-4)


@pytest.mark.parametrize('head_cls,margin,m', [(CosFace, 'cosface', 0.4),
                                               (ArcFace, 'arcface', 0.5)])
def test_margin_kd_matches_heads_training_logits(head_cls, margin, m):
    # the margin the loss applies is the one kdzoo's heads train with,
    # including ArcFace's fallback where theta + m > pi
    head = head_cls(num_classes=5, embedding_size=4, s=64.0, m=m)
    emb = torch.randn(6, 4)
    emb[0] = -head.weight[3].detach()  # cos = -1 on the target: fallback
    y = torch.tensor([3, 0, 1, 2, 4, 0])
    loss = MarginKDLoss(s=64.0, m=m, margin=margin)
    with torch.no_grad():
        got = loss.apply_margin(head(emb), y)
        want = head(emb, y)
    assert torch.allclose(got, want, atol=1e-4)


@pytest.mark.parametrize('margin', ['cosface', 'arcface'])
def test_margin_kd_gradients_and_weight(margin):
    s = (torch.rand(4, 6) * 2 - 1).mul(64).requires_grad_(True)
    t = (torch.rand(4, 6) * 2 - 1).mul(64).requires_grad_(True)
    y = torch.randint(0, 6, (4, ))
    loss = MarginKDLoss(margin=margin)(s, t, y)
    loss.backward()
    assert torch.isfinite(s.grad).all() and s.grad.abs().sum() > 0
    assert t.grad is None
    assert MarginKDLoss(margin=margin, loss_weight=0.5)(s, t, y).item() == \
        pytest.approx(0.5 * loss.item(), rel=1e-6)
    # target cosines exactly +-1 (and beyond): clamped, finite gradients
    edge = torch.tensor([[64.0, 0.0], [-64.0, 0.0], [70.0, 1.0]],
                        requires_grad=True)
    out = MarginKDLoss(margin=margin)(edge, torch.zeros(3, 2),
                                      torch.tensor([0, 0, 0]))
    out.backward()
    assert torch.isfinite(out) and torch.isfinite(edge.grad).all()


def test_margin_kd_validation():
    s, t, y = torch.randn(4, 5), torch.randn(4, 5), torch.tensor([0, 1, 2, 3])
    with pytest.raises(ConfigError, match="margin must be one of.*'sphere'"):
        MarginKDLoss(margin='sphere')
    with pytest.raises(ConfigError, match='MarginKDLoss: s must be'):
        MarginKDLoss(s=0)
    with pytest.raises(ConfigError, match='MarginKDLoss: m must be'):
        MarginKDLoss(m=-0.1)
    with pytest.raises(ConfigError, match='m is an angle'):
        MarginKDLoss(m=4.0, margin='arcface')
    with pytest.raises(ConfigError, match='MarginKDLoss: tau'):
        MarginKDLoss(tau=-1)
    with pytest.raises(ValueError, match='labels has shape'):
        MarginKDLoss()(s, t, y.view(4, 1))
    with pytest.raises(ValueError, match=r'labels must lie in \[0, 5\).*-1'):
        MarginKDLoss()(s, t, torch.tensor([0, 1, 2, -1]))
    with pytest.raises(ValueError, match='t_logits'):
        MarginKDLoss()(s, torch.randn(4, 6), y)


# ------------------------------------------------------------------ registry
def test_registry_builds_after_import():
    dkd = LOSSES.build(dict(type='DKDLoss', beta=2.0, warmup=5))
    assert isinstance(dkd, DKDLoss) and dkd.beta == 2.0 and dkd.warmup == 5
    assert isinstance(LOSSES.build(dict(type='DISTLoss', tau=4.0)), DISTLoss)
    mkd = LOSSES.build(dict(type='MarginKDLoss', margin='arcface', m=0.5))
    assert isinstance(mkd, MarginKDLoss) and mkd.margin == 'arcface'


@pytest.mark.gpu
def test_logit_losses_on_cuda_match_cpu():
    s, t = torch.randn(6, 9) * 20, torch.randn(6, 9) * 20
    y = torch.randint(0, 9, (6, ))
    for loss in (DKDLoss(warmup=0), DISTLoss(tau=4.0),
                 MarginKDLoss(margin='arcface', s=20.0)):
        cpu = loss(s, t, y) if not isinstance(loss, DISTLoss) else loss(s, t)
        loss = loss.to('cuda')
        sc = s.cuda().requires_grad_(True)
        args = (sc, t.cuda(), y.cuda())
        out = loss(*args) if not isinstance(loss, DISTLoss) else \
            loss(*args[:2])
        out.backward()
        assert out.device.type == 'cuda'
        assert out.item() == pytest.approx(cpu.item(), rel=1e-4)
        assert torch.isfinite(sc.grad).all()
