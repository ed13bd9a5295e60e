"""RKDLoss, SPLoss, CCLoss, DarkRankLoss: values, gradients, validation."""
import math

import numpy as np
import pytest
import torch

from kdzoo.losses.relational import CCLoss, DarkRankLoss, RKDLoss, SPLoss
from kdzoo.registry import LOSSES
from kdzoo.utils import ConfigError


# ------------------------------------------------------------ references
def smooth_l1(a, b):
    """Elementwise-mean Huber (delta 1), written out."""
    out = []
    for x, y in zip(np.ravel(a), np.ravel(b)):
        d = abs(x - y)
        out.append(0.5 * d * d if d < 1 else d - 0.5)
    return float(np.mean(out))


def reference_rkd(s, t, w_d, w_a):
    def dist(x):
        n = len(x)
        d = np.zeros((n, n))
        for i in range(n):
            for j in range(n):
                if i != j:
                    d[i, j] = math.sqrt(max(((x[i] - x[j])**2).sum(), 1e-12))
        return d / d[d > 0].mean()

    def angle(x):
        n = len(x)
        a = np.zeros((n, n, n))
        for i in range(n):
            for j in range(n):
                for k in range(n):
                    e1, e2 = x[j] - x[i], x[k] - x[i]
                    e1 = e1 / max(np.linalg.norm(e1), 1e-12)
                    e2 = e2 / max(np.linalg.norm(e2), 1e-12)
                    a[i, j, k] = (e1 * e2).sum()
        return a

    s = s.reshape(len(s), -1).double().numpy()
    t = t.reshape(len(t), -1).double().numpy()
    return (w_d * smooth_l1(dist(s), dist(t)) +
            w_a * smooth_l1(angle(s), angle(t)))


def _gram_reference(x, mode):
    x = x.reshape(len(x), -1).double().numpy()
    n = len(x)
    if mode == 'tface':
        x = x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)
    g = np.array([[(x[i] * x[j]).sum() for j in range(n)]
                  for i in range(n)])
    if mode == 'repdistiller':
        g = g / np.maximum(np.linalg.norm(g, axis=1, keepdims=True), 1e-12)
    return g


def reference_sp(s, t, mode):
    n = len(s)
    return float(((_gram_reference(t, mode) - _gram_reference(s, mode))**2)
                 .sum() / (n * n))


def reference_cc(s, t, gamma, orders):
    def corr(x):
        x = x.double().numpy()
        x = x / np.linalg.norm(x, axis=1, keepdims=True)
        n = len(x)
        k = np.zeros((n, n))
        for i in range(n):
            for j in range(n):
                c = (x[i] * x[j]).sum()
                k[i, j] = sum(math.exp(-2 * gamma) * (2 * gamma)**p /
                              math.factorial(p) * c**p for p in orders)
        return k

    return float(((corr(s) - corr(t))**2).mean())


def reference_darkrank(s, t, alpha, beta, plen, candidates='all'):
    def scores(x):
        x = x.double().numpy()
        x = x / np.linalg.norm(x, axis=1, keepdims=True)
        n = len(x)
        return [[-alpha * math.sqrt(max(((x[i] - x[j])**2).sum(), 1e-12))
                 ** beta for j in range(n)] for i in range(n)]

    ss, st = scores(s), scores(t)
    n = len(ss)
    total = 0.0
    for i in range(n):
        others = [j for j in range(n) if j != i]
        ranked = sorted(others, key=lambda j: -st[i][j])  # stable
        if candidates == 'list':
            ranked = ranked[:plen]
        o = [ss[i][j] for j in ranked]
        log_p = 0.0
        for k in range(plen):
            log_p += o[k] - math.log(sum(math.exp(v) for v in o[k:]))
        total += -log_p
    return total / n


