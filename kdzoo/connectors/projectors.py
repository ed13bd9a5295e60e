"""Projectors: the student transform G^s of ShrinkTeaNet / FitNets' regressor.

Connectors are training-only: they live in the distiller, are optimised with
the student, and are never part of the exported student.
"""
from typing import Optional

import torch
from torch import nn

from kdzoo.registry import CONNECTORS


class BaseConnector(nn.Module):
    """Base class: ``in_features`` may be ``None`` and filled at build time.

    The distiller calls ``build_for(input_shape)`` once with the shape of the
    tapped tensor (batch included); subclasses create their layers there, so
    a recipe only needs to state the output size.
    """

    def __init__(self):
        super().__init__()
        self._built = False

    def build_for(self, input_shape: torch.Size) -> None:
        raise NotImplementedError

    def expected_input(self) -> str:
        """Human-readable description of the accepted input (for errors)."""
        raise NotImplementedError


@CONNECTORS.register_module()
class LinearProjector(BaseConnector):
    """Linear (no bias) + BatchNorm1d mapping B×D_in to B×D_out embeddings.

    ShrinkTeaNet's student transform for vectors (arXiv 1905.10620 §3.1: a
    1×1 conv + BN, which on an embedding is Linear + BN).
    """

    def __init__(self, out_features: int, in_features: Optional[int] = None,
                 norm: bool = True):
        super().__init__()
        self.in_features = in_features
        self.out_features = int(out_features)
        self.norm = norm
        if in_features is not None:
            self._make(int(in_features))

    def _make(self, in_features):
        self.in_features = in_features
        self.fc = nn.Linear(in_features, self.out_features, bias=not self.norm)
        self.bn = nn.BatchNorm1d(self.out_features) if self.norm else None
        self._built = True

    def expected_input(self):
        return f'B×{self.in_features} embeddings'

    def build_for(self, input_shape):
        if len(input_shape) != 2:
            raise ValueError(f'LinearProjector takes B×D embeddings, got a '
                             f'tensor of shape {tuple(input_shape)}; use '
                             f'ConvProjector for feature maps')
        if not self._built:
            self._make(int(input_shape[1]))
        elif input_shape[1] != self.in_features:
            raise ValueError(
                f'LinearProjector expects in_features={self.in_features} but '
                f'its input has shape {tuple(input_shape)}; set '
                f'in_features={int(input_shape[1])} (or leave it None to '
                f'infer it)')

    def forward(self, x):
        x = self.fc(x)
        return self.bn(x) if self.bn is not None else x


@CONNECTORS.register_module()
class ConvProjector(BaseConnector):
    """k×k conv (1×1 by default) + BatchNorm2d mapping B×C_in×H×W maps.

    ShrinkTeaNet's H^s (1×1 conv + BN) and FitNets' regressor.
    """

    def __init__(self, out_channels: int, in_channels: Optional[int] = None,
                 kernel_size: int = 1, norm: bool = True):
        super().__init__()
        self.in_channels = in_channels
        self.out_channels = int(out_channels)
        self.kernel_size = int(kernel_size)
        self.norm = norm
        if in_channels is not None:
            self._make(int(in_channels))

    def _make(self, in_channels):
        self.in_channels = in_channels
        self.conv = nn.Conv2d(in_channels, self.out_channels,
                              self.kernel_size,
                              padding=self.kernel_size // 2,
                              bias=not self.norm)
        self.bn = nn.BatchNorm2d(self.out_channels) if self.norm else None
        self._built = True

    def expected_input(self):
        return f'B×{self.in_channels}×H×W feature maps'

    def build_for(self, input_shape):
        if len(input_shape) != 4:
            raise ValueError(f'ConvProjector takes B×C×H×W maps, got a tensor '
                             f'of shape {tuple(input_shape)}; use '
                             f'LinearProjector for embeddings')
        if not self._built:
            self._make(int(input_shape[1]))
        elif input_shape[1] != self.in_channels:
            raise ValueError(
                f'ConvProjector expects in_channels={self.in_channels} but '
                f'its input has shape {tuple(input_shape)}; set '
                f'in_channels={int(input_shape[1])} (or leave it None)')

    def forward(self, x):
        x = self.conv(x)
        return self.bn(x) if self.bn is not None else x
