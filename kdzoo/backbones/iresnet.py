"""IResNet, the ArcFace residual backbone (insightface arcface_torch layout).

References:
    Deng et al., "ArcFace: Additive Angular Margin Loss for Deep Face
    Recognition", CVPR 2019 (the r18..r200 face IResNets).
    Duta et al., "Improved Residual Networks for Image and Video
    Recognition", ICPR 2020 (the improved residual block).
"""
from typing import Optional, Sequence

import torch
from torch import nn

from kdzoo.registry import BACKBONES
from kdzoo.utils import ConfigError
from kdzoo.utils import check_int, check_number, check_size
from .base import BaseBackbone, check_int_tuple, scaled_width

IRESNET_BLOCKS = {
    18: (2, 2, 2, 2),
    34: (3, 4, 6, 3),
    50: (3, 4, 14, 3),
    100: (3, 13, 30, 3),
    200: (6, 26, 60, 6),
}
BASE_WIDTHS = (64, 128, 256, 512)
TOTAL_STRIDE = 16  # four stride-2 stages after a stride-1 stem
BN_EPS = 1e-5


def conv3x3(in_channels: int, out_channels: int, stride: int = 1):
    return nn.Conv2d(in_channels, out_channels, 3, stride=stride, padding=1,
                     bias=False)


class IBasicBlock(nn.Module):
    """Pre-activation-style residual block: BN-conv-BN-PReLU-conv-BN (+id)."""

    def __init__(self, in_channels: int, channels: int, stride: int = 1,
                 downsample: Optional[nn.Module] = None):
        super().__init__()
        self.bn1 = nn.BatchNorm2d(in_channels, eps=BN_EPS)
        self.conv1 = conv3x3(in_channels, channels)
        self.bn2 = nn.BatchNorm2d(channels, eps=BN_EPS)
        self.prelu = nn.PReLU(channels)
        self.conv2 = conv3x3(channels, channels, stride)
        self.bn3 = nn.BatchNorm2d(channels, eps=BN_EPS)
        self.downsample = downsample

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.bn3(self.conv2(self.prelu(self.bn2(self.conv1(
            self.bn1(x))))))
        shortcut = x if self.downsample is None else self.downsample(x)
        return out + shortcut  # not in-place: hooked outputs stay intact


@BACKBONES.register_module()
class IResNet(BaseBackbone):
    """IResNet-18/34/50/100/200 face backbone (ArcFace, Deng et al. CVPR 2019).

    Improved residual network (Duta et al. 2020) in insightface
    arcface_torch's layout: at ``width_mult=1`` and 112×112 input its
    ``state_dict`` keys and shapes equal arcface_torch's ``iresnet*``, so
    their ``backbone.pth`` loads with ``strict=True``.

    Layout: stem conv3×3 (stride 1) → BN → PReLU; ``layer1..4`` of
    ``IBasicBlock`` (each stage stride 2, stage outputs at strides 2, 4, 8,
    16, i.e. 56/28/14/7 at 112); then ``bn2`` → flatten → ``dropout`` →
    ``fc`` → ``features`` (BatchNorm1d with its weight fixed to 1).

    Args:
        depth: 18, 34, 50, 100 or 200 (block counts (2,2,2,2), (3,4,6,3),
            (3,4,14,3), (3,13,30,3), (6,26,60,6)).
        embedding_size: embedding dimension D.
        width_mult: multiplies the stage widths 64/128/256/512 (rounded,
            at least 4), e.g. 0.125 for a tiny CPU model.
        layers: four block counts overriding ``depth`` (e.g. (1,1,1,1)).
        input_size: (H, W), each divisible by 16; sets the ``fc`` input
            (C·H/16·W/16).
        dropout: dropout probability before ``fc``.
    """

    stage_paths = ('layer1', 'layer2', 'layer3', 'layer4')

    def __init__(self, depth: Optional[int] = 50, embedding_size: int = 512,
                 width_mult: float = 1.0,
                 layers: Optional[Sequence[int]] = None,
                 input_size=(112, 112), dropout: float = 0.0):
        super().__init__()
        owner = 'IResNet'
        if layers is None:
            if depth not in IRESNET_BLOCKS:
                raise ConfigError(
                    f'{owner}: depth must be one of '
                    f'{sorted(IRESNET_BLOCKS)}, got {depth!r} (or give '
                    'layers=(n1, n2, n3, n4) block counts)')
            blocks = IRESNET_BLOCKS[depth]
        else:
            blocks = check_int_tuple(owner, 'layers', layers, 4)
        self.depth = depth
        self.blocks = blocks
        self.embedding_size = check_int(owner, 'embedding_size',
                                        embedding_size)
        self.width_mult = check_number(owner, 'width_mult', width_mult, 0,
                                       low_open=True)
        self.input_size = check_size(owner, input_size, divisor=TOTAL_STRIDE)
        dropout = check_number(owner, 'dropout', dropout, 0, 1,
                               high_open=True)
        widths = [scaled_width(w, self.width_mult) for w in BASE_WIDTHS]

        self.conv1 = conv3x3(3, widths[0])
        self.bn1 = nn.BatchNorm2d(widths[0], eps=BN_EPS)
        self.prelu = nn.PReLU(widths[0])
        in_channels = widths[0]
        for i, (channels, count) in enumerate(zip(widths, blocks), start=1):
            setattr(self, f'layer{i}',
                    self._make_stage(in_channels, channels, count))
            in_channels = channels
        self.bn2 = nn.BatchNorm2d(in_channels, eps=BN_EPS)
        self.dropout = nn.Dropout(p=dropout)
        h, w = (s // TOTAL_STRIDE for s in self.input_size)
        self.fc = nn.Linear(in_channels * h * w, self.embedding_size)
        self.features = nn.BatchNorm1d(self.embedding_size, eps=BN_EPS)
        self._init_weights()

    @staticmethod
    def _make_stage(in_channels: int, channels: int, count: int,
                    stride: int = 2) -> nn.Sequential:
        downsample = nn.Sequential(
            nn.Conv2d(in_channels, channels, 1, stride=stride, bias=False),
            nn.BatchNorm2d(channels, eps=BN_EPS))
        blocks = [IBasicBlock(in_channels, channels, stride, downsample)]
        blocks += [IBasicBlock(channels, channels) for _ in range(count - 1)]
        return nn.Sequential(*blocks)

    def _init_weights(self) -> None:
        # arcface_torch's scheme: N(0, 0.1) convs, unit BN, fixed BN1d scale.
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.normal_(m.weight, 0, 0.1)
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
        nn.init.ones_(self.features.weight)
        self.features.weight.requires_grad_(False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.prelu(self.bn1(self.conv1(x)))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        x = self.dropout(torch.flatten(self.bn2(x), 1))
        return self.features(self.fc(x))

    def forward_from_stage(self, x: torch.Tensor, stage: int) -> torch.Tensor:
        """Run ``layer{stage+1}..layer4`` and the embedding layers on ``x``.

        ``x`` is a stage-``stage`` output map (1-based, as ``stage_paths``:
        ``layer1..layer4``); fed the real stage output this reproduces
        ``forward``. ``stage=4`` runs only ``bn2 → flatten → dropout → fc →
        features``. Used by stage-wise distillation (ShrinkTeaNet Eq. 6) to
        push a student map through this (frozen) network.
        """
        self.stage_path(stage)  # validates 1..4 with a clear error
        for i in range(stage + 1, len(self.stage_paths) + 1):
            x = getattr(self, f'layer{i}')(x)
        x = self.dropout(torch.flatten(self.bn2(x), 1))
        return self.features(self.fc(x))