def grads_student_only(loss, s_shape, t_shape):
    s = torch.randn(*s_shape, requires_grad=True)
    t = torch.randn(*t_shape, requires_grad=True)
    loss(s, t).backward()
    assert s.grad is not None and torch.isfinite(s.grad).all()
    assert s.grad.abs().sum() > 0
    assert t.grad is None


# ------------------------------------------------------------ RKD
def test_rkd_hand_computed_1d():
    s = torch.tensor([[0.0], [1.0], [2.0]])
    # teacher keeps the order: angles equal; distances (1,2,1)/(4/3) vs
    # (1,3,2)/2: |diff| .25, 0, .25 per pair -> 4 * .03125 / 9 * 25
    t_same_order = torch.tensor([[0.0], [1.0], [3.0]])
    assert RKDLoss()(s, t_same_order).item() == pytest.approx(
        25 * 0.125 / 9, abs=1e-5)
    assert RKDLoss(w_dist=0.0)(s, t_same_order).item() == pytest.approx(
        0.0, abs=1e-7)
    # teacher order 0,3,1: distance term 25 * 1.625/9; angle: 4 triplets
    # differ by 2 (smooth-l1 1.5) out of 27 -> 50 * 6/27
    t_swapped = torch.tensor([[0.0], [3.0], [1.0]])
    assert RKDLoss()(s, t_swapped).item() == pytest.approx(
        25 * 1.625 / 9 + 50 * 6 / 27, rel=1e-5)


@pytest.mark.parametrize('w_d,w_a', [(25.0, 50.0), (1.0, 2.0), (0.0, 1.0)])
def test_rkd_matches_loop_reference(w_d, w_a):
    s, t = torch.randn(5, 4), torch.randn(5, 6)
    loss = RKDLoss(w_dist=w_d, w_angle=w_a)(s, t)
    assert loss.item() == pytest.approx(reference_rkd(s, t, w_d, w_a),
                                        rel=1e-4, abs=1e-6)


def test_rkd_invariances_and_4d():
    t = torch.randn(6, 5)
    rot, _ = torch.linalg.qr(torch.randn(5, 5))
    s = 3.0 * t @ rot + 1.5  # similarity transform: relations unchanged
    assert RKDLoss()(s, t).item() == pytest.approx(0.0, abs=1e-4)
    s4, t4 = torch.randn(4, 2, 3, 3), torch.randn(4, 3, 2, 2)
    assert RKDLoss()(s4, t4).item() == pytest.approx(
        RKDLoss()(s4.flatten(1), t4.flatten(1)).item(), rel=1e-6)
    assert RKDLoss()(s4, t4).item() == pytest.approx(
        reference_rkd(s4, t4, 25, 50), rel=1e-4)


def test_rkd_gradients_and_weight():
    grads_student_only(RKDLoss(), (5, 4), (5, 7))
    # duplicate student rows: clamp keeps the gradient finite
    s = torch.randn(4, 3)
    s = torch.cat([s, s[:1]]).requires_grad_(True)
    RKDLoss()(s, torch.randn(5, 3)).backward()
    assert torch.isfinite(s.grad).all()
    a, b = torch.randn(5, 4), torch.randn(5, 8)
    assert RKDLoss(loss_weight=0.3)(a, b).item() == pytest.approx(
        0.3 * RKDLoss()(a, b).item(), rel=1e-6)


def test_rkd_validation():
    with pytest.raises(ValueError, match='batch sizes'):
        RKDLoss()(torch.randn(4, 5), torch.randn(3, 5))
    with pytest.raises(ValueError, match='t_emb must be'):
        RKDLoss()(torch.randn(4, 5), torch.randn(4))
    with pytest.raises(ValueError, match='at least 2'):
        RKDLoss()(torch.randn(1, 5), torch.randn(1, 5))
    with pytest.raises(ConfigError, match='w_dist'):
        RKDLoss(w_dist=-1)
    with pytest.raises(ConfigError, match='w_angle'):
        RKDLoss(w_angle=float('inf'))
    with pytest.raises(ConfigError, match='both 0'):
        RKDLoss(w_dist=0, w_angle=0)
    RKDLoss().check_shapes(dict(s_emb=torch.Size([2, 8]),
                                t_emb=torch.Size([2, 16])))


