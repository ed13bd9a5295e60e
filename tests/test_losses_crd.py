"""CRDLoss: NCE value, Z, memory update, sampling, state, gradients, build."""
import inspect
import math

import numpy as np
import pytest
import torch

from kdzoo.losses.crd import CRDLoss
from kdzoo.registry import LOSSES
from kdzoo.utils import ConfigError

N, B, K = 10, 3, 4


def make_loss(**kw):
    cfg = dict(num_data=N, s_dim=5, t_dim=6, feat_dim=3, nce_k=K, nce_t=0.5)
    cfg.update(kw)
    return CRDLoss(**cfg)


def embed_np(linear, x):
    w = linear.weight.detach().double().numpy()
    b = linear.bias.detach().double().numpy()
    out = x.double().numpy() @ w.T + b
    return out / np.linalg.norm(out, axis=1, keepdims=True)


def reference_crd(loss, s, t, indices, neg, mem_s, mem_t, z_s=None,
                  z_t=None):
    """RepDistiller NCE written as loops; returns (loss, Z_s, Z_t)."""
    v_s, v_t = embed_np(loss.embed_s, s), embed_np(loss.embed_t, t)
    mem_s, mem_t = mem_s.double().numpy(), mem_t.double().numpy()
    T, n = loss.nce_t, loss.num_data
    kpn, eps = K / n, 1e-7

    def side(anchor, memory, z):
        e = np.zeros((len(anchor), K + 1))
        for b in range(len(anchor)):
            cols = [int(indices[b])] + [int(j) for j in neg[b]]
            for c, col in enumerate(cols):
                e[b, c] = math.exp((memory[col] * anchor[b]).sum() / T)
        if z is None:
            z = e.mean() * n
        p = e / z
        total = 0.0
        for b in range(len(anchor)):
            total += math.log(p[b, 0] / (p[b, 0] + kpn + eps))
            for k in range(1, K + 1):
                total += math.log(kpn / (p[b, k] + kpn + eps))
        return -total / len(anchor), z

    loss_s, z_s = side(v_s, mem_t, z_s)  # student anchor, teacher memory
    loss_t, z_t = side(v_t, mem_s, z_t)  # teacher anchor, student memory
    return loss_s + loss_t, z_s, z_t


def fixed_negatives(indices):
    gen = torch.Generator().manual_seed(123)
    neg = torch.randint(0, N - 1, (len(indices), K), generator=gen)
    return neg + (neg >= indices.unsqueeze(1)).long()


@pytest.mark.parametrize('nce_t', [0.5, 0.07])
def test_nce_value_and_z_against_loop_reference(nce_t):
    loss = make_loss(nce_t=nce_t, loss_weight=0.8)
    indices = torch.tensor([7, 0, 3])
    neg = fixed_negatives(indices)
    assert not (neg == indices.unsqueeze(1)).any()
    loss.sample_negatives = lambda idx: neg
    s, t = torch.randn(B, 5), torch.randn(B, 6)
    mem_s, mem_t = loss.memory_s.clone(), loss.memory_t.clone()
    expected, z_s, z_t = reference_crd(loss, s, t, indices, neg, mem_s, mem_t)
    out = loss.eval()(s, t, indices)
    assert out.item() == pytest.approx(0.8 * expected, rel=1e-4)
    assert loss.Z_s.item() == pytest.approx(z_s, rel=1e-5)
    assert loss.Z_t.item() == pytest.approx(z_t, rel=1e-5)
    # eval mode: no memory update; second call reuses the stored Z
    assert torch.equal(loss.memory_s, mem_s)
    s2, t2 = torch.randn(B, 5), torch.randn(B, 6)
    expected2, _, _ = reference_crd(loss, s2, t2, indices, neg, mem_s, mem_t,
                                    z_s, z_t)
    assert loss(s2, t2, indices).item() == pytest.approx(0.8 * expected2,
                                                         rel=1e-4)
    assert loss.Z_s.item() == pytest.approx(z_s, rel=1e-5)


def test_memory_update_in_training_only():
    loss = make_loss(nce_m=0.5).train()
    indices = torch.tensor([2, 9, 4])
    s, t = torch.randn(B, 5), torch.randn(B, 6)
    old_s, old_t = loss.memory_s.clone(), loss.memory_t.clone()
    loss(s, t, indices)
    v_s = torch.from_numpy(embed_np(loss.embed_s, s)).float()
    v_t = torch.from_numpy(embed_np(loss.embed_t, t)).float()
    for b, i in enumerate(indices.tolist()):
        want_s = 0.5 * old_s[i] + 0.5 * v_s[b]
        want_t = 0.5 * old_t[i] + 0.5 * v_t[b]
        torch.testing.assert_close(loss.memory_s[i], want_s / want_s.norm())
        torch.testing.assert_close(loss.memory_t[i], want_t / want_t.norm())
        assert loss.memory_s[i].norm().item() == pytest.approx(1.0, rel=1e-5)
    others = [i for i in range(N) if i not in indices.tolist()]
    assert torch.equal(loss.memory_s[others], old_s[others])
    assert torch.equal(loss.memory_t[others], old_t[others])


