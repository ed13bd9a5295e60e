"""Relational (batch-structure) distillation losses: RKD, SP, CC, DarkRank.

All four compare a B×B (or B×B×B) relation computed within the student batch
with the same relation computed within the teacher batch, so the student and
teacher dimensions may differ and no connector is needed. The teacher side is
always detached.
"""
import math
from typing import Dict, Optional, Sequence

import torch
import torch.nn.functional as F

from kdzoo.registry import LOSSES
from kdzoo.utils import ConfigError, check_int, check_number
from .base import BaseDistillLoss


def _check_pair(shapes: Dict[str, torch.Size], s_name: str, t_name: str,
                ndims, what: str) -> None:
    """Both tensors have an accepted ndim and the same batch size."""
    for name in (s_name, t_name):
        shape = shapes[name]
        if len(shape) not in ndims:
            raise ValueError(
                f'{name} must be {what}, got shape {tuple(shape)}')
    s_shape, t_shape = shapes[s_name], shapes[t_name]
    if s_shape[0] != t_shape[0]:
        raise ValueError(
            f'{s_name} has shape {tuple(s_shape)} but {t_name} has shape '
            f'{tuple(t_shape)}; the batch sizes (first dimension) must match '
            '(the feature dimensions may differ). Bind both to taps of the '
            'same batch.')


def pairwise_distance(x: torch.Tensor, eps: float = 1e-12) -> torch.Tensor:
    """Euclidean distance matrix, ``sqrt(clamp(|xi|^2+|xj|^2-2xi.xj, eps))``.

    The diagonal is set to 0 (RepDistiller ``RKDLoss.pdist``); coinciding
    distinct rows get ``sqrt(eps)`` (so they stay > 0).
    """
    sq = x.pow(2).sum(dim=1)
    d2 = sq.unsqueeze(1) + sq.unsqueeze(0) - 2.0 * (x @ x.t())
    d = d2.clamp(min=eps).sqrt()
    off_diag = 1.0 - torch.eye(len(x), dtype=d.dtype, device=d.device)
    return d * off_diag


@LOSSES.register_module()
class RKDLoss(BaseDistillLoss):
    """Relational KD: distance-wise + angle-wise smooth-L1 on batch relations.

    Park, Kim, Lu, Cho, "Relational Knowledge Distillation", CVPR 2019,
    arXiv 1904.05068, Eq. 3-4 (distance potential, normalised by the mean
    distance mu) and Eq. 5-6 (angle potential over all triplets), Huber loss
    (smooth-L1, delta 1). Follows RepDistiller ``distiller_zoo/RKD.py``
    (identical to TFace ``ekd/distillation/rkd.py``):

    * ``pdist``: ``sqrt(clamp(d^2, 1e-12))`` with the diagonal zeroed; each
      matrix is divided by the mean of its non-zero entries (student and
      teacher separately);
    * angle ``psi[i, j, k] = <e_ij, e_ik>`` with ``e_ij`` the L2-normalised
      ``x_j - x_i`` (zero vector for ``j == i``), over all B^3 triplets;
    * both terms are ``F.smooth_l1_loss`` (elementwise mean);
    * ``loss = loss_weight * (w_dist * L_D + w_angle * L_A)``.

    Args:
        w_dist: weight of the distance term (RepDistiller/TFace 25).
        w_angle: weight of the angle term (RepDistiller/TFace 50).
        loss_weight: outer multiplier (RepDistiller 1).

    Forward args: ``s_emb`` (B×D_s), ``t_emb`` (B×D_t); 4-D maps are
    flattened to B×(C·H·W). Needs B >= 2. Cost: B×B×D and B×B×B tensors.
    """

    def __init__(self, w_dist: float = 25.0, w_angle: float = 50.0,
                 loss_weight: float = 1.0):
        super().__init__(loss_weight)
        self.w_dist = check_number('RKDLoss', 'w_dist', w_dist, 0)
        self.w_angle = check_number('RKDLoss', 'w_angle', w_angle, 0)
        if self.w_dist == 0 and self.w_angle == 0:
            raise ConfigError('RKDLoss: w_dist and w_angle are both 0; set at '
                              'least one of them > 0')

    def check_shapes(self, shapes):
        _check_pair(shapes, 's_emb', 't_emb', (2, 4),
                    'B×D embeddings (2-D) or B×C×H×W maps (4-D, flattened)')

    @staticmethod
    def _distance(x: torch.Tensor) -> torch.Tensor:
        # mean of the non-zero entries = the off-diagonal ones (the clamp
        # keeps them >= 1e-6); computed without boolean indexing (no sync)
        d = pairwise_distance(x)
        n = x.shape[0]
        return d / (d.sum() / (n * (n - 1)))

    @staticmethod
    def _angle(x: torch.Tensor) -> torch.Tensor:
        diff = F.normalize(x.unsqueeze(0) - x.unsqueeze(1), p=2, dim=2)
        return torch.bmm(diff, diff.transpose(1, 2))

    def loss(self, s_emb: torch.Tensor, t_emb: torch.Tensor) -> torch.Tensor:
        if s_emb.shape[0] < 2:
            raise ValueError(f'RKDLoss needs a batch of at least 2 samples, '
                             f'got s_emb of shape {tuple(s_emb.shape)}')
        s = s_emb.float().flatten(1)
        t = t_emb.float().flatten(1)
        loss = s.new_zeros(())
        if self.w_dist > 0:
            with torch.no_grad():
                t_d = self._distance(t)
            loss = loss + self.w_dist * F.smooth_l1_loss(self._distance(s),
                                                         t_d)
        if self.w_angle > 0:
            with torch.no_grad():
                t_a = self._angle(t)
            loss = loss + self.w_angle * F.smooth_l1_loss(self._angle(s), t_a)
        return loss

    def extra_repr(self):
        return (f'w_dist={self.w_dist}, w_angle={self.w_angle}, ' +
                super().extra_repr())


