"""mmengine metrics for face verification and identification.

Both consume the model's ``val_step``/``test_step`` output, one dict per image
``{'index': int, 'embedding': Tensor (D,)}`` (flip-sum, not normalised), and
read their protocols from the dataset's metainfo (``self.dataset_meta``).

Metric keys (fractions in [0, 1] unless noted), ``<p>`` the protocol name:

* ``<p>/accuracy``, ``<p>/accuracy_std``: k-fold verification accuracy, in
  percent (InsightFace protocol, see :mod:`kdzoo.evaluation.verification`).
* ``<p>/threshold``: mean best squared-L2 threshold over folds.
* ``<p>/TAR@FAR=1e-3`` (FAR written by :func:`far_key`): TAR on cosine
  scores; FARs the pair count cannot support are left out.
* ``<p>/roc_auc``.
* ``<p>/rank1@<k>``: rank-1 identification rate with k distractors.

Not a metric key: after ``compute_metrics``, ``FaceVerificationMetric.curves``
holds ``{<p>: {'far': [...], 'tar': [...]}}``, TAR on a log-spaced FAR grid
(the points the pair count supports). mmengine's metric dict stays scalar;
``kdzoo.engine.runner`` copies the curves into ``results.json``.

A ``prefix`` is prepended as ``<prefix>/<key>`` by mmengine; kdzoo's report
tables expect no prefix (protocol names are already unique per dataset).
"""
from typing import Dict, List, Optional, Sequence, Union

import numpy as np
from mmengine.evaluator import BaseMetric

from kdzoo.registry import METRICS
from kdzoo.utils.checks import check_int
from kdzoo.utils.errors import ConfigError, did_you_mean

from .all_pairs import MIN_FALSE_ACCEPTS, AllPairs, score_all_pairs
from .bootstrap import (bootstrap_kfold_accuracy, bootstrap_rates,
                        bootstrap_tar, bootstrap_tar_pairs, identity_weights,
                        pair_weights_from_identities, percentile_interval)
from .identification import rank1_hits
from .verification import (far_key, l2_normalize, roc_auc, tar_at_far,
                           verification_accuracy)

# All-pairs sets report TAR at FARs up to this (the exact tail at 0.1 would
# hold 30 % of every negative pair; a threshold there says little).
_ALL_PAIRS_MAX_FAR = 1e-2


def _low(fars):
    return [f for f in fars if f <= _ALL_PAIRS_MAX_FAR * (1 + 1e-9)]


__all__ = ['FaceVerificationMetric', 'FaceIdentificationMetric']


def _to_numpy(x) -> np.ndarray:
    if hasattr(x, 'detach'):
        x = x.detach().float().cpu().numpy()
    return np.asarray(x, dtype=np.float32)


