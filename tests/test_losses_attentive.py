"""AgeAttentionLoss and TeacherAttentionAngularLoss: values, gradients,
validation (LIAAD-style, reconstructed)."""
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from kdzoo.losses.attentive import (AgeAttentionLoss,
                                    TeacherAttentionAngularLoss)
from kdzoo.registry import LOSSES
from kdzoo.utils import ConfigError


# ------------------------------------------------------------ references
def np_attention(f, q):
    """mean_c |F_c|^q for one sample (C×H×W numpy) -> H×W."""
    return (np.abs(f) ** q).mean(axis=0)


def np_transfer(s, t, q):
    """Loop-based transfer loss on equal spatial sizes (numpy, float64)."""
    s, t = s.double().numpy(), t.double().numpy()
    total, count = 0.0, 0
    for b in range(s.shape[0]):
        a_s = np_attention(s[b], q).ravel()
        a_t = np_attention(t[b], q).ravel()
        a_s = a_s / np.sqrt((a_s ** 2).sum())
        a_t = a_t / np.sqrt((a_t ** 2).sum())
        for k in range(a_s.size):
            total += (a_s[k] - a_t[k]) ** 2
            count += 1
    return total / count


def np_weighted(t_feat, s_map, t_map, q):
    """Loop-based 'weight' loss when t_feat and the maps share H×W."""
    t_feat = t_feat.double().numpy()
    s_map, t_map = s_map.double().numpy(), t_map.double().numpy()
    batch, chans, h, w = s_map.shape
    total = 0.0
    for b in range(batch):
        att = np_attention(t_feat[b], q)
        att = att / att.mean()
        for i in range(h):
            for j in range(w):
                sv, tv = s_map[b, :, i, j], t_map[b, :, i, j]
                sv = sv / np.linalg.norm(sv)
                tv = tv / np.linalg.norm(tv)
                total += att[i, j] * ((sv - tv) ** 2).mean()
    return total / (batch * h * w)


def np_teacher_attention(s1, t1, s2, t2, logits, p, tau, alpha_min, beta):
    """Plain per-sample loop given the gate's raw logits (B×2)."""
    s1, t1, s2, t2 = (x.double().numpy() for x in (s1, t1, s2, t2))
    logits = logits.double().numpy()
    total, batch = 0.0, s1.shape[0]
    for i in range(batch):
        d = []
        for s, t in ((s1[i], t1[i]), (s2[i], t2[i])):
            cos = s @ t / (np.linalg.norm(s) * np.linalg.norm(t))
            d.append((1 - cos) ** p)
        z = logits[i] / tau
        soft = np.exp(z - z.max()) / np.exp(z - z.max()).sum()
        alpha = alpha_min + (1 - 2 * alpha_min) * soft
        total += sum(alpha[k] * d[k] for k in range(2))
        total += beta * sum(alpha[k] * math.log(alpha[k]) for k in range(2))
    return total / batch


def gate_logits(loss, t1, t2):
    """The gate's raw output, computed here from its weights."""
    x = torch.cat([t1 / t1.norm(dim=1, keepdim=True),
                   t2 / t2.norm(dim=1, keepdim=True)], dim=1)
    lin1, lin2 = loss.g[0], loss.g[2]
    h = torch.relu(x @ lin1.weight.T + lin1.bias)
    return (h @ lin2.weight.T + lin2.bias).detach()


# ------------------------------------------------------------ AgeAttention
def test_age_attention_hand_computed():
    # one channel, 1×2 maps, q=2: a_s = (1, 0) -> Â_s = (1, 0);
    # a_t = (1, 1) -> Â_t = (1, 1)/sqrt2.
    # loss = ((1 - .7071068)^2 + (0 - .7071068)^2) / 2 = 0.2928932
    s = torch.tensor([[[[1.0, 0.0]]]])
    t = torch.tensor([[[[1.0, -1.0]]]])
    assert AgeAttentionLoss()(s, t).item() == pytest.approx(0.2928932,
                                                            abs=1e-6)
    # q=1, two channels: a_s = mean(|.|) = (1.5, 0.5) -> (3, 1)/sqrt10
    s2 = torch.tensor([[[[1.0, 0.0]], [[2.0, -1.0]]]])
    t2 = torch.tensor([[[[0.0, 4.0]]]])  # a_t = (0, 4) -> (0, 1)
    expected = ((3 / math.sqrt(10)) ** 2 + (1 / math.sqrt(10) - 1) ** 2) / 2
    assert AgeAttentionLoss(q=1)(s2, t2).item() == pytest.approx(expected,
                                                                 abs=1e-6)
    # identical attention -> 0, even with different channel counts / scale
    f = torch.randn(2, 3, 4, 4)
    assert AgeAttentionLoss()(torch.cat([f, f], 1) * 3, f).item() == \
        pytest.approx(0.0, abs=1e-7)


