"""Feature losses (FitNet, AT, PKT, embedding L2/cosine) and ConvReg."""
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import kdzoo  # noqa: F401
from kdzoo.connectors.conv_reg import ConvReg
from kdzoo.losses.feature import (ATLoss, CosineEmbeddingLoss,
                                  EmbeddingL2Loss, FitNetLoss, PKTLoss)
from kdzoo.registry import CONNECTORS, LOSSES
from kdzoo.utils import ConfigError


def _np(x):
    return x.detach().double().numpy()


def _grad_check(loss_fn, s, t):
    """Student gets a finite non-zero gradient, the teacher none."""
    s = s.clone().requires_grad_(True)
    t = t.clone().requires_grad_(True)
    loss = loss_fn(s, t)
    assert loss.dim() == 0 and torch.isfinite(loss)
    loss.backward()
    assert s.grad is not None and torch.isfinite(s.grad).all()
    assert s.grad.abs().sum() > 0
    assert t.grad is None


# ---------------------------------------------------------------- ConvReg
@pytest.mark.parametrize('in_shape,out_size,layer,kernel', [
    ((2, 3, 8, 8), 4, torch.nn.Conv2d, (3, 3)),            # s_H == 2 t_H
    ((2, 3, 4, 4), 8, torch.nn.ConvTranspose2d, (4, 4)),   # 2 s_H == t_H
    ((2, 3, 7, 6), (5, 3), torch.nn.Conv2d, (3, 4)),       # s_H >= t_H
    ((2, 3, 5, 5), None, torch.nn.Conv2d, (1, 1)),         # same size
])
def test_convreg_layer_choice_and_output_shape(in_shape, out_size, layer,
                                               kernel):
    reg = ConvReg(out_channels=6, out_size=out_size)
    reg.build_for(torch.Size(in_shape))
    assert type(reg.conv) is layer and tuple(reg.conv.kernel_size) == kernel
    assert reg.in_channels == 3
    if out_size is None:
        expected = in_shape[2:]
    elif isinstance(out_size, int):
        expected = (out_size, out_size)
    else:
        expected = out_size
    out = reg(torch.randn(*in_shape))
    assert out.shape == (in_shape[0], 6, *expected)
    assert (out >= 0).all()  # ReLU


def test_convreg_matches_manual_conv_bn_relu():
    reg = ConvReg(out_channels=4, out_size=3, use_relu=False)
    reg.build_for(torch.Size((3, 2, 6, 6)))
    with torch.no_grad():
        reg.bn.weight.uniform_(0.5, 1.5)
        reg.bn.bias.uniform_(-1, 1)
    x = torch.randn(3, 2, 6, 6)
    out = reg(x)  # train mode: batch statistics
    y = F.conv2d(x, reg.conv.weight, reg.conv.bias, stride=2, padding=1)
    mu = y.mean(dim=(0, 2, 3), keepdim=True)
    var = y.var(dim=(0, 2, 3), unbiased=False, keepdim=True)
    ref = (y - mu) / torch.sqrt(var + reg.bn.eps)
    ref = ref * reg.bn.weight.view(1, -1, 1, 1) + reg.bn.bias.view(1, -1, 1, 1)
    assert torch.allclose(out, ref, atol=1e-5)
    assert (out < 0).any()  # use_relu=False keeps negatives
    out.sum().backward()
    assert reg.conv.weight.grad.abs().sum() > 0


def test_convreg_built_in_init_without_out_size():
    reg = ConvReg(out_channels=5, in_channels=3)
    assert sum(p.numel() for p in reg.parameters()) > 0
    reg.build_for(torch.Size((2, 3, 9, 9)))  # any size is fine
    assert reg(torch.randn(2, 3, 9, 9)).shape == (2, 5, 9, 9)


