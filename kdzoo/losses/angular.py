"""Angular (direction-only) embedding distillation."""
import torch
import torch.nn.functional as F

from kdzoo.registry import LOSSES
from .base import BaseDistillLoss, require_ndim, require_same_shape


@LOSSES.register_module()
class AngularDistillationLoss(BaseDistillLoss):
    """ShrinkTeaNet angular distillation: batch mean of (1 - cos(s, t))^p.

    Duong, Luu, Quach, Le, "ShrinkTeaNet", arXiv 1905.10620, Eq. 4 (final
    layer) with the student transform applied by a connector (Linear+BN for
    embeddings, kdzoo's ``LinearProjector``). Only the direction is
    transferred: student and teacher may lie on spheres of different radius.

    Eq. 4 reads ``|| 1 - t_hat * s_hat ||_2^2``; kdzoo takes ``*`` as the inner
    product, giving ``(1 - cos)^2`` (``p=2``, the default, paper-faithful).
    ``p=1`` is what public re-implementations use (MarginDistillation,
    TFace's ShrinkTeaNet baseline). See shared reference ``liaad.md`` §3.1/§6.

    Args:
        p: exponent on (1 - cos); 1 or 2 are the documented choices.
        eps: numerical floor for the norms.
        loss_weight: multiplier (ShrinkTeaNet lambda_n = 1).

    Forward args: ``s_emb`` (B×D), ``t_emb`` (B×D); the teacher side is
    detached.
    """

    def __init__(self, p: float = 2.0, eps: float = 1e-8,
                 loss_weight: float = 1.0):
        super().__init__(loss_weight)
        if not p > 0:
            raise ValueError(f'AngularDistillationLoss: p must be > 0, got {p}')
        self.p = float(p)
        self.eps = float(eps)

    def check_shapes(self, shapes):
        require_ndim('s_emb', shapes['s_emb'], 2, 'B×D embeddings')
        require_same_shape(
            's_emb', shapes['s_emb'], 't_emb', shapes['t_emb'],
            'Put a connector on the student side, e.g. connectors=dict('
            'proj=dict(type="LinearProjector", out_features=<teacher D>)) and '
            's_emb=dict(tap="student.embedding", connector="proj").')

    def forward(self, s_emb: torch.Tensor, t_emb: torch.Tensor) -> torch.Tensor:
        self.check_shapes(dict(s_emb=s_emb.shape, t_emb=t_emb.shape))
        cos = F.cosine_similarity(s_emb.float(), t_emb.detach().float(),
                                  dim=1, eps=self.eps)
        loss = (1.0 - cos).clamp_min(0.0).pow(self.p).mean()
        return self.loss_weight * loss

    def extra_repr(self):
        return f'p={self.p}, ' + super().extra_repr()