@pytest.mark.parametrize('q', [1.0, 2.0, 3.0])
def test_age_attention_transfer_matches_numpy_and_weight(q):
    s, t = torch.randn(3, 4, 5, 5), torch.randn(3, 6, 5, 5)
    expected = np_transfer(s, t, q)
    assert AgeAttentionLoss(q=q)(s, t).item() == pytest.approx(expected,
                                                               rel=1e-5)
    assert AgeAttentionLoss(q=q, loss_weight=2.5)(s, t).item() == \
        pytest.approx(2.5 * expected, rel=1e-5)
    assert AgeAttentionLoss(q=q, loss_weight=0)(s, t).item() == 0.0


@pytest.mark.parametrize('mode', ['bilinear', 'nearest', 'area'])
def test_age_attention_resize_path(mode):
    s, t = torch.randn(2, 4, 8, 8), torch.randn(2, 5, 4, 4)
    a_s = s.abs().pow(2).mean(1, keepdim=True)
    kwargs = dict(align_corners=False) if mode == 'bilinear' else {}
    a_s = F.interpolate(a_s, size=(4, 4), mode=mode, **kwargs).flatten(1)
    a_t = t.abs().pow(2).mean(1).flatten(1)
    ref = (a_s / a_s.norm(dim=1, keepdim=True) -
           a_t / a_t.norm(dim=1, keepdim=True)).pow(2).mean()
    got = AgeAttentionLoss(resize=mode)(s, t)
    assert got.item() == pytest.approx(ref.item(), rel=1e-5)
    # upsampling the student's map (student smaller than teacher) works too
    small = torch.randn(2, 4, 3, 3, requires_grad=True)
    loss = AgeAttentionLoss()(small, t)
    loss.backward()
    assert torch.isfinite(small.grad).all() and small.grad.abs().sum() > 0


def test_age_attention_gradients_student_only():
    s = torch.randn(2, 3, 4, 4, requires_grad=True)
    t = torch.randn(2, 5, 4, 4, requires_grad=True)
    AgeAttentionLoss()(s, t).backward()
    assert torch.isfinite(s.grad).all() and s.grad.abs().sum() > 0
    assert t.grad is None


def test_age_attention_weight_mode_value():
    t_feat = torch.randn(2, 3, 4, 4)
    s_map, t_map = torch.randn(2, 5, 4, 4), torch.randn(2, 5, 4, 4)
    s_feat = torch.randn(2, 2, 4, 4)
    loss = AgeAttentionLoss(attention_use='weight')
    expected = np_weighted(t_feat, s_map, t_map, 2.0)
    assert loss(s_feat, t_feat, s_map, t_map).item() == pytest.approx(
        expected, rel=1e-5)
    # uniform teacher attention -> plain mean of the per-position term
    flat = torch.ones(2, 3, 4, 4)
    plain = (F.normalize(s_map, dim=1) -
             F.normalize(t_map, dim=1)).pow(2).mean()
    assert loss(s_feat, flat, s_map, t_map).item() == pytest.approx(
        plain.item(), rel=1e-5)
    # hand case: 1 sample, 1×2 positions, 2 channels; teacher attention
    # (q=2, one channel) a = (1, 9) -> w = (0.2, 1.8); position 0 has
    # ŝ = (1, 0), t̂ = (0, 1): mean_c (ŝ - t̂)^2 = 1; position 1 equal -> 0.
    # loss = (0.2 * 1 + 1.8 * 0) / 2 = 0.1
    tf = torch.tensor([[[[1.0, 3.0]]]])
    sm = torch.tensor([[[[2.0, 1.0]], [[0.0, 1.0]]]])
    tm = torch.tensor([[[[0.0, 5.0]], [[3.0, 5.0]]]])
    assert loss(torch.zeros(1, 1, 1, 2), tf, sm, tm).item() == \
        pytest.approx(0.1, abs=1e-6)
    assert AgeAttentionLoss(attention_use='weight', loss_weight=3)(
        torch.zeros(1, 1, 1, 2), tf, sm, tm).item() == \
        pytest.approx(0.3, abs=1e-6)


