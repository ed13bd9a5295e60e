"""TFace IR / IR-SE face backbones (Tencent TFace ``torchkit`` layout).

References:
    Deng et al., "ArcFace: Additive Angular Margin Loss for Deep Face
    Recognition", CVPR 2019 (the improved-residual "IR" unit).
    Hu et al., "Squeeze-and-Excitation Networks", CVPR 2018 (the SE unit).
    Tencent TFace, ``torchkit/backbone/model_irse.py`` (``IR_18`` ..
    ``IR_SE_200``): the module layout and state-dict key names reproduced
    here, so TFace ``Backbone_*.pth`` files load with ``strict=True``.

State-dict layout (TFace's, one entry per parameter group)::

    input_layer.0            conv3×3 3→64, stride 1, no bias
    input_layer.1 / .2       BatchNorm2d(64) / PReLU(64)
    body.<i>                 the units, numbered 0.. across all four stages
      .shortcut_layer.0 / .1   conv1×1 (stride) / BatchNorm2d, only when the
                               unit changes width; otherwise MaxPool2d(1,
                               stride) (no weights)
      .res_layer.0..5          basic unit (depth <= 101): BN, conv3×3, BN,
                               PReLU, conv3×3 (stride), BN
      .res_layer.0..8          bottleneck unit (depth 152/200): BN,
                               conv1×1 (C/4), BN, PReLU, conv3×3, BN, PReLU,
                               conv1×1 (stride, C), BN
      .res_layer.se_block      SE variant only: fc1 / fc2 (1×1 convs, no
                               bias, reduction 16)
    output_layer.0           BatchNorm2d(C)
    output_layer.1 / .2      Dropout / Flatten (no weights)
    output_layer.3           Linear(C·H/16·W/16 → D)
    output_layer.4           BatchNorm1d(D, affine=False): running stats only

Note: face.evoLVe's older ``model_irse.py`` uses the same top-level names but
a different unit (no BN after the first conv, SE at ``res_layer.5``, affine
final BN), so its files do not fit this layout; loading one reports the
missing/unexpected keys.
"""
from collections import OrderedDict
from typing import Optional, Sequence

import torch
from torch import nn

from kdzoo.registry import BACKBONES
from kdzoo.utils import ConfigError
from kdzoo.utils import check_int, check_number, check_size
from .base import BaseBackbone, check_int_tuple, init_conv_bn_

# units per stage, as TFace's get_blocks(num_layers)
TFACE_UNITS = {
    18: (2, 2, 2, 2),
    34: (3, 4, 6, 3),
    50: (3, 4, 14, 3),
    100: (3, 13, 30, 3),
    152: (3, 8, 36, 3),
    200: (3, 24, 36, 3),
}
DEPTH_ALIASES = {101: 100}  # TFace names the 100-layer net ``IR_101``
BASIC_WIDTHS = (64, 128, 256, 512)  # depth <= 100
BOTTLENECK_WIDTHS = (256, 512, 1024, 2048)  # depth 152, 200
STEM_WIDTH = 64
SE_REDUCTION = 16
TOTAL_STRIDE = 16  # stride-1 stem, then stride 2 at each stage's first unit


