"""Classifier-based distillation: margin softmax against teacher-side centres.

Both losses here are *classification* losses: the student embedding is
scored against class centres that come from the teacher (frozen teacher
head for :class:`MarginDistillationLoss`, an EMA of teacher embeddings for
:class:`AdaDistillLoss`) and trained with a margin softmax cross-entropy.
In a recipe they usually **replace** the student's own margin head (set the
student's ``head=None``), otherwise the student is trained with two
classification losses.

ArcFace form used by both (documented deviation from the classic form of
``kdzoo.heads.ArcFace``): the target logit is the plain
``s·cos(acos(cos θ_y) + m)``, with ``cos θ_y`` clamped to
``[-1+1e-7, 1-1e-7]`` before ``acos`` (finite value and gradient at
``cos = ±1``) and **no** ``θ + m > π`` fallback, like both reference codes
(MXNet ``arccos``/``+m``/``cos`` in margindistillation, in-place
``acos_``/``cos_`` with autograd in AdaDistill). Gradients flow through the
margin function (not insightface's straight-through form). Non-target
logits are ``s·cos θ_j`` (unclamped). All maths in float32 (float64 for
float64 inputs) with autocast disabled.
"""
import math
import os
from typing import Optional

import torch
import torch.distributed as dist
import torch.nn.functional as F

from kdzoo.registry import LOSSES
from kdzoo.utils import (CheckpointError, ConfigError, check_class_labels,
                         check_int, check_number)
from kdzoo.utils.dist import world_size
from kdzoo.utils.checkpoint import extract_state_dict, load_weights_file
from .base import BaseDistillLoss, require_ndim

_ACOS_EPS = 1e-7

# Layout of the class-centre matrix by key name, when embedding_size is not
# given: kdzoo heads / insightface PartialFC / nn.Linear store ``weight`` as
# (C, D); TFace, the official CurricularFace and AdaDistill store ``kernel``
# as (D, C).
_KEY_LAYOUT = {'weight': 'CxD', 'kernel': 'DxC'}


def _compute_dtype(x: torch.Tensor) -> torch.dtype:
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def _arc_target(cos_y: torch.Tensor, m) -> torch.Tensor:
    """``cos(acos(clamp(cos_y)) + m)``: plain ArcFace target, no fallback.

    ``m`` is a float or a tensor broadcastable to ``cos_y`` (per-sample
    margins).
    """
    theta = torch.acos(cos_y.clamp(-1.0 + _ACOS_EPS, 1.0 - _ACOS_EPS))
    return torch.cos(theta + m)


def _margin_cross_entropy(cos: torch.Tensor, labels: torch.Tensor, s: float,
                          target_of) -> torch.Tensor:
    """Cross-entropy over ``s * cos`` with each sample's target cosine
    replaced by ``target_of(cos_y)`` (the margin)."""
    cos_y = cos.gather(1, labels.unsqueeze(1)).squeeze(1)
    logits = s * cos.scatter(1, labels.unsqueeze(1),
                             target_of(cos_y).unsqueeze(1))
    return F.cross_entropy(logits, labels)


