"""Held-out identities of an image folder: the train/val split of
ImageFolderFaces and the verification protocol of ImageFolderVerification."""
import os

import numpy as np
import pytest
import torch
from PIL import Image

from kdzoo.datasets import ImageFolderFaces, ImageFolderVerification
from kdzoo.datasets.image_folder import identity_fold_pairs
from kdzoo.evaluation.metrics import FaceVerificationMetric
from kdzoo.evaluation.verification import kfold_indices
from kdzoo.registry import DATASETS
from kdzoo.utils.errors import ConfigError

NUM_IDS, PER_ID = 24, 4


@pytest.fixture(scope='module')
def faces(tmp_path_factory):
    """24 identities x 4 small JPEGs, one colour per identity."""
    root = tmp_path_factory.mktemp('faces')
    rng = np.random.default_rng(0)
    for i in range(NUM_IDS):
        folder = root / f'person_{i:02d}'
        folder.mkdir()
        colour = rng.integers(0, 256, 3)
        for j in range(PER_ID):
            c = tuple(int(v) for v in np.clip(colour + 8 * j, 0, 255))
            Image.new('RGB', (16, 16), c).save(folder / f'{j}.jpg', 'JPEG')
    return str(root)


def items(ds):
    """(identity folder, file, label) of every item, without decoding."""
    out = []
    for i in range(len(ds)):
        info = super(ImageFolderFaces, ds).get_data_info(i)
        folder, name = info['img_path'].split(os.sep)[-2:]
        out.append((folder, name, info['label']))
    return out


def folder_labels(ds):
    """Identity of every item from its path (not from the dataset's labels),
    numbered in sorted folder order."""
    folders = [f for f, _, _ in items(ds)]
    names = sorted(set(folders))
    return np.array([names.index(f) for f in folders])


# ------------------------------------------------------------ the split
def test_train_and_val_are_disjoint_and_make_up_all(faces):
    whole = ImageFolderFaces(faces)
    train = ImageFolderFaces(faces, val_identities=6, split='train')
    val = ImageFolderFaces(faces, val_identities=6, split='val')
    tr, va = set(train.metainfo['classes']), set(val.metainfo['classes'])
    assert len(va) == 6 and len(tr) == NUM_IDS - 6
    assert not tr & va
    assert tr | va == set(whole.metainfo['classes'])
    files = [(f, n) for f, n, _ in items(train) + items(val)]
    assert len(files) == len(set(files)) == len(whole) == NUM_IDS * PER_ID
    assert set(files) == {(f, n) for f, n, _ in items(whole)}
    # 'all' keeps every identity whatever val_identities says
    assert items(ImageFolderFaces(faces, val_identities=6)) == items(whole)


@pytest.mark.parametrize('split, count', [('train', NUM_IDS - 6),
                                          ('val', 6)])
def test_labels_are_renumbered_within_the_part(faces, split, count):
    ds = DATASETS.build(dict(type='ImageFolderFaces', data_root=faces,
                             val_identities=6, split=split, split_seed=3))
    classes = ds.metainfo['classes']
    assert ds.metainfo['num_classes'] == len(classes) == count
    assert classes == sorted(classes)
    labels = [lab for _, _, lab in items(ds)]
    assert sorted(set(labels)) == list(range(count))
    assert all(classes[lab] == f for f, _, lab in items(ds))
    assert ds[0]['data_samples']['label'] == labels[0]


def test_the_split_depends_on_the_seed_only(faces):
    def held_out(seed, **kw):
        return ImageFolderFaces(faces, val_identities=6, split='val',
                                split_seed=seed, **kw).metainfo['classes']

    first = held_out(0)
    assert held_out(0) == first
    assert held_out(1) != first
    # the documented rule: the first 6 of a seeded permutation of the
    # sorted kept names (the same on every machine)
    names = sorted(f'person_{i:02d}' for i in range(NUM_IDS))
    perm = np.random.default_rng(0).permutation(NUM_IDS)
    assert first == sorted(names[i] for i in perm[:6])
    # chosen among the identities the filters keep
    assert set(held_out(0, max_identities=10)) <= set(names[:10])


def test_teacher_cache_fingerprints_differ_between_parts(faces):
    def key(**kw):
        return ImageFolderFaces(faces, **kw).content_fingerprint()

    keys = [key(), key(val_identities=6, split='train'),
            key(val_identities=6, split='val'),
            key(val_identities=6, split='val', split_seed=1)]
    assert len(set(keys)) == len(keys)
    assert key(val_identities=6, split='val') == keys[2]


