"""Logit-based distillation losses: KD, DKD, DIST, margin-applied KD."""
import math

import torch
import torch.nn.functional as F

from kdzoo.heads.arcface import arc_margin
from kdzoo.registry import LOSSES
from kdzoo.utils import ConfigError, check_class_labels, check_number
from .base import BaseDistillLoss, require_ndim, require_same_shape


@LOSSES.register_module()
class KDLoss(BaseDistillLoss):
    """Hinton KD: batch-mean KL(softmax(t/tau) || softmax(s/tau)) * tau^2.

    Hinton, Vinyals, Dean, "Distilling the Knowledge in a Neural Network",
    arXiv 1503.02531, Eq. (soft-target cross-entropy) as implemented by
    RepDistiller ``distiller_zoo/KD.py``: ``kl_div(log_softmax(s/T),
    softmax(t/T), 'sum') * T^2 / B``. The tau^2 factor keeps gradient
    magnitudes comparable across temperatures.

    For face recognition the logits need a shared identity set and the
    teacher's classifier (``teacher.logits`` comes from the teacher's head);
    kdzoo's ``*.logits`` taps are margin-free ``s*cos(theta)``.

    Args:
        tau: softmax temperature (RepDistiller default 4).
        loss_weight: multiplier on the returned loss.

    Forward args: ``s_logits`` (B×C), ``t_logits`` (B×C).
    """

    def __init__(self, tau: float = 4.0, loss_weight: float = 1.0):
        super().__init__(loss_weight)
        self.tau = check_number('KDLoss', 'tau', tau, 0, low_open=True)

    def check_shapes(self, shapes):
        _check_logits_and_labels(shapes)

    def loss(self, s_logits: torch.Tensor,
             t_logits: torch.Tensor) -> torch.Tensor:
        log_p_s = F.log_softmax(s_logits.float() / self.tau, dim=1)
        p_t = F.softmax(t_logits.float() / self.tau, dim=1)
        kl = F.kl_div(log_p_s, p_t, reduction='sum') / s_logits.shape[0]
        return kl * self.tau**2

    def extra_repr(self):
        return f'tau={self.tau}, ' + super().extra_repr()


# ---------------------------------------------------------------- helpers
def _check_logits_and_labels(shapes, needs_two_classes: bool = False) -> None:
    """Shape checks shared by the label-aware logit losses."""
    require_ndim('s_logits', shapes['s_logits'], 2, 'B×C logits')
    require_same_shape('s_logits', shapes['s_logits'], 't_logits',
                       shapes['t_logits'],
                       'Student and teacher heads need the same classes '
                       '(same num_classes, same identity order).')
    batch, classes = tuple(shapes['s_logits'])
    if needs_two_classes and classes < 2:
        raise ValueError(f's_logits has {classes} class(es) (shape '
                         f'{tuple(shapes["s_logits"])}); this loss needs at '
                         'least 2 classes (it splits target / non-target).')
    if 'labels' in shapes and tuple(shapes['labels']) != (batch, ):
        raise ValueError(f'labels has shape {tuple(shapes["labels"])} but '
                         f's_logits has shape {tuple(shapes["s_logits"])}; '
                         f'labels must be ({batch},), one class index per '
                         'row (bind labels to the data label, e.g. '
                         "labels='data.label').")


def _kl_from_logs(log_p_t: torch.Tensor,
                  log_p_s: torch.Tensor) -> torch.Tensor:
    """``sum_rows KL(p_t || p_s)`` from log-probabilities (zeros are fine)."""
    return F.kl_div(log_p_s, log_p_t, reduction='sum', log_target=True)