def test_age_attention_weight_mode_resize_and_detached():
    t_feat = torch.randn(2, 3, 2, 2, requires_grad=True)
    s_map = torch.randn(2, 4, 4, 4, requires_grad=True)
    t_map = torch.randn(2, 4, 4, 4, requires_grad=True)
    s_feat = torch.randn(2, 3, 4, 4, requires_grad=True)
    loss = AgeAttentionLoss(attention_use='weight')(s_feat, t_feat, s_map,
                                                    t_map)
    # reference: bilinear resize of the map-level teacher attention
    a = t_feat.detach().pow(2).mean(1, keepdim=True)
    w = F.interpolate(a, size=(4, 4), mode='bilinear',
                      align_corners=False).flatten(1)
    w = w / w.mean(1, keepdim=True)
    per_pos = (F.normalize(s_map.detach(), dim=1) -
               F.normalize(t_map.detach(), dim=1)).pow(2).mean(1).flatten(1)
    assert loss.item() == pytest.approx((w * per_pos).mean().item(),
                                        rel=1e-5)
    loss.backward()
    assert torch.isfinite(s_map.grad).all() and s_map.grad.abs().sum() > 0
    assert t_feat.grad is None and t_map.grad is None  # teacher sides
    assert s_feat.grad is None  # not part of the value in 'weight' mode
    # zero teacher attention -> uniform weights, still finite
    zero = AgeAttentionLoss(attention_use='weight')(
        s_feat, torch.zeros(2, 3, 2, 2), s_map, t_map)
    assert torch.isfinite(zero)


def test_age_attention_validation():
    with pytest.raises(ConfigError, match='q must'):
        AgeAttentionLoss(q=0.5)
    with pytest.raises(ConfigError, match='q must'):
        AgeAttentionLoss(q=float('inf'))
    with pytest.raises(ConfigError, match="attention_use.*'mask'"):
        AgeAttentionLoss(attention_use='mask')
    with pytest.raises(ConfigError, match='resize'):
        AgeAttentionLoss(resize='bicubic')
    with pytest.raises(ConfigError, match='loss_weight'):
        AgeAttentionLoss(loss_weight=-1)
    loss = AgeAttentionLoss()
    with pytest.raises(ValueError, match='t_feat must be'):
        loss(torch.randn(2, 3, 4, 4), torch.randn(2, 12))
    with pytest.raises(ValueError, match='s_feat has shape .*batch'):
        loss(torch.randn(2, 3, 4, 4), torch.randn(3, 3, 4, 4))
    with pytest.raises(ValueError, match='s_map'):
        loss(torch.randn(2, 3, 4, 4), torch.randn(2, 3, 4, 4),
             s_map=torch.randn(2, 3, 4, 4))
    weight = AgeAttentionLoss(attention_use='weight')
    with pytest.raises(ValueError, match=r"s_map and t_map.*\['t_map'\]"):
        weight(torch.randn(2, 3, 4, 4), torch.randn(2, 3, 4, 4),
               s_map=torch.randn(2, 3, 4, 4))
    with pytest.raises(ValueError, match='missing'):
        weight.check_shapes(dict(s_feat=torch.Size([2, 3, 4, 4]),
                                 t_feat=torch.Size([2, 3, 4, 4])))
    with pytest.raises(ValueError, match='ConvProjector.*out_channels=8'):
        weight(torch.randn(2, 3, 4, 4), torch.randn(2, 3, 4, 4),
               torch.randn(2, 3, 4, 4), torch.randn(2, 8, 4, 4))
    with pytest.raises(ValueError, match='batch'):
        weight(torch.randn(2, 3, 4, 4), torch.randn(2, 3, 4, 4),
               torch.randn(3, 3, 4, 4), torch.randn(3, 3, 4, 4))


