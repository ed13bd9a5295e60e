"""EKDLoss: thresholds/EMA, soft-rank value, gradients, state, DDP gather."""
import datetime
import math
import os

import numpy as np
import pytest
import torch

from kdzoo.losses.ekd import EKDLoss
from kdzoo.registry import LOSSES
from kdzoo.utils import ConfigError

FARS = (1e-1, 1e-2, 1e-3, 1e-4, 1e-5, 1e-6)


# --------------------------------------------------------------- reference
def reference_ekd_step(s, t, y, a_s, a_t, topk, tau, pos_w, neg_w, momentum,
                       fars, training=True):
    """One EKD step written with numpy loops (float64).

    Returns (loss, new a_s, new a_t); thresholds update before use.
    """
    s = np.asarray(s, np.float64)
    t = np.asarray(t, np.float64)
    s = s / np.linalg.norm(s, axis=1, keepdims=True)
    t = t / np.linalg.norm(t, axis=1, keepdims=True)
    pos_s, pos_t, neg_s, neg_t = [], [], [], []
    n = len(y)
    for i in range(n):
        for j in range(i + 1, n):
            cs, ct = float(s[i] @ s[j]), float(t[i] @ t[j])
            if y[i] == y[j]:
                pos_s.append(cs)
                pos_t.append(ct)
            else:
                neg_s.append(cs)
                neg_t.append(ct)
    a_s, a_t = np.array(a_s, np.float64), np.array(a_t, np.float64)
    if training and neg_s:
        anchors = [int(round(1 / f)) for f in fars]
        desc_s = sorted(neg_s, reverse=True)
        desc_t = sorted(neg_t, reverse=True)
        for k, a in enumerate(anchors):
            a_s[k] = momentum * desc_s[len(neg_s) // a] + \
                (1 - momentum) * a_s[k]
            a_t[k] = momentum * desc_t[len(neg_t) // a] + \
                (1 - momentum) * a_t[k]

    def rank(x, anchors_):
        total = 0.0
        for a in anchors_:
            e = min(max(-(x - a) / tau, -50.0), 50.0)
            total += 1.0 / (1.0 + math.exp(e))
        return total

    def mse(xs, xt):
        if not xs:
            return 0.0
        return float(np.mean([(rank(u, a_s) - rank(v, a_t)) ** 2
                              for u, v in zip(xs, xt)]))

    hard = sorted(range(len(neg_s)), key=lambda k: -neg_s[k])[:topk]
    l_neg = mse([neg_s[k] for k in hard], [neg_t[k] for k in hard])
    l_pos = mse(pos_s, pos_t)
    return pos_w * l_pos + neg_w * l_neg, a_s, a_t


def make_batch(num_ids=4, per_id=3, dim=6, t_dim=5, seed=0):
    g = torch.Generator().manual_seed(seed)
    y = torch.arange(num_ids).repeat_interleave(per_id)
    centres = torch.randn(num_ids, dim, generator=g)
    s = centres[y] + 0.8 * torch.randn(len(y), dim, generator=g)
    t = torch.randn(len(y), t_dim, generator=g)
    return s, t, y


# ------------------------------------------------------------------ values
def test_thresholds_hand_computed():
    # three identities -> every pair negative; student cos: (0,1)=0,
    # (0,2)=.6, (1,2)=.8 -> sorted desc [.8, .6, 0].
    s = torch.tensor([[1.0, 0.0], [0.0, 1.0], [0.6, 0.8]])
    y = torch.tensor([0, 1, 2])
    loss = EKDLoss(fars=(0.5, 0.1), momentum=0.5).train()
    # far .5: index 3 // 2 = 1 -> .6; far .1: index 3 // 10 = 0 -> .8
    loss(s, s.clone(), y)
    assert loss.thresholds_s.tolist() == pytest.approx([0.3, 0.4])
    assert loss.thresholds_t.tolist() == pytest.approx([0.3, 0.4])
    loss(s, s.clone(), y)  # EMA: .5 * .6 + .5 * .3 = .45
    assert loss.thresholds_s.tolist() == pytest.approx([0.45, 0.6])
    # identical student and teacher -> identical ranks -> zero loss
    assert loss(s, s.clone(), y).item() == pytest.approx(0.0, abs=1e-12)


@pytest.mark.parametrize('kwargs', [
    dict(topk=10, tau=0.1, fars=(0.5, 0.1, 0.02)),
    dict(topk=2000, tau=0.01, fars=FARS),
    dict(topk=3, tau=0.05, momentum=0.3, pos_weight=1.0, neg_weight=0.5,
         fars=(0.25, 0.05)),
])
def test_matches_numpy_reference_over_steps(kwargs):
    full = dict(topk=2000, tau=0.01, pos_weight=0.02, neg_weight=0.01,
                momentum=0.01, fars=FARS)
    full.update(kwargs)
    loss = EKDLoss(**full).train()
    a_s = np.zeros(len(full['fars']))
    a_t = np.zeros(len(full['fars']))
    for step in range(3):  # EMA carries over steps
        s, t, y = make_batch(seed=step)
        got = loss(s, t, y)
        want, a_s, a_t = reference_ekd_step(
            s.numpy(), t.numpy(), y.tolist(), a_s, a_t, full['topk'],
            full['tau'], full['pos_weight'], full['neg_weight'],
            full['momentum'], full['fars'])
        np.testing.assert_allclose(loss.thresholds_s.numpy(), a_s,
                                   rtol=1e-5, atol=1e-7)
        np.testing.assert_allclose(loss.thresholds_t.numpy(), a_t,
                                   rtol=1e-5, atol=1e-7)
        assert got.item() == pytest.approx(want, rel=1e-4, abs=1e-8)


def test_eval_mode_does_not_update_thresholds():
    loss = EKDLoss(tau=0.1, fars=(0.5, 0.1))
    s, t, y = make_batch()
    loss.train()(s, t, y)
    before = (loss.thresholds_s.clone(), loss.thresholds_t.clone())
    got = loss.eval()(s, t, y)
    assert torch.equal(loss.thresholds_s, before[0])
    assert torch.equal(loss.thresholds_t, before[1])
    want, _, _ = reference_ekd_step(
        s.numpy(), t.numpy(), y.tolist(), before[0].numpy(),
        before[1].numpy(), 2000, 0.1, 0.02, 0.01, 0.01, (0.5, 0.1),
        training=False)
    assert got.item() == pytest.approx(want, rel=1e-4)


def test_loss_weight_scales_linearly():
    s, t, y = make_batch()
    base = EKDLoss(tau=0.1)(s, t, y)
    assert base.item() > 0
    for w in (0.0, 0.5, 3.0):
        got = EKDLoss(tau=0.1, loss_weight=w)(s, t, y)
        assert got.item() == pytest.approx(w * base.item(), rel=1e-6)


# --------------------------------------------------------------- gradients
def test_gradient_student_only():
    s, t, y = make_batch()
    s.requires_grad_(True)
    t.requires_grad_(True)
    loss = EKDLoss(tau=0.1, fars=(0.5, 0.1))
    loss(s, t, y)  # move thresholds off 0
    loss(s, t, y).backward()
    assert s.grad is not None and torch.isfinite(s.grad).all()
    assert s.grad.abs().sum() > 0
    assert t.grad is None
    assert not loss.thresholds_s.requires_grad


# ------------------------------------------------------------------- state
def test_thresholds_in_state_dict_and_load_back():
    loss = EKDLoss(fars=(0.5, 0.1))
    assert set(loss.state_dict()) == {'thresholds_s', 'thresholds_t'}
    s, t, y = make_batch()
    loss(s, t, y)
    state = {k: v.clone() for k, v in loss.state_dict().items()}
    assert state['thresholds_s'].abs().sum() > 0
    other = EKDLoss(fars=(0.5, 0.1))
    other.load_state_dict(state)
    assert torch.equal(other.thresholds_s, loss.thresholds_s)
    assert torch.equal(other.thresholds_t, loss.thresholds_t)
    other.eval()
    loss.eval()
    assert other(s, t, y).item() == loss(s, t, y).item()


def test_no_positive_pairs_warns_once(monkeypatch):
    import kdzoo.losses.ekd as ekd_module
    calls = []
    monkeypatch.setattr(ekd_module, 'print_log',
                        lambda msg, **kw: calls.append((msg, kw)))
    s, t, _ = make_batch()
    y = torch.arange(len(s))  # every sample its own identity
    s.requires_grad_(True)
    loss = EKDLoss(tau=0.1, fars=(0.5, 0.1))
    got = loss(s, t, y)
    # only the negative term remains
    want, _, _ = reference_ekd_step(s.detach().numpy(), t.numpy(),
                                    y.tolist(), [0, 0], [0, 0], 2000, 0.1,
                                    0.02, 0.01, 0.01, (0.5, 0.1))
    assert got.item() == pytest.approx(want, rel=1e-4)
    got.backward()
    assert torch.isfinite(s.grad).all()
    loss(s, t, y)
    assert len(calls) == 1
    assert 'IdentityBalancedSampler' in calls[0][0]
    assert calls[0][1]['level'] == 30  # logging.WARNING


def test_single_identity_batch_is_zero_and_keeps_thresholds():
    s, t, _ = make_batch()
    y = torch.zeros(len(s), dtype=torch.long)
    s.requires_grad_(True)
    loss = EKDLoss(tau=0.1)
    got = loss(s, t, y)
    # thresholds 0 for both models; positives only
    want, _, _ = reference_ekd_step(s.detach().numpy(), t.numpy(), y.tolist(),
                                    [0] * 6, [0] * 6, 2000, 0.1, 0.02, 0.01,
                                    0.01, FARS)
    assert got.item() == pytest.approx(want, rel=1e-4)
    assert loss.thresholds_s.abs().sum() == 0
    got.backward()
    assert s.grad is not None


# -------------------------------------------------------------- validation
def test_shape_validation():
    loss = EKDLoss()
    with pytest.raises(ValueError, match='s_emb.*2-D'):
        loss(torch.randn(4, 3, 2), torch.randn(4, 5), torch.arange(4))
    with pytest.raises(ValueError, match='labels.*1-D'):
        loss(torch.randn(4, 3), torch.randn(4, 5), torch.zeros(4, 1))
    with pytest.raises(ValueError, match='t_emb.*batch size'):
        loss(torch.randn(4, 3), torch.randn(6, 3), torch.arange(4))
    with pytest.raises(ValueError, match='labels'):
        loss.check_shapes(dict(s_emb=torch.Size([4, 3]),
                               t_emb=torch.Size([4, 8]),
                               labels=torch.Size([5])))
    # different widths are fine: only similarities are compared
    loss.check_shapes(dict(s_emb=torch.Size([4, 3]), t_emb=torch.Size([4, 8]),
                           labels=torch.Size([4])))


@pytest.mark.parametrize('kwargs,arg', [
    (dict(topk=0), 'topk'), (dict(topk=1.5), 'topk'),
    (dict(tau=0), 'tau'), (dict(tau=float('inf')), 'tau'),
    (dict(pos_weight=-1), 'pos_weight'), (dict(neg_weight=None), 'neg_weight'),
    (dict(momentum=0), 'momentum'), (dict(momentum=1.5), 'momentum'),
    (dict(fars=()), 'fars'), (dict(fars=(0.1, 1.0)), 'fars'),
    (dict(fars=0.1), 'fars'), (dict(loss_weight=-1), 'loss_weight'),
])
def test_constructor_validation(kwargs, arg):
    with pytest.raises(ConfigError, match=f'EKDLoss: {arg}'):
        EKDLoss(**kwargs)


def test_registry_build():
    loss = LOSSES.build(dict(type='EKDLoss', topk=100, loss_weight=2.0))
    assert isinstance(loss, EKDLoss)
    assert loss.topk == 100 and loss.loss_weight == 2.0
    assert loss.fars == FARS and loss.all_gather
    assert 'topk=100' in repr(loss)


@pytest.mark.gpu
def test_cuda_matches_cpu():
    s, t, y = make_batch()
    cpu = EKDLoss(tau=0.1)
    gpu = EKDLoss(tau=0.1).to('cuda')
    want = cpu(s, t, y)
    got = gpu(s.cuda(), t.cuda(), y.cuda())
    assert got.item() == pytest.approx(want.item(), rel=1e-4)
    assert gpu.thresholds_s.is_cuda
    torch.testing.assert_close(gpu.thresholds_s.cpu(), cpu.thresholds_s)


# ---------------------------------------------------------- 2-process DDP
def _ddp_worker(rank, world, init_file, data_path, out_dir):
    import torch.distributed as dist
    dist.init_process_group('gloo', init_method=f'file://{init_file}',
                            rank=rank, world_size=world,
                            timeout=datetime.timedelta(seconds=60))
    try:
        data = torch.load(data_path)
        s, t, y = data['s'], data['t'], data['y']
        results = {}
        for name, cuts in (('even', [0, 6, 12]), ('uneven', [0, 5, 12])):
            lo, hi = cuts[rank], cuts[rank + 1]
            loss = EKDLoss(tau=0.1, topk=10, fars=(0.5, 0.1, 0.02))
            s_loc = s[lo:hi].clone().requires_grad_(True)
            t_loc = t[lo:hi].clone().requires_grad_(True)
            for _ in range(2):  # second step uses EMA'd thresholds
                s_loc.grad = None
                out = loss(s_loc, t_loc, y[lo:hi])
                out.backward()
            results[name] = dict(loss=out.detach(), grad=s_loc.grad,
                                 t_grad=t_loc.grad,
                                 thr_s=loss.thresholds_s.clone(),
                                 thr_t=loss.thresholds_t.clone())
        torch.save(results, os.path.join(out_dir, f'rank{rank}.pt'))
    finally:
        dist.destroy_process_group()


@pytest.mark.slow  # 3-6 s: two spawned interpreters import torch
def test_two_process_gloo_all_gather_equals_full_batch(tmp_path):
    import torch.multiprocessing as mp
    s, t, y = make_batch()
    data_path = str(tmp_path / 'data.pt')
    torch.save(dict(s=s, t=t, y=y), data_path)
    mp.spawn(_ddp_worker, args=(2, str(tmp_path / 'init'), data_path,
                                str(tmp_path)), nprocs=2, join=True)

    full = EKDLoss(tau=0.1, topk=10, fars=(0.5, 0.1, 0.02))
    s_full = s.clone().requires_grad_(True)
    for _ in range(2):
        s_full.grad = None
        want = full(s_full, t, y)
        want.backward()
    for name, cuts in (('even', [0, 6, 12]), ('uneven', [0, 5, 12])):
        for rank in range(2):
            res = torch.load(tmp_path / f'rank{rank}.pt')[name]
            assert res['loss'].item() == pytest.approx(want.item(), rel=1e-5)
            torch.testing.assert_close(res['thr_s'], full.thresholds_s)
            torch.testing.assert_close(res['thr_t'], full.thresholds_t)
            assert res['t_grad'] is None
            # backward sums every rank's (identical) loss gradient into the
            # local slice: world_size x the single-process gradient, which
            # DDP's gradient averaging brings back to exactly 1x.
            lo, hi = cuts[rank], cuts[rank + 1]
            torch.testing.assert_close(res['grad'], 2 * s_full.grad[lo:hi],
                                       rtol=1e-4, atol=1e-7)


def test_float32_math_under_autocast():
    s, t, y = make_batch()
    want = EKDLoss(tau=0.01, fars=(0.5, 0.1))(s, t, y)
    with torch.autocast('cpu', dtype=torch.bfloat16):
        got = EKDLoss(tau=0.01, fars=(0.5, 0.1))(s, t.bfloat16(), y)
    assert got.dtype == torch.float32
    assert got.item() == pytest.approx(
        EKDLoss(tau=0.01, fars=(0.5, 0.1))(s, t.bfloat16().float(), y).item(),
        rel=1e-6)
    assert want.item() > 0