def test_memory_init_buffers_and_state_dict():
    loss = make_loss(feat_dim=12)
    stdv = 1 / math.sqrt(12 / 3)
    assert loss.memory_s.shape == (N, 12) and loss.memory_t.shape == (N, 12)
    assert loss.memory_s.abs().max() <= stdv
    assert loss.Z_s.item() == -1 and loss.Z_t.item() == -1
    keys = set(loss.state_dict())
    assert {'memory_s', 'memory_t', 'Z_s', 'Z_t', 'embed_s.weight',
            'embed_t.weight', 'embed_s.bias', 'embed_t.bias'} <= keys
    loss.train()(torch.randn(B, 5), torch.randn(B, 6), torch.arange(B))
    fresh = make_loss(feat_dim=12)
    fresh.load_state_dict(loss.state_dict())
    assert torch.equal(fresh.memory_s, loss.memory_s)
    assert fresh.Z_t.item() == loss.Z_t.item() > 0
    names = {n for n, _ in loss.named_parameters()}
    assert names == {'embed_s.weight', 'embed_s.bias', 'embed_t.weight',
                     'embed_t.bias'}


def test_negative_sampling_excludes_positive_and_covers_rest():
    loss = make_loss(nce_k=9)
    indices = torch.tensor([0, 5, 9])
    torch.manual_seed(7)
    draws = torch.cat([loss.sample_negatives(indices) for _ in range(40)], 1)
    torch.manual_seed(7)
    assert torch.equal(loss.sample_negatives(indices), draws[:, :9])
    assert draws.shape == (3, 360)
    for b, i in enumerate(indices.tolist()):
        seen = set(draws[b].tolist())
        assert seen == set(range(N)) - {i}


def test_gradients_reach_student_and_both_heads_not_t_emb():
    loss = make_loss().train()
    s = torch.randn(B, 5, requires_grad=True)
    t = torch.randn(B, 6, requires_grad=True)
    loss(s, t, torch.tensor([1, 2, 3])).backward()
    assert s.grad is not None and torch.isfinite(s.grad).all()
    assert s.grad.abs().sum() > 0
    assert t.grad is None
    for head in (loss.embed_s, loss.embed_t):
        assert head.weight.grad is not None
        assert torch.isfinite(head.weight.grad).all()
        assert head.weight.grad.abs().sum() > 0


def test_loss_weight_scales_linearly():
    s, t, idx = torch.randn(B, 5), torch.randn(B, 6), torch.tensor([1, 4, 8])
    values = []
    for w in (1.0, 0.25):
        torch.manual_seed(3)
        loss = make_loss(loss_weight=w).eval()
        torch.manual_seed(4)
        values.append(loss(s, t, idx).item())
    assert values[1] == pytest.approx(0.25 * values[0], rel=1e-6)


def test_lazy_heads_built_by_check_shapes():
    loss = CRDLoss(num_data=N, nce_k=K, feat_dim=3)
    s, t, idx = torch.randn(B, 5), torch.randn(B, 2, 2, 2), torch.arange(B)
    with pytest.raises(RuntimeError, match='s_dim and t_dim'):
        loss(s, t, idx)
    with torch.no_grad():  # as the distiller's build-time probe
        loss.check_shapes(dict(s_emb=torch.Size([2, 5]),
                               t_emb=torch.Size([2, 2, 2, 2]),
                               indices=torch.Size([2])))
    assert (loss.s_dim, loss.t_dim) == (5, 8)
    assert all(p.requires_grad for p in loss.parameters())
    assert loss(s, t, idx).ndim == 0  # 4-D teacher input is flattened
    with pytest.raises(ValueError, match='s_dim=6'):
        loss(torch.randn(B, 6), t, idx)


