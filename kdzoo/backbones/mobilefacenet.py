"""MobileFaceNet (insightface arcface_torch layout, ``mbf`` / ``mbf_large``).

Reference:
    Chen et al., "MobileFaceNets: Efficient CNNs for Accurate Real-Time Face
    Verification on Mobile Devices", CCBR 2018, arXiv:1804.07573.
"""
import math
from typing import Sequence

import torch
from torch import nn

from kdzoo.registry import BACKBONES
from kdzoo.utils import check_int, check_number, check_size
from .base import BaseBackbone, check_int_tuple, init_conv_bn_, scaled_width

TOTAL_STRIDE = 16  # stem and three DepthWise downsamplings, stride 2 each


class ConvBlock(nn.Module):
    """Conv (no bias) → BatchNorm2d → PReLU, as ``layers.0/1/2``."""

    def __init__(self, in_channels, out_channels, kernel=1, stride=1,
                 padding=0, groups=1):
        super().__init__()
        self.layers = nn.Sequential(
            nn.Conv2d(in_channels, out_channels, kernel, stride=stride,
                      padding=padding, groups=groups, bias=False),
            nn.BatchNorm2d(out_channels),
            nn.PReLU(out_channels))

    def forward(self, x):
        return self.layers(x)


class LinearBlock(nn.Module):
    """Conv (no bias) → BatchNorm2d without activation, as ``layers.0/1``."""

    def __init__(self, in_channels, out_channels, kernel=1, stride=1,
                 padding=0, groups=1):
        super().__init__()
        self.layers = nn.Sequential(
            nn.Conv2d(in_channels, out_channels, kernel, stride=stride,
                      padding=padding, groups=groups, bias=False),
            nn.BatchNorm2d(out_channels))

    def forward(self, x):
        return self.layers(x)


class DepthWise(nn.Module):
    """Bottleneck: 1×1 expand → 3×3 depthwise (stride) → 1×1 linear project.

    ``expansion`` is the hidden width (arcface_torch calls it ``groups``);
    with ``residual`` the input is added to the output.
    """

    def __init__(self, in_channels, out_channels, expansion, stride=2,
                 residual=False):
        super().__init__()
        self.residual = residual
        self.layers = nn.Sequential(
            ConvBlock(in_channels, expansion),
            ConvBlock(expansion, expansion, kernel=3, stride=stride,
                      padding=1, groups=expansion),
            LinearBlock(expansion, out_channels))

    def forward(self, x):
        out = self.layers(x)
        return x + out if self.residual else out


class Residual(nn.Module):
    """``num_blocks`` residual stride-1 ``DepthWise`` blocks."""

    def __init__(self, channels, num_blocks, expansion):
        super().__init__()
        self.layers = nn.Sequential(*[
            DepthWise(channels, channels, expansion, stride=1, residual=True)
            for _ in range(num_blocks)])

    def forward(self, x):
        return self.layers(x)


class GDC(nn.Module):
    """Global depthwise conv (kernel = final map size) → Linear → BN1d."""

    def __init__(self, channels, embedding_size, kernel_size):
        super().__init__()
        self.layers = nn.Sequential(
            LinearBlock(channels, channels, kernel=kernel_size,
                        groups=channels),
            nn.Flatten(),
            nn.Linear(channels, embedding_size, bias=False),
            nn.BatchNorm1d(embedding_size))

    def forward(self, x):
        return self.layers(x)


