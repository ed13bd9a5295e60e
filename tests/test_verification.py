"""Verification accuracy (InsightFace protocol), TAR@FAR, ROC and the
FaceVerificationMetric."""
import numpy as np
import pytest
import torch

from kdzoo.evaluation import (FaceVerificationMetric, far_key, kfold_indices,
                              roc_auc, roc_curve, tar_at_far,
                              verification_accuracy)
from kdzoo.registry import METRICS
from kdzoo.utils.errors import ConfigError


# ---------------------------------------------------------------- reference
def reference_accuracy(e1, e2, issame, num_folds, thresholds):
    """Straight loops: normalise, contiguous folds of sizes as sklearn's
    KFold, best threshold on the other folds (first on ties)."""
    e1 = e1 / np.linalg.norm(e1, axis=1, keepdims=True)
    e2 = e2 / np.linalg.norm(e2, axis=1, keepdims=True)
    dist = ((e1 - e2)**2).sum(1)
    n = len(dist)
    sizes = [n // num_folds + (1 if f < n % num_folds else 0)
             for f in range(num_folds)]
    accs, ths, start = [], [], 0
    for size in sizes:
        test = np.arange(start, start + size)
        train = np.setdiff1d(np.arange(n), test)
        start += size
        best_acc, best_t = -1.0, None
        for t in thresholds:
            acc = np.mean((dist[train] < t) == issame[train])
            if acc > best_acc:  # strict: keeps the first best
                best_acc, best_t = acc, t
        accs.append(np.mean((dist[test] < best_t) == issame[test]))
        ths.append(best_t)
    return np.array(accs), np.array(ths)


def pairs_with_dist(dists):
    """2-D unit embeddings whose squared L2 distance is ``dists``."""
    c = 1 - np.asarray(dists, float) / 2
    e1 = np.tile([1.0, 0.0], (len(c), 1))
    e2 = np.stack([c, np.sqrt(1 - c**2)], axis=1)
    return e1, e2


def random_pairs(n, dim=16, seed=0):
    rng = np.random.default_rng(seed)
    issame = rng.random(n) < 0.5
    e1 = rng.standard_normal((n, dim))
    e2 = np.where(issame[:, None], e1 + rng.standard_normal((n, dim)),
                  rng.standard_normal((n, dim)))
    return e1.astype(np.float32), e2.astype(np.float32), issame


# ---------------------------------------------------------------- accuracy
def test_kfold_sizes_match_sklearn_kfold():
    # KFold(10) on 13 items: the first 13 % 10 = 3 folds get 2 items.
    sizes = [len(test) for _, test in kfold_indices(13, 10)]
    assert sizes == [2, 2, 2, 1, 1, 1, 1, 1, 1, 1]
    train, test = kfold_indices(13, 10)[1]
    assert test.tolist() == [2, 3] and 2 not in train and len(train) == 11
    assert [len(t) for _, t in kfold_indices(6000, 10)] == [600] * 10


@pytest.mark.parametrize('n,folds', [(600, 10), (605, 10), (301, 7)])
def test_accuracy_matches_reference_loops(n, folds):
    e1, e2, issame = random_pairs(n, seed=n)
    thresholds = np.arange(0, 4, 0.01)
    accs, ths = reference_accuracy(e1.astype(np.float64),
                                   e2.astype(np.float64), issame, folds,
                                   thresholds)
    res = verification_accuracy(e1, e2, issame, num_folds=folds)
    np.testing.assert_array_equal(res.fold_accuracies, accs)
    np.testing.assert_array_equal(res.fold_thresholds, ths)
    assert res.accuracy == pytest.approx(accs.mean())
    assert res.accuracy_std == pytest.approx(accs.std())  # ddof=0
    assert res.threshold == pytest.approx(ths.mean())
    assert 0.6 < res.accuracy < 1.0  # non-trivial case


def test_accuracy_perfectly_separable():
    # positives at squared distance 0.5, negatives at 2.0: every fold is
    # perfect and the first best threshold is the first grid value > 0.5.
    issame = np.array([True, False] * 50)
    e1, e2 = pairs_with_dist(np.where(issame, 0.5, 2.0))
    res = verification_accuracy(e1, e2, issame)
    assert res.accuracy == 1.0 and res.accuracy_std == 0.0
    assert res.threshold == pytest.approx(0.51)


