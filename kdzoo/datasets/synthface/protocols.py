"""Evaluation protocols of the SynthFaceAge test split (deterministic).

Verification protocols follow LFW / AgeDB-30: identities are split into
``num_folds`` disjoint groups; fold f holds m positive then m negative pairs
drawn from group f only, with the same m for every fold, and folds are
stored contiguously, so the metric's unshuffled k-fold split recovers them.

* ``standard`` (LFW-like): positives are same-identity pairs at any ages
  (at most :data:`MAX_PAIRS_PER_FOLD` per fold), negatives random
  different-identity pairs.
* ``cross_age`` (AgeDB-30-like): positives are the same-identity pairs whose
  age gap is at least ``cross_age_gap`` (all of them, trimmed to the
  smallest fold's count); each negative copies the two ages of a positive
  onto two different identities of the fold (their nearest-age images) and
  must also have a gap >= ``cross_age_gap``, so age difference is no cue
  (at most :data:`MAX_PAIRS_PER_FOLD` positives per fold).

These balanced lists serve the k-fold accuracy. Each verification protocol
also carries ``labels`` (and, for ``cross_age``, ``ages`` and
``min_age_gap``) so that TAR@FAR is scored over every pair of the test
identities' images meeting the protocol
(:mod:`kdzoo.evaluation.all_pairs`).

Pairs are distinct within a protocol; m is limited by the eligible negatives
too, so tiny test splits still balance.

Identification ``cross_age`` (FG-NET / MegaFace-like): the gallery is each
test identity's youngest image, probes are its images at least
``cross_age_gap`` years older, and the distractors are the distractor
identities' images, added to the gallery in steps of ``distractor_counts``.
"""
from typing import Dict, List, Tuple

import numpy as np

from kdzoo.utils.errors import ConfigError

__all__ = ['fold_groups', 'standard_pairs', 'cross_age_pairs',
           'cross_age_identification', 'distractor_ladder',
           'build_protocols']

# Upper bound on positive pairs per fold of the pair lists (which serve the
# k-fold accuracy; TAR@FAR uses all pairs).
MAX_PAIRS_PER_FOLD = 1500


def fold_groups(num_identities: int, num_folds: int,
                rng: np.random.Generator) -> List[np.ndarray]:
    """Identity labels of each fold: a random partition, sizes within 1."""
    perm = rng.permutation(num_identities)
    return [np.sort(perm[f::num_folds]) for f in range(num_folds)]


def _by_identity(labels, ages, members):
    """label -> (dataset indices, ages) for the identities in ``members``."""
    out = {}
    for lab in members:
        idx = np.flatnonzero(labels == lab)
        out[int(lab)] = (idx, ages[idx])
    return out


def _same_identity_pairs(groups, min_gap=None):
    """All (i, j), i < j, of one identity's images (gap >= min_gap)."""
    pairs = []
    for idx, age in groups.values():
        i, j = np.triu_indices(len(idx), k=1)
        keep = np.ones(len(i), bool) if min_gap is None else \
            np.abs(age[i] - age[j]) >= min_gap
        pairs.append(np.stack([idx[i[keep]], idx[j[keep]]], 1))
    return np.concatenate(pairs) if pairs else np.zeros((0, 2), np.int64)


def _assemble(pos_folds, neg_folds):
    pairs, issame = [], []
    for p, n in zip(pos_folds, neg_folds):
        pairs += [p, n]
        issame += [np.ones(len(p), bool), np.zeros(len(n), bool)]
    return (np.concatenate(pairs).astype(np.int64),
            np.concatenate(issame))


def _fold_arrays(g):
    """Dataset indices and identity labels of every image of a fold."""
    idx = np.concatenate([v[0] for v in g.values()])
    lab = np.concatenate([np.full(len(v[0]), k) for k, v in g.items()])
    return idx, lab


def _count_cross(idx, lab, ages, min_gap=None):
    """Number of different-identity pairs (with age gap >= min_gap)."""
    if min_gap is None:
        n, counts = len(idx), np.unique(lab, return_counts=True)[1]
        return n * (n - 1) // 2 - int(np.sum(counts * (counts - 1) // 2))

    def pairs_with_gap(a):  # i < j in sorted order with a[j] - a[i] >= gap
        a = np.sort(a)
        first = np.maximum(np.searchsorted(a, a + min_gap, 'left'),
                           np.arange(1, len(a) + 1))
        return int(np.sum(len(a) - first))

    return pairs_with_gap(ages[idx]) - sum(
        pairs_with_gap(ages[idx[lab == k]]) for k in np.unique(lab))