def _check_emb_shapes(owner: str, shapes, dim: int, dim_hint: str) -> None:
    """Shared ``check_shapes`` for ``(s_emb, t_emb, labels)`` losses."""
    s_shape, t_shape = shapes['s_emb'], shapes['t_emb']
    require_ndim('s_emb', s_shape, 2, 'B×D embeddings')
    require_ndim('t_emb', t_shape, 2, 'B×D embeddings')
    if s_shape[1] != dim:
        raise ValueError(
            f'{owner}: s_emb has shape {tuple(s_shape)} but the class '
            f'centres have D={dim} ({dim_hint}); t_emb has shape '
            f'{tuple(t_shape)}. Project the student embedding with a '
            'connector, e.g. connectors=dict(proj=dict('
            f'type="LinearProjector", out_features={dim})) and '
            's_emb=dict(tap="student.embedding", connector="proj").')
    if t_shape[1] != dim:
        raise ValueError(
            f'{owner}: t_emb has shape {tuple(t_shape)} but the class '
            f'centres have D={dim} ({dim_hint}); s_emb has shape '
            f'{tuple(s_shape)}. Bind t_emb to the teacher embedding the '
            'centres belong to (e.g. "teacher.embedding").')
    if s_shape[0] != t_shape[0]:
        raise ValueError(f'{owner}: s_emb has shape {tuple(s_shape)} but '
                         f't_emb has shape {tuple(t_shape)}; the batch sizes '
                         'must match.')
    if 'labels' in shapes:
        l_shape = shapes['labels']
        if len(l_shape) != 1 or l_shape[0] != s_shape[0]:
            raise ValueError(
                f'{owner}: labels must have shape ({s_shape[0]},) to match '
                f's_emb {tuple(s_shape)}, got {tuple(l_shape)}; bind labels '
                'to "data.label".')