# ---------------------------------------------------------------- DKD
@LOSSES.register_module()
class DKDLoss(BaseDistillLoss):
    """Decoupled KD: warm-up · (alpha·TCKD + beta·NCKD), CE not included.

    Zhao, Cui, Song, Qiu, Liang, "Decoupled Knowledge Distillation", CVPR
    2022, arXiv 2203.08679, Eq. (7) ``KD = TCKD + (1 − p_t^T)·NCKD``
    re-weighted as ``alpha·TCKD + beta·NCKD``; follows mdistiller
    ``mdistiller/distillers/DKD.py`` (the first reference implementation):

    * with ``p = softmax(z/tau)`` and ``y`` the label,
      ``b = [p_y, 1 − p_y]``; ``TCKD = tau²·KL(b^T ‖ b^S)``;
    * ``NCKD = tau²·KL(p̂^T ‖ p̂^S)``, ``p̂`` the softmax over the non-target
      classes only. mdistiller subtracts 1000 from ``z_y/tau`` before the
      softmax; kdzoo drops the target column exactly, which gives the same
      value whenever ``exp(−1000 + spread of z/tau)`` underflows (always for
      face logits ``|z| <= s``);
    * both KLs are summed over the batch and divided by ``B`` (batch mean),
      the log-probabilities of ``b`` are computed with ``logsumexp`` (no
      ``log(0)`` when ``p_y`` underflows);
    * the result is multiplied by ``min((epoch + 1)/warmup, 1)``, where
      ``epoch`` is :meth:`current_epoch` (mmengine's 0-based ``runner.epoch``
      published in the MessageHub). mdistiller's trainer numbers epochs from
      1 and uses ``min(epoch/warmup, 1)``, so ``+1`` reproduces it: the
      first epoch gets ``1/warmup`` (not 0), epoch index ``warmup − 1`` and
      later get 1. ``warmup=0`` disables the ramp. The ramp needs an
      epoch-based loop (with an iteration-based loop the epoch stays 0).

    The cross-entropy term of mdistiller's DKD is not part of this loss: the
    distiller adds the student head's loss.

    Args:
        alpha: TCKD weight (mdistiller CIFAR default 1.0).
        beta: NCKD weight (CIFAR default 8.0; ImageNet 0.5).
        tau: temperature (CIFAR default 4.0; ImageNet 1.0).
        warmup: warm-up length in epochs (CIFAR 20; ImageNet 1); 0 = off.
        loss_weight: multiplier on the returned loss.

    Forward args: ``s_logits`` (B×C), ``t_logits`` (B×C, detached),
    ``labels`` (B, long, in ``[0, C)``); C >= 2.
    """

    def __init__(self, alpha: float = 1.0, beta: float = 8.0,
                 tau: float = 4.0, warmup: float = 20,
                 loss_weight: float = 1.0):
        super().__init__(loss_weight)
        name = type(self).__name__
        self.alpha = check_number(name, 'alpha', alpha, 0)
        self.beta = check_number(name, 'beta', beta, 0)
        self.tau = check_number(name, 'tau', tau, 0, low_open=True)
        self.warmup = check_number(name, 'warmup', warmup, 0,
                                   what='epochs; 0 disables the warm-up')

    def check_shapes(self, shapes):
        _check_logits_and_labels(shapes, needs_two_classes=True)

    def warmup_factor(self) -> float:
        """``min((current_epoch() + 1)/warmup, 1)``, 1 when ``warmup=0``."""
        if self.warmup == 0:
            return 1.0
        return min((self.current_epoch() + 1) / self.warmup, 1.0)

    def loss(self, s_logits: torch.Tensor, t_logits: torch.Tensor,
             labels: torch.Tensor) -> torch.Tensor:
        batch, classes = s_logits.shape
        labels = check_class_labels(type(self).__name__, labels,
                                    classes).to(s_logits.device)
        z_s = s_logits.float() / self.tau
        z_t = t_logits.float() / self.tau
        target = F.one_hot(labels, classes).bool()

        def split(z):
            lse_all = z.logsumexp(dim=1)
            z_y = z.gather(1, labels.unsqueeze(1)).squeeze(1)
            z_other = z[~target].view(batch, classes - 1)
            log_b = torch.stack(
                [z_y - lse_all, z_other.logsumexp(dim=1) - lse_all], dim=1)
            return log_b, F.log_softmax(z_other, dim=1)

        log_b_s, log_q_s = split(z_s)
        log_b_t, log_q_t = split(z_t)
        tckd = _kl_from_logs(log_b_t, log_b_s) / batch * self.tau**2
        nckd = _kl_from_logs(log_q_t, log_q_s) / batch * self.tau**2
        loss = self.alpha * tckd + self.beta * nckd
        return self.warmup_factor() * loss

    def extra_repr(self):
        return (f'alpha={self.alpha}, beta={self.beta}, tau={self.tau}, '
                f'warmup={self.warmup}, ' + super().extra_repr())