def test_accuracy_known_threshold_single_fold():
    # pos at 0.1, 0.3, 1.2 and neg at 0.8, 1.5, 2.0: thresholds in
    # (0.3, 0.8] and (1.2, 1.5] both get 5/6 right; the first, 0.31, wins.
    issame = np.array([1, 1, 1, 0, 0, 0], bool)
    e1, e2 = pairs_with_dist([0.1, 0.3, 1.2, 0.8, 1.5, 2.0])
    res = verification_accuracy(e1, e2, issame, num_folds=1)
    assert res.accuracy == pytest.approx(5 / 6)
    assert res.threshold == pytest.approx(0.31)


def test_distance_equal_to_threshold_is_not_same():
    # InsightFace predicts same iff dist < t (strict). 1-D embeddings 0 and
    # 0.5 give dist 0.25 exactly, so t = 0.25 rejects it and 0.26 is chosen.
    e1 = np.zeros((2, 1))
    e2 = np.array([[0.5], [1.0]])
    res = verification_accuracy(e1, e2, [True, False], num_folds=1,
                                normalize=False)
    assert res.threshold == pytest.approx(0.26) and res.accuracy == 1.0


@pytest.mark.parametrize('bad,match', [
    (dict(issame=np.ones(10, bool)), 'both positive and negative'),
    (dict(issame=np.zeros(10, bool)), 'both positive and negative'),
    (dict(issame=np.array([True, False] * 4)), 'has 10 pairs but issame'),
    (dict(nan=True), 'NaN'),
    (dict(num_folds=11), 'num_folds'),
])
def test_accuracy_errors(bad, match):
    e1, e2, issame = random_pairs(10)
    if bad.pop('nan', False):
        e1[3, 0] = np.nan
    kwargs = dict(issame=issame, num_folds=10)
    kwargs.update(bad)
    with pytest.raises(ValueError, match=match):
        verification_accuracy(e1, e2, **kwargs)
    with pytest.raises(ValueError, match='equal shape'):
        verification_accuracy(e1, e2[:5], issame[:5])


# ---------------------------------------------------------------- TAR@FAR
def test_tar_at_far_hand_computed():
    neg = [0.9, 0.8, 0.7, 0.6, 0.5, 0.4, 0.3, 0.2, 0.1, 0.0]
    pos = [0.95, 0.85, 0.75, 0.65, 0.3]
    scores = np.array(pos + neg)
    issame = np.array([True] * 5 + [False] * 10)
    out = tar_at_far(scores, issame, fars=(0.1, 0.3, 1.0, 0.01))
    # FAR 0.1: k = floor(0.1*10) = 1, threshold = 2nd largest negative 0.8;
    #   positives > 0.8: 0.95, 0.85 -> 2/5. (One negative, 0.9, accepted.)
    # FAR 0.3: k = 3, threshold = 4th largest negative 0.6; positives > 0.6:
    #   0.95, 0.85, 0.75, 0.65 -> 4/5.
    # FAR 1.0: k = 10 = n_neg, threshold -inf -> all positives accepted.
    # FAR 0.01: 0.01*10 < 1 negative -> not measurable, omitted.
    assert out == {0.1: pytest.approx(0.4), 0.3: pytest.approx(0.8),
                   1.0: 1.0}
    assert list(out) == [0.1, 0.3, 1.0]


def test_tar_at_far_ties_stay_under_far():
    # negatives 0.8, 0.8, 0.5, 0.1; positives 0.9, 0.8, 0.6.
    # FAR 0.25 (k=1): threshold = 2nd largest negative = 0.8; accepting one
    #   0.8 negative would accept both (FAR 0.5), so only 0.9 passes -> 1/3
    #   and the achieved FAR is 0.
    # FAR 0.5 (k=2): threshold 0.5 -> 0.9, 0.8, 0.6 pass -> 1.0.
    scores = np.array([0.9, 0.8, 0.6, 0.8, 0.8, 0.5, 0.1])
    issame = np.array([1, 1, 1, 0, 0, 0, 0], bool)
    out = tar_at_far(scores, issame, fars=(0.25, 0.5))
    assert out[0.25] == pytest.approx(1 / 3) and out[0.5] == 1.0