@LOSSES.register_module()
class SPLoss(BaseDistillLoss):
    """Similarity-preserving KD: match the batch similarity (Gram) matrices.

    Tung & Mori, "Similarity-Preserving Knowledge Distillation", ICCV 2019,
    arXiv 1907.09682, Eq. 2-4: ``G = F F^T`` over the flattened activations
    ``F`` (B×N), each row of G L2-normalised, then
    ``L = ||G_t - G_s||_F^2 / B^2``.

    ``mode='repdistiller'`` (default) follows RepDistiller
    ``distiller_zoo/SP.py`` exactly as above (row normalisation with
    ``F.normalize``, eps 1e-12).
    ``mode='tface'`` follows TFace ``ekd/distillation/similarity_perserving.py``
    ("different from the origin paper"): each sample's flattened features are
    L2-normalised first (``F.normalize``, eps 1e-12), ``G = F_hat F_hat^T`` is
    the cosine-similarity matrix and is NOT row-normalised; same reduction
    ``||G_t - G_s||_F^2 / B^2``.

    Two teachers (kdzoo's extension, in neither the paper nor either
    reference): with ``t_feat2`` bound as well, the target is the weighted
    mean of the two teachers' matrices,
    ``G_t = w_1 G(t_feat) + w_2 G(t_feat2)`` with ``teacher_weights``
    ``(w_1, w_2)`` summing to 1, so the student follows a mix of both
    teachers' batch similarities; the teachers' dimensions may differ from
    each other and from the student's (no projector is needed).

    Args:
        mode: ``'repdistiller'`` or ``'tface'``.
        teacher_weights: ``(w_1, w_2)``, each >= 0, summing to 1; used only
            when ``t_feat2`` is bound.
        loss_weight: multiplier (RepDistiller/mdistiller beta = 3000 on CIFAR
            stage maps; not face-tuned).

    Forward args: ``s_feat``, ``t_feat`` and optionally ``t_feat2``: B×D
    embeddings or B×C×H×W maps (any ndim >= 2 is flattened to B×N); the
    dimensions may differ.
    """

    MODES = ('repdistiller', 'tface')

    def __init__(self, mode: str = 'repdistiller',
                 teacher_weights: Sequence[float] = (0.5, 0.5),
                 loss_weight: float = 1.0):
        super().__init__(loss_weight)
        if mode not in self.MODES:
            raise ConfigError(f'SPLoss: mode must be one of {self.MODES}, got '
                              f'{mode!r}')
        self.mode = mode
        if not isinstance(teacher_weights, (list, tuple)) or \
                len(teacher_weights) != 2:
            raise ConfigError('SPLoss: teacher_weights must be two numbers '
                              f'(w_1, w_2), got {teacher_weights!r}')
        weights = tuple(check_number('SPLoss', 'teacher_weights', w, 0)
                        for w in teacher_weights)
        if abs(sum(weights) - 1.0) > 1e-6:
            raise ConfigError(f'SPLoss: teacher_weights {teacher_weights!r} '
                              'must sum to 1 (e.g. (0.5, 0.5)), so that the '
                              'mixed target stays a similarity matrix')
        self.teacher_weights = weights

    def check_shapes(self, shapes):
        what = 'B×D embeddings or B×C×H×W maps (>= 2-D)'
        _check_pair(shapes, 's_feat', 't_feat', (2, 3, 4, 5), what)
        if 't_feat2' in shapes:
            _check_pair(shapes, 's_feat', 't_feat2', (2, 3, 4, 5), what)

    def _gram(self, x: torch.Tensor) -> torch.Tensor:
        x = x.flatten(1)
        if self.mode == 'tface':
            x = F.normalize(x, p=2, dim=1)
            return x @ x.t()
        return F.normalize(x @ x.t(), p=2, dim=1)

    def loss(self, s_feat: torch.Tensor, t_feat: torch.Tensor,
             t_feat2: Optional[torch.Tensor] = None) -> torch.Tensor:
        bsz = s_feat.shape[0]
        g_s = self._gram(s_feat.float())
        g_t = self._gram(t_feat.float())
        if t_feat2 is not None:
            w_1, w_2 = self.teacher_weights
            g_t = w_1 * g_t + w_2 * self._gram(t_feat2.float())
        loss = (g_t - g_s).pow(2).sum() / (bsz * bsz)
        return loss

    def extra_repr(self):
        return (f'mode={self.mode!r}, teacher_weights={self.teacher_weights}, '
                + super().extra_repr())