# ---------------------------------------------------------------- DIST
def _pearson_rows(a: torch.Tensor, b: torch.Tensor,
                  eps: float) -> torch.Tensor:
    """Row-wise Pearson correlation, torchdistill style: cosine of the
    mean-centred rows with ``eps`` added to the product of the norms."""
    a = a - a.mean(dim=1, keepdim=True)
    b = b - b.mean(dim=1, keepdim=True)
    return (a * b).sum(dim=1) / (a.norm(dim=1) * b.norm(dim=1) + eps)


@LOSSES.register_module()
class DISTLoss(BaseDistillLoss):
    """DIST: beta·(1 − inter-class ρ) + gamma·(1 − intra-class ρ), times tau².

    Huang, You, Wang, Qian, Xu, "Knowledge Distillation from A Stronger
    Teacher", NeurIPS 2022, arXiv 2205.10536, Eqs. (5)-(7) (relation
    matching by Pearson correlation), as torchdistill
    ``torchdistill/losses/mid_level.py:DISTLoss`` (the variant with a
    temperature; the official ``hunto/image_classification_sota`` code is the
    ``tau=1`` case):

    * ``Y = softmax(Z/tau)`` for student and teacher (B×C);
    * ``inter = tau²·(1 − mean_i ρ(Y_s[i,:], Y_t[i,:]))`` (per sample,
      across classes);
    * ``intra = tau²·(1 − mean_c ρ(Y_s[:,c], Y_t[:,c]))`` (per class, across
      the batch);
    * ``loss = beta·inter + gamma·intra``.

    ``ρ`` is the cosine of the mean-centred vectors with ``eps = 1e-8`` added
    to the product of their norms (torchdistill), so a constant vector gives
    ρ = 0 (not NaN): with ``B = 1`` the intra term is ``tau²`` and gets no
    gradient. The intra term needs a reasonably large batch, and over
    thousands of identities most class columns are near-constant.

    Args:
        beta: inter-class (per-sample) weight (torchdistill / official 1.0).
        gamma: intra-class (per-class) weight (1.0).
        tau: temperature (torchdistill ImageNet config 1.0).
        loss_weight: multiplier (torchdistill's ImageNet config uses 2.0 for
            the DIST term next to CE 1.0).

    Forward args: ``s_logits`` (B×C), ``t_logits`` (B×C, detached).
    """

    eps = 1e-8

    def __init__(self, beta: float = 1.0, gamma: float = 1.0,
                 tau: float = 1.0, loss_weight: float = 1.0):
        super().__init__(loss_weight)
        name = type(self).__name__
        self.beta = check_number(name, 'beta', beta, 0)
        self.gamma = check_number(name, 'gamma', gamma, 0)
        self.tau = check_number(name, 'tau', tau, 0, low_open=True)

    def check_shapes(self, shapes):
        _check_logits_and_labels(shapes)

    def loss(self, s_logits: torch.Tensor,
             t_logits: torch.Tensor) -> torch.Tensor:
        y_s = F.softmax(s_logits.float() / self.tau, dim=1)
        y_t = F.softmax(t_logits.float() / self.tau, dim=1)
        inter = 1.0 - _pearson_rows(y_s, y_t, self.eps).mean()
        intra = 1.0 - _pearson_rows(y_s.t(), y_t.t(), self.eps).mean()
        loss = self.tau**2 * (self.beta * inter + self.gamma * intra)
        return loss

    def extra_repr(self):
        return (f'beta={self.beta}, gamma={self.gamma}, tau={self.tau}, '
                + super().extra_repr())


