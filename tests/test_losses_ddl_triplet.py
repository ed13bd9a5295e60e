"""DDLLoss and TripletDistillationLoss: values, gradients, validation."""
import math

import numpy as np
import pytest
import torch

from kdzoo.losses.ddl import DDLLoss
from kdzoo.losses.triplet import TripletDistillationLoss
from kdzoo.registry import LOSSES
from kdzoo.utils import ConfigError


def make_batch(num_ids=4, per_id=3, dim=6, t_dim=5, seed=0):
    g = torch.Generator().manual_seed(seed)
    y = torch.arange(num_ids).repeat_interleave(per_id)
    centres = torch.randn(num_ids, dim, generator=g)
    s = centres[y] + 0.7 * torch.randn(len(y), dim, generator=g)
    t_centres = torch.randn(num_ids, t_dim, generator=g)
    t = t_centres[y] + 0.5 * torch.randn(len(y), t_dim, generator=g)
    return s, t, y


def _unit(x):
    x = np.asarray(x, np.float64)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


# ===================================================================== DDL
def reference_ddl(s, t, y, pos_w=0.1, neg_w=0.02, order_w=0.5, num_bins=1000,
                  sigma=0.1, thr=0.0):
    """Loop/numpy DDL (kdzoo adaptation): P = teacher, Q = student."""
    def sims(e):
        e = _unit(e)
        pos, neg = [], []
        n = len(y)
        for i in range(n):
            for j in range(i + 1, n):
                c = float(e[i] @ e[j])
                if y[i] == y[j] and c > thr:
                    pos.append(c)
            row = [float(e[i] @ e[j]) for j in range(n) if y[j] != y[i]]
            if row:
                neg.append(max(row))
        return pos, neg

    def hist(values):
        nodes = np.arange(num_bins) / num_bins
        h = np.zeros(num_bins)
        for v in values:
            h += np.exp(-0.5 * ((v - nodes) / sigma) ** 2)
        return h / h.sum()

    def kl(p, q):
        p, q = p + 1e-9, q + 1e-9
        return float(np.sum(p * (np.log(p) - np.log(q))))

    pos_s, neg_s = sims(s)
    pos_t, neg_t = sims(t)
    return (pos_w * kl(hist(pos_t), hist(pos_s))
            + neg_w * kl(hist(neg_t), hist(neg_s))
            + order_w * (np.mean(neg_s) - np.mean(pos_s)))


def test_ddl_hand_computed_order_term():
    # labels [0,0,1,1]; cos: pos (0,1)=.6, (2,3)=.8 -> mean .7
    # hardest negatives per row: 0 -> max(0, -.6)=0, 1 -> max(.8, .28)=.8,
    # 2 -> max(0, .8)=.8, 3 -> max(-.6, .28)=.28 -> mean .47
    s = torch.tensor([[1.0, 0.0], [0.6, 0.8], [0.0, 1.0], [-0.6, 0.8]])
    y = torch.tensor([0, 0, 1, 1])
    # teacher = scaled student: same histograms -> KL terms exactly 0
    got = DDLLoss()(s, 2.0 * s, y)
    assert got.item() == pytest.approx(0.5 * (0.47 - 0.7), abs=1e-6)
    got = DDLLoss(order_weight=1.0, loss_weight=2.0)(s, 3.0 * s, y)
    assert got.item() == pytest.approx(2.0 * (0.47 - 0.7), abs=1e-6)


def test_ddl_histogram_hand_computed():
    # two nodes (0, .5), sigma .5, one value .5: weights e^-.5 and 1
    h = DDLLoss(num_bins=2, sigma=0.5).histogram(torch.tensor([0.5]))
    w = math.exp(-0.5)
    assert h.shape == (1, 2)
    assert h.flatten().tolist() == pytest.approx([w / (1 + w), 1 / (1 + w)])