@pytest.mark.parametrize('kwargs, message', [
    (dict(split='test'), r"split must be one of \['all', 'train', 'val'\], "
     r"got 'test'"),
    (dict(val_identities=-1), r'val_identities must be an integer >= 0'),
    (dict(val_identities=2.5), r'val_identities must be an integer'),
    (dict(val_identities=1, split='val'), r'val_identities=1 holds out a '
     r'single identity.*at least 2'),
    (dict(split='val'), r"split='val' needs val_identities > 0"),
    (dict(split='train'), r"split='train' needs val_identities > 0"),
    (dict(split_seed=-1, val_identities=2), r'split_seed must be an '
     r'integer >= 0'),
    (dict(val_identities=NUM_IDS, split='train'),
     rf'val_identities={NUM_IDS} must be smaller than the {NUM_IDS} '
     r'identities kept.*lower val_identities'),
    (dict(val_identities=10, max_identities=10, split='val'),
     r'val_identities=10 must be smaller than the 10 identities kept'),
])
def test_split_errors_name_the_argument(faces, kwargs, message):
    with pytest.raises(ConfigError, match=r'ImageFolderFaces: ' + message):
        ImageFolderFaces(faces, **kwargs)


def test_split_arguments_are_checked_before_a_lazy_scan(tmp_path):
    # the folder does not exist: only an argument check can raise here
    with pytest.raises(ConfigError, match="split='val' needs val_identities"):
        ImageFolderFaces(str(tmp_path / 'absent'), split='val',
                         lazy_init=True)


# --------------------------------------------------- verification protocol
def fold_of_pairs(num_pairs, num_folds):
    """Fold index of every pair under the metric's contiguous split."""
    fold = np.empty(num_pairs, np.int64)
    for f, (_, test) in enumerate(kfold_indices(num_pairs, num_folds)):
        fold[test] = f
    return fold


def check_protocol(ds, proto, num_folds):
    pairs, issame = proto['pairs'], proto['issame']
    labels = folder_labels(ds)
    assert pairs.dtype == np.int64 and pairs.shape == (len(issame), 2)
    assert pairs.min() >= 0 and pairs.max() < len(ds)
    assert (pairs[:, 0] < pairs[:, 1]).all()
    assert len({tuple(p) for p in pairs.tolist()}) == len(pairs)
    np.testing.assert_array_equal(issame,
                                  labels[pairs[:, 0]] == labels[pairs[:, 1]])
    assert issame.sum() == (~issame).sum()
    np.testing.assert_array_equal(proto['labels'], labels)
    np.testing.assert_array_equal(proto['image_ids'], np.arange(len(ds)))
    assert proto['num_folds'] == num_folds
    # no identity in two of the folds the metric forms
    fold = fold_of_pairs(len(pairs), num_folds)
    owner = {}
    for (a, b), f in zip(pairs.tolist(), fold):
        for identity in (labels[a], labels[b]):
            assert owner.setdefault(identity, f) == f
    return fold


def test_val_part_as_a_verification_protocol(faces):
    ds = DATASETS.build(dict(type='ImageFolderVerification', data_root=faces,
                             val_identities=20, split='val'))
    assert len(ds) == 20 * PER_ID
    proto = ds.metainfo['verification']['val']
    # 3000 asked, 20 * C(4, 2) = 120 distinct positives exist: all of them
    assert proto['issame'].sum() == 120 and len(proto['issame']) == 240
    fold = check_protocol(ds, proto, 10)
    # equal folds here (2 identities each), balanced within each
    for f in range(10):
        assert proto['issame'][fold == f].sum() == 12 == (fold == f).sum() / 2
    assert proto['identity_names'] == ds.metainfo['classes']
    assert ds.get_data_info(0)['label'] == proto['labels'][0]
    ds.check_verification()


@pytest.mark.parametrize('ids, folds, positives', [
    # 7 identities in 3 folds (3, 2, 2): all 42 positive pairs fit the
    # metric's folds of 28 pairs (18 + 10, 12 + 16, 12 + 16)
    (7, 3, 42),
    # 12 identities in 5 folds (3, 3, 2, 2, 2): the 72 positives would need
    # folds of 29 pairs, but a fold of 2 identities (8 images) has only 28
    # pairs; 71 and 71 fit (folds of 29, 29, 28, 28, 28)
    (12, 5, 71)])
def test_uneven_folds_use_as_many_positives_as_fit(faces, ids, folds,
                                                   positives):
    ds = ImageFolderVerification(faces, val_identities=ids, split='val',
                                 num_folds=folds, protocol='held_out')
    proto = ds.metainfo['verification']['held_out']
    assert proto['issame'].sum() == positives
    check_protocol(ds, proto, folds)


