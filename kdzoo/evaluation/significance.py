"""Intervals over seeds and test identities, and paired differences.

Each evaluated run leaves ``bootstrap.npz`` beside its ``results.json``:
for every metric key, the values of the same identity-bootstrap
replicates (:mod:`kdzoo.evaluation.bootstrap`; replicate r resamples the
same test identities in every run on that test split). From them:

* the interval of a run name's mean over seeds: a two-level bootstrap,
  replicate r drawing the seeds with replacement and averaging their
  replicate-r values (seeds and test identities both resampled; with one
  seed, the identity interval alone);
* the paired difference of two run names: the mean over their common seeds
  of ``A_s - B_s``; replicate r draws the common seeds with replacement
  and averages ``A_s[r] - B_s[r]`` (paired by seed and by test
  identities). A difference is *better* / *worse* when its 95 % interval
  lies above / below zero, else *not distinguishable*.

With three seeds the seed draws are coarse (the interval may be narrow by a
factor of about sqrt((n-1)/n)); more seeds, tighter statement.
"""
import os
from typing import Dict, List, Optional, Sequence

import numpy as np

from .bootstrap import percentile_interval

__all__ = ['load_samples', 'mean_interval', 'paired_difference',
           'add_intervals', 'run_difference', 'contrast_differences',
           'METHOD_NOTE', 'VERDICTS']

VERDICTS = ('better', 'worse', 'not distinguishable')
METHOD_NOTE = (
    'intervals: 95 % percentile bootstrap resampling test identities '
    '(1000 replicates, the same draws for every run on the test split) and, '
    'with several seeds, the seeds (two-level); differences are paired by '
    'seed and by replicate; better / worse: the 95 % interval of the '
    'difference excludes 0, otherwise not distinguishable')
_SEED = 2024


def load_samples(record: dict) -> Dict[str, np.ndarray]:
    """The bootstrap replicates of a run's record (empty if none)."""
    from kdzoo.engine.runner import bootstrap_file
    work_dir = record.get('work_dir')
    if not work_dir:
        return {}
    path = bootstrap_file(os.path.join(work_dir, 'results.json'))
    if not os.path.isfile(path):
        return {}
    with np.load(path, allow_pickle=False) as data:
        return {k: np.asarray(data[k], np.float64) for k in data.files}


def _two_level(per_seed: Sequence[np.ndarray], seed: int = _SEED):
    """(R,) replicates of the mean over seeds (seeds drawn per replicate)."""
    stack = np.stack([np.asarray(s, np.float64) for s in per_seed])  # n x R
    n, reps = stack.shape
    if n == 1:
        return stack[0]
    rng = np.random.default_rng(seed)
    pick = rng.integers(0, n, size=(reps, n))
    return stack[pick, np.arange(reps)[:, None]].mean(1)


def mean_interval(per_seed: Sequence[np.ndarray]):
    """95 % interval of the mean over seeds (see module doc)."""
    return percentile_interval(_two_level(per_seed))


def paired_difference(a_points: Sequence[float], b_points: Sequence[float],
                      a_samples: Sequence[np.ndarray],
                      b_samples: Sequence[np.ndarray]) -> dict:
    """``{diff, ci95, verdict, seeds}`` of A - B over paired seeds."""
    diff = float(np.mean(np.asarray(a_points) - np.asarray(b_points)))
    reps = _two_level([np.asarray(a) - np.asarray(b)
                       for a, b in zip(a_samples, b_samples)])
    lo, hi = percentile_interval(reps)
    verdict = VERDICTS[0] if lo > 0 else VERDICTS[1] if hi < 0 else \
        VERDICTS[2]
    return dict(diff=diff, ci95=[lo, hi], verdict=verdict,
                seeds=len(a_points))


def _by_seed(records: List[dict], samples: Dict[int, dict], key: str):
    out = {}
    for r in records:
        s = samples.get(id(r), {})
        if key in s and key in r.get('metrics', {}):
            out[r.get('seed')] = (float(r['metrics'][key]), s[key])
    return out


def add_intervals(entries: List[dict], records: Sequence[dict],
                  keys: Sequence[str], baseline: Optional[str] = None,
                  reference: Optional[str] = None) -> None:
    """Give each aggregated entry ``ci95`` (``{key: [lo, hi]}`` of its
    mean) and, for student runs, ``differences``
    (``{against: {key: paired_difference}}``) against the ``baseline`` and
    ``reference`` run names. Entries without bootstrap replicates get
    neither."""
    groups: Dict[str, List[dict]] = {}
    for r in records:
        groups.setdefault(r.get('name'), []).append(r)
    samples = {id(r): load_samples(r) for r in records}
    for e in entries:
        rs = groups.get(e['name'], [])
        e['ci95'] = {}
        for key in keys:
            per = _by_seed(rs, samples, key)
            if per and len(per) == len(rs):
                e['ci95'][key] = list(mean_interval(
                    [v[1] for v in per.values()]))
        if e.get('role') == 'teacher':
            continue
        e['differences'] = {}
        for against in dict.fromkeys(x for x in (baseline, reference) if x):
            if against == e['name'] or against not in groups:
                continue
            diffs = {}
            for key in keys:
                diff = _difference(rs, groups[against], samples, key)
                if diff is not None:
                    diffs[key] = diff
            if diffs:
                e['differences'][against] = diffs


def _difference(a_records, b_records, samples, key):
    a = _by_seed(a_records, samples, key)
    b = _by_seed(b_records, samples, key)
    common = [s for s in a if s in b]
    if len(b) == 1 and len(common) < len(a):
        # trained once (e.g. shared by every seed): pair it with each of
        # A's seeds
        only = next(iter(b.values()))
        b = {s: only for s in a}
        common = list(a)
    if not common:
        return None
    return paired_difference(
        [a[s][0] for s in common], [b[s][0] for s in common],
        [a[s][1] for s in common], [b[s][1] for s in common])


def run_difference(a_records: Sequence[dict], b_records: Sequence[dict],
                   key: str) -> Optional[dict]:
    """Paired difference A - B of ``key`` between two runs given by their
    per-seed records (as ``comparison.json``'s ``runs``), or None where
    either has no bootstrap replicates of it."""
    samples = {id(r): load_samples(r)
               for r in list(a_records) + list(b_records)}
    return _difference(a_records, b_records, samples, key)


def contrast_differences(records: Sequence[dict], contrasts, keys:
                         Sequence[str]) -> List[dict]:
    """``[{a, b, label, differences: {key: paired_difference}}]``: for
    each ``(a, b, label)`` the paired difference a - b of every key both
    runs have replicates of (a run trained once is paired with each of the
    other's seeds, as in :func:`add_intervals`)."""
    groups: Dict[str, List[dict]] = {}
    for r in records:
        groups.setdefault(r.get('name'), []).append(r)
    samples = {id(r): load_samples(r) for r in records}
    out = []
    for a, b, label in contrasts:
        diffs = {}
        for key in keys:
            diff = _difference(groups.get(a, []), groups.get(b, []), samples,
                               key)
            if diff is not None:
                diffs[key] = diff
        out.append(dict(a=a, b=b, label=label, differences=diffs))
    return out
