"""Age-invariant face recognition terms: train an age-invariant FR model.

These losses train the *age-specialised* teacher of LIAAD (shared reference
``liaad.md`` §2.2: "Teacher 2, T_A": a heavy network trained on FR data WITH
age labels, which supplies the age-invariant knowledge). They are not
distillation terms: they are bound to the trained network's own embedding and
to the data's age label, e.g. in a recipe with no teachers::

    distill_losses=dict(
        loss_age_norm=dict(type='AgeNormRegressionLoss',
                           inputs=dict(s_emb='student.embedding',
                                       ages='data.age')),
        loss_age_adv=dict(type='AgeAdversarialLoss',
                          inputs=dict(s_emb='student.embedding',
                                      ages='data.age')))

kdzoo's age-invariant teacher recipe
(``recipes/teachers/iresnet_age_invariant_synthface_age.py``) uses
:class:`CrossAgeCompactnessLoss` (same-identity pairs pulled together,
weighted by their age gap), which measured better on SynthFaceAge's
cross-age pairs than the general teacher; the OE-CNN and adversarial terms
below, tried first, measured worse there (numbers in the recipe). All three
stay available as plugins.

First method implemented: **OE-CNN**,
Wang, Gong, Zhou, Ji, Wang, Li, Liu, Zhang,
"Orthogonal Deep Features Decomposition for Age-Invariant Face Recognition",
ECCV 2018, arXiv 1810.07599. The deep feature is decomposed into two
orthogonal components, ``x = ||x|| * x_hat``: the **norm** ``||x||`` is made
to carry age (an age regression from the norm), the **direction** ``x_hat``
carries identity (a margin softmax on normalised features). Recognition then
compares directions only, which kdzoo's verification does (cosine of
L2-normalised embeddings), so the age information parked in the norm does not
reach the matcher. Why this method:

* it fits kdzoo's pipeline exactly: kdzoo's margin heads (CosFace, ArcFace)
  already normalise the embedding, so the identity half of OE-CNN is the head
  the general FR teacher is trained with; OE-CNN adds only one scalar loss on
  ``||x||`` and no extra network or change of the backbone;
* it needs nothing but the embedding and the age label (the ``data.age`` tap);
* other discriminative AIFR methods (DAL, CVPR 2019, arXiv 1904.04972; MTLFace,
  CVPR 2021, arXiv 2103.01520) need an extra factorisation module inside the
  backbone and (DAL) a canonical-correlation minimax; they are heavier to
  reproduce faithfully.

OE-CNN alone only gives age a *place* (the norm); nothing forces age out of
the direction. :class:`AgeAdversarialLoss` adds that push: an age-group
classifier on ``x_hat`` trained through a gradient-reversal layer (Ganin &
Lempitsky, "Unsupervised Domain Adaptation by Backpropagation", ICML 2015,
arXiv 1409.7495), in the spirit of DAL's adversarial decorrelation of the
identity feature from age. It is a kdzoo combination, NOT DAL's loss (DAL
decorrelates an identity and an age component with batch canonical
correlation analysis; that is not implemented here).

Age labels: ``ages`` are years (SynthFaceAge: 5..80), long or float. Negative
(``PackFaceInputs`` writes ``-1`` for an unknown age) or non-finite ages are
ignored, so data with and without age labels can be mixed (LIAAD's setting);
a batch without any known age gives a zero loss that still has a graph.
"""
from typing import Optional, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from kdzoo.registry import LOSSES
from kdzoo.utils import ConfigError, check_int, check_number
from .base import BaseDistillLoss, require_ndim


# ---------------------------------------------------------------- helpers
def _check_emb_and_ages(shapes) -> None:
    require_ndim('s_emb', shapes['s_emb'], 2, 'B×D embeddings')
    batch = int(shapes['s_emb'][0])
    if tuple(shapes['ages']) != (batch, ):
        raise ValueError(
            f'ages has shape {tuple(shapes["ages"])} but s_emb has shape '
            f'{tuple(shapes["s_emb"])}; ages must be ({batch},), one age in '
            "years per row: bind it to the data's age, ages='data.age'")


def _known_ages(owner: str, ages: torch.Tensor, device):
    """``(ages as float32, mask of known ages)``; unknown = < 0 or NaN."""
    if not isinstance(ages, torch.Tensor) or ages.dtype == torch.bool or \
            ages.is_complex():
        what = ages.dtype if isinstance(ages, torch.Tensor) else \
            type(ages).__name__
        raise ValueError(f'{owner}: ages must be a real (long or float) '
                         f'tensor of ages in years, got {what}')
    ages = ages.to(device=device, dtype=torch.float32)
    known = torch.isfinite(ages) & (ages >= 0)
    return torch.where(known, ages, torch.zeros_like(ages)), known