def test_validation_messages():
    with pytest.raises(ConfigError, match='nce_k'):
        CRDLoss(num_data=10, nce_k=10)
    with pytest.raises(ConfigError, match='num_data'):
        CRDLoss(num_data=0, nce_k=1)
    with pytest.raises(ConfigError, match='nce_t'):
        make_loss(nce_t=0)
    with pytest.raises(ConfigError, match='nce_m'):
        make_loss(nce_m=1.0)
    with pytest.raises(ConfigError, match='feat_dim'):
        make_loss(feat_dim=0)
    with pytest.raises(ConfigError, match='s_dim'):
        make_loss(s_dim=2.5)
    loss = make_loss()
    s, t = torch.randn(B, 5), torch.randn(B, 6)
    with pytest.raises(ValueError, match='num_data must be the training-set'):
        loss(s, t, torch.tensor([0, 1, N]))
    with pytest.raises(ValueError, match='batch sizes'):
        loss(s, t, torch.arange(B + 1))
    with pytest.raises(ValueError, match='indices must be'):
        loss(s, t, torch.zeros(B, 1, dtype=torch.long))
    with pytest.raises(ValueError, match='t_dim=6'):
        loss(s, torch.randn(B, 7), torch.arange(B))
    with pytest.raises(ValueError, match='labels has shape'):
        loss(s, t, torch.arange(B), torch.arange(B + 1))
    assert loss(s, t, torch.arange(B), torch.arange(B)).ndim == 0


def test_registry_build_defaults():
    loss = LOSSES.build(dict(type='CRDLoss', num_data=20, nce_k=5, s_dim=4,
                             t_dim=4))
    assert isinstance(loss, CRDLoss)
    assert (loss.feat_dim, loss.nce_t, loss.nce_m, loss.loss_weight) == (
        128, 0.07, 0.5, 1.0)
    assert inspect.signature(CRDLoss).parameters['nce_k'].default == 16384


def test_distiller_builds_lazy_heads_before_optimizer(tmp_path):
    """FaceDistiller's build-time check_shapes creates the heads, so the
    optimizer sees them and one training step updates bank and heads."""
    from kdzoo.distillers import FaceDistiller
    from kdzoo.engine import TrainableOptimWrapperConstructor
    from toy_models import ToyNet, toy_batch

    net = ToyNet(width=8, embedding_size=16)
    torch.save(net.state_dict(), tmp_path / 't.pth')
    model = FaceDistiller(
        student=dict(backbone=dict(type='ToyNet', width=4, embedding_size=8),
                     head=dict(type='ToyHead', num_classes=5,
                               embedding_size=8)),
        teachers=dict(teacher_fr=dict(
            type='CheckpointTeacher', checkpoint=str(tmp_path / 't.pth'),
            backbone=dict(type='ToyNet', width=8, embedding_size=16))),
        distill_losses=dict(loss_crd=dict(
            type='CRDLoss', num_data=8, nce_k=4, feat_dim=4,
            inputs=dict(s_emb='student.embedding',
                        t_emb='teacher_fr.embedding',
                        indices='data.index'))))
    crd = model.distill_losses['loss_crd']
    assert (crd.s_dim, crd.t_dim) == (8, 16)
    optim = TrainableOptimWrapperConstructor(
        dict(type='OptimWrapper', optimizer=dict(type='SGD', lr=0.1)))(model)
    in_optim = {id(p) for g in optim.optimizer.param_groups
                for p in g['params']}
    assert id(crd.embed_s.weight) in in_optim
    assert id(crd.embed_t.weight) in in_optim
    before = crd.embed_t.weight.detach().clone()
    bank = crd.memory_t.clone()
    log_vars = model.train_step(toy_batch(), optim)
    assert torch.isfinite(torch.as_tensor(log_vars['loss_crd'])).all()
    assert not torch.equal(crd.embed_t.weight, before)
    assert not torch.equal(crd.memory_t[:4], bank[:4])
    assert torch.equal(crd.memory_t[4:], bank[4:])
    assert 'distill_losses.loss_crd.memory_s' in model.state_dict()


@pytest.mark.gpu
def test_cuda_after_to_device():
    loss = make_loss().train()
    indices = torch.tensor([7, 0, 3])
    neg = fixed_negatives(indices)
    loss.sample_negatives = lambda idx: neg.to(idx.device)
    s, t = torch.randn(B, 5), torch.randn(B, 6)
    mem_s, mem_t = loss.memory_s.clone(), loss.memory_t.clone()
    expected, _, _ = reference_crd(loss, s, t, indices, neg, mem_s, mem_t)
    loss = loss.cuda()
    sc = s.cuda().requires_grad_(True)
    out = loss(sc, t.cuda(), indices.cuda())
    out.backward()
    assert out.item() == pytest.approx(expected, rel=1e-3)
    assert torch.isfinite(sc.grad).all() and loss.memory_s.is_cuda
    assert not torch.equal(loss.memory_s.cpu()[7], mem_s[7])
    del loss.sample_negatives  # the real sampler runs on the device
    assert loss(sc, t.cuda(), indices.cuda()).item() > 0
    lazy = CRDLoss(num_data=N, nce_k=K).cuda()
    lazy.check_shapes(dict(s_emb=(2, 5), t_emb=(2, 6), indices=(2,)))
    assert lazy.embed_s.weight.is_cuda
