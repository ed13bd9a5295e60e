"""All-pairs verification (BLUFR / IJB style) over a labelled image set.

A balanced list of a few thousand pairs cannot measure TAR at low FAR: with
3,000 negatives, TAR@FAR=1e-3 rests on the 3 highest impostor scores. Where
the identity of every test image is known, :func:`score_all_pairs` scores
**every** pair of distinct images instead:

* positives: same-identity pairs, negatives: different-identity pairs, both
  restricted by the protocol (``min_age_gap``: the two images' ages differ
  by at least that much, for positives and negatives alike);
* images with label ``-1`` (distractors, unlabelled) take no part, and
  duplicates (the same ``image_ids`` entry, e.g. the same photo packed twice
  into a ``.bin``) count once;
* scores are cosine similarities, computed block by block: memory is
  O(block x N + kept scores), never N x N.

Two passes over the blocks: the first histograms the negative scores and
keeps every positive; the second keeps every negative at or above the
histogram edge below which fewer than ``tail_margin x max_far x negatives``
negatives lie (the *tail*). TAR@FAR uses the exact tail, with the
convention of :func:`kdzoo.evaluation.verification.tar_at_far`; ROC AUC
uses the histograms (bins of 2/65536 in cosine).

The per-identity counts (positives of each identity, eligible negatives of
each pair of identities) are what a bootstrap over identities needs: see
:mod:`kdzoo.evaluation.bootstrap`.
"""
import math
from dataclasses import dataclass, field
from typing import Dict, Optional, Sequence

import numpy as np

from .verification import l2_normalize

__all__ = ['AllPairs', 'score_all_pairs', 'far_count', 'supported_fars',
           'MIN_FALSE_ACCEPTS']

# A TAR@FAR value is reported only when at least this many negatives lie
# above its threshold (far * negatives >= MIN_FALSE_ACCEPTS).
MIN_FALSE_ACCEPTS = 10
_BINS = 1 << 16  # score histogram over [-1, 1]
_BLOCK_ENTRIES = 1 << 22  # scores per block (32 MiB of float64)
# The tail holds at least this many negatives (all of them in small sets,
# where a bootstrap replicate can move the threshold far down the tail).
_MIN_TAIL = 1 << 16


def far_count(far: float, num_negatives: int) -> int:
    """``floor(far * num_negatives)``, tolerant of 1e-3 * 3000 = 2.999..."""
    return math.floor(float(far) * num_negatives + 1e-9)


def supported_fars(fars: Sequence[float], num_negatives: int,
                   min_false_accepts: int = MIN_FALSE_ACCEPTS):
    """The FARs at which at least ``min_false_accepts`` negatives lie above
    the threshold, in the order given."""
    return [float(f) for f in fars
            if far_count(f, num_negatives) >= max(1, min_false_accepts)]


@dataclass
class AllPairs:
    """Scores of all eligible pairs of a labelled set (see module doc).

    ``identities`` are the original labels of the compact identity ids used
    in ``pos_ids``/``tail_ids``/``neg_counts`` (sorted ascending).
    """
    identities: np.ndarray  # (U,) original labels
    pos_scores: np.ndarray  # (P,) float64
    pos_ids: np.ndarray  # (P,) compact identity of each positive pair
    neg_counts: np.ndarray  # (U, U) float64, symmetric, zero diagonal
    num_negatives: int
    tail_scores: np.ndarray  # (K,) descending: every negative >= tail_edge
    tail_ids: np.ndarray  # (K, 2) compact identities of each tail negative
    tail_edge: float
    neg_hist: np.ndarray = field(repr=False)  # (_BINS,) negative counts
    pos_hist: np.ndarray = field(repr=False)  # (_BINS,) positive counts

    @property
    def num_positives(self) -> int:
        return len(self.pos_scores)

    @property
    def num_identities(self) -> int:
        return len(self.identities)

    def threshold(self, far: float) -> Optional[float]:
        """The (k+1)-th largest negative score, k = floor(far * negatives);
        None when the tail does not reach it."""
        k = far_count(far, self.num_negatives)
        if k >= self.num_negatives:
            return -np.inf
        return float(self.tail_scores[k]) if k < len(self.tail_scores) \
            else None

    def tar_at_far(self, fars: Sequence[float],
                   min_false_accepts: int = MIN_FALSE_ACCEPTS
                   ) -> Dict[float, float]:
        """``{far: TAR}`` for the FARs this many negatives support (and the
        tail covers); TAR = fraction of positives strictly above the
        threshold."""
        out = {}
        for far in supported_fars(fars, self.num_negatives,
                                  min_false_accepts):
            thr = self.threshold(far)
            if thr is not None:
                out[far] = float(np.mean(self.pos_scores > thr))
        return out

    def roc_auc(self) -> float:
        """P(positive score > negative score) + P(tie) / 2, with scores
        binned at 2/65536 (ties within a bin count one half)."""
        neg = self.neg_hist / max(1, self.neg_hist.sum())
        pos = self.pos_hist / max(1, self.pos_hist.sum())
        pos_above = np.cumsum(pos[::-1])[::-1] - pos  # strictly higher bins
        return float(np.sum(neg * (pos_above + 0.5 * pos)))