def test_age_attention_registry():
    loss = LOSSES.build(dict(type='AgeAttentionLoss', q=1,
                             attention_use='weight', loss_weight=1000))
    assert isinstance(loss, AgeAttentionLoss)
    assert loss.attention_use == 'weight' and loss.loss_weight == 1000


# ------------------------------------------------------------ TeacherAttn
def make_embs(batch=5, d1=6, d2=4, grad=False):
    out = [torch.randn(batch, d1), torch.randn(batch, d1),
           torch.randn(batch, d2), torch.randn(batch, d2)]
    return [x.requires_grad_(grad) for x in out]


def zero_gate(loss):
    with torch.no_grad():
        loss.g[2].weight.zero_()
        loss.g[2].bias.zero_()


def test_teacher_attention_hand_computed_constant_gate():
    # g's output constant (zero) -> alpha = (0.5, 0.5):
    # loss = 0.5 * mean_i (d_i1 + d_i2) + beta * (2 * 0.5 ln 0.5)
    s1 = torch.tensor([[1.0, 0.0], [0.0, 2.0]])
    t1 = torch.tensor([[1.0, 1.0], [0.0, 1.0]])
    s2 = torch.tensor([[1.0, 0.0], [1.0, 0.0]])
    t2 = torch.tensor([[-1.0, 0.0], [0.0, 3.0]])
    loss = TeacherAttentionAngularLoss(teacher_dim=2)
    zero_gate(loss)
    # d1 = ((1 - 1/sqrt2)^2, 0) ; d2 = (4, 1) (p = 2)
    d1 = (1 - 1 / math.sqrt(2)) ** 2
    expected = 0.5 * (d1 + 0 + 4 + 1) / 2 + 0.1 * math.log(0.5)
    assert loss(s1, t1, s2, t2).item() == pytest.approx(expected, abs=1e-6)
    assert loss.last_weights.tolist() == pytest.approx([0.5, 0.5])
    # p = 1, beta = 0, alpha_min irrelevant with a constant gate
    loss1 = TeacherAttentionAngularLoss(teacher_dim=2, p=1, beta=0,
                                        alpha_min=0.3)
    zero_gate(loss1)
    d1 = 1 - 1 / math.sqrt(2)
    assert loss1(s1, t1, s2, t2).item() == pytest.approx(
        0.5 * (d1 + 0 + 2 + 1) / 2, abs=1e-6)
    # constant but unequal logits (bias only): alpha = floor + softmax
    loss2 = TeacherAttentionAngularLoss(teacher_dim=2, tau=2.0)
    zero_gate(loss2)
    with torch.no_grad():
        loss2.g[2].bias.copy_(torch.tensor([math.log(3.0) * 2, 0.0]))
    # softmax(bias / tau) = (.75, .25) -> alpha = .1 + .8 * (.75, .25)
    a = (0.7, 0.3)
    d = ((1 - 1 / math.sqrt(2)) ** 2 + 0) / 2, (4 + 1) / 2
    ent = a[0] * math.log(a[0]) + a[1] * math.log(a[1])
    assert loss2(s1, t1, s2, t2).item() == pytest.approx(
        a[0] * d[0] + a[1] * d[1] + 0.1 * ent, abs=1e-6)
    assert loss2.last_weights.tolist() == pytest.approx(list(a), abs=1e-6)


@pytest.mark.parametrize('p,tau,alpha_min,beta',
                         [(2.0, 1.0, 0.1, 0.1), (1.0, 0.5, 0.0, 0.0),
                          (3.0, 2.0, 0.25, 1.0)])
def test_teacher_attention_matches_numpy(p, tau, alpha_min, beta):
    s1, t1, s2, t2 = make_embs()
    loss = TeacherAttentionAngularLoss(p=p, tau=tau, alpha_min=alpha_min,
                                       beta=beta)
    loss.check_shapes(dict(s_emb_1=s1.shape, t_emb_1=t1.shape,
                           s_emb_2=s2.shape, t_emb_2=t2.shape))
    with torch.no_grad():  # spread the logits so alpha is far from 0.5
        loss.g[2].weight.mul_(20)
    logits = gate_logits(loss, t1, t2)
    expected = np_teacher_attention(s1, t1, s2, t2, logits, p, tau,
                                    alpha_min, beta)
    assert loss(s1, t1, s2, t2).item() == pytest.approx(expected, rel=1e-5,
                                                        abs=1e-6)
    weighted = TeacherAttentionAngularLoss(p=p, tau=tau, alpha_min=alpha_min,
                                           beta=beta, loss_weight=0.25)
    weighted.load_state_dict(loss.state_dict())
    assert weighted(s1, t1, s2, t2).item() == pytest.approx(
        0.25 * expected, rel=1e-5, abs=1e-6)


