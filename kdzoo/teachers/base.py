"""Frozen teachers: eval mode, no gradient, never optimised or saved."""
import logging
from typing import Optional, Sequence, Tuple, Union

import torch
import torch.nn.functional as F
from mmengine.logging import print_log
from torch import nn

from kdzoo.utils import ConfigError

Number = Union[float, Sequence[float]]


def _as_channel_tensor(value: Number, name: str) -> torch.Tensor:
    t = torch.as_tensor(value, dtype=torch.float32).flatten()
    if t.numel() == 1:
        t = t.repeat(3)
    if t.numel() != 3:
        raise ConfigError(f'teacher {name} must be a number or 3 numbers '
                          f'(RGB), got {value!r}')
    return t.view(1, 3, 1, 1)


def _count(n: int) -> str:
    """1234567 -> '1.2M', 5400 -> '5.4k'."""
    if n >= 1e6:
        return f'{n / 1e6:.1f}M'
    return f'{n / 1e3:.1f}k' if n >= 1e3 else str(n)


def _channels(values: Sequence[float]) -> str:
    """One number when the three channels agree, else ``[r, g, b]``."""
    if len(set(values)) == 1:
        return f'{values[0]:g}'
    return '[' + ', '.join(f'{v:.4g}' for v in values) + ']'


class FrozenTeacher(nn.Module):
    """A pretrained network used as a frozen teacher.

    - always in eval mode (``train()`` keeps it frozen, BN statistics fixed);
    - every parameter has ``requires_grad=False``, so the distiller's
      optimizer never sees it; the distiller also drops it from checkpoints;
    - ``forward(x)`` takes the batch as normalised for the *student*
      (``set_source_normalization``), converts it to this teacher's own
      normalisation (``mean``/``std`` on 0-255 pixels) and input size, and
      returns the embedding. Call it under ``torch.no_grad()`` for targets;
      gradients flow through it (weights fixed) when a loss needs that.

    Args:
        network: module mapping the teacher's input to a B×D embedding.
        head: optional margin head (gives ``<teacher>.logits``).
        mean, std: the teacher's input normalisation, on 0-255 RGB pixels.
        input_size: (H, W) the teacher expects; the batch is resized
            bilinearly when it differs. ``None`` keeps the batch size.
        stage_paths: module paths of stage 1..4 outputs inside ``network``
            (defaults to ``network.stage_paths`` when it has them).
        source: the file the weights came from (for ``describe()``).
        variant: short architecture name shown by ``describe()`` (``r50``).
        embedding_size: D, when ``network`` has no ``embedding_size``.
    """

    def __init__(self, network: nn.Module, head: Optional[nn.Module] = None,
                 mean: Number = 127.5, std: Number = 128.0,
                 input_size: Optional[Tuple[int, int]] = None,
                 stage_paths: Optional[Sequence[str]] = None,
                 source: Optional[str] = None,
                 variant: Optional[str] = None,
                 embedding_size: Optional[int] = None):
        super().__init__()
        self.network = network
        self.head = head
        self.source = source
        self.variant = variant
        self._embedding_size = embedding_size
        self.register_buffer('mean', _as_channel_tensor(mean, 'mean'),
                             persistent=False)
        self.register_buffer('std', _as_channel_tensor(std, 'std'),
                             persistent=False)
        self.register_buffer('src_mean', self.mean.clone(), persistent=False)
        self.register_buffer('src_std', self.std.clone(), persistent=False)
        self.input_size = tuple(input_size) if input_size else None
        if stage_paths is None:
            stage_paths = getattr(network, 'stage_paths', ())
        self.stage_paths = tuple(stage_paths)
        for p in self.parameters():
            p.requires_grad_(False)
        super().train(False)

    def train(self, mode: bool = True):
        """Teachers stay in eval mode whatever the caller asks."""
        return super().train(False)

    def set_source_normalization(self, mean: Number, std: Number) -> None:
        """Declare how the incoming batch was normalised (the student's)."""
        self.src_mean.copy_(_as_channel_tensor(mean, 'source mean'))
        self.src_std.copy_(_as_channel_tensor(std, 'source std'))

    @property
    def embedding_size(self) -> Optional[int]:
        if self._embedding_size is not None:
            return self._embedding_size
        return getattr(self.network, 'embedding_size', None)

    def describe(self) -> dict:
        """What this teacher is: name, size, input contract, weights file.

        Keys: ``teacher`` (class and variant), ``parameters`` (network and
        head), ``embedding_size``, ``input_size`` ((H, W) or ``None`` when
        the batch is not resized), ``mean``/``std`` (per RGB channel, on
        0-255 pixels), ``source`` (the weights file, or ``None``).
        """
        name = type(self).__name__
        return dict(
            teacher=f'{name} {self.variant}' if self.variant else name,
            # an onnxruntime network holds its weights outside torch
            parameters=sum(p.numel() for p in self.parameters()) or getattr(
                self.network, 'onnx_parameters', 0),
            embedding_size=self.embedding_size,
            input_size=self.input_size,
            mean=[round(v, 6) for v in self.mean.flatten().tolist()],
            std=[round(v, 6) for v in self.std.flatten().tolist()],
            source=self.source)

    def summary(self) -> str:
        """``describe()`` as one line, e.g. ``teacher ArcFaceTorchTeacher
        r50: 43.6M parameters, embedding 512, input 112×112 RGB
        (x-127.5)/127.5, from backbone.pth``."""
        d = self.describe()
        size = ('any size (not resized)' if d['input_size'] is None
                else '×'.join(str(v) for v in d['input_size']))
        norm = f"(x-{_channels(d['mean'])})/{_channels(d['std'])}"
        line = (f"teacher {d['teacher']}: {_count(d['parameters'])} "
                f"parameters, embedding {d['embedding_size']}, "
                f"input {size} RGB {norm}")
        return line + (f", from {d['source']}" if d['source'] else '')

    def log_summary(self) -> None:
        """Log ``summary()`` (adapters call this once, when built)."""
        print_log(self.summary(), logger='current', level=logging.INFO)

    def adapt_input(self, x: torch.Tensor) -> torch.Tensor:
        """Student-normalised batch -> this teacher's normalisation/size."""
        if not (torch.equal(self.src_mean, self.mean)
                and torch.equal(self.src_std, self.std)):
            pixels = x * self.src_std.to(x.dtype) + self.src_mean.to(x.dtype)
            x = (pixels - self.mean.to(x.dtype)) / self.std.to(x.dtype)
        if self.input_size and tuple(x.shape[-2:]) != self.input_size:
            x = F.interpolate(x, size=self.input_size, mode='bilinear',
                              align_corners=False)
        return x

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.network(self.adapt_input(x))

    def logits(self, embedding: torch.Tensor) -> torch.Tensor:
        """Margin-free logits ``s*cos`` from the teacher's head."""
        if self.head is None:
            raise ConfigError('this teacher has no head, so it has no logits; '
                              'give it head=dict(...) and head_checkpoint=...')
        return self.head(embedding)

    def stage_path(self, i: int) -> str:
        """Module path of stage ``i`` (1-based) inside ``network``."""
        if not 1 <= i <= len(self.stage_paths):
            raise ConfigError(
                f'teacher has {len(self.stage_paths)} known stages '
                f'({list(self.stage_paths)}), so stage{i} does not exist; give '
                'the teacher stage_paths=[...] (module paths of its stage '
                'outputs)')
        return self.stage_paths[i - 1]