# ------------------------------------------------------------ SP
def test_sp_hand_computed():
    s = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    t = torch.tensor([[1.0, 0.0], [1.0, 0.0]])
    # G_s = I; G_t = ones -> rows (1/sqrt2, 1/sqrt2):
    # 2 (1/sqrt2 - 1)^2 + 2 (1/2) = 1.1715729, / 4
    assert SPLoss()(s, t).item() == pytest.approx(0.2928932, abs=1e-6)
    # tface: cosine matrices I vs ones, no row normalisation: 2 / 4
    assert SPLoss(mode='tface')(s, t).item() == pytest.approx(0.5, abs=1e-6)


@pytest.mark.parametrize('mode', ['repdistiller', 'tface'])
def test_sp_matches_loop_reference(mode):
    s, t = torch.randn(6, 2, 3, 3), torch.randn(6, 5)
    loss = SPLoss(mode=mode, loss_weight=2.5)
    assert loss(s, t).item() == pytest.approx(
        2.5 * reference_sp(s, t, mode), rel=1e-5)
    assert loss(s, t).item() == pytest.approx(
        loss(s.flatten(1), t).item(), rel=1e-6)


def test_sp_gradients_weight_validation():
    grads_student_only(SPLoss(), (4, 3, 2, 2), (4, 5, 2, 2))
    grads_student_only(SPLoss(mode='tface'), (4, 6), (4, 9))
    a, b = torch.randn(4, 6), torch.randn(4, 3)
    assert SPLoss(loss_weight=4)(a, b).item() == pytest.approx(
        4 * SPLoss()(a, b).item(), rel=1e-6)
    with pytest.raises(ValueError, match='s_feat has shape'):
        SPLoss()(torch.randn(4, 6), torch.randn(5, 6))
    with pytest.raises(ValueError, match='s_feat must be'):
        SPLoss()(torch.randn(4), torch.randn(4, 6))
    with pytest.raises(ConfigError, match='mode'):
        SPLoss(mode='paper')


def test_sp_two_teachers_hand_computed():
    s = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    t1 = torch.tensor([[1.0, 0.0], [1.0, 0.0]])  # cosine matrix: ones
    t2 = torch.tensor([[1.0, 0.0], [-1.0, 0.0]])  # [[1, -1], [-1, 1]]
    # tface, equal weights: target [[1, 0], [0, 1]] = G_s -> 0
    loss = SPLoss(mode='tface')
    assert loss(s, t1, t2).item() == pytest.approx(0.0, abs=1e-7)
    # weights (0.75, 0.25): off-diagonal target 0.5, G_s 0: 2 * 0.25 / 4
    loss = SPLoss(mode='tface', teacher_weights=(0.75, 0.25))
    assert loss(s, t1, t2).item() == pytest.approx(0.125, abs=1e-7)
    # all weight on one teacher: the one-teacher loss of that teacher
    assert SPLoss(mode='tface', teacher_weights=(0, 1))(s, t1, t2).item() \
        == pytest.approx(SPLoss(mode='tface')(s, t2).item(), abs=1e-7)


@pytest.mark.parametrize('mode', ['repdistiller', 'tface'])
def test_sp_two_teachers_match_loop_reference(mode):
    s, t1, t2 = torch.randn(6, 2, 3, 3), torch.randn(6, 5), torch.randn(6, 9)
    loss = SPLoss(mode=mode, teacher_weights=(0.3, 0.7), loss_weight=2.0)

    n = len(s)
    g1 = np.array(_gram_reference(t1, mode))
    g2 = np.array(_gram_reference(t2, mode))
    gs = np.array(_gram_reference(s, mode))
    expect = ((0.3 * g1 + 0.7 * g2 - gs)**2).sum() / (n * n)
    assert loss(s, t1, t2).item() == pytest.approx(2.0 * expect, rel=1e-5)


