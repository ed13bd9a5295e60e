"""Forward FLOPs of a network, counted by hooks on its layers.

Convention: a multiply-add is 2 FLOPs (the "2 × MACs" of most papers and
of ``torch.utils.flop_counter``). Counted per forward pass:

- ``Conv2d``: ``2 · (C_in / groups) · k_h · k_w`` per output element
  (``C_out · H_out · W_out`` of them per sample), plus 1 per output element
  with a bias;
- ``Linear``: ``2 · in_features · out_features`` per row, plus
  ``out_features`` with a bias;
- ``BatchNorm1d/2d``: 2 per element (normalisation folded into one scale
  and one shift, as at inference).

Activations, pooling, residual additions and resizing are not counted:
for face backbones they are a few percent of the convolutions.
"""
from collections import Counter
from typing import Dict, Sequence

import torch
from torch import nn

from kdzoo.utils.probe import run_on_zeros

__all__ = ['count_forward_flops']


def _conv_flops(module: nn.Conv2d, output: torch.Tensor) -> int:
    kh, kw = module.kernel_size
    per_output = 2 * (module.in_channels // module.groups) * kh * kw
    if module.bias is not None:
        per_output += 1
    return per_output * output.numel()


def _linear_flops(module: nn.Linear, output: torch.Tensor) -> int:
    rows = output.numel() // module.out_features
    per_row = 2 * module.in_features * module.out_features
    if module.bias is not None:
        per_row += module.out_features
    return per_row * rows


def _batchnorm_flops(module: nn.Module, output: torch.Tensor) -> int:
    return 2 * output.numel()


_COUNTERS = (
    (nn.Conv2d, 'Conv2d', _conv_flops),
    (nn.Linear, 'Linear', _linear_flops),
    (nn.modules.batchnorm._BatchNorm, 'BatchNorm', _batchnorm_flops),
)


def count_forward_flops(module: nn.Module,
                        input_shape: Sequence[int]) -> Dict[str, object]:
    """FLOPs of one forward pass of ``module`` on zeros of ``input_shape``.

    The module runs once in eval mode without gradients on its own device
    (its training mode is restored afterwards). Returns
    ``dict(total=int, by_layer={'Conv2d': int, 'Linear': int,
    'BatchNorm': int})`` for the whole batch of ``input_shape``.
    """
    counts: Counter = Counter()

    def hook(mod, _inputs, output, kind, rule):
        if isinstance(output, torch.Tensor):
            counts[kind] += rule(mod, output)

    hooks = []
    for sub in module.modules():
        for cls, kind, rule in _COUNTERS:
            if isinstance(sub, cls):
                hooks.append((sub, lambda m, i, o, kind=kind, rule=rule:
                              hook(m, i, o, kind, rule)))
                break
    run_on_zeros(module, input_shape, hooks)
    by_layer = {kind: int(counts.get(kind, 0)) for _, kind, _ in _COUNTERS}
    return dict(total=sum(by_layer.values()), by_layer=by_layer)