@LOSSES.register_module()
class MarginDistillationLoss(BaseDistillLoss):
    """MarginDistillation: ArcFace on frozen teacher centres, per-sample margin.

    The margin of each sample follows the teacher's confidence.

    Svitov, Alyamkin, "MarginDistillation: distillation for margin-based
    softmax", arXiv 2003.02586; reference code
    ``david-svitov/margindistillation`` ``train/train.py`` (branch
    ``margin_distillation``), followed here. With ``f̂`` the L2-normalised
    embeddings and ``Ŵ_t`` the normalised teacher centres::

        d_i   = cos(f̂_t,i, Ŵ_t[y_i])
        D_max = max_batch d_i
        m_i   = (m_max - m_min) / D_max · d_i + m_min
        L     = CE(s·cos θ_j with target s·cos(θ_{y_i} + m_i)),
                cos θ_j = f̂_s,i · Ŵ_t[j]

    Like the reference, the margin map takes the *cosine* ``d_i`` and is not
    clipped (a sample with ``d_i < 0`` gets ``m_i < m_min``). kdzoo adds a
    guard: if ``D_max <= 0`` (no sample is closer to its teacher centre than
    orthogonal) every margin is ``m_min``. The target logit is the plain
    ``cos(θ + m)`` with the cosine clamped before ``acos`` and no
    ``θ + m > π`` fallback (the reference has none; see the module
    docstring). Margins are computed from the teacher side only and carry no
    gradient.

    The teacher centres are read from ``head_checkpoint`` with
    ``torch.load(weights_only=True)`` (a file with pickled objects is
    refused) and kept as the non-trainable buffer ``centers`` of shape
    ``(C, D)``, rows L2-normalised (it lands in checkpoints). The file may be
    a kdzoo ``head.pth`` (state dict with ``weight`` ``(C, D)``) or any state
    dict holding one class-centre matrix under ``weight`` or ``kernel``
    (also ``...head.weight``/``...head.kernel``). Orientation: with
    ``embedding_size`` given, the axis equal to it is ``D`` (a square matrix
    falls back to the key rule); without it, ``weight`` is ``(C, D)``
    (kdzoo, insightface ``PartialFC_V2``, ``nn.Linear``) and ``kernel`` is
    ``(D, C)`` (TFace, CurricularFace, AdaDistill) and is transposed.

    In a recipe this loss normally **replaces** the student's own head
    (student ``head=None``): in the reference the student head *is* the
    frozen teacher head. Bind ``s_emb`` to the student embedding (through a
    ``LinearProjector`` connector if its D differs from the teacher's),
    ``t_emb`` to the teacher embedding and ``labels`` to ``data.label``;
    the dataset's identities must be the teacher head's classes.

    Args:
        head_checkpoint: path of the teacher head weights (see above).
        s: logit scale (> 0), 64 in the reference.
        m_max: largest margin in radians (reference 0.5), ``m_min <= m_max
            < π``.
        m_min: smallest margin in radians (reference 0.2), ``>= 0``.
        loss_weight: multiplier on the returned loss.
        embedding_size: optional ``D`` to pick the orientation of the
            centre matrix (kdzoo extension, not in the reference).

    Forward args: ``s_emb`` (B×D), ``t_emb`` (B×D, detached), ``labels``
    (B, long, in ``[0, C)``).
    """

    def __init__(self, head_checkpoint: str, s: float = 64.0,
                 m_max: float = 0.5, m_min: float = 0.2,
                 loss_weight: float = 1.0,
                 embedding_size: Optional[int] = None):
        super().__init__(loss_weight)
        name = type(self).__name__
        if not isinstance(head_checkpoint, (str, os.PathLike)) or \
                not str(head_checkpoint):
            raise ConfigError(f'{name}: head_checkpoint must be the path of '
                              'the teacher head weights (e.g. a kdzoo '
                              f'head.pth), got {head_checkpoint!r}')
        self.s = check_number(name, 's', s, low=0, low_open=True)
        self.m_min = check_number(name, 'm_min', m_min, low=0,
                                  high=math.pi, high_open=True)
        self.m_max = check_number(name, 'm_max', m_max, low=0,
                                  high=math.pi, high_open=True)
        if self.m_max < self.m_min:
            raise ConfigError(f'{name}: m_max must be >= m_min (margins in '
                              f'radians, 0 <= m_min <= m_max < pi), got '
                              f'm_max={m_max!r}, m_min={m_min!r}')
        if embedding_size is not None:
            embedding_size = check_int(name, 'embedding_size',
                                       embedding_size)
        self.head_checkpoint = str(head_checkpoint)
        centers = self._load_centers(self.head_checkpoint, embedding_size)
        self.register_buffer('centers', F.normalize(centers, dim=1))

    # ------------------------------------------------------------ loading
    @classmethod
    def _load_centers(cls, path: str,
                      embedding_size: Optional[int]) -> torch.Tensor:
        name = cls.__name__
        what = f'{name}: head_checkpoint'
        state = extract_state_dict(load_weights_file(path, what), path)
        key = next((k for k in ('weight', 'kernel') if k in state), None)
        if 'weight' in state and 'kernel' in state:
            raise CheckpointError(
                f'{what} {path!r} holds both "weight" and "kernel"; save '
                'only the class-centre matrix: torch.save({"weight": W}, '
                '"head.pth") with W of shape (num_classes, embedding_size).')
        if key is None:
            hits = [k for k in state
                    if k.endswith(('head.weight', 'head.kernel'))
                    and state[k].dim() == 2]
            if len(hits) == 1:
                key = hits[0]
            else:
                raise CheckpointError(
                    f'{what} {path!r} holds no class-centre matrix: expected '
                    'one 2-D tensor under "weight" (kdzoo head.pth, (C, D)) '
                    'or "kernel" ((D, C)); found keys '
                    f'{list(state)[:10]}. Save the teacher head alone: '
                    'torch.save({"weight": W}, "head.pth").')
        w = state[key]
        if w.dim() != 2 or not w.is_floating_point():
            raise CheckpointError(
                f'{what} {path!r}: {key!r} must be a 2-D floating-point '
                f'class-centre matrix, got shape {tuple(w.shape)} and dtype '
                f'{w.dtype}')
        if not torch.isfinite(w).all():
            raise CheckpointError(f'{what} {path!r}: {key!r} contains '
                                  'NaN or Inf values')
        layout = _KEY_LAYOUT[key.rsplit('.', 1)[-1]]
        if embedding_size is not None:
            rows_d = w.shape[1] == embedding_size
            cols_d = w.shape[0] == embedding_size
            if not rows_d and not cols_d:
                raise ConfigError(
                    f'{name}: embedding_size={embedding_size} matches no '
                    f'axis of {key!r} {tuple(w.shape)} in {path!r}; it must '
                    'be the teacher embedding dimension (accepted: one of '
                    f'{tuple(w.shape)})')
            if rows_d != cols_d:
                layout = 'CxD' if rows_d else 'DxC'
        if layout == 'DxC':
            w = w.t()
        return w.detach().to(torch.float32).contiguous().clone()

    @property
    def num_classes(self) -> int:
        return self.centers.shape[0]

    @property
    def embedding_size(self) -> int:
        return self.centers.shape[1]

    # ------------------------------------------------------------ checks
    def check_shapes(self, shapes):
        _check_emb_shapes(
            type(self).__name__, shapes, self.embedding_size,
            f'{self.num_classes}×{self.embedding_size} from '
            f'{self.head_checkpoint!r}; if that file stores the transposed '
            'matrix, pass embedding_size=<teacher D>')

    # ------------------------------------------------------------ maths
    def margins(self, t_emb: torch.Tensor,
                labels: torch.Tensor) -> torch.Tensor:
        """Per-sample margins ``m_i`` (B,) from the teacher side (no grad)."""
        with torch.no_grad():
            t = F.normalize(t_emb.detach().to(self.centers.dtype), dim=1)
            d = (t * self.centers[labels]).sum(dim=1)
            d_max = d.max()
            scale = (self.m_max - self.m_min) / d_max.clamp_min(1e-12)
            m = torch.where(d_max > 0, scale * d + self.m_min,
                            torch.full_like(d, self.m_min))
        return m

    def loss(self, s_emb: torch.Tensor, t_emb: torch.Tensor,
             labels: torch.Tensor) -> torch.Tensor:
        labels = check_class_labels(type(self).__name__, labels,
                                    self.num_classes, len(s_emb))
        if s_emb.shape[0] == 0:
            return s_emb.float().sum() * 0.0
        labels, dtype = labels.to(s_emb.device), _compute_dtype(s_emb)
        m = self.margins(t_emb, labels).to(dtype)
        s_n = F.normalize(s_emb.to(dtype), dim=1)
        cos = s_n.matmul(self.centers.to(dtype).t())
        return _margin_cross_entropy(cos, labels, self.s,
                                     lambda cos_y: _arc_target(cos_y, m))

    def extra_repr(self):
        return (f'num_classes={self.num_classes}, '
                f'embedding_size={self.embedding_size}, s={self.s}, '
                f'm_max={self.m_max}, m_min={self.m_min}, '
                + super().extra_repr())