@LOSSES.register_module()
class CCLoss(BaseDistillLoss):
    """Correlation congruence: MSE between Taylor-RBF correlation matrices.

    Peng et al., "Correlation Congruence for Knowledge Distillation", ICCV
    2019, arXiv 1904.01802, Eq. 8-9 (Gaussian RBF kernel approximated by its
    Taylor series). With ``c = x_hat_i . x_hat_j`` (cosine of L2-normalised
    embeddings)::

        k(c) = sum_p exp(-2 gamma) (2 gamma)^p / p! * c^p
        L = mean_ij (k(c_s)_ij - k(c_t)_ij)^2        (F.mse_loss)

    Reference implementation: TFace ``ekd/distillation/cc.py`` (RepDistiller
    has no CC). **Order convention (off-by-one):** TFace's current code
    loops ``for p in range(self.p)`` with ``p=2``, i.e. orders 0 and 1 only
    (the kernel is affine in the cosine); its first commit and the formula
    with ``P`` as the highest order use ``range(P_order + 1)``. The default
    here (``include_last_order=False``) follows current TFace:
    orders ``0 .. p_order-1``; ``include_last_order=True`` sums orders
    ``0 .. p_order``.

    Args:
        gamma: RBF kernel parameter (TFace 0.4).
        p_order: number of Taylor terms (default convention) or highest order
            (``include_last_order=True``); TFace 2.
        include_last_order: see above.
        loss_weight: multiplier.

    Forward args: ``s_emb`` (B×D_s), ``t_emb`` (B×D_t); dims may differ.
    """

    def __init__(self, gamma: float = 0.4, p_order: int = 2,
                 include_last_order: bool = False, loss_weight: float = 1.0):
        super().__init__(loss_weight)
        self.gamma = check_number('CCLoss', 'gamma', gamma, 0, low_open=True)
        self.p_order = check_int('CCLoss', 'p_order', p_order, 1)
        if not isinstance(include_last_order, bool):
            raise ConfigError(f'CCLoss: include_last_order must be True or '
                              f'False, got {include_last_order!r}')
        self.include_last_order = include_last_order
        orders = range(self.p_order + 1 if include_last_order
                       else self.p_order)
        self.coefficients = [
            math.exp(-2 * self.gamma) * (2 * self.gamma)**p /
            math.factorial(p) for p in orders]

    def check_shapes(self, shapes):
        _check_pair(shapes, 's_emb', 't_emb', (2,), 'B×D embeddings (2-D)')

    def _correlation(self, x: torch.Tensor) -> torch.Tensor:
        x = F.normalize(x, p=2, dim=1)
        cos = x @ x.t()
        corr = torch.zeros_like(cos)
        for p, coef in enumerate(self.coefficients):
            corr = corr + coef * cos.pow(p)
        return corr

    def loss(self, s_emb: torch.Tensor, t_emb: torch.Tensor) -> torch.Tensor:
        corr_s = self._correlation(s_emb.float())
        with torch.no_grad():
            corr_t = self._correlation(t_emb.float())
        return F.mse_loss(corr_s, corr_t)

    def extra_repr(self):
        return (f'gamma={self.gamma}, p_order={self.p_order}, '
                f'include_last_order={self.include_last_order}, ' +
                super().extra_repr())


