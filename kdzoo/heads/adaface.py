"""AdaFace: quality-adaptive margin (Kim, Jain, Liu, CVPR 2022, arXiv
2204.00964). Written from the paper's formulas following the official head
(``mk-minchul/AdaFace:head.py``, defaults from ``config.py`` /
``scripts/run_ir50_ms1mv2.sh``).

Difference in interface from the reference: the official backbone returns
``(normalised embedding, norm)`` and the head receives both. kdzoo backbones
return the *raw* (unnormalised) embedding, so this head computes the feature
norm ``‖z‖`` of the embedding it is given; the cosine uses the normalised
embedding as usual. The result is the same as the reference's, whose norm is
that of the backbone output before ``l2_norm``.
"""
import math
from typing import Optional

import torch
import torch.distributed as dist

from kdzoo.registry import HEADS
from kdzoo.utils import ConfigError, check_number, no_autocast
from kdzoo.utils.dist import world_size
from .base import BaseMarginHead


def _all_reduce_sum(values: torch.Tensor) -> torch.Tensor:
    """``values`` summed over all ranks (unchanged without distributed)."""
    if world_size() > 1:
        values = values.clone()
        dist.all_reduce(values)
    return values


@HEADS.register_module()
class AdaFace(BaseMarginHead):
    """AdaFace head: feature-norm-adaptive angular plus additive margin.

    Kim, Jain, Liu, "AdaFace: Quality Adaptive Margin for Face Recognition",
    CVPR 2022, arXiv 2204.00964: the image-quality proxy ``ẑ`` (the feature
    norm standardised with EMA batch statistics) and the adaptive margins
    ``g_angle = −m·ẑ``, ``g_add = m·ẑ + m`` in the target logit
    ``s·(cos(θ_y + g_angle) − g_add)`` (equation numbers not checked: only
    the abstract and the code were available). Follows
    ``mk-minchul/AdaFace:head.py``.

    * ``‖z‖``: the L2 norm of the raw embedding (computed here, see the
      module docstring), clipped to ``[0.001, 100]`` and **detached**.
    * EMA statistics, float32 buffers of shape ``(1,)`` saved in
      ``state_dict`` and checkpoints: ``batch_mean`` (init 20) and
      ``batch_std`` (init 100). In training mode, on each forward with labels
      and *before* the margin is computed (the reference's order), under
      ``no_grad``: ``μ ← t_alpha·mean(‖z‖) + (1 − t_alpha)·μ`` and
      ``σ ← t_alpha·std(‖z‖) + (1 − t_alpha)·σ``, ``std`` the **unbiased**
      estimator (``torch.std``, as the reference). When ``torch.distributed``
      is initialised the mean and the std are those of the global batch
      (all-reduced, like CurricularFace's ``t``), so every rank keeps the
      same statistics. No update in eval mode or without labels; an empty
      global batch leaves both as they are and a global batch of one sample
      updates ``μ`` only (the unbiased std of one value is undefined; the
      reference would write NaN).
    * ``ẑ = clip(h·(‖z‖ − μ)/(σ + eps), −1, 1)``; ``g_angle = −m·ẑ``;
      ``g_add = m + m·ẑ``.
    * Target logit ``s·(cos(clip(θ_y + g_angle, eps, π − eps)) − g_add)``,
      with ``θ_y = acos(cos θ_y)`` and ``cos θ`` clamped to
      ``[−1 + eps, 1 − eps]``; non-target logits ``s·cos θ_j``. The gradient
      flows through ``acos``/``cos`` (zero for a target whose angle is
      clipped), never into the norm.

    Args:
        num_classes, embedding_size, s, init_std: see
            :class:`BaseMarginHead`. ``weight`` is ``(num_classes,
            embedding_size)``, initialised ``N(0, 0.01²)`` (the reference
            uses a renormalised uniform init; only directions matter).
        m: margin, ``0 <= m < π`` (0.4).
        h: concentration of the norm proxy, ``>= 0`` (0.333).
        t_alpha: EMA weight of the new batch statistics, in ``[0, 1]``
            (0.01, the reference's ``config.py``; the ``head.py`` class
            default is 1.0).
        eps: cosine clamp, angle clip and the ``σ + eps`` guard
            (``0 < eps < 0.1``; 1e-3 as the reference).
    """

    def __init__(self, num_classes: int, embedding_size: int, s: float = 64.0,
                 m: float = 0.4, h: float = 0.333, t_alpha: float = 0.01,
                 eps: float = 1e-3, init_std: float = 0.01):
        super().__init__(num_classes, embedding_size, s=s, m=m, eps=eps,
                         init_std=init_std)
        name = type(self).__name__
        if self.m >= math.pi:
            raise ConfigError(f'{name}: m is an angle in radians and must be '
                              f'in [0, pi), got {m!r}')
        self.h = check_number(name, 'h', h, low=0)
        self.t_alpha = check_number(name, 't_alpha', t_alpha, low=0, high=1)
        self.register_buffer('batch_mean', torch.full((1,), 20.0))
        self.register_buffer('batch_std', torch.full((1,), 100.0))

    # ------------------------------------------------------------ maths
    def feature_norm(self, emb: torch.Tensor) -> torch.Tensor:
        """``‖z‖`` per row, clipped to ``[0.001, 100]`` and detached."""
        dtype = self._compute_dtype(emb)
        with no_autocast(emb.device.type):
            norm = emb.detach().to(dtype).norm(dim=1)
        return norm.clamp(0.001, 100.0)

    @torch.no_grad()
    def _update_stats(self, norm: torch.Tensor) -> None:
        norm = norm.to(torch.float32)
        stats = _all_reduce_sum(torch.stack([
            norm.sum(), norm.new_tensor(float(norm.numel()))]))
        total, count = stats[0], stats[1]
        mean = total / count.clamp_min(1.0)
        sq = _all_reduce_sum((norm - mean).pow(2).sum().reshape(1))[0]
        std = (sq / (count - 1.0).clamp_min(1.0)).sqrt()
        a = self.t_alpha
        old_mean = self.batch_mean.to(torch.float32)
        old_std = self.batch_std.to(torch.float32)
        # No host sync: the conditions are evaluated on the device.
        self.batch_mean.copy_(torch.where(
            count > 0, a * mean + (1.0 - a) * old_mean, old_mean))
        self.batch_std.copy_(torch.where(
            count > 1, a * std + (1.0 - a) * old_std, old_std))

    def norm_proxy(self, norm: torch.Tensor) -> torch.Tensor:
        """``ẑ = clip(h·(‖z‖ − μ)/(σ + eps), −1, 1)`` with the current
        buffers (no update)."""
        mean = self.batch_mean.to(device=norm.device, dtype=norm.dtype)
        std = self.batch_std.to(device=norm.device, dtype=norm.dtype)
        return (self.h * (norm - mean) / (std + self.eps)).clamp(-1.0, 1.0)

    def margin_cosine(self, cos: torch.Tensor, labels: torch.Tensor,
                      norm: Optional[torch.Tensor] = None) -> torch.Tensor:
        """Margin cosines; ``norm`` is :meth:`feature_norm` of the batch.

        Updates the EMA statistics first when in training mode.
        """
        if norm is None:
            raise ValueError('AdaFace.margin_cosine needs the feature norms '
                             '(norm=AdaFace.feature_norm(emb))')
        norm = norm.to(device=cos.device, dtype=cos.dtype)
        if self.training:
            self._update_stats(norm)
        z = self.norm_proxy(norm)
        g_angle = -self.m * z
        g_add = self.m + self.m * z
        theta = torch.acos(self.target_cosine(cos, labels))
        theta_m = (theta + g_angle).clamp(self.eps, math.pi - self.eps)
        target = torch.cos(theta_m) - g_add
        return self.replace_target(cos, labels, target)

    def _logits(self, emb, labels):
        with no_autocast(emb.device.type):
            cos = self.cosine(emb)
            if labels is None:
                return self.s * cos
            return self.s * self.margin_cosine(cos, labels,
                                               self.feature_norm(emb))

    def extra_repr(self) -> str:
        return super().extra_repr() + (f', h={self.h}, '
                                       f't_alpha={self.t_alpha}, '
                                       f'eps={self.eps}')
