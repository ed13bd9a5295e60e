"""The loss plugin contract (``kdzoo.losses.contract.check_contract``) on
every registered loss: a new plugin is covered without new test code. Only
losses whose constructor needs a value without a default (a file, a dataset
size) or a teacher are listed here. Also: the frame around ``loss()``.
"""
import pytest
import torch

import kdzoo  # noqa: F401  (registers everything)
from kdzoo.losses import BaseDistillLoss
from kdzoo.losses.contract import DIM, check_contract, example_inputs
from kdzoo.registry import BACKBONES, LOSSES
from kdzoo.teachers import FrozenTeacher

# constructor arguments for losses that cannot be built from defaults alone
CONSTRUCTOR = {
    'CRDLoss': dict(num_data=64, nce_k=16),
    'AdaDistillLoss': dict(num_classes=10, embedding_size=DIM),
    'MarginDistillationLoss': dict(embedding_size=DIM),
    'StagewiseAngularLoss': dict(teacher='teacher_fr', stages=(2, 3)),
}
TEACHER = dict(type='IResNet', width_mult=0.25, layers=(1, 1, 1, 1),
               embedding_size=DIM, input_size=(32, 32))


def _build(name, tmp_path):
    """The loss, and the inputs its names do not tell (stage maps)."""
    kwargs = dict(CONSTRUCTOR.get(name, {}))
    if name == 'MarginDistillationLoss':
        path = tmp_path / 'head.pth'
        torch.save({'weight': torch.randn(10, DIM)}, path)
        kwargs['head_checkpoint'] = str(path)
    loss = LOSSES.build(dict(type=name, **kwargs))
    inputs = {}
    if hasattr(loss, 'attach_teachers'):  # runs the teacher's later stages
        teacher = FrozenTeacher(BACKBONES.build(TEACHER))
        loss.attach_teachers({'teacher_fr': teacher})
        shapes = teacher.network.feature_shapes(batch_size=8)
        inputs = {f's_feat{k}': torch.randn(shapes[teacher.stage_path(k)])
                  for k in loss.stages}
    return loss, inputs


@pytest.mark.parametrize('name', sorted(LOSSES.module_dict))
def test_every_registered_loss_keeps_the_contract(name, tmp_path):
    loss, inputs = _build(name, tmp_path)
    check_contract(loss, inputs)


def test_the_contract_check_catches_broken_losses():
    class LeaksToTheTeacher(BaseDistillLoss):  # owns forward, no detach
        def forward(self, s_emb, t_emb):
            return self.loss_weight * (s_emb - t_emb).pow(2).mean()

    with pytest.raises(AssertionError, match='gradient reached t_emb'):
        check_contract(LeaksToTheTeacher())

    class NotLinear(BaseDistillLoss):
        def loss(self, s_emb, t_emb):
            return (s_emb - t_emb).pow(2).mean() + self.loss_weight

    with pytest.raises(AssertionError, match='linear in loss_weight'):
        check_contract(NotLinear())

    class NoStudentGradient(BaseDistillLoss):
        def loss(self, s_emb, t_emb):
            return (s_emb.detach() - t_emb).pow(2).mean() * 0 + t_emb.sum() * 0

    with pytest.raises(AssertionError, match='no gradient reached the '
                       'student'):
        check_contract(NoStudentGradient())

    class UnknownArgument(BaseDistillLoss):
        def loss(self, x):
            return x.sum()

    with pytest.raises(ValueError, match="argument 'x'"):
        example_inputs(UnknownArgument())


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