class _EmbeddingMetric(BaseMetric):
    """Stores (dataset index, embedding) per image; resolves protocols."""

    default_prefix = ''  # no prefix and no mmengine "prefix not set" warning
    metainfo_key = ''
    metainfo_doc = ''

    def __init__(self, protocols: Union[str, Sequence[str], None] = None,
                 prefix: Optional[str] = None, collect_device: str = 'cpu',
                 collect_dir: Optional[str] = None):
        super().__init__(collect_device=collect_device, prefix=prefix,
                         collect_dir=collect_dir)
        self.protocols = [protocols] if isinstance(protocols, str) else \
            (None if protocols is None else list(protocols))

    def process(self, data_batch, data_samples) -> None:
        """Keep one ``(index, float32 embedding)`` per image."""
        if isinstance(data_samples, dict):  # batched form: B and B×D tensors
            idx = data_samples['index']
            idx = np.asarray(idx.cpu() if hasattr(idx, 'cpu') else idx,
                             dtype=np.int64).ravel()
            emb = _to_numpy(data_samples['embedding'])
            self.results.extend(zip(idx.tolist(), emb))
            return
        for s in data_samples:
            self.results.append((int(s['index']),
                                 _to_numpy(s['embedding']).reshape(-1)))

    def _name(self) -> str:
        return type(self).__name__

    def _selected(self) -> Dict[str, dict]:
        meta = self.dataset_meta or {}
        section = meta.get(self.metainfo_key)
        if not section:
            raise ConfigError(
                f'{self._name()} needs the dataset metainfo key '
                f"'{self.metainfo_key}' ({self.metainfo_doc}), but the "
                f'dataset provides {sorted(meta) or "no metainfo"}. Use a '
                'dataset that defines it (e.g. InsightFaceBinDataset for '
                'verification) or remove this metric from the evaluator.')
        names = self.protocols or list(section)
        for name in names:
            if name not in section:
                raise ConfigError(
                    f"{self._name()}: protocol '{name}' is not in the "
                    f"dataset's metainfo['{self.metainfo_key}'] (has "
                    f'{sorted(section)}).' + did_you_mean(name, section))
        return {name: section[name] for name in names}

    def _lookup(self, results: List) -> tuple:
        """Dedup by index (samplers may pad) -> (index->row map, (N,D))."""
        if not results:
            raise ConfigError(f'{self._name()} received no embeddings; the '
                              "model's val/test step must return dicts with "
                              "'index' and 'embedding'.")
        idx = np.array([r[0] for r in results], dtype=np.int64)
        uniq, first = np.unique(idx, return_index=True)
        if uniq[0] < 0:
            raise ConfigError(f'{self._name()}: got negative dataset index '
                              f'{uniq[0]}; the pipeline must set sample_idx.')
        emb = np.stack([results[i][1] for i in first])
        pos = np.full(int(uniq[-1]) + 1, -1, dtype=np.int64)
        pos[uniq] = np.arange(len(uniq))
        return pos, l2_normalize(emb)

    def _rows(self, pos: np.ndarray, needed: np.ndarray, proto: str):
        needed = np.asarray(needed, dtype=np.int64)
        ok = (needed >= 0) & (needed < len(pos))
        ok[ok] = pos[needed[ok]] >= 0
        if not ok.all():
            miss = np.unique(needed[~ok])
            raise ConfigError(
                f"{self._name()}: protocol '{proto}' needs embeddings of "
                f'{len(np.unique(needed))} dataset indices but {len(miss)} '
                f'were not evaluated (e.g. {miss[:5].tolist()}). Evaluate '
                'the whole dataset: no `indices` subset, no drop_last.')
        return pos[needed]