def test_teacher_attention_alpha_rows():
    s1, t1, s2, t2 = make_embs(batch=16)
    loss = TeacherAttentionAngularLoss(teacher_dim=(6, 4), alpha_min=0.2)
    with torch.no_grad():
        loss.g[2].weight.mul_(100)  # near-saturated softmax
    alpha = loss.weights(t1, t2)
    assert alpha.shape == (16, 2)
    assert torch.allclose(alpha.sum(1), torch.ones(16), atol=1e-6)
    assert (alpha >= 0.2 - 1e-7).all() and (alpha <= 0.8 + 1e-7).all()
    loss(s1, t1, s2, t2)
    assert loss.last_weights.shape == (2, )
    assert not loss.last_weights.requires_grad
    assert torch.allclose(loss.last_weights, alpha.mean(0))


def test_teacher_attention_gradients():
    s1, t1, s2, t2 = make_embs(grad=True)
    loss = TeacherAttentionAngularLoss(teacher_dim=(6, 4))
    loss(s1, t1, s2, t2).backward()
    for s in (s1, s2):
        assert torch.isfinite(s.grad).all() and s.grad.abs().sum() > 0
    for t in (t1, t2):
        assert t.grad is None
    for name, param in loss.named_parameters():
        assert param.grad is not None, name
        assert torch.isfinite(param.grad).all() and \
            param.grad.abs().sum() > 0, name
    # aligned student (cos = 1): gradient finite, no NaN
    s_eq = t1.detach().clone().requires_grad_(True)
    loss(s_eq, t1, s2, t2).backward()
    assert torch.isfinite(s_eq.grad).all()


def test_teacher_attention_lazy_gate():
    s1, t1, s2, t2 = make_embs()
    loss = TeacherAttentionAngularLoss()
    assert loss.g is None and list(loss.parameters()) == []
    with pytest.raises(RuntimeError, match='teacher_dim'):
        loss(s1, t1, s2, t2)
    shapes = dict(s_emb_1=s1.shape, t_emb_1=t1.shape, s_emb_2=s2.shape,
                  t_emb_2=t2.shape)
    loss.check_shapes(shapes)
    assert loss.g[0].in_features == 10 and loss.g[0].out_features == 128
    assert loss.g[2].out_features == 2
    assert '_anchor' not in loss.state_dict()
    assert 'g.0.weight' in loss.state_dict()
    # a gate built lazily after .to(device) lands on that device
    moved = TeacherAttentionAngularLoss().to('meta')
    moved.check_shapes(shapes)
    assert moved.g[0].weight.device.type == 'meta'
    # a second check with other dims is an error naming teacher_dim
    with pytest.raises(ValueError, match='teacher_dim'):
        loss.check_shapes(dict(shapes, s_emb_2=torch.Size([5, 3]),
                               t_emb_2=torch.Size([5, 3])))


def test_teacher_attention_state_dict_builds_unbuilt_gate():
    s1, t1, s2, t2 = make_embs()
    src = TeacherAttentionAngularLoss(teacher_dim=(6, 4), hidden=8)
    dst = TeacherAttentionAngularLoss(hidden=8)  # g not built yet
    dst.load_state_dict(src.state_dict())  # must not drop g's weights
    assert torch.equal(dst.g[0].weight, src.g[0].weight)
    assert dst(s1, t1, s2, t2).item() == pytest.approx(
        src(s1, t1, s2, t2).item(), rel=1e-6)
    with pytest.raises(ValueError, match='10 in total'):
        dst(s1, t1, s2[:, :3], t2[:, :3])
    with pytest.raises(RuntimeError, match='size mismatch'):
        TeacherAttentionAngularLoss(hidden=4).load_state_dict(
            src.state_dict())