def test_convreg_errors_name_shapes_and_arguments():
    with pytest.raises(ValueError, match=r'3×3 to the teacher size 7×7'):
        ConvReg(8, out_size=7).build_for(torch.Size((2, 4, 3, 3)))
    # H halves but W does not: RepDistiller would silently give 3×4
    with pytest.raises(ValueError, match=r'6×8 to the teacher size 3×3'):
        ConvReg(8, out_size=3).build_for(torch.Size((2, 4, 6, 8)))
    with pytest.raises(ValueError, match='LinearProjector'):
        ConvReg(8).build_for(torch.Size((2, 4)))
    with pytest.raises(ValueError, match='in_channels=3'):
        ConvReg(8, in_channels=3).build_for(torch.Size((2, 4, 5, 5)))
    reg = ConvReg(8, out_size=2)
    reg.build_for(torch.Size((2, 4, 4, 4)))
    with pytest.raises(ValueError, match='built for 4×4'):
        reg.build_for(torch.Size((2, 4, 6, 6)))
    with pytest.raises(ConfigError, match=r'ConvReg: out_channels.*0'):
        ConvReg(0)
    with pytest.raises(ConfigError, match=r'out_size.*\(3,\)'):
        ConvReg(4, out_size=(3,))
    with pytest.raises(ConfigError, match=r'out_size.*-1'):
        ConvReg(4, out_size=-1)
    with pytest.raises(ConfigError, match=r'in_channels.*2\.5'):
        ConvReg(4, in_channels=2.5)
    with pytest.raises(RuntimeError, match='build_for'):
        ConvReg(4)(torch.randn(1, 2, 3, 3))


def test_convreg_registry():
    reg = CONNECTORS.build(dict(type='ConvReg', out_channels=4, out_size=2))
    assert isinstance(reg, ConvReg)


# ---------------------------------------------------------------- FitNet
def test_fitnet_hand_computed_and_reference():
    s = torch.tensor([[0.0, 0.0], [1.0, 1.0]])
    t = torch.tensor([[1.0, 2.0], [1.0, -1.0]])
    # squared errors 1, 4, 0, 4 -> mean 9/4
    assert FitNetLoss()(s, t).item() == pytest.approx(2.25)
    s, t = torch.randn(2, 3, 4, 5), torch.randn(2, 3, 4, 5)
    ref = np.mean((_np(s) - _np(t)) ** 2)
    assert FitNetLoss()(s, t).item() == pytest.approx(ref, rel=1e-5)
    assert FitNetLoss(loss_weight=100)(s, t).item() == pytest.approx(
        100 * ref, rel=1e-5)
    assert FitNetLoss(loss_weight=0)(s, t).item() == 0


def test_fitnet_gradients():
    _grad_check(FitNetLoss(), torch.randn(2, 3, 4, 4), torch.randn(2, 3, 4, 4))
    _grad_check(FitNetLoss(), torch.randn(3, 5), torch.randn(3, 5))


def test_fitnet_validation_suggests_convreg():
    with pytest.raises(ValueError, match=r's_feat has shape \(2, 8, 8, 8\).*'
                       r'\(2, 16, 4, 4\).*type="ConvReg", out_channels=16, '
                       r'out_size=4'):
        FitNetLoss()(torch.randn(2, 8, 8, 8), torch.randn(2, 16, 4, 4))
    with pytest.raises(ValueError, match=r'out_size=\(4, 2\)'):
        FitNetLoss().check_shapes(dict(s_feat=torch.Size((2, 8, 8, 8)),
                                       t_feat=torch.Size((2, 16, 4, 2))))
    with pytest.raises(ValueError, match='LinearProjector", out_features=6'):
        FitNetLoss()(torch.randn(2, 4), torch.randn(2, 6))
    with pytest.raises(ValueError, match='s_feat must be'):
        FitNetLoss()(torch.randn(2, 3, 4), torch.randn(2, 3, 4))
    with pytest.raises(ConfigError, match='loss_weight'):
        FitNetLoss(loss_weight=-1)


