"""SynthFaceAge: determinism, chunking, cache, splits, protocols, pipeline."""
import os

import numpy as np
import pytest
import torch

import kdzoo.datasets.synthface.dataset as sf_dataset
import kdzoo.datasets.synthface.render as sf_render
from kdzoo.datasets import SynthFaceAge
from kdzoo.datasets.synthface import (build_protocols, identity_uids,
                                      render_faces, resolve,
                                      sample_identities, split_layout)
from kdzoo.datasets.synthface.identities import sample_nuisance
from kdzoo.registry import DATASETS
from kdzoo.utils.errors import ConfigError

SMALL_TEST = dict(split='test', num_identities=20, images_per_identity=6,
                  num_distractors=30, image_size=24)


def _params(n_id=12, n_img=4, difficulty=2.0, seed=0):
    lay = split_layout(seed, 'train', n_id, n_img, (5, 80))
    uniq, inv = np.unique(lay['uid'], return_inverse=True)
    raw = sample_nuisance(seed, uniq, n_img)
    return resolve(sample_identities(seed, uniq), inv, lay['age'],
                   raw['U'][inv, lay['image_index']],
                   raw['N'][inv, lay['image_index']], difficulty)


def test_render_deterministic_and_seeded():
    uids = identity_uids('train', 3)
    a = render_faces(0, uids, [10, 40, 70], 32)
    b = render_faces(0, uids, [10, 40, 70], 32)
    c = render_faces(1, uids, [10, 40, 70], 32)
    assert a.shape == (3, 3, 32, 32, 3) and a.dtype == np.uint8
    assert a.tobytes() == b.tobytes()
    assert (a != c).mean() > 0.3
    assert 20 < a.mean() < 235 and a.std() > 20  # not blank


def test_chunk_thread_and_window_independence(monkeypatch):
    P = _params(difficulty=2.5)  # every nuisance, occlusions included
    ref = sf_render.render(P, 40, chunk=64)
    assert np.array_equal(sf_render.render(P, 40, chunk=5, num_threads=2),
                          ref)
    single = np.concatenate([
        sf_render.render({k: v[i:i + 1] for k, v in P.items()}, 40)
        for i in range(0, len(ref), 7)])
    assert np.array_equal(single, ref[::7])
    # windows are an optimisation only: drawing in the full frame agrees
    monkeypatch.setattr(sf_render, '_USE_WINDOWS', False)
    assert np.array_equal(sf_render.render(P, 40, chunk=16), ref)


def test_dataset_deterministic_shapes_and_ages():
    kw = dict(split='train', num_identities=8, images_per_identity=5,
              image_size=24, cache_dir=False)
    ds = SynthFaceAge(**kw)
    again = SynthFaceAge(**kw)
    other = SynthFaceAge(**dict(kw, seed=3))
    assert len(ds) == 40
    assert ds._images.shape == (40, 24, 24, 3)
    assert ds._images.dtype == np.uint8
    assert np.asarray(ds._images).tobytes() == \
        np.asarray(again._images).tobytes()
    assert not np.array_equal(ds._images, other._images)
    assert ds.metainfo['num_classes'] == 8
    assert ds.metainfo['dataset_name'] == 'SynthFaceAge'
    assert sorted(set(ds.labels.tolist())) == list(range(8))
    for lab in range(8):  # stratified: each identity spans the age range
        ages = ds.ages[ds.labels == lab]
        assert ages.min() < 20 and ages.max() > 65
    assert ds.ages.min() >= 5 and ds.ages.max() <= 80


def test_pack_face_inputs_sample():
    ds = DATASETS.build(dict(type='SynthFaceAge', num_identities=3,
                             images_per_identity=4, image_size=20,
                             cache_dir=False))
    info = ds.get_data_info(5)
    assert info['img'].shape == (20, 20, 3) and info['img'].dtype == np.uint8
    assert info['label'] == 1 and info['sample_idx'] == 5
    assert info['age'] == int(ds.ages[5])
    out = ds[5]
    assert set(out) == {'inputs', 'data_samples'}
    assert out['inputs'].dtype == torch.uint8
    assert out['inputs'].shape == (3, 20, 20)
    assert out['data_samples'] == dict(index=5, label=1,
                                       age=int(ds.ages[5]), flip=0)
    assert torch.equal(out['inputs'],
                       torch.from_numpy(info['img']).permute(2, 0, 1))