@pytest.mark.parametrize('kwargs', [
    dict(),
    dict(num_bins=50, sigma=0.2, positive_threshold=0.3),
    dict(pos_weight=1.0, neg_weight=0.5, order_weight=0.0, num_bins=100),
])
def test_ddl_matches_reference(kwargs):
    for seed in range(2):
        s, t, y = make_batch(seed=seed)
        got = DDLLoss(**kwargs)(s, t, y)
        rename = dict(positive_threshold='thr', pos_weight='pos_w',
                      neg_weight='neg_w', order_weight='order_w')
        ref_kwargs = {rename.get(k, k): v for k, v in kwargs.items()}
        want = reference_ddl(s.numpy(), t.numpy(), y.tolist(), **ref_kwargs)
        assert got.item() == pytest.approx(want, rel=1e-4, abs=1e-6)


def test_ddl_loss_weight_linear():
    s, t, y = make_batch()
    base = DDLLoss()(s, t, y).item()
    assert base != 0
    for w in (0.0, 0.25, 4.0):
        assert DDLLoss(loss_weight=w)(s, t, y).item() == pytest.approx(
            w * base, rel=1e-6, abs=1e-12)


def test_ddl_gradients_student_only():
    s, t, y = make_batch()
    s.requires_grad_(True)
    t.requires_grad_(True)
    DDLLoss(order_weight=0.0)(s, t, y).backward()  # KL terms alone
    assert s.grad is not None and torch.isfinite(s.grad).all()
    assert s.grad.abs().sum() > 0
    assert t.grad is None
    s.grad = None
    DDLLoss()(s, t, y).backward()
    assert s.grad.abs().sum() > 0 and t.grad is None


def test_ddl_no_positives_returns_zero_and_warns_once(monkeypatch):
    import kdzoo.losses.ddl as ddl_module
    calls = []
    monkeypatch.setattr(ddl_module, 'print_log',
                        lambda msg, **kw: calls.append((msg, kw)))
    s, t, _ = make_batch()
    s.requires_grad_(True)
    y = torch.arange(len(s))
    loss = DDLLoss()
    out = loss(s, t, y)
    assert out.item() == 0.0
    out.backward()  # still connected to the graph
    loss(s, t, y)
    assert len(calls) == 1 and 'IdentityBalancedSampler' in calls[0][0]
    # one identity only: no negatives -> 0 as well
    assert loss(s, t, torch.zeros(len(s), dtype=torch.long)).item() == 0.0
    # every positive filtered by the threshold -> 0
    assert DDLLoss(positive_threshold=0.999)(s, t, make_batch()[2]).item() \
        == 0.0


def test_ddl_validation():
    loss = DDLLoss()
    with pytest.raises(ValueError, match='s_emb.*2-D'):
        loss(torch.randn(4), torch.randn(4, 3), torch.arange(4))
    with pytest.raises(ValueError, match='labels.*batch size'):
        loss(torch.randn(4, 3), torch.randn(4, 3), torch.arange(5))
    for kwargs, arg in ((dict(pos_weight=-1), 'pos_weight'),
                        (dict(neg_weight=float('nan')), 'neg_weight'),
                        (dict(order_weight='x'), 'order_weight'),
                        (dict(num_bins=1), 'num_bins'),
                        (dict(num_bins=10.0), 'num_bins'),
                        (dict(sigma=0), 'sigma'),
                        (dict(positive_threshold=1.0), 'positive_threshold'),
                        (dict(loss_weight=-2), 'loss_weight')):
        with pytest.raises(ConfigError, match=f'DDLLoss: {arg}'):
            DDLLoss(**kwargs)


def test_ddl_registry_and_state():
    loss = LOSSES.build(dict(type='DDLLoss', num_bins=20, loss_weight=0.5))
    assert isinstance(loss, DDLLoss) and loss.num_bins == 20
    assert loss.loss_weight == 0.5
    assert dict(loss.state_dict()) == {}  # nodes are not checkpointed


