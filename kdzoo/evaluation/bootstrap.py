"""Bootstrap over test identities: confidence intervals for face metrics.

Pairs that share an identity are not independent, so kdzoo resamples
**identities** (a cluster bootstrap), never pairs: replicate r draws the
test identities with replacement and gives each identity the number of
times it was drawn, ``w[r, i]``. A same-identity pair of identity i then
weighs ``w_i``, a pair of identities i and j weighs ``w_i * w_j`` (an
identity drawn twice forms no pairs with its own copy), a probe weighs its
identity's ``w``. Every statistic is recomputed with those weights:

* TAR@FAR (all pairs): the threshold is the weighted analogue of
  :func:`kdzoo.evaluation.verification.tar_at_far`'s, the (k+1)-th largest
  negative with k = floor(far x weighted negatives);
* k-fold accuracy: thresholds chosen on the weighted training folds,
  weighted accuracy on the held-out fold (the folds stay as they are);
* rank-1: each probe's hit or miss against the full gallery is kept, and
  the probes are reweighted (the gallery is not resampled).

The intervals are percentile intervals (2.5 and 97.5 % of the replicates).
The weights depend only on the number of identities and the seed, so every
run evaluated on the same test split sees the same replicates: differences
between two runs can be bootstrapped replicate by replicate (paired).
"""
import math
from typing import Dict, Optional, Sequence, Tuple

import numpy as np

from .all_pairs import AllPairs, far_count, supported_fars
from .verification import kfold_indices

__all__ = ['identity_weights', 'percentile_interval', 'bootstrap_tar',
           'bootstrap_kfold_accuracy', 'bootstrap_rates', 'bootstrap_tar_pairs',
           'pair_weights_from_identities']

_CHUNK_ENTRIES = 1 << 23  # replicate x item entries per chunk (64 MiB f64)
_MAX_TAIL = 1 << 14  # tail entries a replicate scans per FAR


def identity_weights(num_identities: int, replicates: int,
                     seed: int = 0) -> np.ndarray:
    """(replicates, num_identities) draw counts (each row sums to
    ``num_identities``), reproducible from ``seed``."""
    if num_identities < 1 or replicates < 1:
        raise ValueError('need at least one identity and one replicate')
    rng = np.random.default_rng(np.random.SeedSequence([int(seed), 1009]))
    return rng.multinomial(num_identities,
                           np.full(num_identities, 1.0 / num_identities),
                           size=replicates).astype(np.float64)


def percentile_interval(samples, level: float = 0.95) -> Tuple[float, float]:
    """The central ``level`` percentile interval of bootstrap samples."""
    s = np.asarray(samples, dtype=np.float64)
    s = s[np.isfinite(s)]
    if s.size == 0:
        return (math.nan, math.nan)
    a = (1 - level) / 2 * 100
    lo, hi = np.percentile(s, [a, 100 - a])
    return float(lo), float(hi)