@LOSSES.register_module()
class DarkRankLoss(BaseDistillLoss):
    """DarkRank (hard): Plackett-Luce likelihood of the teacher's ranking.

    Chen, Wang, Zhang, "DarkRank: Accelerating Deep Metric Learning via Cross
    Sample Similarities Transfer", AAAI 2018, arXiv 1707.01220, Eq. 3
    (listwise Plackett-Luce probability) and Eq. 5 (hard transfer). Setting
    and defaults of TFace ``ekd/distillation/darkrank.py`` (``HardDarkRank``,
    alpha 3, beta 3, permute_len 3):

    * embeddings are L2-normalised; ``d_ij`` is the Euclidean distance
      (``sqrt(clamp(d^2, 1e-12))``); the score of candidate j for query i is
      ``S_ij = -alpha * d_ij^beta``;
    * for each query i the teacher ranks all other samples (self excluded)
      by descending teacher score; ``pi_1..pi_P`` are its ``P = permute_len``
      nearest;
    * the student's scores are put in the teacher's order, ``o_1..o_P``
      for the teacher's top-P list, and
      ``log P_i = sum_{k=1..P} (o_k - logsumexp(o_k, ..., o_P))``, the
      Plackett-Luce probability of the teacher's order within its top-P
      list, as TFace's and lenscloth/RKD's code compute it (the default,
      ``candidates='list'``); ``loss = -mean_i log P_i``.

    ``candidates='all'`` normalises each step over every non-self candidate
    not yet placed (``logsumexp(o_k, ..., o_{B-1})``): the top-P
    Plackett-Luce likelihood of the paper's Eq. 3 over the whole batch.

    Args:
        alpha: score scale (TFace 3).
        beta: distance exponent (TFace 3).
        permute_len: length of the teacher list imposed (TFace 3;
            lenscloth/RKD 4). Needs batch size > permute_len.
        candidates: ``'list'`` (default, TFace) or ``'all'``.
        loss_weight: multiplier.

    Forward args: ``s_emb`` (B×D_s), ``t_emb`` (B×D_t); dims may differ.
    """

    CANDIDATES = ('all', 'list')

    def __init__(self, alpha: float = 3.0, beta: float = 3.0,
                 permute_len: int = 3, candidates: str = 'list',
                 loss_weight: float = 1.0):
        super().__init__(loss_weight)
        self.alpha = check_number('DarkRankLoss', 'alpha', alpha, 0,
                                  low_open=True)
        self.beta = check_number('DarkRankLoss', 'beta', beta, 0,
                                 low_open=True)
        self.permute_len = check_int('DarkRankLoss', 'permute_len',
                                     permute_len, 1)
        if candidates not in self.CANDIDATES:
            raise ConfigError(f'DarkRankLoss: candidates must be one of '
                              f'{self.CANDIDATES}, got {candidates!r}')
        self.candidates = candidates

    def check_shapes(self, shapes):
        # The batch-size requirement (B > permute_len) is checked in forward:
        # the build-time probe uses a batch of 2.
        _check_pair(shapes, 's_emb', 't_emb', (2,), 'B×D embeddings (2-D)')

    def _scores(self, x: torch.Tensor) -> torch.Tensor:
        x = F.normalize(x, p=2, dim=1)
        sq = x.pow(2).sum(dim=1)
        d = (sq.unsqueeze(1) + sq.unsqueeze(0) - 2.0 * (x @ x.t())).clamp(
            min=1e-12).sqrt()
        return -self.alpha * d.pow(self.beta)

    def loss(self, s_emb: torch.Tensor, t_emb: torch.Tensor) -> torch.Tensor:
        bsz = s_emb.shape[0]
        if self.permute_len >= bsz:
            raise ValueError(
                f'DarkRankLoss: batch too small: permute_len='
                f'{self.permute_len} needs a batch of more than '
                f'{self.permute_len} samples, got s_emb of shape '
                f'{tuple(s_emb.shape)}; lower permute_len or use larger '
                'batches')
        score_s = self._scores(s_emb.float())
        with torch.no_grad():
            score_t = self._scores(t_emb.float())
            eye = torch.eye(bsz, dtype=torch.bool, device=score_t.device)
            score_t = score_t.masked_fill(eye, float('-inf'))
            # self (-inf) sorts last: keep the B-1 non-self candidates
            order = score_t.sort(dim=1, descending=True, stable=True)[1]
            order = order[:, :bsz - 1]
            if self.candidates == 'list':
                order = order[:, :self.permute_len]
        ordered = torch.gather(score_s, 1, order)
        # logsumexp over the suffix o_k..o_end, for every k at once
        suffix_lse = torch.logcumsumexp(ordered.flip(1), dim=1).flip(1)
        log_prob = (ordered - suffix_lse)[:, :self.permute_len].sum(dim=1)
        return -log_prob.mean()

    def extra_repr(self):
        return (f'alpha={self.alpha}, beta={self.beta}, '
                f'permute_len={self.permute_len}, '
                f'candidates={self.candidates!r}, ' + super().extra_repr())