class _GradientReversal(torch.autograd.Function):
    """Identity forward; backward multiplies the gradient by ``-lambda``."""

    @staticmethod
    def forward(ctx, x, lam: float):
        ctx.lam = lam
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):
        return -ctx.lam * grad, None


def gradient_reversal(x: torch.Tensor, lam: float = 1.0) -> torch.Tensor:
    """Ganin & Lempitsky's gradient-reversal layer R_lambda (arXiv 1409.7495):
    ``R(x) = x`` forward, ``dR/dx = -lambda * I`` backward."""
    return _GradientReversal.apply(x, float(lam))


# ---------------------------------------------------------------- OE-CNN
@LOSSES.register_module()
class AgeNormRegressionLoss(BaseDistillLoss):
    """OE-CNN age term: the embedding's norm regresses the age.

    Wang et al., "Orthogonal Deep Features Decomposition for Age-Invariant
    Face Recognition", ECCV 2018, arXiv 1810.07599 (OE-CNN), age-related
    component: ``x = ||x|| * x_hat``; the age is regressed from ``||x||``
    with a squared error through a simple mapping ``f`` between the norm and
    the age, while the identity loss sees only ``x_hat`` (kdzoo: the margin
    head, which normalises). No reference code was published; kdzoo writes
    the regression from the paper's description (equation numbers are not
    cited because they could not be re-checked):

    ``L = mean_{i: age known} ( ||x_i|| - (age_scale * age_i + age_offset) )^2``

    i.e. ``f`` is a fixed affine map, written from age to target norm (a
    fixed ``f(n) = (n - age_offset) / age_scale`` from norm to age gives the
    same loss times ``1 / age_scale^2``; that constant, and the paper's
    ``1/2`` of its squared-error form as kdzoo reads it, are absorbed by
    ``loss_weight``). Fixing ``f`` (instead of learning it) avoids the
    trivial solution ``f = const`` that leaves the norm free.

    Choose the targets around the embedding's natural norm: a backbone that
    ends with BatchNorm1d with its scale fixed to 1 (IResNet, insightface)
    gives ``mean ||x||^2 >= D`` in training, so targets far below ``sqrt(D)``
    cannot be met. The defaults suit a 128-d such embedding (``sqrt(128) =
    11.3``) and ages 5..80 (targets 9.5..13.25).

    Args:
        age_scale: norm units per year (> 0).
        age_offset: target norm at age 0 (>= 0).
        loss_weight: multiplier on the returned loss (OE-CNN's balance
            ``lambda`` on the age term).

    Forward args: ``s_emb`` (B×D raw embedding, not normalised), ``ages``
    (B, years, long or float; negative/NaN = unknown, ignored).
    """

    def __init__(self, age_scale: float = 0.05, age_offset: float = 9.25,
                 loss_weight: float = 1.0):
        super().__init__(loss_weight)
        name = type(self).__name__
        self.age_scale = check_number(name, 'age_scale', age_scale, 0,
                                      low_open=True,
                                      what='norm units per year')
        self.age_offset = check_number(name, 'age_offset', age_offset, 0,
                                       what='target norm at age 0')

    def check_shapes(self, shapes):
        _check_emb_and_ages(shapes)

    def target_norm(self, ages: torch.Tensor) -> torch.Tensor:
        """``age_scale * ages + age_offset`` (the regression target)."""
        return self.age_scale * ages + self.age_offset

    def loss(self, s_emb: torch.Tensor, ages: torch.Tensor) -> torch.Tensor:
        ages, known = _known_ages(type(self).__name__, ages, s_emb.device)
        norm = torch.linalg.vector_norm(s_emb.float(), dim=1)
        sq = (norm - self.target_norm(ages)).pow(2)
        count = known.sum()
        loss = torch.where(known, sq, torch.zeros_like(sq)).sum() / \
            count.clamp_min(1)
        return loss

    def extra_repr(self):
        return (f'age_scale={self.age_scale}, age_offset={self.age_offset}, '
                + super().extra_repr())


