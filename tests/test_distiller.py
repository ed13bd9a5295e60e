"""FaceDistiller: wiring, taps, connectors, build-time validation, state."""
import pickle

import pytest
import torch

import kdzoo  # noqa: F401
from kdzoo.distillers import FaceDistiller
from kdzoo.engine import TrainableOptimWrapperConstructor
from kdzoo.teachers import CheckpointTeacher
from kdzoo.utils import CheckpointError, ConfigError
from toy_models import ToyNet, toy_batch

STUDENT = dict(backbone=dict(type='ToyNet', width=4, embedding_size=8),
               head=dict(type='ToyHead', num_classes=5, embedding_size=8))


@pytest.fixture
def teacher_ckpt(tmp_path):
    net = ToyNet(width=8, embedding_size=16)
    path = tmp_path / 'teacher.pth'
    torch.save(net.state_dict(), path)
    return str(path), net


def teacher_cfg(path):
    return dict(type='CheckpointTeacher', checkpoint=path,
                backbone=dict(type='ToyNet', width=8, embedding_size=16))


def angular_kd(path, **loss_overrides):
    loss = dict(type='AngularDistillationLoss', loss_weight=1.0,
                inputs=dict(s_emb=dict(tap='student.embedding',
                                       connector='proj'),
                            t_emb='teacher_fr.embedding'))
    loss.update(loss_overrides)
    return FaceDistiller(
        student=STUDENT, teachers=dict(teacher_fr=teacher_cfg(path)),
        connectors=dict(proj=dict(type='LinearProjector', out_features=16)),
        distill_losses=dict(loss_ang=loss))


def train_step(model):
    optim = TrainableOptimWrapperConstructor(
        dict(type='OptimWrapper', optimizer=dict(type='SGD', lr=0.1)))(model)
    return model.train_step(toy_batch(), optim), optim


def test_student_alone_trains():
    model = FaceDistiller(student=STUDENT)
    log_vars, _ = train_step(model)
    assert set(log_vars) == {'loss', 'loss_cls'}


def test_teacher_is_frozen_and_outside_optimizer_and_state(teacher_ckpt):
    path, net = teacher_ckpt
    model = angular_kd(path)
    teacher = model.teachers['teacher_fr']
    # weights loaded from the file
    assert torch.equal(teacher.network.conv1.weight, net.conv1.weight)
    model.train()
    assert not teacher.training and not teacher.network.bn1.training
    assert all(not p.requires_grad for p in teacher.parameters())
    log_vars, optim = train_step(model)
    assert {'loss_cls', 'loss_ang'} <= set(log_vars)
    optimised = {id(p) for g in optim.optimizer.param_groups
                 for p in g['params']}
    assert not optimised & {id(p) for p in teacher.parameters()}
    assert {id(p) for p in model.connectors.parameters()} <= optimised
    # teacher unchanged by the step (BN stats included)
    assert torch.equal(teacher.network.bn1.running_mean,
                       net.bn1.running_mean)
    state = model.state_dict()
    assert not any(k.startswith('teachers.') for k in state)
    assert any(k.startswith('connectors.proj') for k in state)
    fresh = angular_kd(path)
    fresh.load_state_dict(state, strict=True)  # teachers filled back in
    from mmengine.runner.checkpoint import get_state_dict
    assert not any(k.startswith('teachers.') for k in get_state_dict(model))


def test_gradients_reach_student_and_connector_only(teacher_ckpt):
    model = angular_kd(teacher_ckpt[0])
    data = model.data_preprocessor(toy_batch(), True)
    losses = model(**data, mode='loss')
    losses['loss_ang'].backward()
    assert model.student.backbone.conv1.weight.grad.abs().sum() > 0
    assert model.connectors['proj'].fc.weight.grad.abs().sum() > 0
    assert all(p.grad is None for p in model.teachers.parameters())
    assert model.recorder.records == {}  # taps hold nothing after the step


def test_stage_and_input_taps_are_recorded(teacher_ckpt):
    seen = {}

    class Spy(torch.nn.Module):
        def forward(self, s_feat, t_feat, s_in):
            seen.update(s=s_feat.shape, t=t_feat.shape, i=s_in.shape)
            return (s_feat.mean() - t_feat.mean()) ** 2 + 0 * s_in.sum()

    from kdzoo.registry import LOSSES
    LOSSES.register_module(name='SpyLoss', module=Spy, force=True)
    model = FaceDistiller(
        student=STUDENT, teachers=dict(t=teacher_cfg(teacher_ckpt[0])),
        connectors=dict(c=dict(type='ConvProjector', out_channels=16)),
        distill_losses=dict(spy=dict(
            type='SpyLoss',
            inputs=dict(s_feat=dict(tap='student.stage2', connector='c'),
                        t_feat='t.stage2', s_in='student.conv2:input'))))
    data = model.data_preprocessor(toy_batch(), True)
    losses = model(**data, mode='loss')
    assert 'loss_spy' in losses
    assert seen['s'] == seen['t'] == (4, 16, 4, 4)
    assert seen['i'] == (4, 4, 8, 8)