def _cross_candidates(idx, lab, ages, min_gap=None):
    """All different-identity pairs (i < j dataset indices) of a fold."""
    i, j = np.triu_indices(len(idx), k=1)
    ok = lab[i] != lab[j]
    if min_gap is not None:
        ok &= np.abs(ages[idx[i]] - ages[idx[j]]) >= min_gap
    a, b = idx[i[ok]], idx[j[ok]]
    return np.stack([np.minimum(a, b), np.maximum(a, b)], 1)


# Folds up to this many images enumerate their candidate pairs.
_ENUMERATE_MAX = 3000


def standard_pairs(labels, ages, folds, rng) -> Tuple[np.ndarray, np.ndarray]:
    """LFW-like pairs: ``(pairs (P, 2) int64, issame (P,) bool)``."""
    pos, arrays = [], []
    for members in folds:
        g = _by_identity(labels, ages, members)
        arrays.append(_fold_arrays(g))
        pos.append(_same_identity_pairs(g))
    m = min(min(len(p) for p in pos), MAX_PAIRS_PER_FOLD)
    pos_out, neg_out = [], []
    for p, (idx, lab) in zip(pos, arrays):
        pos_out.append(p[np.sort(rng.choice(len(p), m, replace=False))])
        if len(idx) <= _ENUMERATE_MAX:
            cand = _cross_candidates(idx, lab, ages)
            neg_out.append(cand[np.sort(rng.choice(len(cand), m,
                                                   replace=False))])
            continue
        neg, seen = [], set()  # large fold: rejection sampling
        while len(neg) < m:
            a, b = rng.choice(len(idx), 2, replace=False)
            key = (min(idx[a], idx[b]), max(idx[a], idx[b]))
            if lab[a] != lab[b] and key not in seen:
                seen.add(key)
                neg.append(key)
        neg_out.append(np.array(neg, np.int64))
    return _assemble(pos_out, neg_out)


def _nearest(idx, age, target, rng):
    """Index (into idx) of the image whose age is nearest ``target``."""
    d = np.abs(age - target)
    best = np.flatnonzero(d == d.min())
    return best[rng.integers(len(best))] if len(best) > 1 else best[0]


def cross_age_pairs(labels, ages, folds, min_gap, rng, max_tries=100
                    ) -> Tuple[np.ndarray, np.ndarray]:
    """AgeDB-like pairs with age gap >= ``min_gap`` for positives and
    negatives: ``(pairs (P, 2) int64, issame (P,) bool)``."""
    pos, groups, avail = [], [], []
    for f, members in enumerate(folds):
        if len(members) < 2:
            raise ConfigError('SynthFaceAge: a verification fold has fewer '
                              'than 2 identities; raise num_identities to '
                              'at least 2 * num_folds')
        g = _by_identity(labels, ages, members)
        groups.append(g)
        p = _same_identity_pairs(g, min_gap)
        idx, lab = _fold_arrays(g)
        avail.append(_count_cross(idx, lab, ages, min_gap))
        if len(p) == 0 or avail[-1] == 0:
            raise ConfigError(
                f'SynthFaceAge: fold {f} of the test split has no '
                f'{"same" if len(p) == 0 else "different"}-identity pair '
                f'with an age gap >= cross_age_gap={min_gap}; raise '
                'images_per_identity or num_identities, widen age_range or '
                'lower cross_age_gap')
        pos.append(p)
    # every fold gets m positives and m negatives
    m = min(min(len(p) for p in pos), min(avail), MAX_PAIRS_PER_FOLD)
    pos_out, neg_out = [], []
    for p, g, n_avail in zip(pos, groups, avail):
        p = p[np.sort(rng.choice(len(p), m, replace=False))]
        members = np.array(sorted(g))
        idx, lab = _fold_arrays(g)
        cand = _cross_candidates(idx, lab, ages, min_gap) \
            if len(idx) <= _ENUMERATE_MAX else None
        neg, seen = [], set()
        for a, b in p:
            # copy the positive's two ages onto two other identities
            for _ in range(max_tries):
                i1, i2 = rng.choice(members, 2, replace=False)
                (x_idx, x_age), (y_idx, y_age) = g[int(i1)], g[int(i2)]
                x = x_idx[_nearest(x_idx, x_age, ages[a], rng)]
                y = y_idx[_nearest(y_idx, y_age, ages[b], rng)]
                key = (min(x, y), max(x, y))
                if abs(ages[x] - ages[y]) >= min_gap and key not in seen:
                    break
            else:  # nearly exhausted: any unused eligible pair
                key = _unused(cand, seen, idx, lab, ages, min_gap, rng)
            seen.add(key)
            neg.append(key)
        pos_out.append(p)
        neg_out.append(np.array(neg, np.int64).reshape(-1, 2))
    return _assemble(pos_out, neg_out)