def test_cache_hit_miss_and_corrupt_regeneration(tmp_path, monkeypatch):
    kw = dict(split='train', num_identities=4, images_per_identity=3,
              image_size=20, cache_dir=str(tmp_path))
    first = SynthFaceAge(**kw)
    npy, npz = first.cache_paths()
    assert os.path.isfile(npy) and os.path.isfile(npz)
    assert first.cache_key()[:32] in os.path.basename(npy)
    assert not [f for f in os.listdir(tmp_path) if f.endswith('.tmp')]
    with np.load(npz) as meta:
        assert np.array_equal(meta['label'], first.labels)
        assert np.array_equal(meta['age'], first.ages)
        assert np.array_equal(meta['uid'], first.uids)
    reference = np.array(first._images)

    calls = []
    real = sf_dataset.generate_split

    def counting(*a, **k):
        calls.append(1)
        return real(*a, **k)

    monkeypatch.setattr(sf_dataset, 'generate_split', counting)
    hit = SynthFaceAge(**kw)  # hit: nothing rendered
    assert calls == [] and np.array_equal(hit._images, reference)
    miss = SynthFaceAge(**dict(kw, difficulty=0.5))  # other params: miss
    assert calls == [1] and miss.cache_paths()[0] != npy
    assert len([f for f in os.listdir(tmp_path) if f.endswith('.npy')]) == 2

    # flip image bytes: checksum fails -> warning, regenerated identically
    with open(npy, 'r+b') as f:
        f.seek(-50, os.SEEK_END)
        f.write(b'\x00' * 50)
    with pytest.warns(UserWarning, match='corrupt or stale'):
        fixed = SynthFaceAge(**kw)
    assert calls == [1, 1] and np.array_equal(fixed._images, reference)
    # truncated metadata file
    with open(npz, 'r+b') as f:
        f.truncate(10)
    with pytest.warns(UserWarning, match='corrupt or stale'):
        fixed = SynthFaceAge(**kw)
    assert len(calls) == 3 and np.array_equal(fixed._images, reference)
    assert SynthFaceAge(**kw) is not None and len(calls) == 3


def test_cache_dir_from_environment(monkeypatch, tmp_path):
    monkeypatch.setenv('KDZOO_CACHE', str(tmp_path))
    ds = SynthFaceAge(num_identities=2, images_per_identity=2, image_size=16,
                      lazy_init=True)
    assert ds.cache_paths()[0].startswith(str(tmp_path / 'synthface'))


def test_train_test_distractor_identities_disjoint():
    train = split_layout(0, 'train', 50, 2, (5, 80))
    test = split_layout(0, 'test', 50, 2, (5, 80), num_distractors=50)
    tr, te = set(train['uid']), set(test['uid'][~test['distractor']])
    dis = set(test['uid'][test['distractor']])
    assert not tr & te and not tr & dis and not te & dis
    # and the identities themselves differ (no shared parameter vectors)
    keys = ('face_w', 'eye_sep', 'nose_len', 'mouth_w', 'hairline')

    def vectors(uids):
        p = sample_identities(0, sorted(uids))
        return {tuple(np.round(p[k][i], 9) for k in keys)
                for i in range(len(uids))}

    assert not vectors(tr) & vectors(te)
    assert not vectors(te) & vectors(dis)


def _check_verification(name, proto, labels, ages, n, gap=None):
    pairs, issame = proto['pairs'], proto['issame']
    assert pairs.dtype == np.int64 and pairs.ndim == 2 and pairs.shape[1] == 2
    assert issame.dtype == bool and issame.shape == (len(pairs), )
    assert proto['num_folds'] == 10
    assert pairs.min() >= 0 and pairs.max() < n
    assert (pairs[:, 0] != pairs[:, 1]).all()
    key = np.sort(pairs, axis=1)
    assert len(np.unique(key, axis=0)) == len(pairs), f'{name}: duplicates'
    assert len(pairs) % 20 == 0
    for fold in np.split(issame, 10):  # contiguous, balanced folds
        m = len(fold) // 2
        assert fold[:m].all() and not fold[m:].any()
    la, lb = labels[pairs[:, 0]], labels[pairs[:, 1]]
    assert (la[issame] == lb[issame]).all()
    assert (la[~issame] != lb[~issame]).all()
    if gap is not None:
        d = np.abs(ages[pairs[:, 0]] - ages[pairs[:, 1]])
        assert (d >= gap).all()
        # negatives copy the positives' age gaps (not a cue)
        assert abs(d[issame].mean() - d[~issame].mean()) < 5


def test_test_split_metainfo_protocols():
    ds = SynthFaceAge(cache_dir=False, **SMALL_TEST)
    meta = ds.metainfo
    n = len(ds)
    assert n == 20 * 6 + 30
    labels, ages = ds.labels, ds.ages
    ver = meta['verification']
    assert set(ver) == {'standard', 'cross_age'}
    distractor_idx = np.flatnonzero(ds.is_distractor)
    for name, proto in ver.items():
        _check_verification(name, proto, labels, ages, n,
                            gap=30 if name == 'cross_age' else None)
        assert not np.isin(proto['pairs'], distractor_idx).any()
    ide = meta['identification']['cross_age']
    g, p, d = ide['gallery'], ide['probe'], ide['distractors']
    assert np.array_equal(ide['labels'], labels) and len(ide['labels']) == n
    assert np.array_equal(d, distractor_idx) and len(d) == 30
    assert ide['distractor_counts'] == [0, 10, 30]
    assert not np.intersect1d(g, p).size
    assert len(g) == 20 and len(np.unique(labels[g])) == 20
    for gi in g:  # youngest image of its identity
        same = np.flatnonzero((labels == labels[gi]) & ~ds.is_distractor)
        assert ages[gi] == ages[same].min()
    young = {labels[gi]: ages[gi] for gi in g}
    assert all(ages[i] - young[labels[i]] >= 30 for i in p)
    assert set(labels[d]).isdisjoint(set(labels[~ds.is_distractor]))
    assert len(set(labels[d])) == 30  # one label per distractor identity
    # deterministic
    again = SynthFaceAge(cache_dir=False, lazy_init=True, **SMALL_TEST)
    for name in ver:
        assert np.array_equal(again.metainfo['verification'][name]['pairs'],
                              ver[name]['pairs'])