@METRICS.register_module()
class FaceVerificationMetric(_EmbeddingMetric):
    """Verification: 10-fold accuracy (InsightFace) on the protocol's pair
    list, TAR@FAR and ROC AUC over **all pairs** where identities are known,
    and identity-bootstrap confidence intervals.

    A protocol (``dataset_meta['verification'][name]``) holds ``pairs``
    (P, 2), ``issame`` (P,) and ``num_folds``: the balanced list scored by
    the k-fold accuracy. When it also holds ``labels`` (one identity per
    dataset index, -1 = no part), TAR@FAR, ROC AUC and the curve come from
    every pair of distinct labelled images that meets the protocol
    (``ages`` + ``min_age_gap``: age gap >= that for positives and
    negatives alike; ``image_ids``: duplicates count once), see
    :mod:`kdzoo.evaluation.all_pairs`; without labels they come from the
    pair list.

    Args:
        protocols: names in ``dataset_meta['verification']`` to evaluate
            (default: all).
        fars: FARs for ``TAR@FAR=<far>`` keys; one is reported only when at
            least ``min_false_accepts`` negatives lie above its threshold
            (all-pairs sets: FARs up to 1e-2).
        num_folds: override each protocol's ``num_folds`` (default 10).
        curve_fars: FAR grid of the TAR-vs-FAR curve kept in ``self.curves``
            (not a metric key); default 4 points per decade from 1e-6 to 1,
            same support rule as ``fars``.
        bootstrap: replicates of the identity bootstrap (0: no intervals).
        bootstrap_seed: seed of the replicates (the same for every run, so
            runs on one test split can be compared replicate by replicate).
        min_false_accepts: see ``fars`` (default 10).
        prefix: optional mmengine key prefix.

    Keys: ``<p>/accuracy``, ``<p>/accuracy_std`` (%), ``<p>/threshold``,
    ``<p>/TAR@FAR=<f>``, ``<p>/roc_auc``, ``<p>/num_positives``,
    ``<p>/num_negatives`` (the pairs TAR rests on). Kept aside (not
    scalars, so not in mmengine's metric dict; the runner writes them to
    ``results.json``): ``self.intervals`` ``{<key>_ci95: [low, high]}``,
    ``self.bootstrap_samples`` ``{<key>: (R,) replicates}``,
    ``self.bootstrap_info`` ``{<p>: unit, count, replicates, seed}``.
    """
    metainfo_key = 'verification'
    metainfo_doc = ('protocol name -> dict(pairs=(P, 2) dataset indices, '
                    'issame=(P,) bool, num_folds=10[, labels=(N,) identity '
                    'per dataset index, ages=(N,), min_age_gap=, '
                    'image_ids=(N,)])')

    def __init__(self, protocols=None,
                 fars: Sequence[float] = (1e-1, 1e-2, 1e-3, 1e-4, 1e-5,
                                          1e-6),
                 num_folds: Optional[int] = None,
                 curve_fars: Optional[Sequence[float]] = None,
                 bootstrap: int = 1000, bootstrap_seed: int = 0,
                 min_false_accepts: int = MIN_FALSE_ACCEPTS, prefix=None,
                 **kwargs):
        super().__init__(protocols, prefix, **kwargs)
        self.fars = tuple(float(f) for f in fars)
        self.curve_fars = tuple(float(f) for f in (
            np.logspace(-6, 0, 25) if curve_fars is None else curve_fars))
        for arg, values in (('fars', self.fars),
                            ('curve_fars', self.curve_fars)):
            for f in values:
                if not 0 < f <= 1:
                    raise ConfigError(f'FaceVerificationMetric: {arg} must '
                                      f'be in (0, 1], got {f}')
        self.num_folds = num_folds
        self.bootstrap = check_int('face metric', 'bootstrap', bootstrap, 0)
        self.bootstrap_seed = int(bootstrap_seed)
        self.min_false_accepts = check_int('face metric', 'min_false_accepts',
                                           min_false_accepts, 1)
        # {protocol: {'far': [...], 'tar': [...]}} of the last evaluation
        self.curves: Dict[str, Dict[str, List[float]]] = {}
        self.intervals: Dict[str, List[float]] = {}
        self.bootstrap_samples: Dict[str, np.ndarray] = {}
        self.bootstrap_info: Dict[str, dict] = {}

    def compute_metrics(self, results: list) -> Dict[str, float]:
        protocols = self._selected()
        pos, emb = self._lookup(results)
        out, self.curves = {}, {}
        self.intervals, self.bootstrap_samples = {}, {}
        self.bootstrap_info = {}
        for name, proto in protocols.items():
            try:
                pairs = np.asarray(proto['pairs'], dtype=np.int64)
                issame = np.asarray(proto['issame']).astype(bool)
            except KeyError as e:
                raise ConfigError(
                    f"metainfo['verification']['{name}'] lacks {e}; expected "
                    f'{self.metainfo_doc}') from None
            if pairs.ndim != 2 or pairs.shape[1] != 2 or \
                    len(issame) != len(pairs):
                raise ConfigError(
                    f"metainfo['verification']['{name}']: pairs must be "
                    f'(P, 2) and issame (P,), got {pairs.shape} and '
                    f'{issame.shape}')
            rows = self._rows(pos, pairs.ravel(), name).reshape(-1, 2)
            e1, e2 = emb[rows[:, 0]], emb[rows[:, 1]]
            folds = self.num_folds or int(proto.get('num_folds', 10))
            try:
                res = verification_accuracy(e1, e2, issame, num_folds=folds,
                                            normalize=False)
                scores = np.sum(e1 * e2, axis=1)  # cosine similarity
                ap = self._all_pairs(name, proto, pos, emb)
                if ap is None:
                    tars = tar_at_far(scores, issame, self.fars,
                                      self.min_false_accepts)
                    curve = tar_at_far(scores, issame, self.curve_fars,
                                       self.min_false_accepts)
                    auc = roc_auc(scores, issame)
                    n_pos, n_neg = int(issame.sum()), int((~issame).sum())
                else:  # FARs up to _ALL_PAIRS_MAX_FAR, whatever the size
                    tars = ap.tar_at_far(_low(self.fars),
                                         self.min_false_accepts)
                    curve = ap.tar_at_far(_low(self.curve_fars),
                                          self.min_false_accepts)
                    auc = ap.roc_auc()
                    n_pos, n_neg = ap.num_positives, ap.num_negatives
            except ValueError as e:
                raise ValueError(f"verification protocol '{name}': {e}") \
                    from None
            out[f'{name}/accuracy'] = 100.0 * res.accuracy
            out[f'{name}/accuracy_std'] = 100.0 * res.accuracy_std
            out[f'{name}/threshold'] = res.threshold
            for far, tar in tars.items():
                out[f'{name}/TAR@FAR={far_key(far)}'] = tar
            out[f'{name}/roc_auc'] = auc
            out[f'{name}/num_positives'] = float(n_pos)
            out[f'{name}/num_negatives'] = float(n_neg)
            self.curves[name] = dict(far=list(curve),
                                     tar=list(curve.values()))
            if self.bootstrap:
                self._intervals(name, proto, ap, pairs, issame, scores,
                                np.sum((e1 - e2) ** 2, axis=1), folds)
        return out

    def _all_pairs(self, name, proto, pos, emb) -> Optional[AllPairs]:
        """Every pair of the protocol's labelled images, or None when the
        protocol has no ``labels``."""
        labels = proto.get('labels')
        if labels is None:
            return None
        labels = np.asarray(labels, dtype=np.int64).ravel()
        take = np.flatnonzero(labels >= 0)
        rows = self._rows(pos, take, name)
        ages = proto.get('ages')
        gap = proto.get('min_age_gap')
        if (ages is None) != (gap is None):
            raise ConfigError(
                f"metainfo['verification']['{name}']: give 'ages' and "
                "'min_age_gap' together (or neither)")
        image_ids = proto.get('image_ids')
        exact = _low(self.fars + self.curve_fars)
        return score_all_pairs(
            emb[rows], labels[take],
            None if ages is None else np.asarray(ages).ravel()[take], gap,
            None if image_ids is None else
            np.asarray(image_ids).ravel()[take],
            max_far=max(exact, default=_ALL_PAIRS_MAX_FAR), normalize=False)

    def _intervals(self, name, proto, ap, pairs, issame, scores, dist,
                   folds) -> None:
        """Bootstrap replicates and 95 % intervals of the protocol's keys:
        over identities when they are known, else over pairs."""
        if ap is not None:
            w = identity_weights(ap.num_identities, self.bootstrap,
                                 self.bootstrap_seed)
            labels = np.asarray(proto['labels'], dtype=np.int64).ravel()
            pair_ids = np.searchsorted(ap.identities, labels[pairs])
            known = (labels[pairs] >= 0).all(1) & \
                (ap.identities[np.minimum(pair_ids, len(ap.identities) -
                                          1)] == labels[pairs]).all(1)
            if not known.all():
                raise ConfigError(
                    f"metainfo['verification']['{name}']: {int((~known).sum())}"
                    ' pairs use images without a label; every image of the '
                    "pair list needs one in 'labels'")
            pw = pair_weights_from_identities(w, pair_ids[:, 0],
                                              pair_ids[:, 1])
            tar_reps = bootstrap_tar(ap, w, _low(self.fars),
                                     self.min_false_accepts)
            info = dict(unit='identity', count=ap.num_identities)
        else:
            pw = identity_weights(len(pairs), self.bootstrap,
                                  self.bootstrap_seed)
            tar_reps = bootstrap_tar_pairs(scores, issame, pw, self.fars,
                                           self.min_false_accepts)
            info = dict(unit='pair', count=len(pairs))
        samples = {f'{name}/accuracy': 100.0 * bootstrap_kfold_accuracy(
            dist, issame, pw, folds)}
        for far, reps in tar_reps.items():
            samples[f'{name}/TAR@FAR={far_key(far)}'] = reps
        self._keep(samples)
        self.bootstrap_info[name] = dict(info, replicates=self.bootstrap,
                                         seed=self.bootstrap_seed)

    def _keep(self, samples: Dict[str, np.ndarray]) -> None:
        for key, reps in samples.items():
            self.bootstrap_samples[key] = np.asarray(reps, np.float32)
            self.intervals[f'{key}_ci95'] = list(percentile_interval(reps))


