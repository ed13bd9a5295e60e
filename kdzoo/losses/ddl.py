"""DDL: distribution distillation loss, adapted to teacher->student KD."""
import logging

import torch
import torch.nn.functional as F
from mmengine.logging import print_log

from kdzoo.registry import LOSSES
from kdzoo.utils import ConfigError, is_finite_number
from .base import BaseDistillLoss, require_embeddings_and_labels


@LOSSES.register_module()
class DDLLoss(BaseDistillLoss):
    """DDL adapted to network distillation: the student's positive and
    hard-negative similarity histograms are pulled onto the teacher's.

    Huang, Shen, Tai, Li, Liu, Li, Huang, Ji, "Improving Face Recognition
    from Hard Samples via Distribution Distillation Loss", ECCV 2020,
    arXiv 2002.03662 (``L_DDL = L_KL + L_order``, loss figure of the paper).
    Histogram, KL and order term follow Tencent/TFace
    ``torchkit/loss/ddl.py`` (shared reference ``kd-methods.md`` §1.2).

    **kdzoo's adaptation (not the authors' method).** In the paper both
    distributions come from ONE network: P from easy samples, Q from hard
    ones, and both receive gradient. Here P is the *teacher network's*
    similarity distribution and Q the *student network's*, on the same
    batch; P is detached, so only the student is trained::

        loss = pos_weight   * KL(P+ || Q+) + neg_weight * KL(P- || Q-)
             + order_weight * (mean(neg_s) - mean(pos_s))

    - Positives: cosine of every same-label pair ``i<j`` of the batch, kept
      where ``> positive_threshold``, per network (TFace pairs ``(x1, x2)``
      from a separate positive-pair batch and hard-codes the threshold 0).
    - Negatives: for each sample, the hardest different-label similarity
      (row-wise max over different-label pairs), per network; samples with
      no different-label partner are skipped. TFace instead feeds a
      one-image-per-identity batch and takes the row max of the
      ``triu(., 1)``-masked matrix, so it sees only pairs ``j > i`` and the
      masked zeros (its last row is always 0).
    - Soft histogram: Gaussian kernel of width ``sigma`` at the nodes
      ``0, 1/num_bins, ..., (num_bins-1)/num_bins``, normalised to sum 1.
    - KL exactly as TFace: ``F.kl_div(log(Q + 1e-9), P + 1e-9,
      reduction='batchmean')`` on a (1, num_bins) row, so "batchmean"
      divides by 1 (the plain sum over bins).
    - Order term: TFace adds ``mean(neg) - mean(pos)`` for every
      (negative branch, positive branch) combination, unhinged and linear;
      with one trained branch kdzoo uses the student's own positives and
      hardest negatives only (the teacher's term would carry no gradient).
      It is negative whenever positives score above negatives, so the total
      loss can be < 0.

    A batch without positive pairs (or where one network has none above
    ``positive_threshold``) returns 0 with a one-time warning: use the
    ``IdentityBalancedSampler``. A batch without negatives (one identity)
    also returns 0.

    Args:
        pos_weight: lambda_1, weight of the positive KL (0.1).
        neg_weight: lambda_2, weight of the negative KL (0.02).
        order_weight: lambda_3, weight of the order term (0.5).
        num_bins: histogram nodes on [0, 1) (TFace 1000, step 0.001).
        sigma: Gaussian kernel width (TFace 0.1).
        positive_threshold: keep positive similarities above it (0).
        loss_weight: multiplier on the returned loss.

    Forward args: ``s_emb`` (B×D), ``t_emb`` (B×D', widths may differ),
    ``labels`` (B, long). The teacher side is detached.
    """

    def __init__(self, pos_weight: float = 0.1, neg_weight: float = 0.02,
                 order_weight: float = 0.5, num_bins: int = 1000,
                 sigma: float = 0.1, positive_threshold: float = 0.0,
                 loss_weight: float = 1.0):
        super().__init__(loss_weight)
        name = type(self).__name__
        for arg, value in (('pos_weight', pos_weight),
                           ('neg_weight', neg_weight),
                           ('order_weight', order_weight)):
            if not is_finite_number(value) or value < 0:
                raise ConfigError(f'{name}: {arg} must be a finite number '
                                  f'>= 0, got {value!r}')
        if isinstance(num_bins, bool) or not isinstance(num_bins, int) \
                or num_bins < 2:
            raise ConfigError(f'{name}: num_bins must be an integer >= 2, got '
                              f'{num_bins!r}')
        if not is_finite_number(sigma) or sigma <= 0:
            raise ConfigError(f'{name}: sigma must be a finite number > 0, '
                              f'got {sigma!r}')
        if not is_finite_number(positive_threshold) or \
                not -1 <= positive_threshold < 1:
            raise ConfigError(f'{name}: positive_threshold must be in '
                              f'[-1, 1), got {positive_threshold!r}')
        self.pos_weight = float(pos_weight)
        self.neg_weight = float(neg_weight)
        self.order_weight = float(order_weight)
        self.num_bins = int(num_bins)
        self.sigma = float(sigma)
        self.positive_threshold = float(positive_threshold)
        self.register_buffer(
            'nodes', torch.arange(self.num_bins, dtype=torch.float32)
            / self.num_bins, persistent=False)
        self._warned = set()

    def check_shapes(self, shapes):
        require_embeddings_and_labels(shapes)

    # -------------------------------------------------------------- helpers
    def histogram(self, sims: torch.Tensor) -> torch.Tensor:
        """Soft histogram of 1-D ``sims``: a (1, num_bins) row summing to 1."""
        diff = sims.reshape(-1, 1) - self.nodes.to(sims).reshape(1, -1)
        h = torch.exp(-0.5 * (diff / self.sigma) ** 2).sum(0, keepdim=True)
        return h / h.sum(1, keepdim=True)

    @staticmethod
    def kl(p: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
        """TFace's KL(P || Q) on (1, num_bins) rows."""
        return F.kl_div(torch.log(q + 1e-9), p + 1e-9, reduction='batchmean')

    def _pairs(self, emb, same, iu, rows_ok, diff):
        """(positives above threshold, per-row hardest negatives)."""
        e = F.normalize(emb, dim=1)
        sim = e @ e.t()
        pos = sim[iu[0], iu[1]][same]
        pos = pos[pos > self.positive_threshold]
        hard_neg = sim.masked_fill(~diff, float('-inf')).max(dim=1).values
        return pos, hard_neg[rows_ok]

    def _warn(self, key, msg):
        if key not in self._warned:
            self._warned.add(key)
            print_log(f'DDLLoss: {msg}', logger='current',
                      level=logging.WARNING)

    def loss(self, s_emb: torch.Tensor, t_emb: torch.Tensor,
             labels: torch.Tensor) -> torch.Tensor:
        s_emb = s_emb.float()
        n = s_emb.shape[0]
        zero = s_emb.sum() * 0.0
        iu = torch.triu_indices(n, n, offset=1, device=s_emb.device)
        diff = labels.reshape(-1, 1) != labels.reshape(1, -1)
        same = ~diff[iu[0], iu[1]]
        rows_ok = diff.any(dim=1)
        if not bool(same.any()):
            self._warn('no_pos', 'the batch has no positive pair (two images '
                       'of one identity); the loss is 0. Use '
                       'train_dataloader.sampler=dict(type='
                       '"IdentityBalancedSampler", ...).')
            return zero
        if not bool(rows_ok.any()):
            self._warn('no_neg', 'the batch holds one identity only (no '
                       'negative pair); the loss is 0.')
            return zero
        pos_s, neg_s = self._pairs(s_emb, same, iu, rows_ok, diff)
        with torch.no_grad():
            pos_t, neg_t = self._pairs(t_emb.float(), same, iu,
                                       rows_ok, diff)
        if pos_s.numel() == 0 or pos_t.numel() == 0:
            self._warn('pos_thr', 'no positive similarity above '
                       f'positive_threshold={self.positive_threshold} for the '
                       f'{"student" if pos_s.numel() == 0 else "teacher"}; '
                       'the loss is 0 for such batches.')
            return zero
        kl_pos = self.kl(self.histogram(pos_t), self.histogram(pos_s))
        kl_neg = self.kl(self.histogram(neg_t), self.histogram(neg_s))
        order = neg_s.mean() - pos_s.mean()
        loss = (self.pos_weight * kl_pos + self.neg_weight * kl_neg
                + self.order_weight * order)
        return loss

    def extra_repr(self):
        return (f'pos_weight={self.pos_weight}, neg_weight={self.neg_weight}, '
                f'order_weight={self.order_weight}, num_bins={self.num_bins}, '
                f'sigma={self.sigma}, positive_threshold='
                f'{self.positive_threshold}, ' + super().extra_repr())
