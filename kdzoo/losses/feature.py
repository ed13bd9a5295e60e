"""Feature-level distillation: FitNets hints, attention transfer, PKT, and
the embedding L2 / cosine losses used as face-KD baselines."""
from typing import Sequence

import torch
import torch.nn.functional as F

from kdzoo.registry import LOSSES
from kdzoo.utils import ConfigError, is_finite_number
from .base import BaseDistillLoss, require_ndim, require_same_shape


def _check_embedding_pair(shapes) -> None:
    """``s_emb`` and ``t_emb``: B×D embeddings of one shape."""
    require_ndim('s_emb', shapes['s_emb'], 2, 'B×D embeddings')
    require_ndim('t_emb', shapes['t_emb'], 2, 'B×D embeddings')
    require_same_shape('s_emb', shapes['s_emb'], 't_emb', shapes['t_emb'],
                       _connector_hint(shapes['t_emb'], 's_emb'))


def _require_same_batch(name_a, shape_a, name_b, shape_b) -> None:
    if len(shape_a) and len(shape_b) and shape_a[0] != shape_b[0]:
        raise ValueError(
            f'{name_a} has shape {tuple(shape_a)} but {name_b} has shape '
            f'{tuple(shape_b)}; their batch sizes (dim 0) must match: bind '
            f'both to taps of the same forward pass')


def _connector_hint(t_shape: Sequence[int], s_arg: str) -> str:
    """The connector that maps the student input ``s_arg`` onto ``t_shape``."""
    if len(t_shape) == 4:
        c, h, w = (int(v) for v in t_shape[1:])
        size = h if h == w else (h, w)
        return ('Put a regressor on the student side: connectors=dict(reg='
                f'dict(type="ConvReg", out_channels={c}, out_size={size})) '
                f'and {s_arg}=dict(tap=<student tap>, connector="reg").')
    if len(t_shape) == 2:
        return ('Put a projector on the student side: connectors=dict(proj='
                f'dict(type="LinearProjector", out_features={int(t_shape[1])}'
                f')) and {s_arg}=dict(tap=<student tap>, connector="proj").')
    return ''


@LOSSES.register_module()
class FitNetLoss(BaseDistillLoss):
    """FitNets hint loss: ``mean((s_feat - t_feat)^2)`` over all elements.

    Romero, Ballas, Kahou, Chassang, Gatta, Bengio, "FitNets: Hints for Thin
    Deep Nets", ICLR 2015, arXiv 1412.6550, Eq. 3
    (``L_HT = 1/2 ||u_h(x) - r(v_g(x))||^2``) as implemented by RepDistiller
    ``distiller_zoo/FitNet.py:HintLoss``: ``nn.MSELoss()``, i.e. the mean over
    every element (B·C·H·W, or B·D for embeddings), without the 1/2. The
    regressor ``r`` is a connector on the student side (``ConvReg`` for maps,
    ``LinearProjector`` for embeddings) so that both shapes match. Training
    is single-stage (as in the benchmarks), not the paper's two stages.

    RepDistiller/mdistiller train with weight beta = 100 (``-b 100``,
    ``FITNET.LOSS.FEAT_WEIGHT``): that is a recipe setting
    (``loss_weight=100``), the class default stays 1. TFace's EKD baseline
    applies the same bare MSE to 512-d embeddings (2-D inputs accepted).

    Args:
        loss_weight: multiplier on the returned loss.

    Forward args: ``s_feat``, ``t_feat``: same shape, B×C×H×W maps or B×D
    embeddings; the teacher side is detached.
    """

    def check_shapes(self, shapes):
        s, t = shapes['s_feat'], shapes['t_feat']
        for name, shape in (('s_feat', s), ('t_feat', t)):
            if len(shape) not in (2, 4):
                raise ValueError(
                    f'{name} must be B×C×H×W feature maps (4-D) or B×D '
                    f'embeddings (2-D), got shape {tuple(shape)}')
        require_same_shape('s_feat', s, 't_feat', t,
                           _connector_hint(t, 's_feat'))

    def loss(self, s_feat: torch.Tensor,
             t_feat: torch.Tensor) -> torch.Tensor:
        loss = F.mse_loss(s_feat.float(), t_feat.float())
        return loss


