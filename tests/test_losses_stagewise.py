"""StagewiseAngularLoss (ShrinkTeaNet Eq. 6) and forward_from_stage."""
import math

import numpy as np
import pytest
import torch
from torch import nn

from kdzoo.backbones.iresnet import IResNet
from kdzoo.backbones.mobilefacenet import MobileFaceNet
from kdzoo.connectors.projectors import ConvProjector
from kdzoo.losses.angular import StagewiseAngularLoss
from kdzoo.registry import LOSSES
from kdzoo.teachers.base import FrozenTeacher
from kdzoo.utils import ConfigError
from toy_models import ToyNet, toy_batch

TINY_IRESNET = dict(width_mult=0.25, layers=(1, 1, 1, 1), embedding_size=16,
                    input_size=(32, 32))
TINY_MBF = dict(width_mult=0.125, blocks=(1, 1, 1, 1), embedding_size=16,
                input_size=(32, 32))


@pytest.fixture(autouse=True, scope='module')
def _one_thread():
    """Tiny tensors: one thread avoids oversubscription on shared CPUs."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def randomise_bn(net):
    """Non-trivial eval statistics, so BN is not an identity."""
    for m in net.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            m.running_mean.uniform_(-0.2, 0.2)
            m.running_var.uniform_(0.5, 1.5)
    return net


def stage_outputs(net, x):
    """Real stage outputs (by hooks on stage_paths) and the embedding."""
    outs = {}
    handles = [net.get_submodule(p).register_forward_hook(
        lambda m, a, o, i=i: outs.__setitem__(i, o))
        for i, p in enumerate(net.stage_paths, start=1)]
    try:
        emb = net(x)
    finally:
        for h in handles:
            h.remove()
    return outs, emb


def tiny_teacher():
    return FrozenTeacher(randomise_bn(IResNet(**TINY_IRESNET)))


def attached(teacher=None, **kwargs):
    teacher = teacher or tiny_teacher()
    loss = StagewiseAngularLoss(teacher='fr', **kwargs)
    loss.attach_teachers(dict(fr=teacher))
    return loss, teacher


# ------------------------------------------------------ forward_from_stage
@pytest.mark.parametrize('cls,cfg', [(IResNet, TINY_IRESNET),
                                     (MobileFaceNet, TINY_MBF)])
def test_forward_from_stage_reproduces_forward(cls, cfg):
    net = randomise_bn(cls(**cfg)).eval()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        outs, emb = stage_outputs(net, x)
        assert len(outs) == 4
        for s in range(1, 5):
            again = net.forward_from_stage(outs[s], s)
            assert torch.allclose(again, emb, atol=1e-6, rtol=1e-5), s
    with pytest.raises(ConfigError, match='stage 5'):
        net.forward_from_stage(outs[4], 5)


def test_iresnet_last_stage_runs_only_embedding_layers():
    net = randomise_bn(IResNet(**TINY_IRESNET)).eval()
    x = torch.randn(2, 128, 2, 2)
    with torch.no_grad():
        manual = net.features(net.fc(net.bn2(x).flatten(1)))
        assert torch.allclose(net.forward_from_stage(x, 4), manual)


# ------------------------------------------------------ values
def manual_iresnet_rest(net, x, stage):
    """The teacher's remaining modules, run one by one (not the API)."""
    for i in range(stage + 1, 5):
        for block in getattr(net, f'layer{i}'):
            x = block(x)
    x = net.bn2(x).flatten(1)
    return net.features(net.fc(x))


def reference_terms(emb_by_stage, t_emb, p):
    """Per-stage mean_b (1 - cos)^p, as an explicit numpy loop."""
    t = t_emb.detach().double().numpy()
    terms = {}
    for s, e in emb_by_stage.items():
        e = e.detach().double().numpy()
        vals = []
        for b in range(len(t)):
            cos = float(np.dot(e[b], t[b]) /
                        (np.linalg.norm(e[b]) * np.linalg.norm(t[b])))
            vals.append((1.0 - cos) ** p)
        terms[s] = sum(vals) / len(vals)
    return terms