@LOSSES.register_module()
class AdaDistillLoss(BaseDistillLoss):
    """AdaDistill: margin softmax on centres that track teacher embeddings.

    The centres are an adaptive EMA of the teacher's embeddings.

    Boutros, Štruc, Damer, "AdaDistill: Adaptive Knowledge Distillation for
    Deep Face Recognition", ECCV 2024, arXiv 2407.01332, Eqs. 6-8; reference
    code ``fdbtrs/AdaDistill`` ``utils/losses.py`` (``AdaptiveAArcFace``,
    ``AdaptiveACosFace``), followed here. In training mode, under
    ``no_grad`` and **before** the logits are computed, each sample ``i``
    updates its class centre::

        'plain' (Eq. 7):    alpha = clamp(cos(f̂_s,i, f̂_t,i), 1e-6, 1)
        'weighted' (Eq. 8): alpha = clamp(cos(f̂_s,i, f̂_t,i)
                              · clamp(cos(w_{y_i}, f̂_t,i), 1e-6, 1),
                              1e-6, 1)
        w_{y_i} <- alpha · w_{y_i} + (1 - alpha) · f̂_t,i

    then the loss is CE on ArcFace ``s·cos(θ_y + m)`` (plain form, cosine
    clamped before ``acos``, no fallback) or CosFace ``s·(cos θ_y − m)``
    logits between ``f̂_s`` and the L2-normalised (updated) centres. In eval
    mode the centres are not touched. There is no trainable parameter and
    no extra KD term; in a recipe this loss normally **replaces** the
    student's own head (student ``head=None``), as in the reference
    (``train_AdaDistill.py`` trains with the AdaDistill header only).

    kdzoo's deliberate differences from the reference code:

    * One ``alpha`` argument (``'weighted'`` | ``'plain'``) replaces the
      reference's ``adaptive_weighted_alpha`` flag, which fixes its two bugs
      (the trainer passes ``adaptive_alpha=`` to constructors that name it
      ``adaptive_weighted_alpha``; the unweighted branch reads an undefined
      ``self.t_alpha``).
    * Several samples of one class in a batch: the reference's indexed
      assignment keeps one arbitrary write (nondeterministic); kdzoo applies
      the updates **sequentially in batch order** (a later sample sees the
      centre already updated by an earlier one, also in its ``alpha'``),
      computed in rounds so that only duplicates cost extra steps.
    * DDP: the reference lets each rank's centres drift apart; kdzoo
      all-reduces (averages) ``centers`` across ranks after every update
      when ``torch.distributed`` is initialised with world size > 1 (a
      centre updated on one rank only moves by 1/world_size of that
      update). Single process: no-op.
    * Layout: ``centers`` is ``(num_classes, embedding_size)`` (one row per
      class, like kdzoo heads), the transpose of the reference's ``kernel``
      ``(embedding_size, num_classes)``; row normalisation here equals the
      reference's column normalisation.

    State: the buffer ``centers`` (persistent, so it is checkpointed and
    moves with ``.to(device)``), initialised ``N(0, init_std²)`` from the
    global RNG at construction (mmengine seeds it). ``last_alpha`` is the
    batch mean of the EMA coefficients of the last update (``nan`` before
    the first), for logging.

    Args:
        num_classes: number of identities ``C`` (>= 1).
        embedding_size: teacher embedding dimension ``D`` (>= 1).
        s: logit scale (> 0), 64.
        m: margin; ArcFace angle in ``[0, π)`` (reference default 0.45), or
            CosFace cosine margin ``>= 0`` (paper best 0.35; pass it).
        margin: ``'arcface'`` (default) or ``'cosface'``.
        alpha: ``'weighted'`` (alpha', the paper's best, default) or
            ``'plain'``.
        init_std: std of the centres' normal initialisation (0.01).
        loss_weight: multiplier on the returned loss.

    Forward args: ``s_emb`` (B×D), ``t_emb`` (B×D, detached), ``labels``
    (B, long, in ``[0, C)``).
    """

    MARGINS = ('arcface', 'cosface')
    ALPHAS = ('weighted', 'plain')

    def __init__(self, num_classes: int, embedding_size: int, s: float = 64.0,
                 m: float = 0.45, margin: str = 'arcface',
                 alpha: str = 'weighted', init_std: float = 0.01,
                 loss_weight: float = 1.0):
        super().__init__(loss_weight)
        name = type(self).__name__
        self.num_classes = check_int(name, 'num_classes', num_classes)
        self.embedding_size = check_int(name, 'embedding_size',
                                        embedding_size)
        if margin not in self.MARGINS:
            raise ConfigError(f'{name}: margin must be one of '
                              f'{self.MARGINS}, got {margin!r}')
        if alpha not in self.ALPHAS:
            raise ConfigError(f'{name}: alpha must be one of {self.ALPHAS}, '
                              f'got {alpha!r}')
        self.margin = margin
        self.alpha = alpha
        self.s = check_number(name, 's', s, low=0, low_open=True)
        if margin == 'arcface':
            self.m = check_number(name, 'm', m, low=0, high=math.pi,
                                  high_open=True)
        else:
            self.m = check_number(name, 'm', m, low=0)
        init_std = check_number(name, 'init_std', init_std, low=0,
                                low_open=True)
        centers = torch.empty(self.num_classes, self.embedding_size)
        torch.nn.init.normal_(centers, mean=0.0, std=init_std)
        self.register_buffer('centers', centers)
        self._last_alpha: Optional[torch.Tensor] = None

    @property
    def last_alpha(self) -> float:
        """Batch-mean EMA coefficient of the last update (nan before)."""
        if self._last_alpha is None:
            return float('nan')
        return float(self._last_alpha)

    def check_shapes(self, shapes):
        _check_emb_shapes(type(self).__name__, shapes, self.embedding_size,
                          f'embedding_size={self.embedding_size}')

    # ------------------------------------------------------------ update
    @staticmethod
    def _duplicate_rank(labels: torch.Tensor) -> torch.Tensor:
        """For each sample, how many earlier samples share its label."""
        n = labels.numel()
        order = torch.argsort(labels, stable=True)
        sorted_labels = labels[order]
        pos = torch.arange(n, device=labels.device)
        is_first = torch.ones(n, dtype=torch.bool, device=labels.device)
        is_first[1:] = sorted_labels[1:] != sorted_labels[:-1]
        start = torch.cummax(torch.where(is_first, pos, torch.zeros_like(pos)),
                             dim=0).values
        rank = torch.empty_like(pos)
        rank[order] = pos - start
        return rank

    @torch.no_grad()
    def update_centers(self, s_n: torch.Tensor, t_n: torch.Tensor,
                       labels: torch.Tensor) -> torch.Tensor:
        """EMA update of ``centers`` from normalised embeddings; returns the
        per-sample coefficients (B,). Sequential in batch order."""
        s_n = s_n.to(self.centers.dtype)
        t_n = t_n.to(self.centers.dtype)
        agree = (s_n * t_n).sum(dim=1).clamp(-1.0, 1.0)
        alphas = torch.empty_like(agree)
        rank = self._duplicate_rank(labels)
        for r in range(int(rank.max()) + 1 if labels.numel() else 0):
            sel = (rank == r).nonzero().squeeze(1)
            y = labels[sel]
            w = self.centers[y]
            f_t = t_n[sel]
            a = agree[sel]
            if self.alpha == 'weighted':
                lam = (F.normalize(w, dim=1) * f_t).sum(dim=1).clamp(1e-6, 1.0)
                a = a * lam
            a = a.clamp(1e-6, 1.0)
            self.centers.index_copy_(
                0, y, a.unsqueeze(1) * w + (1.0 - a.unsqueeze(1)) * f_t)
            alphas[sel] = a
        self._sync_centers()
        return alphas

    def _sync_centers(self) -> None:
        if world_size() > 1:
            dist.all_reduce(self.centers, op=dist.ReduceOp.SUM)
            self.centers.div_(world_size())

    # ------------------------------------------------------------ forward
    def loss(self, s_emb: torch.Tensor, t_emb: torch.Tensor,
             labels: torch.Tensor) -> torch.Tensor:
        labels = check_class_labels(type(self).__name__, labels,
                                    self.num_classes,
                                    s_emb.shape[0]).to(s_emb.device)
        if s_emb.shape[0] == 0:
            return s_emb.float().sum() * 0.0
        dtype = _compute_dtype(s_emb)
        s_n = F.normalize(s_emb.to(dtype), dim=1)
        if self.training:
            t_n = F.normalize(t_emb.to(dtype), dim=1)
            alphas = self.update_centers(s_n.detach(), t_n, labels)
            self._last_alpha = alphas.mean().detach()
        centers_n = F.normalize(self.centers.to(dtype), dim=1)
        cos = s_n.matmul(centers_n.t())
        if self.margin == 'arcface':
            return _margin_cross_entropy(
                cos, labels, self.s, lambda cos_y: _arc_target(cos_y, self.m))
        return _margin_cross_entropy(cos, labels, self.s,
                                     lambda cos_y: cos_y - self.m)

    def extra_repr(self):
        return (f'num_classes={self.num_classes}, '
                f'embedding_size={self.embedding_size}, s={self.s}, '
                f'm={self.m}, margin={self.margin!r}, alpha={self.alpha!r}, '
                + super().extra_repr())