def _bins(scores: np.ndarray) -> np.ndarray:
    q = (scores + 1.0) * (_BINS / 2)  # >= 0 up to rounding: floor = trunc
    return np.clip(q, 0, _BINS - 1).astype(np.int64)


def _edge(b: int) -> float:
    return b * 2.0 / _BINS - 1.0


def _pair_counts(ids: np.ndarray, ages: Optional[np.ndarray], gap,
                 num_ids: int):
    """(U, U) numbers of image pairs between identities meeting the age
    gap (ordered pairs on the diagonal excluded) and (U,) same-identity
    unordered pair counts."""
    if ages is None:
        c = np.bincount(ids, minlength=num_ids).astype(np.float64)
        counts = np.outer(c, c)
        same = c * (c - 1) / 2
    else:
        values, a_idx = np.unique(ages, return_inverse=True)
        if len(values) > 4096:
            raise ValueError(f'ages take {len(values)} distinct values; '
                             'round them (e.g. to whole years) first')
        hist = np.zeros((num_ids, len(values)))
        np.add.at(hist, (ids, a_idx), 1.0)
        ok = (np.abs(values[:, None] - values[None, :]) >= gap).astype(float)
        counts = hist @ ok @ hist.T
        # same identity: ordered pairs i != j meeting the gap, halved
        self_pairs = hist @ np.diag(ok) if gap <= 0 else 0.0
        same = (np.diag(counts) - self_pairs) / 2
    counts = counts.copy()
    np.fill_diagonal(counts, 0.0)
    return counts, same