def test_sp_two_teachers_gradients_and_validation():
    s = torch.randn(4, 6, requires_grad=True)
    t1 = torch.randn(4, 3, requires_grad=True)
    t2 = torch.randn(4, 8, requires_grad=True)
    SPLoss(mode='tface')(s, t1, t2).backward()
    assert s.grad is not None and s.grad.abs().sum() > 0
    assert t1.grad is None and t2.grad is None
    with pytest.raises(ValueError, match='t_feat2 has shape'):
        SPLoss()(torch.randn(4, 6), torch.randn(4, 6), torch.randn(5, 6))
    for bad in ((0.5, 0.6), (1.5, -0.5), (1.0,), 0.5):
        with pytest.raises(ConfigError, match='teacher_weights'):
            SPLoss(teacher_weights=bad)


# ------------------------------------------------------------ CC
def test_cc_hand_computed():
    s = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    t = torch.tensor([[2.0, 0.0], [1.0, 0.0]])
    # cos: I vs ones; default orders 0,1: k = e^-.8 (1 + .8 c);
    # off-diagonal diff .8 e^-.8 = .3594632 (twice), MSE over 4 entries
    assert CCLoss()(s, t).item() == pytest.approx(
        0.5 * 0.3594632**2, rel=1e-5)
    # include_last_order: + e^-.8 .32 c^2 -> diff 1.12 e^-.8 = .5032485
    assert CCLoss(include_last_order=True)(s, t).item() == pytest.approx(
        0.5 * 0.5032485**2, rel=1e-5)


@pytest.mark.parametrize('gamma,p_order,last', [
    (0.4, 2, False), (0.4, 2, True), (1.0, 4, False), (0.2, 1, True)])
def test_cc_matches_loop_reference(gamma, p_order, last):
    s, t = torch.randn(5, 4), torch.randn(5, 7)
    orders = range(p_order + 1 if last else p_order)
    loss = CCLoss(gamma=gamma, p_order=p_order, include_last_order=last)
    assert loss(s, t).item() == pytest.approx(
        reference_cc(s, t, gamma, orders), rel=1e-4, abs=1e-8)


def test_cc_gradients_weight_validation():
    grads_student_only(CCLoss(), (5, 4), (5, 6))
    a, b = torch.randn(5, 4), torch.randn(5, 4)
    assert CCLoss(loss_weight=0.1)(a, b).item() == pytest.approx(
        0.1 * CCLoss()(a, b).item(), rel=1e-6)
    with pytest.raises(ValueError, match='s_emb must be'):
        CCLoss()(torch.randn(4, 2, 2, 2), torch.randn(4, 8))
    with pytest.raises(ValueError, match='batch sizes'):
        CCLoss()(torch.randn(4, 8), torch.randn(3, 8))
    with pytest.raises(ConfigError, match='gamma'):
        CCLoss(gamma=0)
    with pytest.raises(ConfigError, match='p_order'):
        CCLoss(p_order=0)
    with pytest.raises(ConfigError, match='p_order'):
        CCLoss(p_order=2.5)
    with pytest.raises(ConfigError, match='include_last_order'):
        CCLoss(include_last_order='yes')


# ------------------------------------------------------------ DarkRank
def test_darkrank_hand_computed():
    x = torch.tensor([[1.0, 0.0], [0.0, 1.0], [-1.0, 0.0]])
    # alpha=beta=1, P=1: query 0 (and 2): nearest is 1 (sqrt2 vs 2),
    # -log P = log(1 + e^(sqrt2 - 2)) = .4425476; query 1: tie, log 2
    loss = DarkRankLoss(alpha=1.0, beta=1.0, permute_len=1,
                        candidates='all')
    assert loss(x, x).item() == pytest.approx(
        (2 * 0.4425476 + math.log(2)) / 3, abs=1e-6)
    # 'list' normalises over the one-item list only: probability 1
    loss = DarkRankLoss(alpha=1.0, beta=1.0, permute_len=1,
                        candidates='list')
    assert loss(x, x).item() == pytest.approx(0.0, abs=1e-6)