def _chunks(reps: int, width: int):
    step = max(1, _CHUNK_ENTRIES // max(1, width))
    for a in range(0, reps, step):
        yield slice(a, min(reps, a + step))


def bootstrap_tar(ap: AllPairs, weights: np.ndarray,
                  fars: Sequence[float], min_false_accepts: int = 10
                  ) -> Dict[float, np.ndarray]:
    """``{far: (R,) TAR per replicate}`` of an all-pairs set; ``weights``
    (R, U) per compact identity of ``ap`` (see module doc).

    A FAR whose tail is longer than 2^14 negatives scans every m-th tail
    negative with weight x m (systematic thinning of the sorted tail; the
    point estimate stays exact).
    """
    w = np.asarray(weights, dtype=np.float64)
    if w.ndim != 2 or w.shape[1] != ap.num_identities:
        raise ValueError(f'weights must be (R, {ap.num_identities}), got '
                         f'{w.shape}')
    total = 0.5 * np.einsum('ri,ri->r', w @ ap.neg_counts, w)
    # positives grouped by identity, each group's scores ascending
    order = np.lexsort((ap.pos_scores, ap.pos_ids))
    pos_sorted = ap.pos_scores[order]
    starts = np.searchsorted(ap.pos_ids[order],
                             np.arange(ap.num_identities + 1))
    pos_total = w @ np.diff(starts).astype(np.float64)
    out = {}
    for far in supported_fars(fars, ap.num_negatives, min_false_accepts):
        if ap.threshold(far) is None:
            continue
        k = np.floor(far * total + 1e-9)
        need = min(len(ap.tail_scores),
                   3 * far_count(far, ap.num_negatives) + 10)
        stride = max(1, math.ceil(need / _MAX_TAIL))
        scores = ap.tail_scores[:need:stride]
        ia, ib = ap.tail_ids[:need:stride].T
        thr = np.full(len(w), np.nan)
        for sl in _chunks(len(w), len(scores)):
            cum = np.cumsum(w[sl][:, ia] * w[sl][:, ib] * stride, axis=1)
            over = cum > k[sl, None]
            found = over[:, -1]
            m = np.argmax(over, axis=1)
            thr[sl] = np.where(found, scores[m], np.nan)
        missing = np.isnan(thr) & (k < total)
        if missing.any():  # replicate needs more of the tail than scanned
            thr[missing] = _threshold_full(ap, w[missing], k[missing])
        thr[k >= total] = -np.inf
        # above[r, i]: positives of identity i scoring above thr[r]
        above = np.empty(w.shape)
        for i in range(ap.num_identities):
            group = pos_sorted[starts[i]:starts[i + 1]]
            above[:, i] = len(group) - np.searchsorted(group, thr, 'right')
        out[far] = np.einsum('ri,ri->r', w, above) / pos_total
    return out


def _threshold_full(ap: AllPairs, w: np.ndarray, k: np.ndarray):
    ia, ib = ap.tail_ids.T
    thr = np.empty(len(w))
    for r in range(len(w)):
        cum = np.cumsum(w[r, ia] * w[r, ib])
        m = int(np.searchsorted(cum, k[r], side='right'))
        if m >= len(cum):
            raise RuntimeError(
                'bootstrap: a replicate needs more negatives than the '
                'all-pairs tail holds; raise tail_margin of score_all_pairs')
        thr[r] = ap.tail_scores[m]
    return thr


def bootstrap_kfold_accuracy(dist: np.ndarray, issame: np.ndarray,
                             pair_weights: np.ndarray, num_folds: int = 10,
                             thresholds: Optional[np.ndarray] = None
                             ) -> np.ndarray:
    """(R,) k-fold verification accuracy per replicate, pairs weighted by
    ``pair_weights`` (R, P): on each fold the threshold maximising the
    weighted accuracy of the other folds (first on ties, as
    :func:`kdzoo.evaluation.verification.verification_accuracy`), then the
    weighted accuracy of the fold; folds averaged (a fold with no weight
    in a replicate is left out of that replicate's mean).

    Pairs are binned by the threshold grid once (bin = number of
    thresholds <= dist: a pair is below threshold k iff its bin <= k), so
    each replicate works on (folds x bins) weight sums, not on pairs."""
    dist = np.asarray(dist, dtype=np.float64)
    issame = np.asarray(issame, bool)
    pw = np.asarray(pair_weights, dtype=np.float64)
    thresholds = (np.arange(0, 4, 0.01) if thresholds is None else
                  np.asarray(thresholds, dtype=np.float64))
    reps, nb = len(pw), len(thresholds) + 1
    bins = np.searchsorted(thresholds, dist, side='right')
    folds = kfold_indices(len(dist), num_folds)
    # hist[f, same, r, b]: weight of fold f's pairs (same / not) in bin b
    hist = np.zeros((len(folds), 2, reps, nb))
    for f, (_, test) in enumerate(folds):
        for same in (0, 1):
            idx = test[issame[test] == bool(same)]
            if len(idx) == 0:
                continue
            idx = idx[np.argsort(bins[idx], kind='stable')]
            b = bins[idx]
            starts = np.flatnonzero(np.r_[True, b[1:] != b[:-1]])
            hist[f, same][:, b[starts]] = np.add.reduceat(
                pw[:, idx], starts, axis=1)
    total = hist.sum(0)
    rows = np.arange(reps)
    acc_sum = np.zeros(reps)
    acc_n = np.zeros(reps)
    for f in range(len(folds)):
        train = total - hist[f]
        below_pos = np.cumsum(train[1], axis=1)  # same, dist < t_k
        below_neg = np.cumsum(train[0], axis=1)
        correct = below_pos + (below_neg[:, -1:] - below_neg)
        k = np.argmax(correct[:, :nb - 1], axis=1)  # first best threshold
        t_pos = np.cumsum(hist[f, 1], axis=1)
        t_neg = np.cumsum(hist[f, 0], axis=1)
        wsum = t_pos[:, -1] + t_neg[:, -1]
        right = t_pos[rows, k] + (t_neg[:, -1] - t_neg[rows, k])
        has = wsum > 0
        acc_sum[has] += right[has] / wsum[has]
        acc_n[has] += 1
    return np.where(acc_n > 0, acc_sum / np.maximum(acc_n, 1), np.nan)


def bootstrap_rates(hits: np.ndarray, item_ids: np.ndarray,
                    weights: np.ndarray) -> np.ndarray:
    """(R,) weighted rate of 0/1 ``hits`` whose identities are
    ``item_ids`` (compact), each replicate weighting by ``weights``."""
    hits = np.asarray(hits, dtype=np.float64)
    w = np.asarray(weights, dtype=np.float64)
    # sum over items = sum over identities of w_i * (hits, count) of i
    u = w.shape[1]
    per_id_hits = np.bincount(item_ids, weights=hits, minlength=u)
    per_id_n = np.bincount(item_ids, minlength=u).astype(np.float64)
    num = w @ per_id_hits
    den = w @ per_id_n
    return np.where(den > 0, num / np.maximum(den, 1e-300), np.nan)


def bootstrap_tar_pairs(scores: np.ndarray, issame: np.ndarray,
                        pair_weights: np.ndarray, fars: Sequence[float],
                        min_false_accepts: int = 10
                        ) -> Dict[float, np.ndarray]:
    """``{far: (R,) TAR}`` of a fixed pair list, pairs weighted by
    ``pair_weights`` (R, P): the weighted threshold rule of
    :func:`bootstrap_tar` on the list's own negatives (for sets whose
    images carry no identity, where pairs are the only unit there is)."""
    scores = np.asarray(scores, dtype=np.float64)
    issame = np.asarray(issame, bool)
    pw = np.asarray(pair_weights, dtype=np.float64)
    neg_order = np.flatnonzero(~issame)[np.argsort(-scores[~issame],
                                                   kind='stable')]
    neg_scores = scores[neg_order]
    pos_idx = np.flatnonzero(issame)
    out = {}
    for far in supported_fars(fars, len(neg_order), min_false_accepts):
        tar = np.empty(len(pw))
        for sl in _chunks(len(pw), len(scores)):
            wn = pw[sl][:, neg_order]
            cum = np.cumsum(wn, axis=1)
            k = np.floor(far * cum[:, -1] + 1e-9)
            over = cum > k[:, None]
            m = np.argmax(over, axis=1)
            thr = np.where(over[:, -1], neg_scores[m], -np.inf)
            wp = pw[sl][:, pos_idx]
            above = scores[pos_idx][None, :] > thr[:, None]
            tar[sl] = np.sum(wp * above, 1) / np.maximum(wp.sum(1), 1e-300)
        out[far] = tar
    return out


def pair_weights_from_identities(weights: np.ndarray, ids_a: np.ndarray,
                                 ids_b: np.ndarray) -> np.ndarray:
    """(R, P) weights of pairs of identities (compact ids): ``w_a`` for a
    same-identity pair, ``w_a * w_b`` otherwise."""
    wt = np.ascontiguousarray(np.asarray(weights, np.float64).T)  # (U, R)
    wa = wt[ids_a]  # row gathers: far faster than column gathers
    out = np.where((ids_a == ids_b)[:, None], wa, wa * wt[ids_b])
    return out.T  # (R, P), column-major