def test_teacher_attention_validation():
    for kwargs, arg in [(dict(num_teachers=3), 'num_teachers'),
                        (dict(num_teachers=2.0), 'num_teachers'),
                        (dict(alpha_min=0.5), 'alpha_min'),
                        (dict(alpha_min=-0.1), 'alpha_min'),
                        (dict(tau=0), 'tau'), (dict(p=0), 'p must'),
                        (dict(beta=-1), 'beta'), (dict(hidden=0), 'hidden'),
                        (dict(teacher_dim=(4, 4, 4)), 'teacher_dim'),
                        (dict(teacher_dim=0), 'teacher_dim'),
                        (dict(loss_weight=float('nan')), 'loss_weight')]:
        with pytest.raises(ConfigError, match=arg):
            TeacherAttentionAngularLoss(**kwargs)
    loss = TeacherAttentionAngularLoss(teacher_dim=(6, 4))
    s1, t1, s2, t2 = make_embs()
    with pytest.raises(ValueError,
                       match='s_emb_2.*t_emb_2.*LinearProjector.*'
                             'out_features=4'):
        loss(s1, t1, torch.randn(5, 7), t2)
    with pytest.raises(ValueError, match='batch'):
        loss(s1, t1, s2[:3], t2[:3])
    with pytest.raises(ValueError, match='s_emb_1 must be'):
        loss(s1[0], t1, s2, t2)
    with pytest.raises(ValueError, match='teacher_dim'):
        TeacherAttentionAngularLoss(teacher_dim=6)(s1, t1, s2, t2)


def test_teacher_attention_registry():
    loss = LOSSES.build(dict(type='TeacherAttentionAngularLoss',
                             teacher_dim=8, hidden=16, beta=0.0))
    assert isinstance(loss, TeacherAttentionAngularLoss)
    assert loss.g[0].in_features == 16 and loss.g[0].out_features == 16
    assert LOSSES.get('TeacherAttentionAngularLoss') is \
        TeacherAttentionAngularLoss


@pytest.mark.gpu
def test_attentive_losses_on_cuda():
    dev = torch.device('cuda')
    s1, t1, s2, t2 = (x.to(dev) for x in make_embs())
    loss = TeacherAttentionAngularLoss().to(dev)
    loss.check_shapes(dict(s_emb_1=s1.shape, t_emb_1=t1.shape,
                           s_emb_2=s2.shape, t_emb_2=t2.shape))
    assert loss.g[0].weight.device.type == 'cuda'
    cpu = TeacherAttentionAngularLoss(teacher_dim=(6, 4))
    cpu.load_state_dict(loss.state_dict())
    with torch.autocast('cuda', dtype=torch.float16):
        value = loss(s1.half(), t1.half(), s2.half(), t2.half())
    assert value.dtype == torch.float32
    ref = cpu(*(x.half().float().cpu() for x in (s1, t1, s2, t2)))
    assert value.item() == pytest.approx(ref.item(), rel=1e-3, abs=1e-4)
    s = torch.randn(2, 4, 8, 8, device=dev)
    t = torch.randn(2, 5, 4, 4, device=dev)
    for use, extra in (('transfer', ()),
                       ('weight', (torch.randn(2, 3, 8, 8, device=dev),
                                   torch.randn(2, 3, 8, 8, device=dev)))):
        att = AgeAttentionLoss(attention_use=use)
        got = att(s, t, *extra).item()
        want = att(s.cpu(), t.cpu(), *(x.cpu() for x in extra)).item()
        assert got == pytest.approx(want, rel=1e-4)


def test_teacher_weights_are_logged_by_the_distiller_not_summed():
    from kdzoo.distillers.face_distiller import _extra_log_vars
    loss = TeacherAttentionAngularLoss(teacher_dim=(4, 4))
    assert _extra_log_vars('loss_aad', loss, 'cpu') == {}
    s1, t1, s2, t2 = (torch.randn(5, 4) for _ in range(4))
    loss(s1, t1, s2, t2)
    logged = _extra_log_vars('loss_aad', loss, 'cpu')
    assert sorted(logged) == ['aad_weight_1', 'aad_weight_2']
    total = sum(v.item() for v in logged.values())
    assert total == pytest.approx(1.0, abs=1e-5)
    assert all('loss' not in k for k in logged)