@LOSSES.register_module()
class ATLoss(BaseDistillLoss):
    """Attention transfer between one pair of feature maps.

    Zagoruyko & Komodakis, "Paying More Attention to Attention", ICLR 2017,
    arXiv 1612.03928, Eq. 2. Spatial attention of a map ``A`` (B×C×H×W):
    ``Q = vec(F(A))`` with ``F = mean_c |A_c|^p`` (``code``) or
    ``sum_c |A_c|^p`` (``paper``), L2-normalised per sample (after the
    normalisation mean and sum give the same ``Q̂``). ``|A|`` is used so odd
    ``p`` works (RepDistiller's ``f.pow(p)`` equals it for even ``p``).

    * ``mode='code'`` (default; RepDistiller ``distiller_zoo/AT.py``, the
      authors' ``utils.py``): ``loss = mean_{i,k} (Q̂_s[i,k] - Q̂_t[i,k])^2``,
      the mean over B·H·W.
    * ``mode='paper'`` (torchdistill ``ATLoss(mode='paper')``): ``loss =
      (1/B) Σ_i ||Q̂_s[i] - Q̂_t[i]||_2``, the per-sample L2 distance averaged
      over the batch. Eq. 2 writes ``(β/2) Σ_j ||Q̂_S^j - Q̂_T^j||_p`` summed
      over stage pairs ``j`` with p = 2; kdzoo takes one pair per loss
      (declare one ``ATLoss`` per stage), uses the L2 norm regardless of the
      attention exponent ``p``, and leaves ``β/2`` to ``loss_weight``.

    If the spatial sizes differ, the larger map is adaptive-average-pooled to
    the smaller size before the attention is taken (RepDistiller pools to
    the smaller H as a square; kdzoo pools H and W each to the smaller one,
    the same for square maps), in both modes. Channel counts may differ.
    RepDistiller/mdistiller use beta = 1000 per stage with ``mode='code'``
    (a recipe ``loss_weight``, not the class default).

    Args:
        p: exponent of the attention map (paper and RepDistiller: 2); >= 1.
        mode: ``'code'`` or ``'paper'``, see above.
        loss_weight: multiplier on the returned loss.

    Forward args: ``s_feat`` (B×C_s×H_s×W_s), ``t_feat`` (B×C_t×H_t×W_t);
    the teacher side is detached.
    """

    MODES = ('code', 'paper')

    def __init__(self, p: float = 2.0, mode: str = 'code',
                 loss_weight: float = 1.0):
        super().__init__(loss_weight)
        if not is_finite_number(p) or p < 1:
            raise ConfigError(f'ATLoss: p must be a finite number >= 1 (the '
                              f'attention exponent, usually 2), got {p!r}')
        if mode not in self.MODES:
            raise ConfigError(f'ATLoss: mode must be one of {self.MODES}, '
                              f'got {mode!r}')
        self.p = float(p)
        self.mode = mode

    def check_shapes(self, shapes):
        s, t = shapes['s_feat'], shapes['t_feat']
        require_ndim('s_feat', s, 4, 'B×C×H×W feature maps')
        require_ndim('t_feat', t, 4, 'B×C×H×W feature maps')
        _require_same_batch('s_feat', s, 't_feat', t)

    def _attention(self, f: torch.Tensor) -> torch.Tensor:
        a = f.abs().pow(self.p)
        a = a.mean(1) if self.mode == 'code' else a.sum(1)
        return F.normalize(a.flatten(1), dim=1)

    def loss(self, s_feat: torch.Tensor,
             t_feat: torch.Tensor) -> torch.Tensor:
        s, t = s_feat.float(), t_feat.float()
        size = (min(s.shape[2], t.shape[2]), min(s.shape[3], t.shape[3]))
        if tuple(s.shape[2:]) != size:
            s = F.adaptive_avg_pool2d(s, size)
        if tuple(t.shape[2:]) != size:
            t = F.adaptive_avg_pool2d(t, size)
        diff = self._attention(s) - self._attention(t)
        if self.mode == 'code':
            loss = diff.pow(2).mean()
        else:
            loss = torch.linalg.vector_norm(diff, dim=1).mean()
        return loss

    def extra_repr(self):
        return f'p={self.p}, mode={self.mode!r}, ' + super().extra_repr()


