"""Evaluation's BatchNorm-folded, channels-last copy of the student backbone
(kdzoo/distillers/inference.py): the same embeddings up to float rounding,
rebuilt after every weight change, never part of the model's state."""
import copy

import pytest
import torch
from torch import nn

from kdzoo.distillers import FaceDistiller
from kdzoo.distillers.inference import InferenceBackbone, folded_copy
from kdzoo.registry import BACKBONES

BACKBONE_CFGS = {
    'MobileFaceNet': dict(type='MobileFaceNet', width_mult=0.25,
                          blocks=(1, 1, 1, 1), embedding_size=32,
                          input_size=(32, 32)),
    'IResNet': dict(type='IResNet', width_mult=0.25, layers=(1, 1, 1, 1),
                    embedding_size=32, input_size=(32, 32)),
}


def _trained_bn(backbone, size=32):
    """Non-trivial BatchNorm statistics (a train-mode pass)."""
    torch.manual_seed(0)
    with torch.no_grad():
        backbone.train()
        backbone(torch.randn(16, 3, size, size) * 2 + 0.5)
    return backbone.eval()


@pytest.mark.parametrize('name', sorted(BACKBONE_CFGS))
def test_folded_copy_embeds_as_the_backbone(name):
    backbone = _trained_bn(BACKBONES.build(BACKBONE_CFGS[name]))
    folded = folded_copy(backbone)

    def batchnorms(module):
        return sum(isinstance(m, nn.BatchNorm2d) for m in module.modules())
    # every BN right after a conv is folded (IResNet keeps its
    # pre-activation BNs, which precede their convs)
    assert batchnorms(folded) < batchnorms(backbone)
    x = torch.randn(8, 3, 32, 32)
    with torch.no_grad():
        ref = backbone(x)
        got = folded(x.contiguous(memory_format=torch.channels_last))
    # folding rescales each conv weight by gamma/sqrt(var+eps): a few float
    # roundings per weight, summed over a few hundred terms per output
    # (seen: ~1e-6 of the output scale); 2e-5 leaves 20x
    assert (got - ref).abs().max() <= 2e-5 * ref.abs().max()


def test_distiller_embeds_with_the_copy_and_rebuilds_it_after_a_step():
    model = FaceDistiller(student=dict(
        backbone=BACKBONE_CFGS['MobileFaceNet'],
        head=dict(type='CosFace', num_classes=5, embedding_size=32)))
    _trained_bn(model.student.backbone)
    model.eval()
    x = torch.randn(4, 3, 32, 32)
    plain = model.student.backbone
    with torch.no_grad():
        ref = plain(x) + plain(torch.flip(x, dims=[3]))
    emb = model.embed(x)
    assert (emb - ref).abs().max() <= 2e-5 * ref.abs().max()
    first = model._inference._copy
    assert first is not None and first is not plain
    model.embed(x)
    assert model._inference._copy is first  # unchanged weights: reused
    # the copy is no part of the model: parameters, state dict, optimizer
    names = [n for n, _ in model.named_parameters()]
    assert not any('_inference' in n for n in names)
    assert not any('_inference' in k for k in model.state_dict())
    # an optimizer step changes the weights in place: a new copy follows
    model.train()
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    loss = model.student.backbone(torch.randn(8, 3, 32, 32)).pow(2).mean()
    loss.backward()
    opt.step()
    model.eval()
    with torch.no_grad():
        ref2 = plain(x) + plain(torch.flip(x, dims=[3]))
    emb2 = model.embed(x)
    assert model._inference._copy is not first
    assert (emb2 - ref2).abs().max() <= 2e-5 * ref2.abs().max()
    assert not torch.allclose(emb2, emb)
    # fuse_bn=False: the backbone as trained, exactly
    model.test_cfg['fuse_bn'] = False
    assert torch.equal(model.embed(x), ref2)
    # training mode never uses the copy
    model.train()
    model.test_cfg['fuse_bn'] = True
    with torch.no_grad():
        train_ref = plain(x) + plain(torch.flip(x, dims=[3]))
    assert torch.equal(model.embed(x), train_ref)
    # a copied model (EMA, deepcopy) builds its own copy (the train-mode
    # embed above moved the BN statistics: compare with the clone's own)
    clone = copy.deepcopy(model).eval()
    assert clone._inference._copy is None
    with torch.no_grad():
        ref3 = clone.student.backbone(x) + clone.student.backbone(
            torch.flip(x, dims=[3]))
    assert (clone.embed(x) - ref3).abs().max() <= 2e-5 * ref3.abs().max()
    assert clone._inference._copy is not None


class _Untraceable(nn.Module):
    """Data-dependent control flow: torch.fx cannot trace it."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3)
        self.bn = nn.BatchNorm2d(4)

    def forward(self, x):
        y = self.bn(self.conv(x))
        if y.sum() > 0:
            y = y * 2
        return y.flatten(1)


def test_untraceable_backbone_is_used_as_it_is():
    backbone = _Untraceable().eval()
    cache = InferenceBackbone()
    assert cache.get(backbone) is backbone
    assert cache.get(backbone) is backbone  # tried once