@pytest.mark.gpu
def test_ddl_cuda_matches_cpu():
    s, t, y = make_batch()
    want = DDLLoss()(s, t, y)
    got = DDLLoss().to('cuda')(s.cuda(), t.cuda(), y.cuda())
    assert got.item() == pytest.approx(want.item(), rel=1e-4, abs=1e-6)


# ================================================================ triplet
def reference_triplet(s, t, y, m_max=0.5, m_min=0.2, distance='l2'):
    """Loop implementation with batch-hard mining on the student."""
    def dist(e):
        e = _unit(e)
        n = len(e)
        d = np.zeros((n, n))
        for i in range(n):
            for j in range(n):
                c = float(e[i] @ e[j])
                if distance == 'l2':
                    d[i, j] = max(float(np.sum((e[i] - e[j]) ** 2)), 0.0)
                else:
                    d[i, j] = math.acos(min(max(c, -1 + 1e-7), 1 - 1e-7))
        return d

    d_s, d_t = dist(s), dist(t)
    triplets = []
    for a in range(len(y)):
        pos = [j for j in range(len(y)) if j != a and y[j] == y[a]]
        neg = [j for j in range(len(y)) if y[j] != y[a]]
        if pos and neg:
            p = max(pos, key=lambda j: d_s[a, j])
            n = min(neg, key=lambda j: d_s[a, j])
            triplets.append((a, p, n))
    g = [max(d_t[a, n] - d_t[a, p], 0.0) for a, p, n in triplets]
    d_max = max(g)
    losses = []
    for (a, p, n), gi in zip(triplets, g):
        m = (m_max - m_min) / d_max * gi + m_min if d_max > 0 else m_min
        losses.append(max(d_s[a, p] - d_s[a, n] + m, 0.0))
    return float(np.mean(losses))


TRIPLE_Y = torch.tensor([0, 0, 1])
TRIPLE_S = torch.tensor([[1.0, 0.0], [0.0, 1.0], [-1.0, 0.0]])


def test_triplet_hand_computed_l2():
    # student d (2-2cos): d01=2, d02=4, d12=2. Anchors 0 (p=1,n=2), 1 (p=0,
    # n=2); sample 2 has no positive. Teacher t0=t1=(1,0), t2=(0,1):
    # g0 = d02 - d01 = 2 - 0, g1 = 2 - 0 -> D_max=2 -> m = .5 for both.
    t = torch.tensor([[1.0, 0.0], [1.0, 0.0], [0.0, 1.0]])
    loss = TripletDistillationLoss()
    # anchor 0: [2 - 4 + .5]+ = 0; anchor 1: [2 - 2 + .5] = .5 -> mean .25
    assert loss(TRIPLE_S, t, TRIPLE_Y).item() == pytest.approx(0.25)
    # teacher collapsed: g = 0, D_max = 0 -> m = m_min = .2 -> mean .1
    flat = torch.ones(3, 2)
    assert loss(TRIPLE_S, flat, TRIPLE_Y).item() == pytest.approx(0.1)


def test_triplet_hand_computed_cos():
    # angles: d01 = pi/2, d02 ~ pi, d12 = pi/2; teacher g equal -> m = .5
    t = torch.tensor([[1.0, 0.0], [1.0, 0.0], [0.0, 1.0]])
    got = TripletDistillationLoss(distance='cos')(TRIPLE_S, t, TRIPLE_Y)
    assert got.item() == pytest.approx(0.25, abs=1e-5)


@pytest.mark.parametrize('distance', ['l2', 'cos'])
@pytest.mark.parametrize('margins', [(0.5, 0.2), (1.0, 0.0), (0.3, 0.3)])
def test_triplet_matches_reference(distance, margins):
    for seed in range(2):
        s, t, y = make_batch(seed=seed)
        got = TripletDistillationLoss(*margins, distance=distance)(s, t, y)
        want = reference_triplet(s.numpy(), t.numpy(), y.tolist(), *margins,
                                 distance=distance)
        assert got.item() == pytest.approx(want, rel=1e-5, abs=1e-6)