@LOSSES.register_module()
class PKTLoss(BaseDistillLoss):
    """Probabilistic knowledge transfer: KL between cosine-kernel affinities.

    Passalis & Tefas, "Learning Deep Representations with Probabilistic
    Knowledge Transfer", ECCV 2018, arXiv 1803.10837, §3: conditional
    probabilities ``p_{i|j} = K(x_i, x_j) / Σ_k K(x_k, x_j)`` and the KL
    divergence between the teacher's and the student's, with the cosine
    kernel ``K(a, b) = (cos(a, b) + 1) / 2``, as implemented by RepDistiller
    ``distiller_zoo/PKT.py``:

    1. ``x̂ = x / (||x||_2 + eps)`` per sample, NaNs set to 0;
    2. ``P = (x̂ x̂ᵀ + 1) / 2`` (B×B), each row divided by its sum (the
       diagonal included);
    3. ``loss = mean_{i,j} P_t[i,j] · log((P_t[i,j] + eps) / (P_s[i,j] +
       eps))``, the mean over all B² entries (so values are tiny; RepDistiller
       and mdistiller weight it by 30000, a recipe ``loss_weight``).

    Inputs with more than two dims (feature maps) are flattened to B×-1.
    The student and teacher dimensions may differ (only the B×B affinities
    are compared).

    Args:
        eps: floor in the normalisation and inside the log (> 0).
        loss_weight: multiplier on the returned loss.

    Forward args: ``s_emb`` (B×D_s), ``t_emb`` (B×D_t); the teacher side is
    detached.
    """

    def __init__(self, eps: float = 1e-7, loss_weight: float = 1.0):
        super().__init__(loss_weight)
        if not is_finite_number(eps) or eps <= 0:
            raise ConfigError(f'PKTLoss: eps must be a finite number > 0 '
                              f'(RepDistiller: 1e-7), got {eps!r}')
        self.eps = float(eps)

    def check_shapes(self, shapes):
        s, t = shapes['s_emb'], shapes['t_emb']
        for name, shape in (('s_emb', s), ('t_emb', t)):
            if len(shape) < 2:
                raise ValueError(
                    f'{name} must be B×D embeddings (2-D) or B×C×H×W maps '
                    f'(flattened), got shape {tuple(shape)}')
        _require_same_batch('s_emb', s, 't_emb', t)

    def _affinity(self, x: torch.Tensor) -> torch.Tensor:
        x = x.flatten(1)
        x = x / (x.norm(dim=1, keepdim=True) + self.eps)
        x = torch.where(torch.isnan(x), torch.zeros_like(x), x)
        k = (x @ x.t() + 1.0) / 2.0
        return k / k.sum(dim=1, keepdim=True)

    def loss(self, s_emb: torch.Tensor,
             t_emb: torch.Tensor) -> torch.Tensor:
        p_s = self._affinity(s_emb.float())
        p_t = self._affinity(t_emb.float())
        loss = (p_t * torch.log((p_t + self.eps) / (p_s + self.eps))).mean()
        return loss

    def extra_repr(self):
        return f'eps={self.eps}, ' + super().extra_repr()


