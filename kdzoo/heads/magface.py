"""MagFace: magnitude-aware margin (Meng et al., CVPR 2021, arXiv 2103.06627).

Written from the paper's formulas following the official code
(``IrvingMeng/MagFace:models/magface.py``: ``MagLinear``, ``MagLoss`` and
``SoftmaxBuilder._margin``; defaults from ``run/run.sh``).
"""
import math
from typing import Dict

import torch
import torch.nn.functional as F

from kdzoo.registry import HEADS
from kdzoo.utils import ConfigError, check_number, no_autocast
from .base import BaseMarginHead


@HEADS.register_module()
class MagFace(BaseMarginHead):
    """MagFace head: ArcFace margin growing with the feature magnitude.

    Meng, Zhao, Huang, Zhou, "MagFace: A Universal Representation for Face
    Recognition and Quality Assessment", CVPR 2021, arXiv 2103.06627: the
    MagFace loss ``L = CE(s·cos(θ_y + m(a_i))) + λ_g·g(a_i)`` with the linear
    margin ``m(a)`` and the regulariser ``g(a) = a/u_a² + 1/a`` (equation
    numbers not checked: only the abstract and the code were available).
    Follows ``IrvingMeng/MagFace:models/magface.py``.

    * ``a = ‖f‖``, the L2 norm of the raw embedding, clamped to
      ``[l_a, u_a]``. **Not detached** (the reference's ``x_norm``): the
      norm receives gradient from the regulariser and, through ``m(a)``,
      from the cross-entropy; the clamp stops it outside ``[l_a, u_a]``.
    * ``m(a) = (u_m − l_m)/(u_a − l_a)·(a − l_a) + l_m``.
    * Target logit ``s·cos(θ_y + m(a))`` in the differentiable form
      ``cos θ·cos m − sin θ·sin m``. With ``easy_margin`` (the default, as
      ``MagLinear``) the margin applies only where ``cos θ_y > 0``, the
      target staying ``s·cos θ_y`` elsewhere; without it, the ArcFace
      fallback ``s·(cos θ_y − sin(π − m(a))·m(a))`` where
      ``cos θ_y <= cos(π − m(a))``. Non-target logits ``s·cos θ_j``.
    * :meth:`loss` returns ``loss_cls`` (cross-entropy on the margin logits)
      and ``loss_mag = lambda_g·mean_i g(a_i)``, with ``g`` evaluated at the
      **clamped** ``a`` as the reference's ``MagLoss.calc_loss_G(x_norm)``.
      Under :class:`~kdzoo.distillers.FaceDistiller` both keys are logged
      and summed into the total loss.

    Args:
        num_classes, embedding_size, s, eps, init_std: see
            :class:`BaseMarginHead`. ``weight`` is ``(num_classes,
            embedding_size)``, initialised ``N(0, 0.01²)`` (the reference
            uses a renormalised uniform init; only directions matter).
        l_a, u_a: magnitude range, ``0 < l_a < u_a`` (10, 110).
        l_m, u_m: margins at ``l_a`` and ``u_a`` in radians,
            ``0 <= l_m <= u_m < π`` (0.45, 0.8).
        lambda_g: weight of the magnitude regulariser, ``>= 0`` (35).
        easy_margin: see above (True, as ``MagLinear``).
    """

    def __init__(self, num_classes: int, embedding_size: int, s: float = 64.0,
                 l_a: float = 10.0, u_a: float = 110.0, l_m: float = 0.45,
                 u_m: float = 0.8, lambda_g: float = 35.0,
                 easy_margin: bool = True, eps: float = 1e-7,
                 init_std: float = 0.01):
        super().__init__(num_classes, embedding_size, s=s, m=0.0, eps=eps,
                         init_std=init_std)
        name = type(self).__name__
        self.l_a = check_number(name, 'l_a', l_a, low=0, low_open=True)
        self.u_a = check_number(name, 'u_a', u_a, low=0, low_open=True)
        if self.u_a <= self.l_a:
            raise ConfigError(f'{name}: u_a must be > l_a (the magnitude '
                              f'range [l_a, u_a]), got l_a={l_a!r}, '
                              f'u_a={u_a!r}')
        self.l_m = check_number(name, 'l_m', l_m, low=0, high=math.pi,
                                high_open=True)
        self.u_m = check_number(name, 'u_m', u_m, low=0, high=math.pi,
                                high_open=True)
        if self.u_m < self.l_m:
            raise ConfigError(f'{name}: u_m must be >= l_m (margins in '
                              f'radians, 0 <= l_m <= u_m < pi), got '
                              f'l_m={l_m!r}, u_m={u_m!r}')
        self.lambda_g = check_number(name, 'lambda_g', lambda_g, low=0)
        self.easy_margin = bool(easy_margin)

    # ------------------------------------------------------------ maths
    def magnitude(self, emb: torch.Tensor) -> torch.Tensor:
        """``a = clamp(‖f‖, l_a, u_a)`` per row (differentiable)."""
        dtype = self._compute_dtype(emb)
        with no_autocast(emb.device.type):
            return emb.to(dtype).norm(dim=1).clamp(self.l_a, self.u_a)

    def adaptive_margin(self, a: torch.Tensor) -> torch.Tensor:
        """``m(a) = (u_m − l_m)/(u_a − l_a)·(a − l_a) + l_m``."""
        slope = (self.u_m - self.l_m) / (self.u_a - self.l_a)
        return slope * (a - self.l_a) + self.l_m

    def regularizer(self, a: torch.Tensor) -> torch.Tensor:
        """``mean_i g(a_i)``, ``g(a) = a/u_a² + 1/a`` (unweighted)."""
        return (a / self.u_a ** 2 + 1.0 / a).mean()

    def margin_cosine(self, cos: torch.Tensor, labels: torch.Tensor,
                      a: torch.Tensor = None) -> torch.Tensor:
        """Margin cosines; ``a`` is :meth:`magnitude` of the batch."""
        if a is None:
            raise ValueError('MagFace.margin_cosine needs the magnitudes '
                             '(a=MagFace.magnitude(emb))')
        margin = self.adaptive_margin(a.to(cos.dtype))
        cos_y = self.target_cosine(cos, labels)
        sin_y = (1.0 - cos_y * cos_y).clamp_min(1e-12).sqrt()
        cos_y_m = cos_y * torch.cos(margin) - sin_y * torch.sin(margin)
        if self.easy_margin:
            target = torch.where(cos_y > 0, cos_y_m, cos_y)
        else:
            threshold = torch.cos(math.pi - margin)
            fallback = cos_y - torch.sin(math.pi - margin) * margin
            target = torch.where(cos_y > threshold, cos_y_m, fallback)
        return self.replace_target(cos, labels, target)

    def _logits_and_mag(self, emb, labels):
        with no_autocast(emb.device.type):
            cos = self.cosine(emb)
            a = self.magnitude(emb).to(cos.dtype)
            return self.s * self.margin_cosine(cos, labels, a), a

    def _logits(self, emb, labels):
        if labels is None:
            return super()._logits(emb, None)
        return self._logits_and_mag(emb, labels)[0]

    def loss(self, emb: torch.Tensor,
             labels: torch.Tensor) -> Dict[str, torch.Tensor]:
        """``dict(loss_cls=CE, loss_mag=lambda_g·mean g(a))``."""
        self.check_embedding(emb)
        labels = self.check_labels(labels, emb)
        logits, a = self._logits_and_mag(emb, labels)
        with no_autocast(emb.device.type):
            return dict(loss_cls=F.cross_entropy(logits, labels),
                        loss_mag=self.lambda_g * self.regularizer(a))

    def extra_repr(self) -> str:
        return (f'num_classes={self.num_classes}, '
                f'embedding_size={self.embedding_size}, s={self.s}, '
                f'l_a={self.l_a}, u_a={self.u_a}, l_m={self.l_m}, '
                f'u_m={self.u_m}, lambda_g={self.lambda_g}, '
                f'easy_margin={self.easy_margin}')