# ---------------------------------------------------------------- GRL
@LOSSES.register_module()
class AgeAdversarialLoss(BaseDistillLoss):
    """Age-group classifier on the identity direction, behind a GRL.

    A small classifier ``g`` predicts the age group of ``x_hat = x/||x||``;
    ``L = CE(g(R(x_hat)), group(age))`` over the samples with a known age,
    where ``R`` is the gradient-reversal layer of Ganin & Lempitsky (ICML
    2015, arXiv 1409.7495): ``g`` gets the ordinary gradient of the
    cross-entropy (it learns to read age from the direction), the embedding
    gets ``-grl_lambda`` times it (the backbone learns to remove age from
    the direction). This is the adversarial counterpart of OE-CNN's
    decomposition (:class:`AgeNormRegressionLoss` gives age a place in the
    norm; this term pushes it out of the direction), in the spirit of DAL
    (Wang et al., "Decorrelated Adversarial Learning for Age-Invariant Face
    Recognition", CVPR 2019, arXiv 1904.04972), which decorrelates identity
    and age features adversarially. It is a kdzoo combination, not DAL's
    canonical-correlation loss.

    Age groups: ``num_age_groups`` equal bins over ``age_range``; ages
    outside the range fall into the end bins; unknown ages (< 0, NaN) are
    ignored. The returned value is the (positive) cross-entropy times
    ``loss_weight``: watching it rise towards ``log(num_age_groups)`` means
    the direction carries little age information.

    The classifier is trainable and lives in this module (it lands in
    checkpoints and moves with ``.to(device)``). With ``embedding_size``
    given it is created in ``__init__``; with ``None`` it is created by
    :meth:`check_shapes`, which ``FaceDistiller`` calls once at build time,
    before the optimizer is built. Standalone, the first forward creates it
    (on the embedding's device); create it before building an optimizer.

    Args:
        embedding_size: D of ``s_emb``; ``None`` = infer at build time.
        num_age_groups: number of age bins (>= 2).
        age_range: ``(low, high)`` years spanned by the bins, 0 <= low < high.
        grl_lambda: gradient-reversal strength (>= 0; DANN's lambda).
        hidden: hidden width of the classifier ``Linear(D, hidden) - ReLU -
            Linear(hidden, num_age_groups)``; 0 = a linear classifier.
        loss_weight: multiplier on the returned loss (also scales both the
            classifier's and the reversed gradient).

    Forward args: ``s_emb`` (B×D raw embedding), ``ages`` (B, years, long
    or float).
    """

    def __init__(self, embedding_size: Optional[int] = None,
                 num_age_groups: int = 8,
                 age_range: Sequence[float] = (0, 80),
                 grl_lambda: float = 1.0, hidden: int = 64,
                 loss_weight: float = 1.0):
        super().__init__(loss_weight)
        name = type(self).__name__
        if embedding_size is not None:
            embedding_size = check_int(
                name, 'embedding_size', embedding_size, 1,
                'the D of s_emb, or None to infer it')
        self.num_age_groups = check_int(name, 'num_age_groups',
                                        num_age_groups, 2)
        ok = isinstance(age_range, (list, tuple)) and len(age_range) == 2
        if ok:
            try:
                low = check_number(name, 'age_range[0]', age_range[0], 0)
                high = check_number(name, 'age_range[1]', age_range[1])
            except ConfigError:
                ok = False
            else:
                ok = high > low
        if not ok:
            raise ConfigError(f'{name}: age_range must be (low, high) years '
                              f'with 0 <= low < high, got {age_range!r}')
        self.age_range = (low, high)
        self.grl_lambda = check_number(name, 'grl_lambda', grl_lambda, 0,
                                       what='gradient-reversal strength')
        self.hidden = check_int(name, 'hidden', hidden, 0,
                                '0 gives a linear classifier')
        self.embedding_size = embedding_size
        self.classifier: Optional[nn.Module] = None
        if embedding_size is not None:
            self._build_classifier(embedding_size)

    def _build_classifier(self, dim: int, device=None) -> None:
        if self.hidden:
            layers = [nn.Linear(dim, self.hidden), nn.ReLU(inplace=True),
                      nn.Linear(self.hidden, self.num_age_groups)]
        else:
            layers = [nn.Linear(dim, self.num_age_groups)]
        self.classifier = nn.Sequential(*layers).to(device)
        self.embedding_size = dim

    def check_shapes(self, shapes):
        _check_emb_and_ages(shapes)
        dim = int(shapes['s_emb'][1])
        if self.classifier is None:
            self._build_classifier(dim)
        elif dim != self.embedding_size:
            raise ValueError(
                f's_emb has shape {tuple(shapes["s_emb"])} but '
                f'{type(self).__name__} was built for embedding_size='
                f'{self.embedding_size}; set embedding_size={dim} (or None '
                'to infer it) or bind s_emb to a tap of that size')

    def age_groups(self, ages: torch.Tensor) -> torch.Tensor:
        """Bin index in ``[0, num_age_groups)`` of each age (float years)."""
        low, high = self.age_range
        scaled = (ages - low) / (high - low) * self.num_age_groups
        return scaled.floor().clamp(0, self.num_age_groups - 1).long()

    def loss(self, s_emb: torch.Tensor, ages: torch.Tensor) -> torch.Tensor:
        if self.classifier is None and s_emb.dim() == 2:
            self._build_classifier(s_emb.shape[1], s_emb.device)
        ages, known = _known_ages(type(self).__name__, ages, s_emb.device)
        x_hat = F.normalize(s_emb.float(), dim=1)
        logits = self.classifier(gradient_reversal(x_hat, self.grl_lambda))
        ce = F.cross_entropy(logits.float(), self.age_groups(ages),
                             reduction='none')
        loss = torch.where(known, ce, torch.zeros_like(ce)).sum() / \
            known.sum().clamp_min(1)
        return loss

    def extra_repr(self):
        return (f'embedding_size={self.embedding_size}, num_age_groups='
                f'{self.num_age_groups}, age_range={self.age_range}, '
                f'grl_lambda={self.grl_lambda}, hidden={self.hidden}, '
                + super().extra_repr())