def random_feats(teacher, stages, batch=3):
    shapes = {1: (16, 16, 16), 2: (32, 8, 8), 3: (64, 4, 4), 4: (128, 2, 2)}
    return {s: torch.randn(batch, *shapes[s]) for s in stages}


def test_value_against_manual_teacher_run():
    loss, teacher = attached()
    feats = random_feats(teacher, (1, 2, 3))
    t_emb = torch.randn(3, 16)
    with torch.no_grad():
        embs = {s: manual_iresnet_rest(teacher.network, f, s)
                for s, f in feats.items()}
    terms = reference_terms(embs, t_emb, 2.0)
    expected = 0.125 * terms[1] + 0.25 * terms[2] + 0.5 * terms[3]
    got = loss(t_emb, s_feat1=feats[1], s_feat2=feats[2], s_feat3=feats[3])
    assert got.item() == pytest.approx(expected, rel=1e-5)
    # p = 1
    loss1, _ = attached(teacher, p=1.0)
    terms1 = reference_terms(embs, t_emb, 1.0)
    got1 = loss1(t_emb, s_feat1=feats[1], s_feat2=feats[2], s_feat3=feats[3])
    assert got1.item() == pytest.approx(
        0.125 * terms1[1] + 0.25 * terms1[2] + 0.5 * terms1[3], rel=1e-5)


def test_zero_when_student_maps_are_the_teachers_own():
    """Hand case: the teacher's real stage maps give e_i = T(I), cos = 1."""
    loss, teacher = attached(stages=(1, 2, 3, 4))
    with torch.no_grad():
        outs, t_emb = stage_outputs(teacher.network, torch.randn(2, 3, 32, 32))
    got = loss(t_emb, **{f's_feat{s}': outs[s] for s in (1, 2, 3, 4)})
    assert got.item() == pytest.approx(0.0, abs=1e-6)
    # opposite teacher embedding: (1 - (-1))^2 = 4 per stage;
    # weights 1 + .5 + .25 + .125 = 1.875 -> 7.5
    got = loss(-t_emb, **{f's_feat{s}': outs[s] for s in (1, 2, 3, 4)})
    assert got.item() == pytest.approx(7.5, rel=1e-5)


def test_stage_weights_default_and_custom():
    assert StagewiseAngularLoss('fr').stage_weights == (0.125, 0.25, 0.5)
    assert StagewiseAngularLoss('fr', stages=(3, 2, 1)).stage_weights == (
        0.5, 0.25, 0.125)
    assert StagewiseAngularLoss('fr', stages=(4, 2)).stage_weights == (
        1.0, 0.25)
    teacher = tiny_teacher()
    feats = random_feats(teacher, (2, 3))
    t_emb = torch.randn(3, 16)
    with torch.no_grad():
        embs = {s: manual_iresnet_rest(teacher.network, f, s)
                for s, f in feats.items()}
    terms = reference_terms(embs, t_emb, 2.0)
    loss, _ = attached(teacher, stages=(3, 2), stage_weights=(2.0, 0.1))
    got = loss(t_emb, s_feat2=feats[2], s_feat3=feats[3])
    assert got.item() == pytest.approx(2.0 * terms[3] + 0.1 * terms[2],
                                       rel=1e-5)
    single, _ = attached(teacher, stages=(2,))
    assert single(t_emb, s_feat2=feats[2]).item() == pytest.approx(
        0.25 * terms[2], rel=1e-5)


def test_loss_weight_scales_linearly():
    teacher = tiny_teacher()
    feats = random_feats(teacher, (1, 2, 3))
    t_emb = torch.randn(3, 16)
    kw = {f's_feat{s}': f for s, f in feats.items()}
    base = attached(teacher)[0](t_emb, **kw)
    for w in (0.0, 0.5, 3.0):
        got = attached(teacher, loss_weight=w)[0](t_emb, **kw)
        assert got.item() == pytest.approx(w * base.item(), rel=1e-6,
                                           abs=1e-8)