# ---------------------------------------------------------------- margin KD
@LOSSES.register_module()
class MarginKDLoss(BaseDistillLoss):
    """Hinton KD on margin-applied logits (CosFace / ArcFace target margin).

    Hinton et al., arXiv 1503.02531 (soft-target KL times tau²) applied to
    the training logits of a margin head, as GKD (Zhao et al., AAAI 2023,
    arXiv 2304.04462; ``WisonZ/GKD``, CosFace ``s=64, m=0.4`` logits of both
    networks) and MarginDistillation's "margin-based KD with T" (Svitov &
    Alyamkin, arXiv 2003.02586, ``margindistillation/train/train.py`` branch
    ``margin_base_with_T``) distil them.

    kdzoo's ``*.logits`` taps are the margin-free ``s·cos θ`` (see
    ``kdzoo/heads/base.py``), so this loss recovers ``cos θ = logits / s`` and
    replaces the target column of BOTH student and teacher logits:

    * ``'cosface'``: ``s·(cos θ_y − m)`` (CosFace, arXiv 1801.09414);
    * ``'arcface'``: ``s·cos(θ_y + m)`` (ArcFace, arXiv 1801.07698), ``cos θ``
      clamped to ``[-1+1e-7, 1-1e-7]`` first and computed exactly like
      kdzoo's ``ArcFace`` head (:func:`kdzoo.heads.arcface.arc_margin`):
      ``cos θ·cos m − sin θ·sin m``, equal to ``cos(acos(cos θ) + m)``,
      with the head's fallback ``cos θ − sin(π−m)·m`` where ``θ_y + m > π``
      (also insightface's MXNet ArcFace, on which MarginDistillation builds).

    Then ``KL(softmax(t/tau) ‖ softmax(s/tau))·tau²``, batch mean, in
    float32. Non-target logits are unchanged.

    ``s`` MUST equal the scale of the heads that produced the logits
    (student and teacher heads share it, 64 by default); otherwise
    ``logits / s`` is not ``cos θ`` and the margin is mis-scaled. ``m`` is
    usually the heads' margin (CosFace 0.4 as in GKD / insightface, ArcFace
    0.5).

    Args:
        tau: temperature (GKD / margin-KD-with-T: 4.0).
        s: the heads' logit scale (> 0), 64.0.
        m: margin (>= 0): subtracted cosine for cosface, added angle in
            radians (< π) for arcface. 0.4.
        margin: ``'cosface'`` (default, GKD) or ``'arcface'``.
        loss_weight: multiplier on the returned loss.

    Forward args: ``s_logits`` (B×C, margin-free ``s·cos θ``), ``t_logits``
    (B×C, detached), ``labels`` (B, long, in ``[0, C)``).
    """

    MARGINS = ('cosface', 'arcface')
    CLAMP = 1e-7

    def __init__(self, tau: float = 4.0, s: float = 64.0, m: float = 0.4,
                 margin: str = 'cosface', loss_weight: float = 1.0):
        super().__init__(loss_weight)
        name = type(self).__name__
        self.tau = check_number(name, 'tau', tau, 0, low_open=True)
        self.s = check_number(name, 's', s, 0, low_open=True,
                              what="the heads' logit scale")
        self.m = check_number(name, 'm', m, 0)
        if margin not in self.MARGINS:
            raise ConfigError(f'{name}: margin must be one of '
                              f'{list(self.MARGINS)}, got {margin!r}')
        self.margin = margin
        if margin == 'arcface' and self.m >= math.pi:
            raise ConfigError(f'{name}: m is an angle in radians for '
                              f"margin='arcface' and must be < pi, got {m!r}")

    def check_shapes(self, shapes):
        _check_logits_and_labels(shapes)

    def apply_margin(self, logits: torch.Tensor,
                     labels: torch.Tensor) -> torch.Tensor:
        """Float32 logits with the margin applied to each row's label."""
        cos_y = logits.gather(1, labels.unsqueeze(1)).squeeze(1) / self.s
        if self.margin == 'cosface':
            target = cos_y - self.m
        else:
            cos_y = cos_y.clamp(-1.0 + self.CLAMP, 1.0 - self.CLAMP)
            _, target = arc_margin(cos_y, self.m)
        return logits.scatter(1, labels.unsqueeze(1),
                              (self.s * target).unsqueeze(1))

    def loss(self, s_logits: torch.Tensor, t_logits: torch.Tensor,
             labels: torch.Tensor) -> torch.Tensor:
        labels = check_class_labels(type(self).__name__, labels,
                                    s_logits.shape[1]).to(s_logits.device)
        z_s = self.apply_margin(s_logits.float(), labels)
        z_t = self.apply_margin(t_logits.float(), labels)
        log_p_s = F.log_softmax(z_s / self.tau, dim=1)
        log_p_t = F.log_softmax(z_t / self.tau, dim=1)
        kl = _kl_from_logs(log_p_t, log_p_s) / s_logits.shape[0]
        return kl * self.tau**2

    def extra_repr(self):
        return (f'tau={self.tau}, s={self.s}, m={self.m}, '
                f"margin='{self.margin}', " + super().extra_repr())
