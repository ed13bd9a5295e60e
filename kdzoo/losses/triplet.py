"""Triplet distillation: a triplet loss whose margin comes from the teacher."""
import logging

import torch
import torch.nn.functional as F
from mmengine.logging import print_log

from kdzoo.registry import LOSSES
from kdzoo.utils import ConfigError, is_finite_number
from .base import BaseDistillLoss, require_embeddings_and_labels

_COS_EPS = 1e-7


@LOSSES.register_module()
class TripletDistillationLoss(BaseDistillLoss):
    """Triplet loss with a per-triplet margin set by the teacher's distances.

    Feng, Wang, Hu, Yu, Wang, Wang, "Triplet Distillation for Deep Face
    Recognition", ICIP 2020, arXiv 1905.04457, as re-implemented by the
    MarginDistillation authors (david-svitov/margindistillation
    ``train/train.py``, ``triplet_distillation_L2`` / ``_cos``; shared
    reference ``kd-methods.md`` §1.4)::

        g_i   = [d_T(a,n) - d_T(a,p)]_+
        m_i   = (m_max - m_min) / D_max * g_i + m_min,  D_max = max_batch g_i
        loss  = mean_i [d_S(a,p) - d_S(a,n) + m_i]_+

    ``d`` is the squared L2 distance between L2-normalised embeddings
    (``distance='l2'``, i.e. ``2 - 2 cos``) or the angle
    ``arccos(clip(cos))`` (``distance='cos'``; kdzoo clips to
    ``[-1+1e-7, 1-1e-7]`` instead of [-1, 1] so the gradient stays finite).
    If ``D_max = 0`` (the teacher ranks no triplet correctly) every margin is
    ``m_min``.

    Triplet mining differs from the reference: the re-implementation lays a
    batch out as anchor/positive/negative thirds chosen by an online miner
    (``triplet_alpha=0.35``, 18 images per identity). kdzoo mines inside the
    batch from ``labels`` with **batch-hard mining by the student
    distances**: every sample that has a positive and a negative in the
    batch is an anchor, its positive is the farthest same-label sample and
    its negative the nearest different-label sample (student ``d_S``); the
    teacher distances are read at the same triplets. Use the
    ``IdentityBalancedSampler`` so batches hold positives; a batch without
    any valid anchor returns 0 (with a one-time warning).

    Args:
        m_max: largest margin (0.5).
        m_min: smallest margin (0.2).
        distance: ``'l2'`` (squared L2 of normalised embeddings) or
            ``'cos'`` (angle in radians).
        loss_weight: multiplier on the returned loss.

    Forward args: ``s_emb`` (B×D), ``t_emb`` (B×D', widths may differ),
    ``labels`` (B, long). The teacher side is detached.
    """

    DISTANCES = ('l2', 'cos')

    def __init__(self, m_max: float = 0.5, m_min: float = 0.2,
                 distance: str = 'l2', loss_weight: float = 1.0):
        super().__init__(loss_weight)
        name = type(self).__name__
        for arg, value in (('m_max', m_max), ('m_min', m_min)):
            if not is_finite_number(value) or value < 0:
                raise ConfigError(f'{name}: {arg} must be a finite number '
                                  f'>= 0, got {value!r}')
        if m_max < m_min:
            raise ConfigError(f'{name}: m_max must be >= m_min, got '
                              f'm_max={m_max!r} < m_min={m_min!r}')
        if distance not in self.DISTANCES:
            raise ConfigError(f'{name}: distance must be one of '
                              f'{self.DISTANCES}, got {distance!r}')
        self.m_max = float(m_max)
        self.m_min = float(m_min)
        self.distance = distance
        self._warned = False

    def check_shapes(self, shapes):
        require_embeddings_and_labels(shapes)

    def pairwise_distance(self, emb: torch.Tensor) -> torch.Tensor:
        """B×B distance matrix (``l2``: squared L2 of unit vectors)."""
        e = F.normalize(emb, dim=1)
        cos = e @ e.t()
        if self.distance == 'l2':
            return (2.0 - 2.0 * cos).clamp_min(0.0)
        return torch.acos(cos.clamp(-1.0 + _COS_EPS, 1.0 - _COS_EPS))

    def loss(self, s_emb: torch.Tensor, t_emb: torch.Tensor,
             labels: torch.Tensor) -> torch.Tensor:
        s_emb = s_emb.float()
        n = s_emb.shape[0]
        eye = torch.eye(n, dtype=torch.bool, device=s_emb.device)
        same = labels.reshape(-1, 1) == labels.reshape(1, -1)
        pos_mask = same & ~eye
        neg_mask = ~same
        anchors = pos_mask.any(dim=1) & neg_mask.any(dim=1)
        if not bool(anchors.any()):
            if not self._warned:
                self._warned = True
                print_log('TripletDistillationLoss: no sample in the batch '
                          'has both a same-identity and a different-identity '
                          'partner, so the loss is 0. Use train_dataloader.'
                          'sampler=dict(type="IdentityBalancedSampler", ...).',
                          logger='current', level=logging.WARNING)
            return s_emb.sum() * 0.0
        d_s = self.pairwise_distance(s_emb)
        with torch.no_grad():
            d_det = d_s.detach()
            p_idx = d_det.masked_fill(~pos_mask, float('-inf')).argmax(1)
            n_idx = d_det.masked_fill(~neg_mask, float('inf')).argmin(1)
            a_idx = torch.nonzero(anchors, as_tuple=True)[0]
            p_idx, n_idx = p_idx[a_idx], n_idx[a_idx]
            d_t = self.pairwise_distance(t_emb.float())
            g = (d_t[a_idx, n_idx] - d_t[a_idx, p_idx]).clamp_min(0.0)
            d_max = g.max()
            if d_max > 0:
                margin = (self.m_max - self.m_min) / d_max * g + self.m_min
            else:
                margin = torch.full_like(g, self.m_min)
        loss = (d_s[a_idx, p_idx] - d_s[a_idx, n_idx] + margin).clamp_min(0.0)
        return loss.mean()

    def extra_repr(self):
        return (f'm_max={self.m_max}, m_min={self.m_min}, distance='
                f'{self.distance!r}, ' + super().extra_repr())