# ------------------------------------------------------ gradients / state
def test_gradient_reaches_student_and_connector_only():
    loss, teacher = attached(stages=(2, 3))
    net = teacher.network
    bn_before = {n: b.clone() for n, b in net.named_buffers()}
    proj = ConvProjector(out_channels=32)
    proj.build_for(torch.Size((3, 8, 8, 8)))
    s2 = torch.randn(3, 8, 8, 8, requires_grad=True)
    s3 = torch.randn(3, 64, 4, 4, requires_grad=True)
    t_emb = torch.randn(3, 16, requires_grad=True)
    proj.train()
    out = loss(t_emb, s_feat2=proj(s2), s_feat3=s3)
    out.backward()
    for g in (s2.grad, s3.grad, proj.conv.weight.grad):
        assert g is not None and torch.isfinite(g).all() and g.abs().sum() > 0
    assert t_emb.grad is None
    assert all(p.grad is None and not p.requires_grad
               for p in net.parameters())
    assert not net.training
    for n, b in net.named_buffers():  # BN running stats unchanged
        assert torch.equal(b, bn_before[n]), n


def test_teacher_is_not_a_submodule_and_training_mode_is_ignored():
    loss, teacher = attached()
    assert list(loss.parameters()) == [] and loss.state_dict() == {}
    assert list(loss.children()) == []
    loss.train()
    teacher.network.train()  # someone flips it: the loss restores eval
    feats = random_feats(teacher, (1, 2, 3))
    before = teacher.network.bn2.running_mean.clone()
    loss(torch.randn(3, 16), **{f's_feat{s}': f for s, f in feats.items()})
    assert not teacher.network.training
    assert torch.equal(teacher.network.bn2.running_mean, before)


# ------------------------------------------------------ validation
def test_constructor_validation():
    for kwargs, arg in [(dict(teacher=''), 'teacher'),
                        (dict(teacher=3), 'teacher'),
                        (dict(teacher='fr', stages=()), 'stages'),
                        (dict(teacher='fr', stages=(0, 1)), 'stages'),
                        (dict(teacher='fr', stages=(5,)), 'stages'),
                        (dict(teacher='fr', stages=(2, 2)), 'stages'),
                        (dict(teacher='fr', stages=3), 'stages'),
                        (dict(teacher='fr', p=0), 'p must'),
                        (dict(teacher='fr', p=math.inf), 'p must'),
                        (dict(teacher='fr', stage_weights=(1, 2)),
                         'stage_weights'),
                        (dict(teacher='fr', stage_weights=(1, 2, -1)),
                         'stage_weights'),
                        (dict(teacher='fr', loss_weight=-1), 'loss_weight')]:
        with pytest.raises(ConfigError, match=arg):
            StagewiseAngularLoss(**kwargs)
    with pytest.raises(ConfigError, match=r'StagewiseAngularLoss.*1\.\.4'):
        StagewiseAngularLoss('fr', stages=(1, 7))


class ToyStaged(ToyNet):
    """A 2-stage toy backbone that does implement forward_from_stage."""

    def forward_from_stage(self, x, stage):
        if stage == 1:
            x = torch.relu(self.conv2(x))
        return self.fc(x.mean(dim=(2, 3)))


def test_attach_validation():
    loss = StagewiseAngularLoss('fr')
    with pytest.raises(ConfigError, match=r"known teachers: \['age', 'fr2'\]"):
        loss.attach_teachers(dict(age=tiny_teacher(), fr2=tiny_teacher()))
    onnx_like = FrozenTeacher(ToyNet())
    with pytest.raises(ConfigError, match='forward_from_stage.*ONNX teachers '
                                          'support only the final-layer'):
        loss.attach_teachers(dict(fr=onnx_like))
    with pytest.raises(ConfigError, match='FrozenTeacher'):
        loss.attach_teachers(dict(fr=IResNet(**TINY_IRESNET)))
    two_stage = FrozenTeacher(ToyStaged())
    with pytest.raises(ConfigError, match=r'stage\(s\) \[3\] out of range.*'
                                          r'2 stages'):
        loss.attach_teachers(dict(fr=two_stage))
    with pytest.raises(ConfigError, match='attach_teachers'):
        loss(torch.randn(2, 16), s_feat1=torch.randn(2, 16, 16, 16),
             s_feat2=torch.randn(2, 32, 8, 8),
             s_feat3=torch.randn(2, 64, 4, 4))


