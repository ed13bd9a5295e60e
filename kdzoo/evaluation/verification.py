"""Face verification metrics: k-fold accuracy, TAR@FAR and ROC (numpy only).

``verification_accuracy`` follows InsightFace's protocol
(``recognition/arcface_torch/eval/verification.py``, itself after FaceNet's
``lfw.py``): squared L2 distance between L2-normalised embeddings, a pair is
predicted "same" when ``dist < threshold``, contiguous (unshuffled) folds, the
threshold is the one with the best accuracy on the other folds (first on
ties) and accuracy is measured on the held-out fold.
"""
import math
from typing import Dict, NamedTuple, Optional, Sequence, Tuple

import numpy as np

__all__ = [
    'VerificationResult', 'verification_accuracy', 'kfold_indices',
    'l2_normalize', 'tar_at_far', 'roc_curve', 'roc_auc', 'far_key'
]


class VerificationResult(NamedTuple):
    """Output of :func:`verification_accuracy` (accuracies as fractions)."""
    accuracy: float  # mean held-out accuracy over folds
    accuracy_std: float  # population std (ddof=0) over folds, as InsightFace
    threshold: float  # mean of the per-fold best thresholds
    fold_accuracies: np.ndarray  # (num_folds,)
    fold_thresholds: np.ndarray  # (num_folds,)


def l2_normalize(x: np.ndarray) -> np.ndarray:
    """Rows divided by their L2 norm in float64; all-zero rows stay zero."""
    x = np.asarray(x, dtype=np.float64)
    norm = np.linalg.norm(x, axis=1, keepdims=True)
    return x / np.where(norm > 0, norm, 1.0)