def _unused(cand, seen, idx, lab, ages, min_gap, rng):
    if cand is not None:
        free = [k for k in map(tuple, cand.tolist()) if k not in seen]
        return free[rng.integers(len(free))]  # m <= len(cand): never empty
    while True:  # large fold: eligible pairs are plentiful
        a, b = rng.choice(len(idx), 2, replace=False)
        key = (min(idx[a], idx[b]), max(idx[a], idx[b]))
        if lab[a] != lab[b] and key not in seen and \
                abs(ages[idx[a]] - ages[idx[b]]) >= min_gap:
            return key


def distractor_ladder(n: int) -> List[int]:
    """[0, 10, 100, ..., n]: powers of ten below ``n``, then ``n``."""
    ladder, k = [0], 10
    while k < n:
        ladder.append(k)
        k *= 10
    if n > 0:
        ladder.append(int(n))
    return ladder


def cross_age_identification(labels, ages, is_distractor, min_gap
                             ) -> Dict[str, object]:
    """Gallery = youngest image per identity; probes = images >= min_gap
    years older; distractors = every distractor image."""
    gallery, probe = [], []
    for lab in np.unique(labels[~is_distractor]):
        idx = np.flatnonzero((labels == lab) & ~is_distractor)
        g = idx[np.argmin(ages[idx])]
        gallery.append(g)
        probe.extend(idx[ages[idx] - ages[g] >= min_gap].tolist())
    if not probe:
        raise ConfigError(
            f'SynthFaceAge: no test image is cross_age_gap={min_gap} years '
            'older than its identity\'s youngest image; raise '
            'images_per_identity, widen age_range or lower cross_age_gap')
    distractors = np.flatnonzero(is_distractor)
    return dict(gallery=np.array(gallery, np.int64),
                probe=np.array(sorted(probe), np.int64),
                distractors=distractors.astype(np.int64),
                labels=np.asarray(labels, np.int64).copy(),
                distractor_counts=distractor_ladder(len(distractors)))


def build_protocols(labels, ages, is_distractor, num_identities, seed,
                    cross_age_gap=30, num_folds=10):
    """``(verification, identification)`` metainfo dicts of the test split
    (see the module docstring)."""
    labels = np.asarray(labels)
    ages = np.asarray(ages)
    is_distractor = np.asarray(is_distractor, bool)
    rng = np.random.default_rng(np.random.SeedSequence([int(seed), 7919]))
    folds = fold_groups(num_identities, num_folds, rng)
    core = ~is_distractor
    lab_core = np.where(core, labels, -1)
    std = standard_pairs(lab_core, ages, folds, rng)
    cross = cross_age_pairs(lab_core, ages, folds, cross_age_gap, rng)
    # labels/ages: TAR@FAR is scored over all pairs of the test identities'
    # images (distractors take no part); the pair lists serve the accuracy
    verification = {
        'standard': dict(pairs=std[0], issame=std[1], num_folds=num_folds,
                         labels=lab_core.astype(np.int64)),
        'cross_age': dict(pairs=cross[0], issame=cross[1],
                          num_folds=num_folds,
                          labels=lab_core.astype(np.int64),
                          ages=ages.astype(np.int64),
                          min_age_gap=cross_age_gap),
    }
    identification = {
        'cross_age': cross_age_identification(labels, ages, is_distractor,
                                              cross_age_gap)
    }
    return verification, identification