def score_all_pairs(embeddings, labels, ages=None,
                    min_age_gap: Optional[float] = None,
                    image_ids=None, max_far: float = 1e-2,
                    tail_margin: float = 3.0,
                    dtype=np.float32,
                    normalize: bool = True) -> AllPairs:
    """Score every eligible pair of a labelled set (see module doc).

    Args:
        embeddings: (N, D), one row per image.
        labels: (N,) identity per image, ``-1`` for images that take no
            part (distractors).
        ages, min_age_gap: with both, a pair (positive or negative) counts
            only when ``|age_a - age_b| >= min_age_gap``.
        image_ids: (N,) photo identity; rows sharing one are the same photo
            and count once (the first row is used).
        max_far: the largest FAR that must be exact (the tail is sized
            for it; default 1e-2: at FAR=0.1 the tail would hold 30 % of
            all negatives).
        tail_margin: the tail holds at least this many times
            ``max_far * negatives`` negatives, and at least 65,536 (room
            for a bootstrap).
        dtype: precision of the similarity blocks (float32: the model's
            own precision; float64 for reference computations).
    """
    emb = np.asarray(embeddings)
    labels = np.asarray(labels).ravel()
    if emb.ndim != 2 or len(emb) != len(labels):
        raise ValueError(f'embeddings must be (N, D) with N = len(labels), '
                         f'got {emb.shape} and {labels.shape}')
    if not np.isfinite(emb).all():
        raise ValueError('embeddings have NaN/inf values')
    if (ages is None) != (min_age_gap is None):
        raise ValueError('give ages and min_age_gap together')
    keep = labels >= 0
    if image_ids is not None:
        image_ids = np.asarray(image_ids).ravel()
        if len(image_ids) != len(labels):
            raise ValueError('image_ids must have one entry per image')
        first = np.zeros(len(labels), bool)
        _, idx = np.unique(image_ids, return_index=True)
        first[idx] = True
        keep &= first
    rows = np.flatnonzero(keep)
    identities, ids = np.unique(labels[rows], return_inverse=True)
    ids = ids.astype(np.int64)
    if len(identities) < 2:
        raise ValueError(f'all-pairs verification needs at least 2 '
                         f'identities, got {len(identities)}')
    x = (l2_normalize(emb[rows]) if normalize else emb[rows]).astype(dtype)
    age = None if ages is None else \
        np.asarray(ages, dtype=np.float64).ravel()[rows]
    if age is not None and np.array_equal(age, np.round(age)) and \
            np.abs(age).max() < 2 ** 15:
        age = age.astype(np.int16)  # whole years: exact and 4x lighter
    gap = None if min_age_gap is None else float(min_age_gap)
    n = len(rows)
    u = len(identities)
    counts, same = _pair_counts(ids, age, gap, u)
    num_neg = int(round(np.triu(counts, 1).sum()))
    num_pos = int(round(same.sum()))
    if num_pos == 0 or num_neg == 0:
        raise ValueError(
            f'no {"positive" if num_pos == 0 else "negative"} pair meets '
            'the protocol' + (f' (age gap >= {gap:g})' if gap is not None
                              else '') + f' among {n} images of {u} '
            'identities')

    def blocks():
        step = max(1, _BLOCK_ENTRIES // max(1, n))
        for a in range(0, n, step):
            b = min(n, a + step)
            sim = x[a:b] @ x[a:].T  # rows a..b against columns a..n
            same_id = ids[a:b, None] == ids[None, a:]
            if gap is None:
                ok = np.ones(sim.shape, bool)
            else:
                ok = np.abs(age[a:b, None] - age[None, a:]) >= gap
            ok[:, :b - a] &= np.triu(np.ones((b - a, b - a), bool), 1)
            pos = ok & same_id
            yield a, b, sim, pos, ok ^ pos

    neg_hist = np.zeros(_BINS, np.int64)
    pos_scores, pos_ids = [], []
    for a, b, sim, pos, neg in blocks():
        pos_scores.append(sim[pos].astype(np.float64))
        pos_ids.append(np.broadcast_to(ids[a:b, None], pos.shape)[pos])
        neg_hist += np.bincount(_bins(sim[neg]), minlength=_BINS)
    pos_scores = np.concatenate(pos_scores)
    pos_ids = np.concatenate(pos_ids)
    if int(neg_hist.sum()) != num_neg or len(pos_scores) != num_pos:
        raise AssertionError(  # the two counts are computed independently
            f'pair counts disagree: {neg_hist.sum()} vs {num_neg} '
            f'negatives, {len(pos_scores)} vs {num_pos} positives')

    # tail: every negative >= the edge of the highest bins holding at least
    # `need` negatives
    need = min(num_neg, max(math.ceil(tail_margin * max_far * num_neg) + 1,
                            _MIN_TAIL))
    from_top = np.cumsum(neg_hist[::-1])
    top_bins = int(np.searchsorted(from_top, need)) + 1
    edge_bin = _BINS - top_bins
    edge = -np.inf if edge_bin <= 0 else _edge(edge_bin)
    t_scores, t_a, t_b = [], [], []
    for a, b, sim, _, neg in blocks():
        sel = neg & (sim >= edge) if edge_bin > 0 else neg
        r, c = np.nonzero(sel)
        t_scores.append(sim[r, c].astype(np.float64))
        t_a.append(ids[a + r])
        t_b.append(ids[a + c])
    t_scores = np.concatenate(t_scores)
    order = np.argsort(-t_scores, kind='stable')
    tail_ids = np.stack([np.concatenate(t_a), np.concatenate(t_b)],
                        1)[order].astype(np.int32)
    return AllPairs(
        identities=identities, pos_scores=pos_scores,
        pos_ids=pos_ids.astype(np.int32), neg_counts=counts,
        num_negatives=num_neg, tail_scores=t_scores[order],
        tail_ids=tail_ids, tail_edge=float(edge), neg_hist=neg_hist,
        pos_hist=np.bincount(_bins(pos_scores), minlength=_BINS))