def test_triplet_loss_weight_linear():
    s, t, y = make_batch()
    base = TripletDistillationLoss()(s, t, y).item()
    assert base > 0
    for w in (0.0, 0.5, 2.0):
        got = TripletDistillationLoss(loss_weight=w)(s, t, y).item()
        assert got == pytest.approx(w * base, rel=1e-6)


@pytest.mark.parametrize('distance', ['l2', 'cos'])
def test_triplet_gradients_student_only(distance):
    s, t, y = make_batch()
    s.requires_grad_(True)
    t.requires_grad_(True)
    TripletDistillationLoss(distance=distance)(s, t, y).backward()
    assert s.grad is not None and torch.isfinite(s.grad).all()
    assert s.grad.abs().sum() > 0
    assert t.grad is None
    # identical embeddings (cos = 1) keep the gradient finite
    s2 = torch.tensor([[1.0, 0.0], [1.0, 0.0], [0.0, 1.0]],
                      requires_grad=True)
    TripletDistillationLoss(distance=distance)(
        s2, torch.randn(3, 4), TRIPLE_Y).backward()
    assert torch.isfinite(s2.grad).all()


def test_triplet_no_anchor_returns_zero_and_warns_once(monkeypatch):
    import kdzoo.losses.triplet as triplet_module
    calls = []
    monkeypatch.setattr(triplet_module, 'print_log',
                        lambda msg, **kw: calls.append((msg, kw)))
    s, t, _ = make_batch()
    s.requires_grad_(True)
    loss = TripletDistillationLoss()
    out = loss(s, t, torch.arange(len(s)))
    assert out.item() == 0.0
    out.backward()
    loss(s, t, torch.zeros(len(s), dtype=torch.long))
    assert len(calls) == 1 and 'IdentityBalancedSampler' in calls[0][0]


def test_triplet_validation():
    loss = TripletDistillationLoss()
    with pytest.raises(ValueError, match='t_emb.*2-D'):
        loss(torch.randn(4, 3), torch.randn(4, 3, 1), torch.arange(4))
    with pytest.raises(ValueError, match='t_emb.*batch size'):
        loss(torch.randn(4, 3), torch.randn(3, 3), torch.arange(4))
    for kwargs, arg in ((dict(m_max=-1), 'm_max'),
                        (dict(m_min=float('inf')), 'm_min'),
                        (dict(m_max=0.1, m_min=0.2), 'm_max'),
                        (dict(distance='euclid'), 'distance'),
                        (dict(loss_weight=None), 'loss_weight')):
        with pytest.raises(ConfigError, match=f'TripletDistillationLoss: '
                                              f'{arg}'):
            TripletDistillationLoss(**kwargs)


def test_triplet_registry():
    loss = LOSSES.build(dict(type='TripletDistillationLoss', distance='cos',
                             m_max=0.6))
    assert isinstance(loss, TripletDistillationLoss)
    assert loss.distance == 'cos' and loss.m_max == 0.6 and loss.m_min == 0.2


@pytest.mark.gpu
def test_triplet_cuda_matches_cpu():
    s, t, y = make_batch()
    want = TripletDistillationLoss()(s, t, y)
    got = TripletDistillationLoss().to('cuda')(s.cuda(), t.cuda(), y.cuda())
    assert got.item() == pytest.approx(want.item(), rel=1e-4)


@pytest.mark.parametrize('cls', [DDLLoss, TripletDistillationLoss])
def test_float32_math_under_autocast(cls):
    s, t, y = make_batch()
    want = cls()(s, t, y)
    with torch.autocast('cpu', dtype=torch.bfloat16):
        got = cls()(s, t, y)
    assert got.dtype == torch.float32
    assert got.item() == pytest.approx(want.item(), rel=1e-6)
