"""The loss plugin contract, checked on every registered loss.

Inputs are built from each loss's ``input_signature`` by argument name (as
``tools/bench_losses.py`` does), so a new plugin is covered without new test
code; only losses whose constructor needs a value without a default (a file,
a dataset size) are listed in ``CONSTRUCTOR``. Per loss: its own
``check_shapes`` accepts the inputs; the result is a finite scalar; it is
linear in ``loss_weight``; no gradient reaches a teacher-side input while
the student side gets a finite one; and the frame checks shapes when the
loss is called on its own but not once a distiller has checked them.
"""
import pytest
import torch

import kdzoo  # noqa: F401  (registers everything)
from kdzoo.losses import BaseDistillLoss
from kdzoo.registry import BACKBONES, LOSSES
from kdzoo.teachers import FrozenTeacher

B, D, C = 8, 16, 10
FEAT = (4, 6, 6)

# constructor arguments for losses that cannot be built from defaults alone
CONSTRUCTOR = {
    'CRDLoss': dict(num_data=64, nce_k=16),
    'AdaDistillLoss': dict(num_classes=C, embedding_size=D),
    'MarginDistillationLoss': dict(embedding_size=D),
    'StagewiseAngularLoss': dict(teacher='teacher_fr', stages=(2, 3)),
}
TEACHER = dict(type='IResNet', width_mult=0.25, layers=(1, 1, 1, 1),
               embedding_size=D, input_size=(32, 32))


def _build(name, tmp_path):
    kwargs = dict(CONSTRUCTOR.get(name, {}))
    if name == 'MarginDistillationLoss':
        path = tmp_path / 'head.pth'
        torch.save({'weight': torch.randn(C, D)}, path)
        kwargs['head_checkpoint'] = str(path)
    return LOSSES.build(dict(type=name, **kwargs))


def _inputs(loss):
    """Named inputs for every required argument (plus the stage maps a
    stage-wise loss asks for), from the argument names."""
    g = torch.Generator().manual_seed(0)
    stage_shapes = {}
    if hasattr(loss, 'attach_teachers'):
        teacher = FrozenTeacher(BACKBONES.build(TEACHER))
        loss.attach_teachers({'teacher_fr': teacher})
        shapes = teacher.network.feature_shapes(batch_size=B)
        stage_shapes = {f's_feat{k}': shapes[teacher.stage_path(k)]
                        for k in loss.stages}
    values = {}
    for name, param in loss.input_signature().parameters.items():
        if param.default is not param.empty and name not in stage_shapes:
            continue
        if name in stage_shapes:
            values[name] = torch.randn(*stage_shapes[name], generator=g)
        elif 'logits' in name:
            values[name] = torch.randn(B, C, generator=g) * 4
        elif 'emb' in name:
            values[name] = torch.randn(B, D, generator=g)
        elif 'feat' in name or name.endswith('_map'):
            values[name] = torch.randn(B, *FEAT, generator=g).relu()
        elif name == 'labels':
            values[name] = torch.arange(B) // 2  # pairs: positives exist
        elif name == 'ages':
            values[name] = torch.tensor([5, 60, 20, 75, 10, 50, 30, 80])
        elif name == 'indices':
            values[name] = torch.arange(B)
        else:
            raise AssertionError(
                f'{type(loss).__name__}: no input rule for argument {name!r}; '
                'add one here (tests/test_loss_contract.py)')
    for name, value in values.items():
        if value.is_floating_point():
            value.requires_grad_(True)
    return values


def _call(loss, inputs):
    torch.manual_seed(0)  # losses that sample (CRD) draw the same
    return loss(**inputs)


@pytest.mark.parametrize('name', sorted(LOSSES.module_dict))
def test_every_registered_loss_keeps_the_contract(name, tmp_path):
    cls = LOSSES.get(name)
    assert issubclass(cls, BaseDistillLoss), (
        f'{name} must subclass kdzoo.losses.BaseDistillLoss')
    loss = _build(name, tmp_path)
    inputs = _inputs(loss)
    loss.check_shapes({k: v.shape for k, v in inputs.items()})
    loss.eval()  # no running statistics move between the calls below

    loss.loss_weight = 1.0
    one = _call(loss, inputs)
    assert one.dim() == 0 and torch.isfinite(one), (name, one)
    loss.loss_weight = 3.0
    three = _call(loss, inputs)
    torch.testing.assert_close(three, 3.0 * one, rtol=1e-6, atol=1e-7)
    loss.loss_weight = 0.0
    assert _call(loss, inputs).item() == 0.0

    loss.loss_weight = 1.0
    _call(loss, inputs).backward()
    teacher = set(cls.teacher_arg_names())  # none for age-teacher terms
    for arg, value in inputs.items():
        if not value.requires_grad:
            continue
        if arg in teacher:
            assert value.grad is None, f'{name}: gradient reached {arg}'
        elif value.grad is not None:
            assert torch.isfinite(value.grad).all(), (name, arg)
    student = [a for a, v in inputs.items()
               if v.requires_grad and a not in teacher]
    assert any(inputs[a].grad is not None for a in student), (
        f'{name}: no gradient reached the student side ({student})')


def test_the_frame_checks_shapes_only_until_a_distiller_has():
    loss = LOSSES.build(dict(type='AngularDistillationLoss'))
    s, t = torch.randn(4, 8), torch.randn(4, 6)
    with pytest.raises(ValueError, match='t_emb'):
        loss(s, t)
    loss.inputs_checked = True  # what FaceDistiller sets after its check
    with pytest.raises(RuntimeError):  # the maths' own error, no shape check
        loss(s, t)


def test_half_inputs_are_computed_in_float32_without_autocast():
    loss = LOSSES.build(dict(type='KDLoss', loss_weight=2.0))
    g = torch.Generator().manual_seed(0)
    s, t = torch.randn(4, 5, generator=g), torch.randn(4, 5, generator=g)
    reference = loss(s, t)
    with torch.autocast('cpu', dtype=torch.bfloat16):
        value = loss(s.bfloat16(), t.bfloat16())
    assert value.dtype == torch.float32
    # the only difference: the inputs' rounding to bfloat16 (8 bits)
    torch.testing.assert_close(value, reference, rtol=3e-2, atol=1e-2)
    exact = loss(s.bfloat16().float(), t.bfloat16().float())
    torch.testing.assert_close(value, exact, rtol=0, atol=0)


def test_a_plugin_that_overrides_forward_still_binds_forward():
    class OldStyle(BaseDistillLoss):
        def forward(self, s_emb, t_emb, labels=None):
            return self.loss_weight * (s_emb - t_emb.detach()).pow(2).mean()
    assert list(OldStyle.input_signature().parameters) == [
        's_emb', 't_emb', 'labels']
    value = OldStyle(loss_weight=2.0)(torch.ones(2, 3), torch.zeros(2, 3))
    assert value.item() == 2.0