@pytest.mark.parametrize('alpha,beta,plen,cand', [
    (3.0, 3.0, 3, 'all'), (3.0, 3.0, 3, 'list'), (1.0, 2.0, 5, 'all'),
    (2.0, 1.5, 4, 'list')])
def test_darkrank_matches_loop_reference(alpha, beta, plen, cand):
    s, t = torch.randn(6, 4), torch.randn(6, 7)
    loss = DarkRankLoss(alpha=alpha, beta=beta, permute_len=plen,
                        candidates=cand)
    assert loss(s, t).item() == pytest.approx(
        reference_darkrank(s, t, alpha, beta, plen, cand), rel=1e-4)


def test_darkrank_gradients_weight_validation():
    grads_student_only(DarkRankLoss(), (6, 4), (6, 8))
    a, b = torch.randn(6, 4), torch.randn(6, 4)
    assert DarkRankLoss(loss_weight=2)(a, b).item() == pytest.approx(
        2 * DarkRankLoss()(a, b).item(), rel=1e-6)
    with pytest.raises(ValueError, match='batch too small'):
        DarkRankLoss(permute_len=3)(torch.randn(3, 4), torch.randn(3, 4))
    # the build-time probe (batch 2) must not trip the batch-size check
    DarkRankLoss().check_shapes(dict(s_emb=torch.Size([2, 8]),
                                     t_emb=torch.Size([2, 16])))
    with pytest.raises(ValueError, match='batch sizes'):
        DarkRankLoss()(torch.randn(6, 4), torch.randn(5, 4))
    with pytest.raises(ConfigError, match='permute_len'):
        DarkRankLoss(permute_len=0)
    with pytest.raises(ConfigError, match='alpha'):
        DarkRankLoss(alpha=-1)
    with pytest.raises(ConfigError, match='beta'):
        DarkRankLoss(beta=0)
    with pytest.raises(ConfigError, match='candidates'):
        DarkRankLoss(candidates='some')


# ------------------------------------------------------------ shared
def test_registry_builds_with_defaults():
    built = {name: LOSSES.build(dict(type=name)) for name in
             ('RKDLoss', 'SPLoss', 'CCLoss', 'DarkRankLoss')}
    assert isinstance(built['RKDLoss'], RKDLoss)
    assert (built['RKDLoss'].w_dist, built['RKDLoss'].w_angle) == (25, 50)
    assert built['SPLoss'].mode == 'repdistiller'
    assert built['CCLoss'].gamma == 0.4 and built['CCLoss'].p_order == 2
    assert len(built['CCLoss'].coefficients) == 2  # orders 0, 1
    d = built['DarkRankLoss']
    assert (d.alpha, d.beta, d.permute_len, d.candidates) == (3, 3, 3, 'list')
    assert isinstance(LOSSES.build(dict(type='SPLoss', mode='tface',
                                        loss_weight=3)), SPLoss)


@pytest.mark.gpu
def test_relational_losses_on_cuda_match_cpu():
    s, t = torch.randn(6, 5), torch.randn(6, 7)
    for loss in (RKDLoss(), SPLoss(), SPLoss(mode='tface'), CCLoss(),
                 DarkRankLoss()):
        cpu = loss(s, t)
        sc = s.cuda().requires_grad_(True)
        gpu = loss.cuda()(sc, t.cuda())
        gpu.backward()
        assert gpu.item() == pytest.approx(cpu.item(), rel=1e-3, abs=1e-5)
        assert torch.isfinite(sc.grad).all()