def test_fewer_pairs_than_available_and_pair_seed(faces):
    def protocol(**kw):
        ds = ImageFolderVerification(faces, val_identities=20, split='val',
                                     num_pairs=30, **kw)
        return ds, ds.metainfo['verification']['val']

    ds, proto = protocol()
    fold = check_protocol(ds, proto, 10)
    assert len(proto['pairs']) == 60
    for f in range(10):
        assert proto['issame'][fold == f].tolist() == [True] * 3 + [False] * 3
    np.testing.assert_array_equal(protocol()[1]['pairs'], proto['pairs'])
    assert not np.array_equal(protocol(pair_seed=1)[1]['pairs'],
                              proto['pairs'])


def test_pair_sampling_is_uniform_without_repeats():
    # one fold, two identities of 3 images: 6 positive pairs, 9 negative
    labels = np.array([0, 0, 0, 1, 1, 1])
    seen_neg = set()
    for seed in range(40):
        pairs, issame, fold = identity_fold_pairs(labels, 2, 1, seed)
        assert issame.tolist() == [True, True, False, False]
        assert (fold == 0).all()
        same = labels[pairs[:, 0]] == labels[pairs[:, 1]]
        np.testing.assert_array_equal(same, issame)
        seen_neg |= {tuple(p) for p in pairs[~issame].tolist()}
    every = {(a, b) for a in range(3) for b in range(3, 6)}
    assert seen_neg == every  # every negative pair gets drawn


@pytest.mark.parametrize('kwargs, message', [
    (dict(num_pairs=0), r'num_pairs must be an integer >= 1'),
    (dict(num_folds=0), r'num_folds must be an integer >= 1'),
    (dict(num_folds=7), r'12 identities for num_folds=7.*at least 14.*'
     r'raise val_identities or lower num_folds'),
    (dict(indices=[0, 1]), r'`indices` is not supported'),
    (dict(on_bad_item='skip'), r"on_bad_item must be 'raise'"),
    (dict(protocol=''), r'protocol must be a non-empty name'),
])
def test_verification_errors_name_the_argument(faces, kwargs, message):
    with pytest.raises(ConfigError,
                       match=r'ImageFolderVerification: ' + message):
        ImageFolderVerification(faces, val_identities=12, split='val',
                                **kwargs)


def test_no_positive_pair_is_refused(tmp_path):
    for i in range(4):
        (tmp_path / f'id{i}').mkdir()
        Image.new('RGB', (8, 8), (i * 50, 0, 0)).save(tmp_path / f'id{i}'
                                                      / 'a.png')
    with pytest.raises(ConfigError, match='no identity has two images.*'
                       'min_images_per_identity=2'):
        ImageFolderVerification(str(tmp_path), num_folds=2)


def embeddings(labels, separable, seed=0):
    rng = np.random.default_rng(seed)
    dim = labels.max() + 1
    centre = np.eye(dim)[labels] if separable else np.zeros((len(labels),
                                                             dim))
    return (centre + 0.08 * rng.normal(size=centre.shape)).astype(np.float32)


@pytest.mark.parametrize('separable', [True, False])
def test_metric_scores_the_protocol(faces, separable):
    ds = ImageFolderVerification(faces, val_identities=20, split='val',
                                 lazy_init=True)
    metric = FaceVerificationMetric(bootstrap=20)
    metric.dataset_meta = ds.metainfo
    emb = embeddings(folder_labels(ds), separable)
    metric.process(None, [dict(index=i, embedding=torch.from_numpy(e))
                          for i, e in enumerate(emb)])
    out = metric.compute_metrics(metric.results)
    # TAR over all pairs of the 80 images: 20 * 6 positive, 3040 negative;
    # 1e-3 of 3040 negatives is too few false accepts to be reported
    assert out['val/num_positives'] == 120
    assert out['val/num_negatives'] == 80 * 79 / 2 - 120
    assert 'val/TAR@FAR=1e-2' in out and 'val/TAR@FAR=1e-3' not in out
    assert metric.bootstrap_info['val']['unit'] == 'identity'
    assert metric.bootstrap_info['val']['count'] == 20
    if separable:
        assert out['val/accuracy'] > 95
        assert out['val/TAR@FAR=1e-2'] > 0.9
    else:  # no identity signal: chance
        assert 30 < out['val/accuracy'] < 70
        assert out['val/TAR@FAR=1e-2'] < 0.2
