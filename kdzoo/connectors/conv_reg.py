"""FitNets' convolutional regressor (RepDistiller's ``ConvReg``)."""
from typing import Optional, Sequence, Tuple, Union

import torch
from torch import nn

from kdzoo.registry import CONNECTORS
from kdzoo.utils import ConfigError, is_int
from .projectors import BaseConnector


def _parse_size(out_size) -> Optional[Tuple[int, int]]:
    """``None``, int or ``(H, W)`` -> ``None`` or ``(H, W)``; else raise."""
    if out_size is None:
        return None
    if (is_int(out_size) and out_size > 0):
        return (out_size, out_size)
    if (isinstance(out_size, (tuple, list)) and len(out_size) == 2
            and all((is_int(v) and v > 0) for v in out_size)):
        return (int(out_size[0]), int(out_size[1]))
    raise ConfigError(
        f'ConvReg: out_size must be None, a positive int or a pair (H, W) of '
        f'positive ints (the teacher map size), got {out_size!r}')


@CONNECTORS.register_module()
class ConvReg(BaseConnector):
    """FitNets regressor: conv + BatchNorm2d (+ ReLU) to the teacher's shape.

    Romero et al., "FitNets: Hints for Thin Deep Nets", ICLR 2015, arXiv
    1412.6550, §2.2 (the regressor ``r`` of the hint loss, Eq. 3), with the
    layer choice of RepDistiller ``models/util.py:ConvReg``. With student maps
    ``B×C_s×s_H×s_W`` and teacher size ``(t_H, t_W)``:

    * ``s_H == 2·t_H``: ``Conv2d(C_s, C_t, 3, stride=2, padding=1)``;
    * ``2·s_H == t_H``: ``ConvTranspose2d(C_s, C_t, 4, stride=2, padding=1)``;
    * ``s_H >= t_H``: ``Conv2d(C_s, C_t, (1+s_H-t_H, 1+s_W-t_W))``
      (1×1 when the sizes are equal);
    * otherwise (the student map is smaller, but not half): ``ValueError``.

    The convolutions keep their bias (as in RepDistiller); then
    ``BatchNorm2d(C_t)`` and, if ``use_relu``, a ReLU. kdzoo additionally
    checks that the chosen layer really produces ``(t_H, t_W)`` (RepDistiller
    only looks at H), so non-square mismatches fail at build time.

    The layers are created in ``build_for`` (called by the distiller at build
    time with the tapped tensor's shape, before the optimizer exists), or in
    ``__init__`` when ``in_channels`` is given and ``out_size`` is ``None``.

    Args:
        out_channels: teacher channels ``C_t``.
        out_size: teacher spatial size, an int or ``(H, W)``; ``None`` keeps
            the student's size (a 1×1 conv).
        in_channels: student channels; ``None`` infers them from the tap.
        use_relu: apply a ReLU after the BatchNorm (RepDistiller default).
    """

    def __init__(self, out_channels: int,
                 out_size: Union[int, Sequence[int], None] = None,
                 in_channels: Optional[int] = None, use_relu: bool = True):
        super().__init__()
        if not (is_int(out_channels) and out_channels > 0):
            raise ConfigError(f'ConvReg: out_channels must be a positive int '
                              f'(the teacher channels), got {out_channels!r}')
        if in_channels is not None and not (is_int(in_channels)
                                            and in_channels > 0):
            raise ConfigError(f'ConvReg: in_channels must be None (inferred) '
                              f'or a positive int, got {in_channels!r}')
        self.out_channels = int(out_channels)
        self.out_size = _parse_size(out_size)
        self.in_channels = in_channels
        self.use_relu = bool(use_relu)
        self._in_size: Optional[Tuple[int, int]] = None
        if in_channels is not None and self.out_size is None:
            self._make(int(in_channels), None)

    def expected_input(self):
        size = ('H×W' if self._in_size is None else
                f'{self._in_size[0]}×{self._in_size[1]}')
        return f'B×{self.in_channels}×{size} feature maps'

    def _target(self, in_size: Tuple[int, int]) -> Tuple[int, int]:
        return in_size if self.out_size is None else self.out_size

    def _layer(self, in_channels: int, in_size: Optional[Tuple[int, int]]):
        """The RepDistiller conv for ``in_size`` and its output size."""
        if in_size is None:  # out_size None: any input size, 1×1 conv
            return nn.Conv2d(in_channels, self.out_channels, 1), None
        (s_h, s_w), (t_h, t_w) = in_size, self._target(in_size)
        if s_h == 2 * t_h:
            conv = nn.Conv2d(in_channels, self.out_channels, 3, stride=2,
                             padding=1)
            out = ((s_h - 1) // 2 + 1, (s_w - 1) // 2 + 1)
        elif 2 * s_h == t_h:
            conv = nn.ConvTranspose2d(in_channels, self.out_channels, 4,
                                      stride=2, padding=1)
            out = (2 * s_h, 2 * s_w)
        elif s_h >= t_h and s_w >= t_w:
            conv = nn.Conv2d(in_channels, self.out_channels,
                             (1 + s_h - t_h, 1 + s_w - t_w))
            out = (t_h, t_w)
        else:
            conv, out = None, None
        if out != (t_h, t_w):
            raise ValueError(
                f'ConvReg cannot map student maps of size {s_h}×{s_w} to the '
                f'teacher size {t_h}×{t_w} (out_size={self.out_size}): the '
                f'regressor needs s_H == 2·t_H (stride-2 conv), 2·s_H == t_H '
                f'(transposed conv) or s_H >= t_H and s_W >= t_W (valid '
                f'conv), '
                f'with the same ratio on W. Tap a student stage whose maps '
                f'are at least the teacher size (or half of it), or a '
                f'smaller teacher stage')
        return conv, out

    def _make(self, in_channels: int, in_size: Optional[Tuple[int, int]]):
        self.conv, _ = self._layer(in_channels, in_size)
        self.in_channels = in_channels
        self._in_size = in_size
        self.bn = nn.BatchNorm2d(self.out_channels)
        self.relu = nn.ReLU() if self.use_relu else None
        self._built = True

    def build_for(self, input_shape):
        if len(input_shape) != 4:
            raise ValueError(f'ConvReg takes B×C×H×W maps, got a tensor of '
                             f'shape {tuple(input_shape)}; use '
                             f'LinearProjector for embeddings')
        channels = int(input_shape[1])
        size = (int(input_shape[2]), int(input_shape[3]))
        if self.in_channels is not None and channels != self.in_channels:
            raise ValueError(
                f'ConvReg expects in_channels={self.in_channels} but its '
                f'input has shape {tuple(input_shape)}; set '
                f'in_channels={channels} (or leave it None to infer it)')
        if not self._built:
            # out_size None -> 1×1 conv, valid for any input size
            self._make(channels, None if self.out_size is None else size)
        elif self._in_size is not None and size != self._in_size:
            raise ValueError(
                f'ConvReg was built for {self._in_size[0]}×'
                f'{self._in_size[1]} inputs but its input has shape '
                f'{tuple(input_shape)}; one ConvReg serves one tap')

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self._built:
            raise RuntimeError('ConvReg is not built yet: call '
                               'build_for(input_shape) first (the distiller '
                               'does this at build time)')
        x = self.bn(self.conv(x))
        return self.relu(x) if self.relu is not None else x

    def extra_repr(self):
        return (f'out_channels={self.out_channels}, out_size={self.out_size}, '
                f'in_channels={self.in_channels}, use_relu={self.use_relu}')
