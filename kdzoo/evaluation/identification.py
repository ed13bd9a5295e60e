"""Closed-set face identification: rank-1 with distractors, and CMC.

Cosine similarity between L2-normalised embeddings. As in MegaFace-style
protocols, distractors are added to the gallery and never match a probe.
A probe counts as correct at rank r when fewer than r non-matching gallery
identities (each distractor is its own identity) score >= its best matching
gallery entry: ties count against the probe, so results do not depend on
gallery order.
"""
from typing import Dict, Optional, Sequence, Tuple

import numpy as np

from .verification import l2_normalize

__all__ = ['rank1_identification', 'rank1_hits', 'cmc']

_CHUNK = 1 << 24  # similarity entries per probe chunk (128 MB of float64)


def _prepare(gallery_emb, gallery_labels, probe_emb, probe_labels,
             distractor_emb) -> Tuple[np.ndarray, ...]:
    g = np.asarray(gallery_emb)
    p = np.asarray(probe_emb)
    gl = np.asarray(gallery_labels).ravel()
    pl = np.asarray(probe_labels).ravel()
    d = None if distractor_emb is None else np.asarray(distractor_emb)
    for name, x in (('gallery_emb', g), ('probe_emb', p),
                    ('distractor_emb', d)):
        if x is None:
            continue
        if x.ndim != 2 or g.ndim != 2 or x.shape[1] != g.shape[1]:
            raise ValueError(f'{name} must be (N, D) with the gallery\'s D, '
                             f'got {x.shape} (gallery {g.shape})')
        if not np.isfinite(x).all():
            raise ValueError(f'{name} has NaN/inf values')
    if len(gl) != len(g) or len(pl) != len(p):
        raise ValueError(f'labels must match embeddings: gallery {len(g)} vs '
                         f'{len(gl)} labels, probe {len(p)} vs {len(pl)}')
    if len(p) == 0:
        raise ValueError('no probes')
    missing = np.setdiff1d(pl, gl)
    if missing.size:
        raise ValueError(f'{missing.size} probe identities have no gallery '
                         f'entry (e.g. {missing[:5].tolist()}); closed-set '
                         'identification needs every probe identity in the '
                         'gallery')
    d = np.zeros((0, g.shape[1])) if d is None else l2_normalize(d)
    return l2_normalize(g), gl, l2_normalize(p), pl, d


def _identity_max(sim: np.ndarray, gl: np.ndarray):
    """Per probe row, max similarity per gallery identity -> (uniq, S×U)."""
    order = np.argsort(gl, kind='stable')
    uniq, starts = np.unique(gl[order], return_index=True)
    return uniq, np.maximum.reduceat(sim[:, order], starts, axis=1)


def _scores(g, gl, p, pl, d, n_distr: int):
    """Yield per probe chunk: genuine score, gallery identity maxima
    (genuine masked to -inf), distractor similarities (first n_distr)."""
    step = max(1, _CHUNK // max(1, len(g) + n_distr))
    for a in range(0, len(p), step):
        pc, lc = p[a:a + step], pl[a:a + step]
        uniq, idmax = _identity_max(pc @ g.T, gl)
        col = np.searchsorted(uniq, lc)
        rows = np.arange(len(pc))
        genuine = idmax[rows, col].copy()
        idmax[rows, col] = -np.inf
        yield genuine, idmax, pc @ d[:n_distr].T


def rank1_hits(gallery_emb, gallery_labels, probe_emb, probe_labels,
               distractor_emb: Optional[np.ndarray] = None,
               distractor_counts: Sequence[int] = (0, )
               ) -> Dict[int, np.ndarray]:
    """Per probe, whether it is identified at rank 1 with 0..k distractors
    added to the gallery: ``{k: (num_probes,) bool}``.

    For each k in ``distractor_counts`` the gallery is the true gallery plus
    the first k rows of ``distractor_emb``. Raises ``ValueError`` if a probe
    identity has no gallery entry or k exceeds the distractors given.
    """
    g, gl, p, pl, d = _prepare(gallery_emb, gallery_labels, probe_emb,
                               probe_labels, distractor_emb)
    counts = [int(k) for k in distractor_counts]
    if not counts:
        raise ValueError('distractor_counts is empty')
    if min(counts) < 0 or max(counts) > len(d):
        raise ValueError(f'distractor_counts must be in [0, {len(d)}] (the '
                         f'distractors given), got {counts}')
    kmax = max(counts)
    hits = {k: [] for k in counts}
    for genuine, idmax, dsim in _scores(g, gl, p, pl, d, kmax):
        impostor = idmax.max(axis=1) if idmax.shape[1] else \
            np.full(len(genuine), -np.inf)
        # best distractor among the first k, for every k at once
        dbest = np.maximum.accumulate(dsim, axis=1) if kmax else None
        for k in counts:
            worst = impostor if k == 0 else np.maximum(impostor,
                                                       dbest[:, k - 1])
            hits[k].append(genuine > worst)
    return {k: np.concatenate(v) for k, v in hits.items()}


def rank1_identification(gallery_emb, gallery_labels, probe_emb, probe_labels,
                         distractor_emb: Optional[np.ndarray] = None,
                         distractor_counts: Sequence[int] = (0, )
                         ) -> Dict[int, float]:
    """Rank-1 identification rate with 0..k distractors added to the gallery
    (see :func:`rank1_hits`): ``{k: rate}`` as fractions in [0, 1]."""
    hits = rank1_hits(gallery_emb, gallery_labels, probe_emb, probe_labels,
                      distractor_emb, distractor_counts)
    return {k: float(np.mean(h)) for k, h in hits.items()}


def cmc(gallery_emb, gallery_labels, probe_emb, probe_labels,
        ranks: Sequence[int] = (1, 5, 10),
        distractor_emb: Optional[np.ndarray] = None) -> Dict[int, float]:
    """Cumulative match characteristic: ``{r: fraction of probes at rank <=
    r}``, ranking gallery identities (all distractors included)."""
    g, gl, p, pl, d = _prepare(gallery_emb, gallery_labels, probe_emb,
                               probe_labels, distractor_emb)
    ranks = [int(r) for r in ranks]
    if not ranks or min(ranks) < 1:
        raise ValueError(f'ranks must be >= 1, got {ranks}')
    found = []
    for genuine, idmax, dsim in _scores(g, gl, p, pl, d, len(d)):
        g_ = genuine[:, None]
        found.append(1 + (idmax >= g_).sum(1) + (dsim >= g_).sum(1))
    rank = np.concatenate(found)
    return {r: float(np.mean(rank <= r)) for r in ranks}
