"""The student backbone as evaluation runs it: BatchNorm folded into the
preceding convolutions and channels-last memory format.

Test and validation embed every image twice (image and mirror) in eval
mode, where BatchNorm is an affine map that can be folded into the
convolution before it. On a 2-core CPU a MobileFaceNet (width 0.5) at
112 px embeds 50 images/s (flip-sum, batch 256) as trained and 119 folded
and channels-last (``tools/bench_eval.py``, docs/speed.md); embeddings
move by ~1e-6 of their scale (float rounding).

:class:`InferenceBackbone` keeps such a copy and rebuilds it whenever the
backbone's weights, buffers or device change (each tensor's in-place
version counter, so an optimizer step invalidates it). A backbone that
torch.fx cannot trace (data-dependent control flow) is used as it is; the
recipe key ``model.test_cfg.fuse_bn=False`` turns the copy off.
"""
import copy
import logging
from typing import Optional, Tuple

import torch
from mmengine.logging import print_log
from torch import nn

__all__ = ['InferenceBackbone', 'folded_copy']


def folded_copy(backbone: nn.Module) -> nn.Module:
    """An eval-mode copy of ``backbone`` with conv+BN pairs folded
    (``torch.fx``) in channels-last format, without hooks; raises what
    ``torch.fx`` raises for a backbone it cannot trace."""
    from torch.fx.experimental.optimization import fuse
    clone = copy.deepcopy(backbone).eval()
    for module in clone.modules():  # taps belong to the trained backbone
        module._forward_hooks.clear()
        module._forward_pre_hooks.clear()
    folded = fuse(clone, inplace=True)
    for p in folded.parameters():
        p.requires_grad_(False)
    return folded.to(memory_format=torch.channels_last)


class InferenceBackbone:
    """The folded copy of one backbone, rebuilt when its tensors change.

    Not an ``nn.Module`` attribute on purpose: the copy never appears in
    ``parameters()``, ``state_dict()`` or checkpoints."""

    def __init__(self):
        self._key: Optional[Tuple] = None
        self._copy: Optional[nn.Module] = None
        self._failed = False

    @staticmethod
    def _state_key(backbone: nn.Module) -> Tuple:
        tensors = list(backbone.parameters()) + list(backbone.buffers())
        return (id(backbone),
                tuple(t.device for t in tensors[:1]),
                tuple(t._version for t in tensors),
                tuple(t.data_ptr() for t in tensors))

    def get(self, backbone: nn.Module) -> nn.Module:
        """The copy to embed with (``backbone`` itself where no copy can be
        made)."""
        if self._failed or next(backbone.parameters(), None) is None:
            return backbone  # untraceable, or weights outside torch (ORT)
        key = self._state_key(backbone)
        if key != self._key:
            try:
                self._copy = folded_copy(backbone)
            except Exception as e:  # noqa: BLE001 -- fx cannot trace it
                self._failed = True
                self._copy = None
                print_log(f'evaluation uses {type(backbone).__name__} as '
                          f'trained (no BatchNorm folding: torch.fx cannot '
                          f'trace it: {type(e).__name__})', logger='current',
                          level=logging.INFO)
                return backbone
            self._key = key
        return self._copy

    def __deepcopy__(self, memo):
        return InferenceBackbone()  # a copied model builds its own