def test_default_test_size_has_enough_cross_age_pairs():
    # protocols only (no rendering) at the default test size
    lay = split_layout(0, 'test', 200, 12, (5, 80), num_distractors=1000)
    ver, ide = build_protocols(lay['label'], lay['age'], lay['distractor'],
                               200, seed=0)
    issame = ver['cross_age']['issame']
    assert (~issame).sum() >= 5000 and issame.sum() == (~issame).sum()
    assert ide['cross_age']['distractor_counts'] == [0, 10, 100, 1000]


@pytest.mark.parametrize('n_id,n_img,distractors', [(20, 4, 0), (21, 5, 7),
                                                     (37, 9, 50)])
def test_protocols_balance_on_small_splits(n_id, n_img, distractors):
    lay = split_layout(5, 'test', n_id, n_img, (5, 80),
                       num_distractors=distractors)
    ver, ide = build_protocols(lay['label'], lay['age'], lay['distractor'],
                               n_id, seed=5)
    for name, proto in ver.items():
        _check_verification(name, proto, lay['label'], lay['age'],
                            len(lay['label']),
                            gap=30 if name == 'cross_age' else None)
    assert len(ide['cross_age']['gallery']) == n_id


def test_metrics_read_the_protocols():
    from kdzoo.evaluation import (FaceIdentificationMetric,
                                  FaceVerificationMetric)
    ds = SynthFaceAge(cache_dir=False, **SMALL_TEST)
    n_lab = int(ds.labels.max()) + 1
    emb = np.eye(n_lab, dtype=np.float32)[ds.labels] + \
        0.01 * np.random.default_rng(0).standard_normal((len(ds), n_lab))
    results = {}
    for metric in (FaceVerificationMetric(fars=(1e-1, )),
                   FaceIdentificationMetric()):
        metric.dataset_meta = ds.metainfo
        metric.process(None, [dict(index=i, embedding=torch.from_numpy(e))
                              for i, e in enumerate(emb.astype(np.float32))])
        results.update(metric.compute_metrics(metric.results))
    assert results['cross_age/accuracy'] == pytest.approx(100.0)
    assert results['standard/accuracy'] == pytest.approx(100.0)
    assert results['cross_age/rank1@30'] == pytest.approx(1.0)


def test_argument_validation():
    with pytest.raises(ConfigError, match="split must be 'train' or 'test'"):
        SynthFaceAge(split='tset', cache_dir=False)
    with pytest.raises(ConfigError, match='images_per_identity'):
        SynthFaceAge(split='test', num_identities=20, images_per_identity=3,
                     cache_dir=False)
    with pytest.raises(ConfigError, match='num_identities >= 2'):
        SynthFaceAge(split='test', num_identities=5, cache_dir=False)
    with pytest.raises(ConfigError, match="Did you mean: 'pose'"):
        SynthFaceAge(difficulty=dict(poze=1.0), cache_dir=False)
    with pytest.raises(ConfigError, match='num_distractors is for the test'):
        SynthFaceAge(num_distractors=5, cache_dir=False)
    with pytest.raises(ConfigError, match='age_range'):
        SynthFaceAge(age_range=(50, 20), cache_dir=False)
    with pytest.raises(ConfigError, match='indices'):
        SynthFaceAge(cache_dir=False, indices=[0, 1], **SMALL_TEST)


def test_age_changes_appearance_statistically():
    """On raw pixels, same identity at a small age gap > same identity at a
    large gap > different identities, on average."""
    ds = SynthFaceAge(num_identities=40, images_per_identity=10,
                      image_size=32, cache_dir=False)
    x = np.asarray(ds._images, np.float32)
    x = x.reshape(len(ds), 16, 2, 16, 2, 3).mean((2, 4)).reshape(len(ds), -1)
    x -= x.mean(1, keepdims=True)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    sim = x @ x.T
    i, j = np.triu_indices(len(ds), 1)
    s = sim[i, j]
    same = ds.labels[i] == ds.labels[j]
    gap = np.abs(ds.ages[i] - ds.ages[j])
    small, large = s[same & (gap <= 10)].mean(), s[same & (gap >= 40)].mean()
    different = s[~same].mean()
    assert small > large + 0.1
    assert large > different
