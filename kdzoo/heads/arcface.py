"""ArcFace: additive angular margin (Deng et al., CVPR 2019, arXiv 1801.07698).

Gradient semantics (kd-methods.md §3.1, pitfall 1 vs 2): kdzoo uses the
classic **differentiable** form of TFace
(``recognition/torchkit/head/localfc/arcface.py``) and the official
CurricularFace code (``HuangYG123/CurricularFace:head/metrics.py``)::

    cos(θ+m) = cos θ·cos m − sin θ·sin m,   sin θ = sqrt(1 − cos²θ)

with the standard fallback ``cos θ − sin(π−m)·m`` where ``θ + m > π`` (i.e.
``cos θ <= cos(π−m)``), which keeps the target logit monotonically
decreasing in θ over the whole range. The gradient is that of this
function. This is *not* insightface's current ``CombinedMarginLoss``, which
applies ``arccos``/``+m``/``cos`` in place under ``torch.no_grad()``: its
forward values equal ours away from the fallback region, but its gradient
passes straight through as if the logit were ``s·cos θ``. Teachers and
students trained with kdzoo's ArcFace share these semantics.
"""
import math
from typing import Tuple

import torch

from kdzoo.registry import HEADS
from kdzoo.utils import ConfigError
from .base import BaseMarginHead


def arc_margin(cos_y: torch.Tensor, m: float, easy_margin: bool = False
               ) -> Tuple[torch.Tensor, torch.Tensor]:
    """The ArcFace target cosine for target cosines ``cos_y`` (any shape).

    Returns ``(cos_y_m, target)``: ``cos_y_m = cos(θ_y + m)`` in the
    differentiable form (no fallback; CurricularFace compares negatives with
    it), and ``target``, the value used as the target logit / s: ``cos_y_m``
    where ``cos θ_y > cos(π − m)`` and ``cos θ_y − sin(π − m)·m`` elsewhere
    (or, with ``easy_margin``, ``cos_y_m`` where ``cos θ_y > 0`` and
    ``cos θ_y`` elsewhere). ``cos_y`` must already be clamped inside
    ``(-1, 1)`` so ``sin θ`` has a finite gradient.
    """
    sin_y = (1.0 - cos_y * cos_y).clamp_min(1e-12).sqrt()
    cos_y_m = cos_y * math.cos(m) - sin_y * math.sin(m)
    if easy_margin:
        target = torch.where(cos_y > 0, cos_y_m, cos_y)
    else:
        threshold = math.cos(math.pi - m)
        mm = math.sin(math.pi - m) * m
        target = torch.where(cos_y > threshold, cos_y_m, cos_y - mm)
    return cos_y_m, target


@HEADS.register_module()
class ArcFace(BaseMarginHead):
    """ArcFace additive angular margin head: target logit s·cos(θ_y + m).

    Deng, Guo, Xue, Zafeiriou, "ArcFace: Additive Angular Margin Loss for
    Deep Face Recognition", CVPR 2019, arXiv 1801.07698, Eq. (3):
    ``L = -log e^{s cos(θ_y+m)} / (e^{s cos(θ_y+m)} + Σ_{j≠y} e^{s cos θ_j})``.

    Target logit ``s·(cos θ_y·cos m − sin θ_y·sin m)``, with the fallback
    ``s·(cos θ_y − sin(π−m)·m)`` where ``θ_y + m > π``; differentiable
    (TFace / official CurricularFace semantics, not insightface's
    straight-through ``no_grad`` form; see the module docstring). Non-target
    logits are ``s·cos θ_j``.

    Args:
        num_classes, embedding_size, s, eps, init_std: see
            :class:`BaseMarginHead`. ``weight`` is ``(num_classes,
            embedding_size)``, initialised ``N(0, 0.01²)``.
        m: additive angular margin in radians, ``0 <= m < π`` (0.5).
        easy_margin: apply the margin only where ``cos θ_y > 0`` and leave
            the target at ``cos θ_y`` elsewhere (no fallback), as in
            MagFace's ``MagLinear``. Default False.
    """

    def __init__(self, num_classes: int, embedding_size: int, s: float = 64.0,
                 m: float = 0.5, easy_margin: bool = False, eps: float = 1e-7,
                 init_std: float = 0.01):
        super().__init__(num_classes, embedding_size, s=s, m=m, eps=eps,
                         init_std=init_std)
        if self.m >= math.pi:
            raise ConfigError(f'{type(self).__name__}: m is an angle in '
                              f'radians and must be < pi, got {m!r}')
        self.easy_margin = bool(easy_margin)

    def margin_cosine(self, cos, labels):
        _, target = arc_margin(self.target_cosine(cos, labels), self.m,
                               self.easy_margin)
        return self.replace_target(cos, labels, target)

    def extra_repr(self) -> str:
        return super().extra_repr() + f', easy_margin={self.easy_margin}'
