"""CurricularFace: adaptive curriculum margin (Huang et al., CVPR 2020,
arXiv 2004.00288). Follows the official code
(``HuangYG123/CurricularFace:head/metrics.py``) and TFace
(``recognition/torchkit/head/localfc/curricularface.py``).
"""
import math

import torch
import torch.distributed as dist

from kdzoo.registry import HEADS
from kdzoo.utils import ConfigError, check_number
from kdzoo.utils.dist import world_size
from .arcface import arc_margin
from .base import BaseMarginHead


def _global_mean(values: torch.Tensor):
    """``(sum, count)`` of ``values`` over all ranks (all-reduced in DDP)."""
    stats = torch.stack([values.sum(),
                         values.new_tensor(float(values.numel()))])
    if world_size() > 1:
        dist.all_reduce(stats)
    return stats[0], stats[1]


@HEADS.register_module()
class CurricularFace(BaseMarginHead):
    """CurricularFace head: ArcFace target plus adaptive hard-negative weights.

    Huang et al., "CurricularFace: Adaptive Curriculum Learning Loss for Deep
    Face Recognition", CVPR 2020, arXiv 2004.00288, Eqs. (8)-(10) (the
    modulation function ``N(t, cos θ_j)`` and the EMA of ``t``).

    * Target logit: ArcFace ``s·cos(θ_y + m)`` in the differentiable form,
      with the fallback ``s·(cos θ_y − sin(π−m)·m)`` where ``θ_y + m > π``
      (see :mod:`kdzoo.heads.arcface`).
    * Non-target ``j``: if ``cos θ_j > cos(θ_y + m)`` (a hard negative; the
      comparison uses the differentiable ``cos(θ_y + m)``, without the
      fallback, as the official code does) the logit is
      ``s·cos θ_j·(t + cos θ_j)``, otherwise ``s·cos θ_j``.
    * ``t`` is a float32 buffer of shape ``(1,)`` (saved in ``state_dict``
      and checkpoints), starting at 0. In training mode, on each forward with
      labels and before it modulates the negatives (as in the official code),
      it is updated under ``no_grad``:
      ``t ← momentum·mean_i(cos θ_{y_i}) + (1 − momentum)·t``, the mean taken
      over the clamped cosines before the margin, over the global batch when
      ``torch.distributed`` is initialised (all-reduced, so every rank keeps
      the same ``t``). There is no update in eval mode, without labels, or
      for an empty global batch.

    Args:
        num_classes, embedding_size, s, eps, init_std: see
            :class:`BaseMarginHead`. ``weight`` is ``(num_classes,
            embedding_size)``, initialised ``N(0, 0.01²)``.
        m: additive angular margin in radians, ``0 <= m < π`` (0.5).
        momentum: EMA weight of the new batch mean, in ``[0, 1]``. The
            official code uses 0.01 (the default; the paper's "momentum 0.99"
            is ``1 − 0.01``); TFace's default is ``alpha=0.1``.
    """

    def __init__(self, num_classes: int, embedding_size: int, s: float = 64.0,
                 m: float = 0.5, momentum: float = 0.01, eps: float = 1e-7,
                 init_std: float = 0.01):
        super().__init__(num_classes, embedding_size, s=s, m=m, eps=eps,
                         init_std=init_std)
        if self.m >= math.pi:
            raise ConfigError(f'{type(self).__name__}: m is an angle in '
                              f'radians and must be < pi, got {m!r}')
        self.momentum = check_number(type(self).__name__, 'momentum',
                                     momentum, low=0, high=1)
        self.register_buffer('t', torch.zeros(1))

    @torch.no_grad()
    def _update_t(self, cos_y: torch.Tensor) -> None:
        total, count = _global_mean(cos_y.detach().to(torch.float32))
        mean = total / count.clamp_min(1.0)
        new_t = self.momentum * mean + (1.0 - self.momentum) * \
            self.t.to(torch.float32)
        # No sync on the host: an empty global batch keeps t as it is.
        self.t.copy_(torch.where(count > 0, new_t, self.t.to(torch.float32)))

    def margin_cosine(self, cos, labels):
        cos_y = self.target_cosine(cos, labels)
        cos_y_m, target = arc_margin(cos_y, self.m)
        if self.training:
            self._update_t(cos_y)
        t = self.t.to(device=cos.device, dtype=cos.dtype)
        hard = cos > cos_y_m.unsqueeze(1)
        logits = torch.where(hard, cos * (t + cos), cos)
        return self.replace_target(logits, labels, target)

    def extra_repr(self) -> str:
        return super().extra_repr() + f', momentum={self.momentum}'