def test_tar_at_far_omits_unsupported_fars():
    rng = np.random.default_rng(1)
    for n_neg, expected in [(999, [1e-1, 1e-2]), (1000, [1e-1, 1e-2, 1e-3]),
                            (3000, [1e-1, 1e-2, 1e-3])]:  # LFW: 3000 neg
        scores = rng.random(n_neg + 10)
        issame = np.r_[np.ones(10, bool), np.zeros(n_neg, bool)]
        assert list(tar_at_far(scores, issame,
                               (1e-1, 1e-2, 1e-3, 1e-4))) == expected
    with pytest.raises(ValueError, match='FAR must be'):
        tar_at_far(scores, issame, [0.0])


def test_far_key_format():
    assert [far_key(f) for f in (1e-1, 1e-3, 1e-4, 5e-2, 2.5e-4, 1.0)] == \
        ['1e-1', '1e-3', '1e-4', '5e-2', '2.5e-4', '1e0']


# ---------------------------------------------------------------- ROC
def test_roc_auc_matches_mann_whitney_with_ties():
    rng = np.random.default_rng(2)
    issame = rng.random(400) < 0.3
    scores = np.round(rng.random(400) + 0.5 * issame, 1)  # many ties
    pos, neg = scores[issame], scores[~issame]
    diff = pos[:, None] - neg[None, :]
    mw = np.mean((diff > 0) + 0.5 * (diff == 0))
    assert roc_auc(scores, issame) == pytest.approx(mw, abs=1e-12)
    fpr, tpr, thr = roc_curve(scores, issame)
    assert (fpr[0], tpr[0], fpr[-1], tpr[-1]) == (0, 0, 1, 1)
    assert np.all(np.diff(fpr) >= 0) and np.all(np.diff(tpr) >= 0)
    assert thr[0] == np.inf and np.all(np.diff(thr) < 0)
    # point i: fraction of scores >= thr[i]
    i = len(thr) // 2
    assert tpr[i] == pytest.approx(np.mean(pos >= thr[i]))
    assert fpr[i] == pytest.approx(np.mean(neg >= thr[i]))


def test_roc_errors():
    with pytest.raises(ValueError, match='both positive and negative'):
        roc_auc([0.1, 0.2], [True, True])
    with pytest.raises(ValueError, match='NaN'):
        roc_auc([0.1, np.nan], [True, False])
    with pytest.raises(ValueError, match='issame'):
        roc_curve([0.1, 0.2, 0.3], [True, False])


# ---------------------------------------------------------------- metric
def make_meta(n_pairs=400, seed=0):
    e1, e2, issame = random_pairs(n_pairs, seed=seed)
    emb = np.empty((2 * n_pairs, e1.shape[1]), np.float32)
    emb[0::2], emb[1::2] = e1, e2
    pairs = np.stack([np.arange(n_pairs) * 2, np.arange(n_pairs) * 2 + 1], 1)
    half = n_pairs // 2
    meta = dict(verification=dict(
        standard=dict(pairs=pairs, issame=issame, num_folds=10),
        cross_age=dict(pairs=pairs[:half], issame=issame[:half],
                       num_folds=5)))
    return meta, emb


def feed(metric, emb, order, batch=32):
    for a in range(0, len(order), batch):
        metric.process(None, [dict(index=int(i),
                                   embedding=torch.from_numpy(emb[i]))
                              for i in order[a:a + batch]])


