"""EKD: evaluation-oriented (TPR@FPR rank) knowledge distillation."""
import logging
import math
from typing import Sequence, Tuple

import torch
import torch.nn.functional as F
from mmengine.logging import print_log

from kdzoo.registry import LOSSES
from kdzoo.utils import ConfigError, is_finite_number
from kdzoo.utils.dist import (all_gather_with_grad, gather_batch_sizes,
                              gather_rows, world_size)
from .base import BaseDistillLoss, require_embeddings_and_labels


# -------------------------------------------------------------------- loss
@LOSSES.register_module()
class EKDLoss(BaseDistillLoss):
    """EKD: match the student's soft TPR/FPR rank of critical pairs to the
    teacher's.

    Huang, Wu, Xu, Ding, "Evaluation-oriented Knowledge Distillation for Deep
    Face Recognition", CVPR 2022, arXiv 2206.02325 (rank-based loss, Eq. 11
    of the paper). Follows the reference implementation Tencent/TFace
    ``recognition/tasks/ekd/distillation/ekd.py`` (shared reference
    ``kd-methods.md`` §1.1):

    1. L2-normalise both embeddings; cosine similarity of every unordered
       pair ``i<j`` of the (all-gathered) batch, split into positives ``P``
       (same label) and negatives ``N``.
    2. Thresholds, per model from its **own** negatives sorted in descending
       order: ``tau_k = sorted_neg[floor(|N| * far_k)]`` (TFace:
       ``|N| // a_k`` with ``a_k = 1/far_k``), smoothed by an EMA
       ``A_k <- momentum * tau_k + (1 - momentum) * A_k`` held in the buffers
       ``thresholds_s`` / ``thresholds_t`` (start at 0, saved in
       checkpoints; updated under ``no_grad`` and only in ``train()`` mode,
       before they are used in the same step, as TFace).
    3. Soft rank ``R(x) = sum_k sigmoid((x - A_k) / tau)`` with the sigmoid's
       exponent clamped to [-50, 50].
    4. Critical pairs: all positives, and the ``topk`` hardest negatives by
       **student** similarity (the teacher is read at the same pairs).
    5. ``loss = pos_weight * MSE(R_s(P)) + neg_weight * MSE(R_s(H))``
       (mean-reduced), then times ``loss_weight``.

    A batch without positive pairs gives ``L_pos = 0`` (with a one-time
    warning): EKD needs an identity-balanced sampler (kdzoo's
    ``IdentityBalancedSampler``; TFace mixes 32 random + 8 identities x 4
    images per GPU). A batch without negatives gives ``L_neg = 0`` and
    leaves the thresholds unchanged. The thresholds take ~100+ iterations
    (momentum 0.01) to become meaningful.

    Distributed: with ``all_gather=True`` and torch.distributed initialised
    with world size > 1, embeddings and labels of all ranks are gathered
    (in rank order) before the pairs are formed; gradient flows to the local
    slice, summed over ranks, so with DDP's gradient averaging the student
    receives exactly the gradient of the single-process loss on the global
    batch. (TFace's ``AllGather`` additionally multiplies the gradient by the
    world size; to reproduce its effective strength on W GPUs, scale
    ``loss_weight`` by W.) The EMA thresholds are computed from the gathered
    batch, so they stay identical on every rank.

    Args:
        topk: number of hardest negatives (by student similarity) used.
        tau: sigmoid temperature of the soft rank (TFace ``t`` = 0.01).
        pos_weight: weight of the positive-pair term (0.02).
        neg_weight: weight of the hard-negative term (0.01).
        momentum: EMA momentum of the thresholds (0.01).
        fars: the false-accept rates whose thresholds are tracked
            (TFace anchors 10 ... 10^6, i.e. FAR 1e-1 ... 1e-6).
        all_gather: gather the batch from all ranks under DDP.
        loss_weight: multiplier (TFace: unit weight on EKD next to ArcFace).

    Forward args: ``s_emb`` (B×D), ``t_emb`` (B×D', the teacher may have a
    different width: only similarities are compared), ``labels`` (B, long).
    The teacher side is detached.
    """

    def __init__(self, topk: int = 2000, tau: float = 0.01,
                 pos_weight: float = 0.02, neg_weight: float = 0.01,
                 momentum: float = 0.01,
                 fars: Sequence[float] = (1e-1, 1e-2, 1e-3, 1e-4, 1e-5,
                                          1e-6),
                 all_gather: bool = True, loss_weight: float = 1.0):
        super().__init__(loss_weight)
        name = type(self).__name__
        if isinstance(topk, bool) or not isinstance(topk, int) or topk < 1:
            raise ConfigError(f'{name}: topk must be an integer >= 1, got '
                              f'{topk!r}')
        if not is_finite_number(tau) or tau <= 0:
            raise ConfigError(f'{name}: tau must be a finite number > 0, got '
                              f'{tau!r}')
        for arg, value in (('pos_weight', pos_weight),
                           ('neg_weight', neg_weight)):
            if not is_finite_number(value) or value < 0:
                raise ConfigError(f'{name}: {arg} must be a finite number '
                                  f'>= 0, got {value!r}')
        if not is_finite_number(momentum) or not 0 < momentum <= 1:
            raise ConfigError(f'{name}: momentum must be in (0, 1], got '
                              f'{momentum!r}')
        try:
            fars = tuple(fars)
        except TypeError:
            fars = None
        if not fars or not all(is_finite_number(f) and 0 < f < 1 for f in fars):
            raise ConfigError(f'{name}: fars must be a non-empty sequence of '
                              f'false-accept rates in (0, 1), got {fars!r}')
        self.topk = int(topk)
        self.tau = float(tau)
        self.pos_weight = float(pos_weight)
        self.neg_weight = float(neg_weight)
        self.momentum = float(momentum)
        self.fars = tuple(float(f) for f in fars)
        self.all_gather = bool(all_gather)
        self.register_buffer('thresholds_s', torch.zeros(len(self.fars)))
        self.register_buffer('thresholds_t', torch.zeros(len(self.fars)))
        self._warned_no_pos = False

    # --------------------------------------------------------------- checks
    def check_shapes(self, shapes):
        require_embeddings_and_labels(shapes)

    # -------------------------------------------------------------- helpers
    def threshold_indices(self, num_neg: int) -> list:
        """Index into the descending-sorted negatives for each FAR."""
        out = []
        for far in self.fars:
            inv = 1.0 / far
            if abs(inv - round(inv)) < 1e-6 * inv:  # TFace: |N| // a_k
                idx = num_neg // int(round(inv))
            else:
                idx = int(math.floor(num_neg * far))
            out.append(min(idx, num_neg - 1))
        return out

    def soft_rank(self, sim: torch.Tensor,
                  thresholds: torch.Tensor) -> torch.Tensor:
        """``R(x) = sum_k sigmoid((x - A_k)/tau)`` (exponent clamped)."""
        exponent = (-(sim.unsqueeze(1) - thresholds.unsqueeze(0))
                    / self.tau).clamp(-50.0, 50.0)
        return (1.0 / (1.0 + torch.exp(exponent))).sum(dim=1)

    def _gather(self, s_emb, t_emb, labels) -> Tuple[torch.Tensor, ...]:
        if not self.all_gather or world_size() <= 1:
            return s_emb, t_emb, labels
        sizes = gather_batch_sizes(s_emb.shape[0], s_emb.device)
        return (all_gather_with_grad(s_emb, sizes),
                gather_rows(t_emb.detach(), sizes), gather_rows(labels, sizes))

    def _warn_no_positives(self):
        if not self._warned_no_pos:
            self._warned_no_pos = True
            print_log(
                'EKDLoss: the batch has no positive pair (two images of one '
                'identity), so the positive term is 0. EKD needs an '
                'identity-balanced sampler: set train_dataloader.sampler='
                'dict(type="IdentityBalancedSampler", num_identities=P, '
                'images_per_identity=K) with batch_size=P*K.',
                logger='current', level=logging.WARNING)

    # -------------------------------------------------------------- forward
    def loss(self, s_emb: torch.Tensor, t_emb: torch.Tensor,
             labels: torch.Tensor) -> torch.Tensor:
        s_emb, t_emb, labels = self._gather(s_emb.float(),
                                            t_emb.float(), labels)
        n = s_emb.shape[0]
        s_hat = F.normalize(s_emb, dim=1)
        iu = torch.triu_indices(n, n, offset=1, device=s_emb.device)
        sim_s = (s_hat @ s_hat.t())[iu[0], iu[1]]
        with torch.no_grad():
            t_hat = F.normalize(t_emb, dim=1)
            sim_t = (t_hat @ t_hat.t())[iu[0], iu[1]]
            same = labels[iu[0]] == labels[iu[1]]
        zero = sim_s.sum() * 0.0  # keeps the graph when a term is empty
        pos_s, pos_t = sim_s[same], sim_t[same]
        neg_s, neg_t = sim_s[~same], sim_t[~same]

        if neg_s.numel() > 0:
            order = torch.argsort(neg_s.detach(), descending=True)
            if self.training:
                with torch.no_grad():
                    idx = torch.tensor(self.threshold_indices(neg_s.numel()),
                                       device=neg_s.device)
                    new_s = neg_s.detach()[order][idx]
                    new_t = torch.sort(neg_t, descending=True).values[idx]
                    m = self.momentum
                    self.thresholds_s.mul_(1 - m).add_(m * new_s)
                    self.thresholds_t.mul_(1 - m).add_(m * new_t)
            hard = order[:self.topk]
            loss_neg = F.mse_loss(
                self.soft_rank(neg_s[hard], self.thresholds_s.float()),
                self.soft_rank(neg_t[hard], self.thresholds_t.float()))
        else:
            loss_neg = zero

        if pos_s.numel() > 0:
            loss_pos = F.mse_loss(
                self.soft_rank(pos_s, self.thresholds_s.float()),
                self.soft_rank(pos_t, self.thresholds_t.float()))
        else:
            self._warn_no_positives()
            loss_pos = zero

        loss = self.pos_weight * loss_pos + self.neg_weight * loss_neg
        return loss

    def extra_repr(self):
        return (f'topk={self.topk}, tau={self.tau}, pos_weight='
                f'{self.pos_weight}, neg_weight={self.neg_weight}, momentum='
                f'{self.momentum}, fars={self.fars}, all_gather='
                f'{self.all_gather}, ' + super().extra_repr())