def kfold_indices(n: int, num_folds: int):
    """Contiguous (train, test) index splits, as sklearn's unshuffled KFold.

    The first ``n % num_folds`` folds get one extra item. ``num_folds == 1``
    trains and tests on everything (InsightFace's ``LFold`` does the same).
    """
    if num_folds < 1 or num_folds > n:
        raise ValueError(f'num_folds must be in [1, {n}] (the pair count), '
                         f'got {num_folds}')
    idx = np.arange(n)
    if num_folds == 1:
        return [(idx, idx)]
    sizes = np.full(num_folds, n // num_folds)
    sizes[:n % num_folds] += 1
    bounds = np.concatenate([[0], np.cumsum(sizes)])
    return [(np.concatenate([idx[:a], idx[b:]]), idx[a:b])
            for a, b in zip(bounds[:-1], bounds[1:])]


def _check_issame(issame, n: int, what: str) -> np.ndarray:
    issame = np.asarray(issame)
    if issame.ndim != 1:
        raise ValueError(f'issame must be 1-D, got shape {issame.shape}')
    if issame.dtype != bool:
        if issame.size and not np.isin(issame, (0, 1)).all():
            raise ValueError('issame must be boolean (or 0/1)')
        issame = issame.astype(bool)
    if len(issame) != n:
        raise ValueError(f'{what} has {n} pairs but issame has '
                         f'{len(issame)} entries')
    n_pos = int(issame.sum())
    if n_pos == 0 or n_pos == n:
        raise ValueError(
            f'verification needs both positive and negative pairs, got '
            f'{n_pos} positive and {n - n_pos} negative')
    return issame


def _check_finite(x: np.ndarray, name: str) -> None:
    if not np.isfinite(x).all():
        bad = np.flatnonzero(~np.isfinite(x).reshape(len(x), -1).all(1))
        raise ValueError(f'{name} has NaN/inf values in {len(bad)} rows '
                         f'(first: {bad[:5].tolist()})')


def verification_accuracy(emb1: np.ndarray, emb2: np.ndarray, issame,
                          num_folds: int = 10,
                          thresholds: Optional[np.ndarray] = None,
                          normalize: bool = True) -> VerificationResult:
    """k-fold verification accuracy as InsightFace's LFW/CFP/AgeDB protocol.

    Args:
        emb1, emb2: (P, D) embeddings of the two images of each pair.
        issame: (P,) bool, True for same-identity pairs.
        num_folds: contiguous folds (10 in the official protocols).
        thresholds: candidate squared-L2 thresholds, default
            ``np.arange(0, 4, 0.01)``; ties go to the first in this order.
        normalize: L2-normalise the embeddings here (in float64, as
            InsightFace's ``sklearn.preprocessing.normalize``). Pass False only
            if the caller already did.

    Returns:
        :class:`VerificationResult` with accuracies as fractions in [0, 1].
    """
    emb1, emb2 = np.asarray(emb1), np.asarray(emb2)
    if emb1.ndim != 2 or emb1.shape != emb2.shape:
        raise ValueError(f'emb1 and emb2 must be (P, D) of equal shape, got '
                         f'{emb1.shape} and {emb2.shape}')
    _check_finite(emb1, 'emb1')
    _check_finite(emb2, 'emb2')
    issame = _check_issame(issame, len(emb1), 'emb1/emb2')
    if normalize:
        emb1, emb2 = l2_normalize(emb1), l2_normalize(emb2)
    dist = np.sum(np.square(emb1.astype(np.float64) - emb2), axis=1)
    thresholds = (np.arange(0, 4, 0.01) if thresholds is None else
                  np.asarray(thresholds, dtype=np.float64).ravel())
    if thresholds.size == 0:
        raise ValueError('thresholds is empty')

    folds = kfold_indices(len(dist), num_folds)
    accs = np.zeros(len(folds))
    best = np.zeros(len(folds))
    for f, (train, test) in enumerate(folds):
        pos = np.sort(dist[train][issame[train]])
        neg = np.sort(dist[train][~issame[train]])
        # correct(t) = #pos with dist < t + #neg with dist >= t, for all t.
        correct = (np.searchsorted(pos, thresholds, side='left') + len(neg) -
                   np.searchsorted(neg, thresholds, side='left'))
        t = thresholds[int(np.argmax(correct))]  # first best, as np.argmax
        pred = dist[test] < t
        accs[f] = np.mean(pred == issame[test])
        best[f] = t
    return VerificationResult(float(accs.mean()), float(accs.std()),
                              float(best.mean()), accs, best)


def _check_scores(scores, issame) -> Tuple[np.ndarray, np.ndarray]:
    scores = np.asarray(scores, dtype=np.float64)
    if scores.ndim != 1:
        raise ValueError(f'scores must be 1-D, got shape {scores.shape}')
    if not np.isfinite(scores).all():
        raise ValueError(f'scores has {int((~np.isfinite(scores)).sum())} '
                         'NaN/inf values')
    return scores, _check_issame(issame, len(scores), 'scores')


def far_key(far: float) -> str:
    """Compact FAR label used in metric keys: 1e-3, 5e-2, 2.5e-4."""
    mant, exp = f'{far:e}'.split('e')
    mant = mant.rstrip('0').rstrip('.')
    return f'{mant}e{int(exp)}'


def tar_at_far(scores, issame,
               fars: Sequence[float] = (1e-1, 1e-2, 1e-3, 1e-4),
               min_false_accepts: int = 1) -> Dict[float, float]:
    """TAR at fixed FARs from similarity scores (higher = same identity).

    Convention: with ``n_neg`` negative pairs and
    ``k = floor(far * n_neg)``, the threshold is the (k+1)-th largest negative
    score (``+inf`` ... ``-inf`` when k = n_neg) and a pair is accepted when
    its score is strictly above it. At most k negatives are accepted, so the
    achieved FAR is <= ``far`` (fewer when negatives tie at the threshold),
    and it is the lowest such threshold, so TAR is the best achievable.
    TAR = fraction of positives strictly above the threshold.

    FARs with ``far * n_neg < min_false_accepts`` are omitted from the
    result: with 1 (the default), those the pair count cannot measure at
    all (LFW's 3000 negatives support 1e-3, not 1e-4); kdzoo's metrics ask
    for 10, so that no reported TAR rests on a handful of impostor scores.
    Returns ``{far: tar}`` in the order given.
    """
    scores, issame = _check_scores(scores, issame)
    neg = np.sort(scores[~issame])[::-1]
    pos = scores[issame]
    out = {}
    for far in fars:
        far = float(far)
        if not 0.0 < far <= 1.0:
            raise ValueError(f'FAR must be in (0, 1], got {far}')
        k = math.floor(far * len(neg) + 1e-9)  # tolerate 1e-3*3000=2.999..
        if k < max(1, min_false_accepts):
            continue
        thr = neg[k] if k < len(neg) else -np.inf
        out[far] = float(np.mean(pos > thr))
    return out


def roc_curve(scores, issame) -> Tuple[np.ndarray, np.ndarray, np.ndarray]:
    """ROC points (fpr, tpr, thresholds) for accepting ``score >= threshold``.

    Thresholds are the distinct scores in decreasing order, preceded by
    ``+inf`` (the (0, 0) point), as ``sklearn.metrics.roc_curve`` without
    dropping intermediate points.
    """
    scores, issame = _check_scores(scores, issame)
    order = np.argsort(-scores, kind='stable')
    s, y = scores[order], issame[order]
    last = np.r_[np.flatnonzero(np.diff(s)), len(s) - 1]  # end of each tie
    tps = np.cumsum(y)[last]
    fps = (last + 1) - tps
    tpr = np.r_[0.0, tps / tps[-1]]
    fpr = np.r_[0.0, fps / fps[-1]]
    return fpr, tpr, np.r_[np.inf, s[last]]


def roc_auc(scores, issame) -> float:
    """Area under the ROC curve (trapezoids; equals the Mann-Whitney U
    statistic with ties counted as one half)."""
    fpr, tpr, _ = roc_curve(scores, issame)
    return float(np.sum(np.diff(fpr) * (tpr[1:] + tpr[:-1]) / 2))