def test_metric_keys_and_values_match_pure_functions():
    meta, emb = make_meta()
    metric = METRICS.build(dict(type='FaceVerificationMetric'))
    metric.dataset_meta = meta
    rng = np.random.default_rng(0)
    order = rng.permutation(len(emb))
    order = np.r_[order, order[:7]]  # DDP-style padding duplicates
    feed(metric, emb, order)
    out = metric.evaluate(len(order))

    std = meta['verification']['standard']
    # 400 pairs, ~200 negatives: only FAR 1e-1 has >= 10 negatives above
    # its threshold (1e-2 would rest on 2).
    assert set(out) == {f'{p}/{k}' for p in ('standard', 'cross_age')
                        for k in ('accuracy', 'accuracy_std', 'threshold',
                                  'TAR@FAR=1e-1', 'roc_auc', 'num_positives',
                                  'num_negatives')}
    assert out['standard/num_negatives'] == int((~std['issame']).sum())
    assert out['standard/num_positives'] == int(std['issame'].sum())
    e1, e2 = emb[std['pairs'][:, 0]], emb[std['pairs'][:, 1]]
    res = verification_accuracy(e1, e2, std['issame'], 10)
    assert out['standard/accuracy'] == pytest.approx(100 * res.accuracy)
    assert out['standard/accuracy_std'] == pytest.approx(
        100 * res.accuracy_std)
    assert out['standard/threshold'] == pytest.approx(res.threshold)
    cos = np.sum(e1 * e2, 1) / np.linalg.norm(e1, axis=1) / \
        np.linalg.norm(e2, axis=1)
    tars = tar_at_far(cos, std['issame'], (1e-1, 1e-2))
    assert out['standard/TAR@FAR=1e-1'] == pytest.approx(tars[1e-1])
    assert out['standard/roc_auc'] == pytest.approx(
        roc_auc(cos, std['issame']))
    ca = meta['verification']['cross_age']
    res5 = verification_accuracy(emb[ca['pairs'][:, 0]],
                                 emb[ca['pairs'][:, 1]], ca['issame'], 5)
    assert out['cross_age/accuracy'] == pytest.approx(100 * res5.accuracy)
    assert metric.results == []  # mmengine clears after evaluate


def test_metric_protocol_selection_folds_and_batched_input():
    meta, emb = make_meta()
    metric = FaceVerificationMetric(protocols='cross_age', fars=(0.1, ),
                                    num_folds=4, prefix='val')
    metric.dataset_meta = meta
    metric.process(None, dict(index=torch.arange(len(emb)),
                              embedding=torch.from_numpy(emb)))
    out = metric.evaluate(len(emb))
    assert sorted(out) == sorted(f'val/cross_age/{k}' for k in (
        'accuracy', 'accuracy_std', 'threshold', 'TAR@FAR=1e-1', 'roc_auc',
        'num_positives', 'num_negatives'))
    ca = meta['verification']['cross_age']
    res = verification_accuracy(emb[ca['pairs'][:, 0]],
                                emb[ca['pairs'][:, 1]], ca['issame'], 4)
    assert out['val/cross_age/accuracy'] == pytest.approx(100 * res.accuracy)


def test_metric_missing_index_is_reported():
    meta, emb = make_meta()
    metric = FaceVerificationMetric()
    metric.dataset_meta = meta
    feed(metric, emb, [i for i in range(len(emb)) if i not in (5, 17)])
    with pytest.raises(ConfigError, match=r"'standard'.*2 were not "
                       r'evaluated \(e\.g\. \[5, 17\]\)'):
        metric.compute_metrics(metric.results)


def test_metric_missing_metainfo_and_unknown_protocol():
    _, emb = make_meta()
    metric = FaceVerificationMetric()
    metric.dataset_meta = dict(classes=('a', ))
    feed(metric, emb, range(len(emb)))
    with pytest.raises(ConfigError, match="metainfo key 'verification'"):
        metric.compute_metrics(metric.results)
    metric.dataset_meta = None
    with pytest.raises(ConfigError, match="'verification'"):
        metric.compute_metrics(metric.results)
    metric = FaceVerificationMetric(protocols=['standrd'])
    metric.dataset_meta = make_meta()[0]
    feed(metric, emb, range(len(emb)))
    with pytest.raises(ConfigError, match="Did you mean: 'standard'"):
        metric.compute_metrics(metric.results)


def test_metric_single_class_protocol_names_protocol():
    meta, emb = make_meta()
    meta['verification']['standard']['issame'][:] = True
    metric = FaceVerificationMetric(protocols='standard')
    metric.dataset_meta = meta
    feed(metric, emb, range(len(emb)))
    with pytest.raises(ValueError, match="protocol 'standard'.*negative"):
        metric.compute_metrics(metric.results)