@LOSSES.register_module()
class EmbeddingL2Loss(BaseDistillLoss):
    """Squared L2 distance between student and teacher embeddings.

    AdaDistill (Boutros, Štruc, Damer, ECCV 2024, arXiv 2407.01332), Eq. 2
    ("Vanilla KD", the feature-distillation baseline):
    ``L = (1/B) Σ_i ||f_s,i - f_t,i||_2^2`` (``reduction='sum_mean'``, the
    default). ``reduction='mean'`` divides by B·D instead, i.e.
    ``nn.MSELoss()`` as in RepDistiller/TFace ``HintLoss`` (the 1/D factor
    silently shrinks the weight: 1/512 for face embeddings).

    ``normalize=True`` L2-normalises both embeddings first; with
    ``'sum_mean'`` the loss is then ``mean_i 2·(1 - cos(f_s,i, f_t,i))``
    (GKD's ``fitnet.py`` equals it up to its 1/(2T) factor). Unnormalised L2
    depends on the embedding norms of both networks.

    Args:
        normalize: L2-normalise both embeddings before the distance.
        reduction: ``'sum_mean'`` (sum over D, mean over B) or ``'mean'``
            (mean over B·D).
        loss_weight: multiplier on the returned loss.

    Forward args: ``s_emb`` (B×D), ``t_emb`` (B×D); the teacher side is
    detached.
    """

    REDUCTIONS = ('sum_mean', 'mean')

    def __init__(self, normalize: bool = False, reduction: str = 'sum_mean',
                 loss_weight: float = 1.0):
        super().__init__(loss_weight)
        if not isinstance(normalize, bool):
            raise ConfigError(f'EmbeddingL2Loss: normalize must be True or '
                              f'False, got {normalize!r}')
        if reduction not in self.REDUCTIONS:
            raise ConfigError(f'EmbeddingL2Loss: reduction must be one of '
                              f'{self.REDUCTIONS}, got {reduction!r}')
        self.normalize = normalize
        self.reduction = reduction

    def check_shapes(self, shapes):
        _check_embedding_pair(shapes)

    def loss(self, s_emb: torch.Tensor,
             t_emb: torch.Tensor) -> torch.Tensor:
        s, t = s_emb.float(), t_emb.float()
        if self.normalize:
            s, t = F.normalize(s, dim=1), F.normalize(t, dim=1)
        sq = (s - t).pow(2)
        loss = sq.sum(1).mean() if self.reduction == 'sum_mean' else sq.mean()
        return loss

    def extra_repr(self):
        return (f'normalize={self.normalize}, reduction={self.reduction!r}, '
                + super().extra_repr())


@LOSSES.register_module()
class CosineEmbeddingLoss(BaseDistillLoss):
    """Cosine distance between embeddings: ``mean_i (1 - cos(f_s,i, f_t,i))``.

    The "cosine" feature-KD baseline of TFace's EKD tasks
    (``recognition/tasks/ekd/distillation/cosine_distance.py``), equal to
    ShrinkTeaNet's angular distillation (Duong et al., arXiv 1905.10620,
    Eq. 4) with exponent 1 as in its public re-implementations (for the
    paper's squared form use ``AngularDistillationLoss``). Scale-invariant:
    only the direction of each embedding is transferred.

    Not to be confused with ``torch.nn.CosineEmbeddingLoss`` (a pair-label
    loss); ``LOSSES.build(dict(type='CosineEmbeddingLoss'))`` gives this one.

    Args:
        loss_weight: multiplier (ShrinkTeaNet alpha = 1).

    Forward args: ``s_emb`` (B×D), ``t_emb`` (B×D); the teacher side is
    detached.
    """

    eps = 1e-8

    def check_shapes(self, shapes):
        _check_embedding_pair(shapes)

    def loss(self, s_emb: torch.Tensor,
             t_emb: torch.Tensor) -> torch.Tensor:
        cos = F.cosine_similarity(s_emb.float(), t_emb.float(),
                                  dim=1, eps=self.eps)
        return (1.0 - cos).mean()