@METRICS.register_module()
class FaceIdentificationMetric(_EmbeddingMetric):
    """Closed-set rank-1 identification with distractors (MegaFace-style).

    Args:
        protocols: names in ``dataset_meta['identification']`` (default all).
        prefix: optional mmengine key prefix.

        bootstrap: replicates of the identity bootstrap (0: no intervals):
            each probe's hit or miss is kept and the probe identities are
            resampled (:mod:`kdzoo.evaluation.bootstrap`).
        bootstrap_seed: seed of the replicates.

    Keys: ``<protocol>/rank1@<k>`` for each of the protocol's
    ``distractor_counts`` (default ``[0]``), as fractions, and
    ``<protocol>/num_probes``; intervals and replicates are kept aside as
    in :class:`FaceVerificationMetric`.
    """

    def __init__(self, protocols=None, bootstrap: int = 1000,
                 bootstrap_seed: int = 0, prefix=None, **kwargs):
        super().__init__(protocols, prefix, **kwargs)
        self.bootstrap = check_int('face metric', 'bootstrap', bootstrap, 0)
        self.bootstrap_seed = int(bootstrap_seed)
        self.intervals: Dict[str, List[float]] = {}
        self.bootstrap_samples: Dict[str, np.ndarray] = {}
        self.bootstrap_info: Dict[str, dict] = {}

    _keep = FaceVerificationMetric._keep
    metainfo_key = 'identification'
    metainfo_doc = ('protocol name -> dict(gallery=, probe=, distractors= '
                    'dataset indices, labels=(len(dataset),) identities, '
                    'distractor_counts=[0, ...])')

    def compute_metrics(self, results: list) -> Dict[str, float]:
        protocols = self._selected()
        pos, emb = self._lookup(results)
        out = {}
        self.intervals, self.bootstrap_samples = {}, {}
        self.bootstrap_info = {}
        for name, proto in protocols.items():
            try:
                gallery = np.asarray(proto['gallery'], dtype=np.int64)
                probe = np.asarray(proto['probe'], dtype=np.int64)
                labels = np.asarray(proto['labels'])
            except KeyError as e:
                raise ConfigError(
                    f"metainfo['identification']['{name}'] lacks {e}; "
                    f'expected {self.metainfo_doc}') from None
            distr = np.asarray(proto.get('distractors', ()), dtype=np.int64)
            counts = [int(k) for k in proto.get('distractor_counts', (0, ))]
            if max(counts, default=0) > len(distr):
                raise ConfigError(
                    f"metainfo['identification']['{name}']: distractor_counts"
                    f' {counts} exceed the {len(distr)} distractors given')
            overlap = np.intersect1d(gallery, probe)
            if overlap.size:
                raise ConfigError(
                    f"metainfo['identification']['{name}']: {overlap.size} "
                    f'indices are both gallery and probe (e.g. '
                    f'{overlap[:5].tolist()}); a probe would match itself')
            distr = distr[:max(counts, default=0)]
            for part in (gallery, probe):
                if part.size and part.max() >= len(labels):
                    raise ConfigError(
                        f"metainfo['identification']['{name}']: labels has "
                        f'{len(labels)} entries but index {part.max()} is '
                        'used; labels must cover every dataset index')
            g = emb[self._rows(pos, gallery, name)]
            p = emb[self._rows(pos, probe, name)]
            d = emb[self._rows(pos, distr, name)] if distr.size else None
            try:
                hits = rank1_hits(g, labels[gallery], p, labels[probe], d,
                                  counts)
            except ValueError as e:
                raise ValueError(f"identification protocol '{name}': {e}") \
                    from None
            for k, hit in hits.items():
                out[f'{name}/rank1@{k}'] = float(np.mean(hit))
            out[f'{name}/num_probes'] = float(len(probe))
            if self.bootstrap:
                ids, probe_ids = np.unique(labels[probe], return_inverse=True)
                w = identity_weights(len(ids), self.bootstrap,
                                     self.bootstrap_seed)
                self._keep({f'{name}/rank1@{k}':
                            bootstrap_rates(hit, probe_ids, w)
                            for k, hit in hits.items()})
                self.bootstrap_info[name] = dict(
                    unit='identity', count=len(ids),
                    replicates=self.bootstrap, seed=self.bootstrap_seed)
        return out
