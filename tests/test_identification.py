"""Rank-1 identification with distractors, CMC and FaceIdentificationMetric."""
import numpy as np
import pytest
import torch

from kdzoo.evaluation import FaceIdentificationMetric, cmc, \
    rank1_identification
from kdzoo.registry import METRICS
from kdzoo.utils.errors import ConfigError


def at(deg):
    r = np.deg2rad(np.asarray(deg, float))
    return np.stack([np.cos(r), np.sin(r)], axis=-1)


# Gallery: identity 0 at 0 deg, identity 1 at 90 deg (two images each).
# Probes: A (id 0) at 10 deg, B (id 1) at 80 deg: both correct with no
# distractors (genuine angle 10 deg vs impostor 80 deg).
# Distractors: d0 at 180 deg (far from both), d1 at 12 deg (2 deg from A:
# steals A once k >= 2), d2 at 79 deg (1 deg from B: steals B once k >= 3).
GALLERY, GALLERY_LABELS = at([0, 1, 90, 91]), np.array([0, 0, 1, 1])
PROBE, PROBE_LABELS = at([10, 80]), np.array([0, 1])
DISTR = at([180, 12, 79])


def test_rank1_distractor_steals_probe():
    out = rank1_identification(GALLERY * 3.0, GALLERY_LABELS, PROBE,
                               PROBE_LABELS, DISTR, (0, 1, 2, 3))
    assert out == {0: 1.0, 1: 1.0, 2: 0.5, 3: 0.0}


def test_cmc_ranks_identities():
    # With all distractors each probe has one distractor above its genuine
    # match -> rank 2. The second gallery image of an identity does not
    # count as another competitor (identities are ranked, not images).
    assert cmc(GALLERY, GALLERY_LABELS, PROBE, PROBE_LABELS, (1, 2, 5),
               DISTR) == {1: 0.0, 2: 1.0, 5: 1.0}
    assert cmc(GALLERY, GALLERY_LABELS, PROBE, PROBE_LABELS, (1, )) == \
        {1: 1.0}


def test_tie_with_distractor_counts_as_miss():
    # a distractor identical to A's best gallery image (1 deg) ties with it
    out = rank1_identification(GALLERY, GALLERY_LABELS, PROBE[:1],
                               PROBE_LABELS[:1], at([1]), (0, 1))
    assert out == {0: 1.0, 1: 0.0}


def test_rank1_matches_bruteforce_argmax_on_random_data():
    rng = np.random.default_rng(0)
    centers = rng.standard_normal((20, 8))
    gl = np.repeat(np.arange(20), 2)
    g = centers[gl] + 0.8 * rng.standard_normal((40, 8))
    pl = rng.integers(0, 20, 60)
    p = centers[pl] + 0.8 * rng.standard_normal((60, 8))
    d = rng.standard_normal((50, 8))
    out = rank1_identification(g, gl, p, pl, d, (0, 10, 50))
    n = lambda x: x / np.linalg.norm(x, axis=1, keepdims=True)  # noqa: E731
    for k in (0, 10, 50):
        allg = np.r_[n(g), n(d[:k])]
        labels = np.r_[gl, np.full(k, -1)]
        top = np.argmax(n(p) @ allg.T, axis=1)  # no exact ties here
        assert out[k] == pytest.approx(np.mean(labels[top] == pl))
    assert 0 < out[50] < out[0]


def test_identification_errors():
    with pytest.raises(ValueError, match='no gallery entry'):
        rank1_identification(GALLERY, GALLERY_LABELS, PROBE, [0, 7])
    with pytest.raises(ValueError, match=r'\[0, 3\]'):
        rank1_identification(GALLERY, GALLERY_LABELS, PROBE, PROBE_LABELS,
                             DISTR, (0, 4))
    with pytest.raises(ValueError, match=r'\[0, 0\]'):
        rank1_identification(GALLERY, GALLERY_LABELS, PROBE, PROBE_LABELS,
                             None, (1, ))
    with pytest.raises(ValueError, match='NaN'):
        rank1_identification(GALLERY, GALLERY_LABELS, PROBE * np.nan,
                             PROBE_LABELS)
    with pytest.raises(ValueError, match='labels must match'):
        rank1_identification(GALLERY, GALLERY_LABELS[:3], PROBE,
                             PROBE_LABELS)


def make_meta():
    # dataset order: gallery 0-3, probes 4-5, distractors 6-8
    emb = np.r_[GALLERY, PROBE, DISTR].astype(np.float32)
    labels = np.r_[GALLERY_LABELS, PROBE_LABELS, [100, 101, 102]]
    meta = dict(identification=dict(cross_age=dict(
        gallery=np.arange(4), probe=np.array([4, 5]),
        distractors=np.array([6, 7, 8]), labels=labels,
        distractor_counts=[0, 2, 3])))
    return meta, emb


def test_identification_metric():
    meta, emb = make_meta()
    metric = METRICS.build(dict(type='FaceIdentificationMetric'))
    metric.dataset_meta = meta
    order = [8, 3, 1, 5, 0, 4, 2, 6, 7, 3, 1]  # shuffled + padded
    metric.process(None, [dict(index=i, embedding=torch.from_numpy(emb[i]))
                          for i in order])
    out = metric.evaluate(len(order))
    assert out == {'cross_age/rank1@0': 1.0, 'cross_age/rank1@2': 0.5,
                   'cross_age/rank1@3': 0.0, 'cross_age/num_probes': 2}


def test_identification_metric_errors():
    meta, emb = make_meta()
    metric = FaceIdentificationMetric()
    metric.dataset_meta = dict(verification={})
    metric.process(None, [dict(index=i, embedding=torch.from_numpy(emb[i]))
                          for i in range(8)])
    with pytest.raises(ConfigError, match="metainfo key 'identification'"):
        metric.compute_metrics(metric.results)
    metric.dataset_meta = meta  # index 8 (3rd distractor) never evaluated
    with pytest.raises(ConfigError, match=r'not evaluated \(e\.g\. \[8\]\)'):
        metric.compute_metrics(metric.results)
    meta['identification']['cross_age']['probe'] = np.array([3, 4])
    metric.dataset_meta = meta
    with pytest.raises(ConfigError, match='both gallery and probe'):
        metric.compute_metrics(metric.results)