@BACKBONES.register_module()
class MobileFaceNet(BaseBackbone):
    """MobileFaceNet face backbone (Chen et al. 2018, arXiv:1804.07573).

    insightface arcface_torch's variant: at the defaults (``mbf``) and with
    ``scale=4, blocks=(2, 8, 12, 4)`` (``mbf_large``) and 112×112 input,
    ``state_dict`` keys and shapes equal arcface_torch's, so its
    ``backbone.pth`` loads with ``strict=True``.

    Layout (``layers`` is a list of 8 modules): ``layers.0`` stem conv
    stride 2; ``layers.1`` depthwise conv (``blocks[0] == 1``) or residual
    blocks; then three (downsampling ``DepthWise``, ``Residual``) pairs;
    ``conv_sep`` 1×1 conv; ``features`` = GDC (depthwise conv over the
    whole final map, Linear, BatchNorm1d). Stage outputs are
    ``layers.1/3/5/7`` at strides 2, 4, 8, 16 (56/28/14/7 at 112).

    Args:
        embedding_size: embedding dimension D.
        blocks: residual block counts of the four stages.
        scale: multiplies the stage widths 64 and 128.
        width_mult: multiplies every internal width (stage widths, the
            expansion widths 128/256/512, conv_sep/GDC width) for tiny
            models; rounded, at least 4.
        conv_sep_channels: width of ``conv_sep`` and the GDC (512).
        input_size: (H, W), each divisible by 16; the GDC kernel is
            (H/16, W/16) (7×7 at 112).
    """

    stage_paths = ('layers.1', 'layers.3', 'layers.5', 'layers.7')

    def __init__(self, embedding_size: int = 512,
                 blocks: Sequence[int] = (1, 4, 6, 2), scale: int = 2,
                 width_mult: float = 1.0, conv_sep_channels: int = 512,
                 input_size=(112, 112)):
        super().__init__()
        owner = 'MobileFaceNet'
        self.embedding_size = check_int(owner, 'embedding_size',
                                        embedding_size)
        self.blocks = check_int_tuple(owner, 'blocks', blocks, 4)
        self.scale = check_int(owner, 'scale', scale)
        self.width_mult = check_number(owner, 'width_mult', width_mult, 0,
                                       low_open=True)
        conv_sep_channels = check_int(owner, 'conv_sep_channels',
                                      conv_sep_channels)
        self.input_size = check_size(owner, input_size, divisor=TOTAL_STRIDE)

        def width(c):
            return scaled_width(c, self.width_mult)

        low, high = width(64 * self.scale), width(128 * self.scale)
        exp1, exp2, exp3 = width(128), width(256), width(512)
        sep = width(conv_sep_channels)

        self.layers = nn.ModuleList()
        self.layers.append(ConvBlock(3, low, kernel=3, stride=2, padding=1))
        if self.blocks[0] == 1:
            # grouped 3×3 conv; arcface_torch uses 64 groups
            groups = math.gcd(low, width(64))
            self.layers.append(ConvBlock(low, low, kernel=3, padding=1,
                                         groups=groups))
        else:
            self.layers.append(Residual(low, self.blocks[0], exp1))
        self.layers.extend([
            DepthWise(low, low, exp1, stride=2),
            Residual(low, self.blocks[1], exp1),
            DepthWise(low, high, exp2, stride=2),
            Residual(high, self.blocks[2], exp2),
            DepthWise(high, high, exp3, stride=2),
            Residual(high, self.blocks[3], exp2),
        ])
        self.conv_sep = ConvBlock(high, sep)
        kernel = tuple(s // TOTAL_STRIDE for s in self.input_size)
        self.features = GDC(sep, self.embedding_size, kernel)
        self._init_weights()

    def _init_weights(self) -> None:
        init_conv_bn_(self)  # as insightface/TFace initialise

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for layer in self.layers:
            x = layer(x)
        return self.features(self.conv_sep(x))

    def forward_from_stage(self, x: torch.Tensor, stage: int) -> torch.Tensor:
        """Run the rest of the network on a stage-``stage`` output map.

        ``stage`` is 1-based as ``stage_paths`` (``layers.1/3/5/7``), so
        ``layers[2*stage:]`` follow, then ``conv_sep`` and the GDC
        ``features``; fed the real stage output this reproduces ``forward``.
        ``stage=4`` runs only the embedding layers (``conv_sep``, GDC).
        """
        self.stage_path(stage)  # validates 1..4 with a clear error
        for layer in self.layers[2 * stage:]:
            x = layer(x)
        return self.features(self.conv_sep(x))
