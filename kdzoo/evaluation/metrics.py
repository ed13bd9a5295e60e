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
from kdzoo.utils.errors import ConfigError, did_you_mean

from .identification import rank1_identification
from .verification import (far_key, l2_normalize, roc_auc, tar_at_far,
                           verification_accuracy)

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
    """Pair verification: 10-fold accuracy (InsightFace), TAR@FAR, ROC AUC.

    Args:
        protocols: names in ``dataset_meta['verification']`` to evaluate
            (default: all).
        fars: FARs for ``TAR@FAR=<far>`` keys (unsupported ones omitted).
        num_folds: override each protocol's ``num_folds`` (default 10).
        curve_fars: FAR grid of the TAR-vs-FAR curve kept in ``self.curves``
            (not a metric key); default 4 points per decade from 1e-6 to 1.
            Points with ``far * negatives < 1`` are left out, as for ``fars``.
        prefix: optional mmengine key prefix.
    """
    metainfo_key = 'verification'
    metainfo_doc = ('protocol name -> dict(pairs=(P, 2) dataset indices, '
                    'issame=(P,) bool, num_folds=10)')

    def __init__(self, protocols=None,
                 fars: Sequence[float] = (1e-1, 1e-2, 1e-3, 1e-4),
                 num_folds: Optional[int] = None,
                 curve_fars: Optional[Sequence[float]] = None, prefix=None,
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
        # {protocol: {'far': [...], 'tar': [...]}} of the last evaluation
        self.curves: Dict[str, Dict[str, List[float]]] = {}

    def compute_metrics(self, results: list) -> Dict[str, float]:
        protocols = self._selected()
        pos, emb = self._lookup(results)
        out, self.curves = {}, {}
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
                tars = tar_at_far(scores, issame, self.fars)
                curve = tar_at_far(scores, issame, self.curve_fars)
                auc = roc_auc(scores, issame)
            except ValueError as e:
                raise ValueError(f"verification protocol '{name}': {e}") \
                    from None
            out[f'{name}/accuracy'] = 100.0 * res.accuracy
            out[f'{name}/accuracy_std'] = 100.0 * res.accuracy_std
            out[f'{name}/threshold'] = res.threshold
            for far, tar in tars.items():
                out[f'{name}/TAR@FAR={far_key(far)}'] = tar
            out[f'{name}/roc_auc'] = auc
            self.curves[name] = dict(far=list(curve),
                                     tar=list(curve.values()))
        return out


@METRICS.register_module()
class FaceIdentificationMetric(_EmbeddingMetric):
    """Closed-set rank-1 identification with distractors (MegaFace-style).

    Args:
        protocols: names in ``dataset_meta['identification']`` (default all).
        prefix: optional mmengine key prefix.

    Keys: ``<protocol>/rank1@<k>`` for each of the protocol's
    ``distractor_counts`` (default ``[0]``), as fractions.
    """
    metainfo_key = 'identification'
    metainfo_doc = ('protocol name -> dict(gallery=, probe=, distractors= '
                    'dataset indices, labels=(len(dataset),) identities, '
                    'distractor_counts=[0, ...])')

    def compute_metrics(self, results: list) -> Dict[str, float]:
        protocols = self._selected()
        pos, emb = self._lookup(results)
        out = {}
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
                rates = rank1_identification(g, labels[gallery], p,
                                             labels[probe], d, counts)
            except ValueError as e:
                raise ValueError(f"identification protocol '{name}': {e}") \
                    from None
            for k, rate in rates.items():
                out[f'{name}/rank1@{k}'] = rate
        return out