class SEModule(nn.Module):
    """Squeeze-and-excitation gate: avg-pool → fc1 → ReLU → fc2 → sigmoid."""

    def __init__(self, channels: int, reduction: int = SE_REDUCTION):
        super().__init__()
        hidden = max(1, channels // reduction)
        self.fc1 = nn.Conv2d(channels, hidden, 1, bias=False)
        self.fc2 = nn.Conv2d(hidden, channels, 1, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate = torch.sigmoid(self.fc2(torch.relu(self.fc1(
            x.mean(dim=(2, 3), keepdim=True)))))
        return x * gate


def _residual_branch(in_channels: int, channels: int, stride: int,
                     bottleneck: bool, se: bool) -> nn.Sequential:
    """``res_layer`` of one unit, numbered as TFace's ``Sequential``."""
    if bottleneck:
        mid = channels // 4
        layers = [
            nn.BatchNorm2d(in_channels),
            nn.Conv2d(in_channels, mid, 1, bias=False),
            nn.BatchNorm2d(mid), nn.PReLU(mid),
            nn.Conv2d(mid, mid, 3, padding=1, bias=False),
            nn.BatchNorm2d(mid), nn.PReLU(mid),
            nn.Conv2d(mid, channels, 1, stride=stride, bias=False),
            nn.BatchNorm2d(channels)]
    else:
        layers = [
            nn.BatchNorm2d(in_channels),
            nn.Conv2d(in_channels, channels, 3, padding=1, bias=False),
            nn.BatchNorm2d(channels), nn.PReLU(channels),
            nn.Conv2d(channels, channels, 3, stride=stride, padding=1,
                      bias=False),
            nn.BatchNorm2d(channels)]
    named = [(str(i), m) for i, m in enumerate(layers)]
    if se:
        named.append(('se_block', SEModule(channels)))
    return nn.Sequential(OrderedDict(named))


class IRUnit(nn.Module):
    """One IR unit: ``res_layer(x) + shortcut_layer(x)``.

    The shortcut subsamples (``MaxPool2d`` with a 1×1 window) when the width
    is unchanged, else projects with conv1×1 + BN, as in TFace.
    """

    def __init__(self, in_channels: int, channels: int, stride: int,
                 bottleneck: bool = False, se: bool = False):
        super().__init__()
        if in_channels == channels:
            self.shortcut_layer = nn.MaxPool2d(1, stride)
        else:
            self.shortcut_layer = nn.Sequential(
                nn.Conv2d(in_channels, channels, 1, stride=stride,
                          bias=False),
                nn.BatchNorm2d(channels))
        self.res_layer = _residual_branch(in_channels, channels, stride,
                                          bottleneck, se)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.res_layer(x) + self.shortcut_layer(x)


@BACKBONES.register_module()
class TFaceIR(BaseBackbone):
    """TFace IR-18..200 / IR-SE backbone with TFace's state-dict keys.

    Basic units (two 3×3 convs) up to depth 100, bottleneck units with
    widths 256..2048 at 152 and 200, as TFace's ``model_irse.py``. Stage
    outputs are the last unit of each stage (``body.<k>``, at strides 2, 4,
    8, 16: 56/28/14/7 at 112×112). The embedding is ``output_layer``'s
    non-affine BatchNorm1d output (not L2-normalised).

    Args:
        depth: 18, 34, 50, 100 (or 101, TFace's ``IR_101`` name), 152, 200.
        se: add the squeeze-and-excitation gate (TFace ``IR_SE_*``).
        input_size: (H, W) or one int, each divisible by 16; TFace trains at
            112 or 224. Sets the ``Linear`` input (C·H/16·W/16).
        embedding_size: D (TFace's files: 512).
        units: four unit counts overriding ``depth``'s (the unit type and
            widths still follow ``depth``), e.g. for small tests.
        dropout: dropout before the ``Linear`` (TFace: 0.4; inactive in
            eval mode).
    """

    def __init__(self, depth: int = 50, se: bool = False, input_size=112,
                 embedding_size: int = 512,
                 units: Optional[Sequence[int]] = None,
                 dropout: float = 0.4):
        super().__init__()
        owner = 'TFaceIR'
        if isinstance(depth, int):
            depth = DEPTH_ALIASES.get(depth, depth)
        if depth not in TFACE_UNITS:
            raise ConfigError(
                f'{owner}: depth must be one of {sorted(TFACE_UNITS)} '
                f'(TFace IR_<depth> / IR_SE_<depth>; IR_101 is depth=100), '
                f'got {depth!r}')
        if not isinstance(se, bool):
            raise ConfigError(f'{owner}: se must be True (IR_SE_*) or False '
                              f'(IR_*), got {se!r}')
        self.depth = depth
        self.se = se
        self.units = (TFACE_UNITS[depth] if units is None else
                      check_int_tuple(owner, 'units', units, 4))
        self.bottleneck = depth >= 152
        self.input_size = check_size(owner, input_size, divisor=TOTAL_STRIDE)
        self.embedding_size = check_int(owner, 'embedding_size',
                                        embedding_size)
        dropout = check_number(owner, 'dropout', dropout, 0, 1,
                               high_open=True)
        widths = BOTTLENECK_WIDTHS if self.bottleneck else BASIC_WIDTHS

        self.input_layer = nn.Sequential(
            nn.Conv2d(3, STEM_WIDTH, 3, padding=1, bias=False),
            nn.BatchNorm2d(STEM_WIDTH), nn.PReLU(STEM_WIDTH))
        # output_layer before body: TFace's state_dict order
        h, w = (s // TOTAL_STRIDE for s in self.input_size)
        self.output_layer = nn.Sequential(
            nn.BatchNorm2d(widths[-1]), nn.Dropout(dropout), nn.Flatten(),
            nn.Linear(widths[-1] * h * w, self.embedding_size),
            nn.BatchNorm1d(self.embedding_size, affine=False))
        body, stage_ends, in_channels = [], [], STEM_WIDTH
        for channels, count in zip(widths, self.units):
            for j in range(count):
                body.append(IRUnit(in_channels, channels,
                                   stride=2 if j == 0 else 1,
                                   bottleneck=self.bottleneck, se=se))
                in_channels = channels
            stage_ends.append(len(body) - 1)
        self.body = nn.Sequential(*body)
        self.stage_paths = tuple(f'body.{k}' for k in stage_ends)
        self._init_weights()

    def _init_weights(self) -> None:
        init_conv_bn_(self)  # as insightface/TFace initialise

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.output_layer(self.body(self.input_layer(x)))

    def forward_from_stage(self, x: torch.Tensor, stage: int) -> torch.Tensor:
        """Run the units after stage ``stage`` (1-based) and the output layer.

        Fed the real stage output this reproduces ``forward`` (see
        ``BaseBackbone``); ``stage=4`` runs only ``output_layer``.
        """
        path = self.stage_path(stage)  # validates 1..4 with a clear error
        last = int(path.split('.')[1])
        for unit in self.body[last + 1:]:
            x = unit(x)
        return self.output_layer(x)