def test_predict_is_flip_sum():
    model = FaceDistiller(student=STUDENT).eval()
    data = model.data_preprocessor(toy_batch(), False)
    out = model(**data, mode='predict')
    x = data['inputs']
    with torch.no_grad():
        expected = model.student.backbone(x) + model.student.backbone(
            torch.flip(x, dims=[3]))
    assert [o['index'] for o in out] == [0, 1, 2, 3]
    assert torch.allclose(torch.stack([o['embedding'] for o in out]),
                          expected, atol=1e-6)


@pytest.mark.parametrize('inputs, match', [
    (dict(s_emb='student.embedding', t_emb='teacher_fr.embedding',
          bogus='data.label'), r"unknown argument\(s\) \['bogus'\]"),
    (dict(s_emb='student.embedding'), r"lacks required argument\(s\) "
     r"\['t_emb'\]"),
    (dict(s_emb='student.embedding', t_emb='teacher_fr.layer9'),
     r"no module 'layer9'.*Did you mean"),
    (dict(s_emb='student.embedding', t_emb='teachr_fr.embedding'),
     r"unknown tap source 'teachr_fr'.*teacher_fr"),
    (dict(s_emb='student.embedding', t_emb='teacher_fr.embedding'),
     r"\(2, 8\) but t_emb has shape \(2, 16\).*connector"),
    (dict(s_emb=dict(tap='student.embedding', connector='nope'),
          t_emb='teacher_fr.embedding'), r"unknown connector 'nope'"),
    (dict(s_emb='student.stage7', t_emb='teacher_fr.embedding'),
     r'2 known stages'),
])
def test_build_time_validation(teacher_ckpt, inputs, match):
    with pytest.raises(ConfigError, match=match):
        angular_kd(teacher_ckpt[0], inputs=inputs)


def test_unknown_loss_type_and_bad_args(teacher_ckpt):
    with pytest.raises(ConfigError, match="'AngularDistilationLoss' is not "
                       "a registered loss.*AngularDistillationLoss"):
        angular_kd(teacher_ckpt[0], type='AngularDistilationLoss')
    with pytest.raises(ConfigError, match='Accepted arguments.*loss_weight'):
        angular_kd(teacher_ckpt[0], power=2)


def test_connector_shape_mismatch_names_shapes(teacher_ckpt):
    with pytest.raises(ConfigError, match=r'in_features=4 but its input has '
                       r'shape \(2, 8\)'):
        FaceDistiller(
            student=STUDENT,
            teachers=dict(teacher_fr=teacher_cfg(teacher_ckpt[0])),
            connectors=dict(proj=dict(type='LinearProjector', in_features=4,
                                      out_features=16)),
            distill_losses=dict(ang=dict(
                type='AngularDistillationLoss',
                inputs=dict(s_emb=dict(tap='student.embedding',
                                       connector='proj'),
                            t_emb='teacher_fr.embedding'))))


def test_teacher_input_normalisation_is_converted(teacher_ckpt):
    path, _ = teacher_ckpt
    teacher = CheckpointTeacher(backbone=dict(type='ToyNet', width=8,
                                              embedding_size=16),
                                checkpoint=path, mean=0.0, std=255.0)
    teacher.set_source_normalization(127.5, 128.0)
    pixels = torch.rand(2, 3, 16, 16) * 255
    x = (pixels - 127.5) / 128.0
    assert torch.allclose(teacher.adapt_input(x), pixels / 255.0, atol=1e-5)
    teacher.input_size = (32, 32)
    assert teacher.adapt_input(x).shape[-2:] == (32, 32)


def test_checkpoint_teacher_errors(tmp_path, teacher_ckpt):
    with pytest.raises(CheckpointError, match='not found'):
        CheckpointTeacher(backbone=dict(type='ToyNet'),
                          checkpoint=str(tmp_path / 'missing.pth'))
    with pytest.raises(CheckpointError, match=r'missing keys.*shape mismatch|'
                       r'shape mismatch for conv1.weight'):
        CheckpointTeacher(backbone=dict(type='ToyNet', width=4),
                          checkpoint=teacher_ckpt[0])
    # prefixes from DDP / wrapper checkpoints are stripped
    state = {'module.backbone.' + k: v
             for k, v in teacher_ckpt[1].state_dict().items()}
    wrapped = tmp_path / 'wrapped.pth'
    torch.save({'state_dict': state}, wrapped)
    CheckpointTeacher(backbone=dict(type='ToyNet', width=8,
                                    embedding_size=16),
                      checkpoint=str(wrapped))


class _Exploit:
    def __reduce__(self):
        return (print, ('this would run code',))


def test_pickled_code_is_refused(tmp_path):
    path = tmp_path / 'evil.pth'
    with open(path, 'wb') as f:
        pickle.dump({'state_dict': {}, 'x': _Exploit()}, f)
    with pytest.raises(CheckpointError, match='weights_only=True'):
        CheckpointTeacher(backbone=dict(type='ToyNet'), checkpoint=str(path))