def test_shape_validation_messages():
    loss, teacher = attached(stages=(2, 3))
    t_emb = torch.randn(2, 16)
    s3 = torch.randn(2, 64, 4, 4)
    # channels differ: suggest the connector with the teacher's channels
    with pytest.raises(ValueError, match=r"s_feat2 has shape \(2, 8, 8, 8\) "
                       r".*stage 2.*\(2, 32, 8, 8\).*type=\"ConvProjector\", "
                       r"out_channels=32"):
        loss(t_emb, s_feat2=torch.randn(2, 8, 8, 8), s_feat3=s3)
    # spatial differs: a 1x1 conv cannot fix it, no resize
    with pytest.raises(ValueError, match=r'spatial sizes differ.*cannot fix'):
        loss(t_emb, s_feat2=torch.randn(2, 32, 16, 16), s_feat3=s3)
    with pytest.raises(ValueError, match='s_feat2 not bound'):
        loss(t_emb, s_feat3=s3)
    with pytest.raises(ValueError, match=r's_feat1 bound but stages'):
        loss(t_emb, s_feat1=torch.randn(2, 16, 16, 16),
             s_feat2=torch.randn(2, 32, 8, 8), s_feat3=s3)
    with pytest.raises(ValueError, match=r"t_emb has shape \(2, 8\).*D=16"):
        loss(torch.randn(2, 8), s_feat2=torch.randn(2, 32, 8, 8), s_feat3=s3)
    with pytest.raises(ValueError, match='s_feat3 must be'):
        loss(t_emb, s_feat2=torch.randn(2, 32, 8, 8),
             s_feat3=torch.randn(2, 64))


def test_registry_build():
    loss = LOSSES.build(dict(type='StagewiseAngularLoss', teacher='fr',
                             stages=[1, 3], p=1, loss_weight=0.5))
    assert isinstance(loss, StagewiseAngularLoss)
    assert loss.stages == (1, 3) and loss.stage_weights == (0.125, 0.5)
    assert 'teacher=' in repr(loss)


# ------------------------------------------------------ FaceDistiller
STUDENT_MBF = dict(type='MobileFaceNet', width_mult=0.125, blocks=(1, 1, 1, 1),
                   embedding_size=64, input_size=(32, 32))


@pytest.fixture
def teacher_ckpt(tmp_path):
    net = randomise_bn(IResNet(**TINY_IRESNET))
    path = tmp_path / 'backbone.pth'
    torch.save(net.state_dict(), path)
    return str(path), net


def stagewise_distiller(path, stages=(1, 2, 3), connectors=True,
                        teacher_name='teacher_fr', teacher_backbone=None,
                        extra_losses=None):
    from kdzoo.distillers.face_distiller import FaceDistiller
    widths = {1: 16, 2: 32, 3: 64}
    inputs = dict(t_emb=f'{teacher_name}.embedding')
    for s in stages:
        tap = f'student.stage{s}'
        inputs[f's_feat{s}'] = (dict(tap=tap, connector=f'c{s}')
                                if connectors else tap)
    losses = dict(loss_stagewise=dict(
        type='StagewiseAngularLoss', teacher='teacher_fr', stages=stages,
        inputs=inputs))
    losses.update(extra_losses or {})
    return FaceDistiller(
        student=dict(backbone=STUDENT_MBF,
                     head=dict(type='ToyHead', num_classes=5,
                               embedding_size=64)),
        teachers={teacher_name: dict(
            type='CheckpointTeacher', checkpoint=path,
            backbone=teacher_backbone or dict(type='IResNet',
                                              **TINY_IRESNET))},
        connectors={f'c{s}': dict(type='ConvProjector', out_channels=widths[s])
                    for s in stages},
        distill_losses=losses)


