"""The contract every kdzoo backbone follows, and shared argument checks.

A backbone maps a normalised float batch ``B×3×H×W`` to embeddings ``B×D``
(not L2-normalised) and exposes:

* ``embedding_size`` (D) and ``input_size`` ((H, W) it was built for);
* ``stage_paths``: module paths (as in ``named_modules()``) whose forward
  outputs are the stage 1..4 feature maps, so distillers can hook them;
  ``stage_path(i)`` returns the i-th (1-based) with a clear error.

Optional contract: ``forward_from_stage(x, stage)`` takes a stage-``stage``
output map (1-based, the ``stage_paths`` convention) and runs the rest of
the network to the embedding, so that
``forward_from_stage(<real stage-i output>, i) == forward(images)`` (eval
mode); for the last stage it runs only the embedding layers. Stage-wise
distillation through a frozen teacher (``StagewiseAngularLoss``,
ShrinkTeaNet Eq. 6) needs it; ``IResNet`` and ``MobileFaceNet`` provide it.
Backbones that cannot (ONNX graphs, timm wrappers) simply do not define it.
"""
from collections import OrderedDict
from typing import Dict, Sequence, Tuple

import torch
from torch import nn

from kdzoo.utils import ConfigError
from kdzoo.utils.probe import run_on_zeros


class BaseBackbone(nn.Module):
    """Base class of face backbones: B×3×H×W images to B×D embeddings."""

    embedding_size: int
    input_size: Tuple[int, int]
    stage_paths: Tuple[str, ...] = ()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def stage_path(self, i: int) -> str:
        """Module path whose output is stage ``i`` (1-based)."""
        n = len(self.stage_paths)
        if isinstance(i, bool) or not isinstance(i, int) or not 1 <= i <= n:
            raise ConfigError(
                f'{type(self).__name__} has {n} stages '
                f'{list(self.stage_paths)}, so stage {i!r} does not exist; '
                f'use 1..{n} or a module path from named_modules()')
        return self.stage_paths[i - 1]

    def module_names(self) -> Tuple[str, ...]:
        """All submodule paths (candidates for taps and ``stage_paths``)."""
        return tuple(name for name, _ in self.named_modules() if name)

    @torch.no_grad()
    def feature_shapes(self, batch_size: int = 1
                       ) -> Dict[str, Tuple[int, ...]]:
        """Output shape of every submodule on a zero batch, in call order.

        Helps choose ``stage_paths``: the last module at each spatial size
        is usually the stage output. Runs in eval mode and restores the mode.
        """
        shapes: Dict[str, Tuple[int, ...]] = OrderedDict()

        def record(name):
            def hook(_module, _inputs, output):
                if torch.is_tensor(output):
                    shapes.pop(name, None)  # keep the last call's position
                    shapes[name] = tuple(output.shape)
            return hook

        run_on_zeros(self, (batch_size, 3, *self.input_size),
                     [(m, record(n)) for n, m in self.named_modules() if n])
        return shapes

    def extra_repr(self) -> str:
        return (f'embedding_size={self.embedding_size}, '
                f'input_size={tuple(self.input_size)}')


def init_conv_bn_(module: nn.Module) -> None:
    """He (fan_out) init of convolutions and linears, zero biases, unit
    BatchNorm2d: the init of insightface's and TFace's face backbones."""
    for m in module.modules():
        if isinstance(m, (nn.Conv2d, nn.Linear)):
            nn.init.kaiming_normal_(m.weight, mode='fan_out',
                                    nonlinearity='relu')
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.BatchNorm2d):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)


def check_int_tuple(owner: str, name: str, value, length: int,
                    minimum: int = 1) -> Tuple[int, ...]:
    """A sequence of ``length`` ints >= ``minimum``, or ``ConfigError``."""
    ok = isinstance(value, Sequence) and not isinstance(value, str) \
        and len(value) == length and all(
            isinstance(v, int) and not isinstance(v, bool) and v >= minimum
            for v in value)
    if not ok:
        raise ConfigError(f'{owner}: {name} must be {length} integers >= '
                          f'{minimum}, got {value!r}')
    return tuple(int(v) for v in value)


def scaled_width(channels: int, width_mult: float, minimum: int = 4) -> int:
    """``channels * width_mult`` rounded, at least ``minimum``."""
    return max(minimum, int(round(channels * width_mult)))