def test_fitnet_with_convreg_in_the_distiller(tmp_path):
    from kdzoo.distillers import FaceDistiller
    from kdzoo.engine import TrainableOptimWrapperConstructor
    from toy_models import ToyNet, toy_batch
    net = ToyNet(width=8, embedding_size=16)
    torch.save(net.state_dict(), tmp_path / 't.pth')
    teacher = dict(type='CheckpointTeacher',
                   checkpoint=str(tmp_path / 't.pth'),
                   backbone=dict(type='ToyNet', width=8, embedding_size=16))
    student = dict(backbone=dict(type='ToyNet', width=4, embedding_size=8),
                   head=dict(type='ToyHead', num_classes=5, embedding_size=8))
    # student.stage1 is 4×8×8, teacher stage2 is 16×4×4: stride-2 ConvReg
    model = FaceDistiller(
        student=student, teachers=dict(t=teacher),
        connectors=dict(reg=dict(type='ConvReg', out_channels=16,
                                 out_size=4)),
        distill_losses=dict(hint=dict(
            type='FitNetLoss', loss_weight=100.0,
            inputs=dict(s_feat=dict(tap='student.stage1', connector='reg'),
                        t_feat='t.stage2'))))
    assert isinstance(model.connectors['reg'].conv, torch.nn.Conv2d)
    assert model.connectors['reg'].conv.stride == (2, 2)
    optim = TrainableOptimWrapperConstructor(
        dict(type='OptimWrapper', optimizer=dict(type='SGD', lr=0.1)))(model)
    optimised = {id(p) for g in optim.optimizer.param_groups
                 for p in g['params']}
    assert {id(p) for p in model.connectors.parameters()} <= optimised
    log = model.train_step(toy_batch(), optim)
    assert 'loss_hint' in log
    assert math.isfinite(torch.as_tensor(log['loss_hint']).detach().item())
    with pytest.raises(ConfigError, match='out_channels=16, out_size=4'):
        FaceDistiller(student=student, teachers=dict(t=teacher),
                      distill_losses=dict(hint=dict(
                          type='FitNetLoss',
                          inputs=dict(s_feat='student.stage2',
                                      t_feat='t.stage2'))))