def test_distiller_trains_one_step(teacher_ckpt):
    from kdzoo.engine.optimizer import TrainableOptimWrapperConstructor
    seen = {}

    class Spy(nn.Module):  # a later loss reading a teacher stage tap
        def forward(self, t_feat):
            seen['t'] = t_feat.detach().clone()
            # taps are paused while losses run: the stage-wise pass through
            # the teacher did not overwrite the recorded teacher map
            seen['rec'] = model.recorder.get('teacher_fr.stage3').detach()
            return t_feat.sum() * 0

    LOSSES.register_module(name='StagewiseSpyLoss', module=Spy, force=True)
    path, net = teacher_ckpt
    model = stagewise_distiller(path, extra_losses=dict(spy=dict(
        type='StagewiseSpyLoss', inputs=dict(t_feat='teacher_fr.stage3'))))
    teacher = model.teachers['teacher_fr']
    loss = model.distill_losses['loss_stagewise']
    assert loss._attached['teacher'] is teacher
    optim = TrainableOptimWrapperConstructor(
        dict(type='OptimWrapper', optimizer=dict(type='SGD', lr=0.1)))(model)
    model.train()
    assert not teacher.training and not teacher.network.training
    batch = toy_batch(n=4, size=32)
    log_vars = model.train_step(batch, optim)
    value = float(torch.as_tensor(log_vars['loss_stagewise']).detach())
    assert math.isfinite(value) and value > 0
    # the teacher's own stage-3 map reached the later loss (not overwritten)
    data = model.data_preprocessor(batch, True)
    with torch.no_grad():
        outs, _ = stage_outputs(net.eval(), data['inputs'])
    assert torch.allclose(seen['t'], outs[3], atol=1e-5)
    assert torch.equal(seen['rec'], seen['t'])
    assert model.recorder.records == {}
    # teacher: frozen, untouched, outside the optimizer and the state dict
    optimised = {id(p) for g in optim.optimizer.param_groups
                 for p in g['params']}
    assert not optimised & {id(p) for p in teacher.parameters()}
    assert {id(p) for p in model.connectors.parameters()} <= optimised
    # gradients of the stage-wise term alone (the step zeroed them)
    model(**data, mode='loss')['loss_stagewise'].backward()
    assert all(p.grad is None for p in teacher.parameters())
    for s in (1, 2, 3):
        grad = model.connectors[f'c{s}'].conv.weight.grad
        assert grad is not None and grad.abs().sum() > 0, s
    assert model.student.backbone.layers[0].layers[0].weight.grad.abs(
        ).sum() > 0
    assert model.recorder.records == {}
    for (n, b), ref in zip(teacher.network.named_buffers(), net.buffers()):
        assert torch.equal(b, ref), n
    state = model.state_dict()
    assert not any(k.startswith('teachers.') for k in state)
    assert not any(k.startswith('distill_losses.') for k in state)
    assert sum(1 for _ in model.parameters()) == len(
        {id(p) for p in model.parameters()})


def test_distiller_validation(teacher_ckpt):
    path, _ = teacher_ckpt
    with pytest.raises(ConfigError, match=r"model\.distill_losses\."
                       r"loss_stagewise.*known teachers: \['fr'\]"):
        stagewise_distiller(path, teacher_name='fr')
    toy = FrozenTeacher(ToyNet())
    toy_path = path.replace('backbone.pth', 'toy.pth')
    torch.save(toy.network.state_dict(), toy_path)
    with pytest.raises(ConfigError, match='needs a kdzoo backbone teacher'):
        stagewise_distiller(toy_path, stages=(1,),
                            teacher_backbone=dict(type='ToyNet'))
    with pytest.raises(ConfigError, match=r'ConvProjector", out_channels=32'):
        stagewise_distiller(path, stages=(2,), connectors=False)


@pytest.mark.gpu
def test_cuda_under_autocast():
    loss, teacher = attached(stages=(2, 3))
    teacher.cuda()
    s2 = torch.randn(3, 32, 8, 8, device='cuda', requires_grad=True)
    s3 = torch.randn(3, 64, 4, 4, device='cuda', requires_grad=True)
    t_emb = torch.randn(3, 16, device='cuda')
    with torch.autocast('cuda', dtype=torch.float16):
        out = loss(t_emb, s_feat2=s2.half(), s_feat3=s3)
    assert out.dtype == torch.float32 and torch.isfinite(out)
    out.backward()
    assert s2.grad.abs().sum() > 0 and s3.grad.abs().sum() > 0
    cpu = loss.cpu()
    teacher.cpu()
    ref = cpu(t_emb.cpu(), s_feat2=s2.detach().half().float().cpu(),
              s_feat3=s3.detach().cpu())
    assert out.item() == pytest.approx(ref.item(), rel=1e-4, abs=1e-6)