# ---------------------------------------------------------------- age gap
@LOSSES.register_module()
class CrossAgeCompactnessLoss(BaseDistillLoss):
    """Pull images of one identity together, the more the larger their age gap.

    The positive half of a contrastive loss on same-identity pairs, weighted
    by the pair's age gap: Bianco, "Large Age-Gap Face Verification by
    Feature Injection in Deep Networks", Pattern Recognition Letters 2017
    (arXiv 1602.06149), fine-tunes an FR network with a contrastive loss on
    large age-gap pairs; kdzoo keeps the identity loss (the margin head,
    which handles negatives) and adds, per batch,

    ``L = sum_{i<j, y_i=y_j} w_ij (1 - cos(x_i, x_j)) / sum w_ij``,
    ``w_ij = min(|a_i - a_j| / age_gap_scale, 1) ** gamma``

    over pairs whose two ages are known (unknown = < 0 or NaN). The weighting
    (``age_gap_scale``, ``gamma``) is kdzoo's reading, not from the paper;
    ``gamma=0`` weighs every positive pair equally (age labels unused).
    A batch with no weighted positive pair gives 0 (with a gradient of 0),
    so batch it with ``IdentityBalancedSampler`` (P identities x K images).

    Args:
        age_gap_scale: gap in years that gets the full weight (> 0).
        gamma: exponent of the weight (>= 0).
        loss_weight: multiplier on the returned loss.

    Forward args: ``s_emb`` (B×D), ``labels`` (B identity labels, bind to
    ``data.label``), ``ages`` (B years, bind to ``data.age``).
    """

    def __init__(self, age_gap_scale: float = 40.0, gamma: float = 1.0,
                 loss_weight: float = 1.0):
        super().__init__(loss_weight)
        name = type(self).__name__
        self.age_gap_scale = check_number(name, 'age_gap_scale',
                                          age_gap_scale, 0, low_open=True,
                                          what='years')
        self.gamma = check_number(name, 'gamma', gamma, 0)

    def check_shapes(self, shapes):
        _check_emb_and_ages(shapes)
        batch = int(shapes['s_emb'][0])
        if tuple(shapes['labels']) != (batch, ):
            raise ValueError(
                f'labels has shape {tuple(shapes["labels"])} but s_emb has '
                f'shape {tuple(shapes["s_emb"])}; labels must be ({batch},): '
                "bind it to the data's identity label, labels='data.label'")

    def pair_weights(self, labels: torch.Tensor, ages: torch.Tensor,
                     known: torch.Tensor) -> torch.Tensor:
        """(B, B) weights ``w_ij`` (0 on the diagonal and lower triangle,
        across identities and where an age is unknown)."""
        gap = (ages[:, None] - ages[None, :]).abs() / self.age_gap_scale
        w = gap.clamp(max=1).pow(self.gamma)
        valid = (labels[:, None] == labels[None, :]) & \
            known[:, None] & known[None, :]
        upper = torch.ones_like(valid).triu(diagonal=1)
        return torch.where(valid & upper, w, torch.zeros_like(w))

    def loss(self, s_emb: torch.Tensor, labels: torch.Tensor,
             ages: torch.Tensor) -> torch.Tensor:
        ages, known = _known_ages(type(self).__name__, ages, s_emb.device)
        w = self.pair_weights(labels.to(s_emb.device), ages, known)
        x = F.normalize(s_emb.to(torch.promote_types(s_emb.dtype,
                                                     torch.float32)), dim=1)
        w = w.to(x.dtype)
        loss = (w * (1 - x @ x.t())).sum() / w.sum().clamp_min(1e-12)
        return loss

    def extra_repr(self):
        return (f'age_gap_scale={self.age_gap_scale}, gamma={self.gamma}, '
                + super().extra_repr())