# ---------------------------------------------------------------- AT
def _block_mean(x, size):
    """Adaptive average pooling for sizes that divide evenly (numpy)."""
    b, c, h, w = x.shape
    oh, ow = size
    return x.reshape(b, c, oh, h // oh, ow, w // ow).mean(axis=(3, 5))


def reference_at(s, t, p, mode):
    s, t = _np(s), _np(t)
    size = (min(s.shape[2], t.shape[2]), min(s.shape[3], t.shape[3]))
    s, t = _block_mean(s, size), _block_mean(t, size)
    b = s.shape[0]
    per_sample = []
    for i in range(b):
        qs, qt = [], []
        for k in range(size[0] * size[1]):
            r, c = divmod(k, size[1])
            agg = np.mean if mode == 'code' else np.sum
            qs.append(agg(np.abs(s[i, :, r, c]) ** p))
            qt.append(agg(np.abs(t[i, :, r, c]) ** p))
        qs, qt = np.array(qs), np.array(qt)
        d = qs / np.linalg.norm(qs) - qt / np.linalg.norm(qt)
        per_sample.append(d)
    d = np.stack(per_sample)
    if mode == 'code':
        return float(np.mean(d ** 2))
    return float(np.mean(np.sqrt((d ** 2).sum(axis=1))))


def test_at_hand_computed():
    s = torch.tensor([[[[1.0, 0.0]]]])   # Q_s = (1, 0)
    t = torch.tensor([[[[0.0, -2.0]]]])  # Q_t = (0, 1)
    # code: mean((1, -1)^2) = 1; paper: ||(1, -1)|| = sqrt 2
    assert ATLoss()(s, t).item() == pytest.approx(1.0)
    assert ATLoss(mode='paper')(s, t).item() == pytest.approx(math.sqrt(2))
    assert ATLoss()(s, s * 3).item() == pytest.approx(0.0, abs=1e-7)


@pytest.mark.parametrize('mode', ['code', 'paper'])
@pytest.mark.parametrize('p', [2.0, 3.0])
@pytest.mark.parametrize('s_shape,t_shape', [
    ((3, 4, 4, 4), (3, 6, 4, 4)),    # same size, channels differ
    ((3, 4, 8, 8), (3, 6, 4, 4)),    # student larger: pooled
    ((3, 4, 2, 2), (3, 6, 4, 4)),    # teacher larger: pooled
])
def test_at_matches_reference(mode, p, s_shape, t_shape):
    s, t = torch.randn(*s_shape), torch.randn(*t_shape)
    expected = reference_at(s, t, p, mode)
    assert ATLoss(p=p, mode=mode)(s, t).item() == pytest.approx(expected,
                                                                rel=1e-5)
    assert ATLoss(p=p, mode=mode, loss_weight=1000)(s, t).item() == \
        pytest.approx(1000 * expected, rel=1e-5)


@pytest.mark.parametrize('mode', ['code', 'paper'])
def test_at_gradients(mode):
    _grad_check(ATLoss(mode=mode), torch.randn(2, 3, 4, 4),
                torch.randn(2, 5, 2, 2))
    # identical attention: finite (zero) gradient, also for the L2 norm
    x = torch.randn(2, 3, 4, 4, requires_grad=True)
    ATLoss(mode=mode)(x, x.detach()).backward()
    assert torch.isfinite(x.grad).all()


def test_at_validation():
    with pytest.raises(ValueError, match=r's_feat must be B×C×H×W'):
        ATLoss()(torch.randn(2, 8), torch.randn(2, 3, 4, 4))
    with pytest.raises(ValueError, match=r't_feat must be'):
        ATLoss()(torch.randn(2, 3, 4, 4), torch.randn(2, 8))
    with pytest.raises(ValueError, match=r'\(2, 3, 4, 4\).*\(3, 3, 4, 4\).*'
                       'batch'):
        ATLoss()(torch.randn(2, 3, 4, 4), torch.randn(3, 3, 4, 4))
    with pytest.raises(ConfigError, match=r"ATLoss: mode.*'sum'"):
        ATLoss(mode='sum')
    with pytest.raises(ConfigError, match=r'ATLoss: p .*>= 1.*0\.5'):
        ATLoss(p=0.5)


# ---------------------------------------------------------------- PKT
def reference_pkt(s, t, eps=1e-7):
    def probs(x):
        x = _np(x).reshape(x.shape[0], -1)
        b = x.shape[0]
        k = np.zeros((b, b))
        for i in range(b):
            for j in range(b):
                ni = np.sqrt((x[i] ** 2).sum()) + eps
                nj = np.sqrt((x[j] ** 2).sum()) + eps
                k[i, j] = ((x[i] / ni) @ (x[j] / nj) + 1) / 2
        return k / k.sum(axis=1, keepdims=True)
    ps, pt = probs(s), probs(t)
    return float(np.mean(pt * np.log((pt + eps) / (ps + eps))))


def test_pkt_hand_computed():
    s = torch.tensor([[1.0, 0.0], [0.0, 1.0]])  # P_s rows (2/3, 1/3)
    t = torch.tensor([[1.0, 0.0], [2.0, 0.0]])  # P_t rows (1/2, 1/2)
    # 2 rows x [.5 ln(.5/(2/3)) + .5 ln(.5/(1/3))] / 4 = ln(1.125) / 4
    assert PKTLoss()(s, t).item() == pytest.approx(math.log(1.125) / 4,
                                                   abs=1e-6)
    assert PKTLoss()(t, t * 5).item() == pytest.approx(0.0, abs=1e-6)


def test_pkt_matches_reference_dims_differ_and_maps():
    s, t = torch.randn(5, 7), torch.randn(5, 12)
    expected = reference_pkt(s, t)
    assert PKTLoss()(s, t).item() == pytest.approx(expected, rel=1e-4)
    assert PKTLoss(loss_weight=3e4)(s, t).item() == pytest.approx(
        3e4 * expected, rel=1e-4)
    fs, ft = torch.randn(4, 2, 3, 3), torch.randn(4, 5)
    assert PKTLoss()(fs, ft).item() == pytest.approx(
        reference_pkt(fs, ft), rel=1e-4)


def test_pkt_gradients_and_zero_vectors():
    _grad_check(PKTLoss(), torch.randn(4, 6), torch.randn(4, 3))
    s = torch.randn(3, 4)
    s[1] = 0  # all-zero embedding: no NaN
    s.requires_grad_(True)
    loss = PKTLoss()(s, torch.randn(3, 4))
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(s.grad).all()


def test_pkt_validation():
    with pytest.raises(ValueError, match=r'\(4, 6\).*\(3, 6\).*batch'):
        PKTLoss()(torch.randn(4, 6), torch.randn(3, 6))
    with pytest.raises(ValueError, match='s_emb must be'):
        PKTLoss()(torch.randn(4), torch.randn(4, 2))
    with pytest.raises(ConfigError, match=r'PKTLoss: eps.*> 0.*0'):
        PKTLoss(eps=0)


# ---------------------------------------------------------------- L2
def reference_l2(s, t, normalize, reduction):
    s, t = _np(s), _np(t)
    if normalize:
        s = s / np.linalg.norm(s, axis=1, keepdims=True)
        t = t / np.linalg.norm(t, axis=1, keepdims=True)
    total = sum(((s[i] - t[i]) ** 2).sum() for i in range(len(s)))
    return total / (len(s) if reduction == 'sum_mean' else s.size)


def test_embedding_l2_hand_computed():
    s = torch.tensor([[1.0, 2.0], [0.0, 0.0]])
    t = torch.tensor([[0.0, 0.0], [3.0, 4.0]])
    # squared distances 5 and 25
    assert EmbeddingL2Loss()(s, t).item() == pytest.approx(15.0)
    assert EmbeddingL2Loss(reduction='mean')(s, t).item() == pytest.approx(7.5)
    # normalised, 90 degrees apart: ||a - b||^2 = 2
    n = EmbeddingL2Loss(normalize=True)
    assert n(torch.tensor([[3.0, 0.0]]),
             torch.tensor([[0.0, 0.5]])).item() == pytest.approx(2.0)


@pytest.mark.parametrize('normalize', [False, True])
@pytest.mark.parametrize('reduction', ['sum_mean', 'mean'])
def test_embedding_l2_matches_reference(normalize, reduction):
    s, t = torch.randn(6, 8), torch.randn(6, 8)
    expected = reference_l2(s, t, normalize, reduction)
    loss = EmbeddingL2Loss(normalize=normalize, reduction=reduction,
                           loss_weight=0.5)
    assert loss(s, t).item() == pytest.approx(0.5 * expected, rel=1e-5)
    if normalize and reduction == 'sum_mean':  # = mean 2(1 - cos)
        cos = F.cosine_similarity(s, t, dim=1)
        assert loss(s, t).item() == pytest.approx(
            0.5 * (2 * (1 - cos)).mean().item(), rel=1e-5)


def test_embedding_l2_gradients():
    _grad_check(EmbeddingL2Loss(), torch.randn(3, 4), torch.randn(3, 4))
    _grad_check(EmbeddingL2Loss(normalize=True), torch.randn(3, 4),
                torch.randn(3, 4))


def test_embedding_l2_validation():
    with pytest.raises(ValueError, match=r's_emb has shape \(2, 4\).*'
                       r'LinearProjector", out_features=8'):
        EmbeddingL2Loss()(torch.randn(2, 4), torch.randn(2, 8))
    with pytest.raises(ValueError, match='s_emb must be B×D'):
        EmbeddingL2Loss()(torch.randn(2, 4, 1, 1), torch.randn(2, 4, 1, 1))
    with pytest.raises(ConfigError,
                       match=r"EmbeddingL2Loss: reduction.*'sum'"):
        EmbeddingL2Loss(reduction='sum')
    with pytest.raises(ConfigError, match=r"normalize.*'yes'"):
        EmbeddingL2Loss(normalize='yes')


# ---------------------------------------------------------------- cosine
def test_cosine_hand_computed_and_reference():
    s = torch.tensor([[1.0, 0.0], [0.0, 2.0]])
    t = torch.tensor([[1.0, 1.0], [0.0, 5.0]])
    assert CosineEmbeddingLoss()(s, t).item() == pytest.approx(
        (1 - 1 / math.sqrt(2)) / 2, abs=1e-6)
    s, t = torch.randn(5, 6), torch.randn(5, 6)
    a, b = _np(s), _np(t)
    ref = np.mean([1 - a[i] @ b[i] / (np.linalg.norm(a[i]) *
                                      np.linalg.norm(b[i]))
                   for i in range(5)])
    loss = CosineEmbeddingLoss(loss_weight=3.0)
    assert loss(s, t).item() == pytest.approx(3 * ref, rel=1e-5)
    assert loss(s * 4, t * 0.2).item() == pytest.approx(3 * ref, rel=1e-5)


def test_cosine_gradients_and_validation():
    _grad_check(CosineEmbeddingLoss(), torch.randn(3, 4), torch.randn(3, 4))
    with pytest.raises(ValueError, match=r't_emb has shape \(2, 6\).*'
                       'LinearProjector'):
        CosineEmbeddingLoss()(torch.randn(2, 4), torch.randn(2, 6))
    with pytest.raises(ConfigError, match='loss_weight'):
        CosineEmbeddingLoss(loss_weight=float('inf'))


# ---------------------------------------------------------------- common
@pytest.mark.parametrize('cfg,cls', [
    (dict(type='FitNetLoss', loss_weight=100), FitNetLoss),
    (dict(type='ATLoss', p=2, mode='paper'), ATLoss),
    (dict(type='PKTLoss', eps=1e-6), PKTLoss),
    (dict(type='EmbeddingL2Loss', normalize=True, reduction='mean'),
     EmbeddingL2Loss),
    (dict(type='CosineEmbeddingLoss', loss_weight=2), CosineEmbeddingLoss),
])
def test_registry_builds(cfg, cls):
    assert type(LOSSES.build(cfg)) is cls


def _all_cases():
    return [
        (FitNetLoss(), (2, 3, 4, 4), (2, 3, 4, 4)),
        (ATLoss(), (2, 3, 4, 4), (2, 5, 2, 2)),
        (ATLoss(mode='paper'), (2, 3, 4, 4), (2, 5, 2, 2)),
        (PKTLoss(), (4, 6), (4, 3)),
        (EmbeddingL2Loss(), (3, 4), (3, 4)),
        (CosineEmbeddingLoss(), (3, 4), (3, 4)),
    ]


def test_half_precision_inputs_give_float32():
    for loss, s_shape, t_shape in _all_cases():
        s = torch.randn(*s_shape)
        t = torch.randn(*t_shape)
        out = loss(s.bfloat16(), t.bfloat16())
        assert out.dtype == torch.float32
        assert out.item() == pytest.approx(loss(s, t).item(), rel=0.1,
                                           abs=1e-3)


@pytest.mark.gpu
def test_cuda_matches_cpu():
    for loss, s_shape, t_shape in _all_cases():
        s, t = torch.randn(*s_shape), torch.randn(*t_shape)
        cpu = loss(s, t).item()
        gpu = loss.to('cuda')(s.cuda(), t.cuda())
        assert gpu.device.type == 'cuda'
        assert gpu.item() == pytest.approx(cpu, rel=1e-4, abs=1e-6)
    reg = ConvReg(6, out_size=4)
    reg.build_for(torch.Size((2, 3, 8, 8)))
    out = reg.to('cuda')(torch.randn(2, 3, 8, 8, device='cuda'))
    assert out.shape == (2, 6, 4, 4)
