"""InsightFaceBinDataset: InsightFace .bin verification sets without mxnet."""
import io
import os
import pickle

import numpy as np
import pytest
import torch
from conftest import shared_path
from mmengine.dataset import default_collate
from PIL import Image

from kdzoo.datasets import InsightFaceBinDataset
from kdzoo.datasets.bin_dataset import load_bin_pairs
from kdzoo.evaluation import FaceVerificationMetric
from kdzoo.registry import DATASETS
from kdzoo.utils.errors import ConfigError, DataError


def encode(img, fmt='PNG'):
    buf = io.BytesIO()
    Image.fromarray(img).save(buf, format=fmt)
    return buf.getvalue()


def write_bin(path, images, issame):
    with open(path, 'wb') as f:
        pickle.dump((images, issame), f, protocol=pickle.HIGHEST_PROTOCOL)
    return str(path)


def random_images(n, h=16, w=12, seed=0):
    rng = np.random.default_rng(seed)
    return [rng.integers(0, 256, (h, w, 3), dtype=np.uint8) for _ in range(n)]


def test_round_trip_png_jpeg_and_grey(tmp_path):
    imgs = random_images(4)
    grey = imgs[3][:, :, 0]
    blobs = [encode(imgs[0]), encode(imgs[1], 'JPEG'), encode(imgs[2]),
             encode(grey)]
    path = write_bin(tmp_path / 'tiny.bin', blobs, [True, False])
    ds = DATASETS.build(dict(type='InsightFaceBinDataset', ann_file=path))
    assert len(ds) == 4
    ver = ds.metainfo['verification']
    assert list(ver) == ['tiny']
    assert ver['tiny']['pairs'].tolist() == [[0, 1], [2, 3]]
    assert ver['tiny']['issame'].tolist() == [True, False]
    assert ver['tiny']['num_folds'] == 10
    info = ds.get_data_info(2)
    assert (info['label'], info['age'], info['sample_idx']) == (-1, -1, 2)
    np.testing.assert_array_equal(info['img'], imgs[2])  # PNG is lossless
    np.testing.assert_array_equal(ds.get_data_info(3)['img'],
                                  np.repeat(grey[:, :, None], 3, 2))
    jpg = ds.get_data_info(1)['img']
    assert jpg.shape == (16, 12, 3) and jpg.dtype == np.uint8
    item = ds[0]  # default pipeline: PackFaceInputs
    assert item['inputs'].dtype == torch.uint8
    assert item['inputs'].shape == (3, 16, 12)
    assert item['data_samples'] == dict(index=0, label=-1, age=-1, flip=0)
    batch = default_collate([ds[i] for i in range(4)])
    assert batch['inputs'].shape == (4, 3, 16, 12)
    assert batch['data_samples']['index'].tolist() == [0, 1, 2, 3]


def test_numpy_blobs_resize_and_protocol_name(tmp_path):
    # Older .bin files (e.g. small_lfw.bin) hold uint8 arrays of the bytes.
    imgs = random_images(2)
    blobs = [np.frombuffer(encode(i), np.uint8).reshape(-1, 1) for i in imgs]
    path = write_bin(tmp_path / 'x.bin', blobs, np.array([True]))
    ds = InsightFaceBinDataset('x.bin', data_root=str(tmp_path),
                               protocol='standard', image_size=8,
                               num_folds=5)
    assert ds.get_data_info(0)['img'].shape == (8, 8, 3)
    assert ds.metainfo['verification']['standard']['num_folds'] == 5
    ds = InsightFaceBinDataset(path, image_size=(16, 12), lazy_init=True)
    assert list(ds.metainfo['verification']) == ['x']  # triggers full_init
    np.testing.assert_array_equal(ds.get_data_info(1)['img'], imgs[1])


@pytest.mark.parametrize('content,match', [
    (dict(), r'expected a pickled \(images, issame\) pair'),
    ((b'\xff', b'\xff', b'\xff'), 'expected a pickled'),
    (([b'a', b'b', b'c'], [True]), '3 images, an odd count'),
    (([b'a', b'b', b'c', b'd'], [True]), '1 issame labels for 4 images'),
    (([b'a', 3], [True]), 'image 1 is int'),
    (([b'a', b'b'], [[1, 0]]), 'issame must be a flat list'),
    ('not a pickle', 'not a readable InsightFace .bin pickle'),
])
def test_structure_errors_name_the_file(tmp_path, content, match):
    path = tmp_path / 'bad.bin'
    if content == 'not a pickle':
        path.write_bytes(b'\x00garbage')
    else:
        path.write_bytes(pickle.dumps(content))
    with pytest.raises(DataError, match=match) as exc:
        InsightFaceBinDataset(str(path))
    assert str(path) in str(exc.value)


def test_missing_file_and_unsafe_pickle(tmp_path):
    with pytest.raises(DataError, match='nope.bin: verification .bin file '
                       'not found'):
        InsightFaceBinDataset(str(tmp_path / 'nope.bin'))

    class Evil:
        def __reduce__(self):
            return (os.system, ('echo pwned',))

    path = tmp_path / 'evil.bin'
    path.write_bytes(pickle.dumps(([Evil(), b'x'], [True])))
    with pytest.raises(DataError, match='refusing global'):
        load_bin_pairs(str(path))


def test_corrupt_image_names_file_and_index(tmp_path):
    imgs = random_images(4)
    blobs = [encode(i, 'JPEG') for i in imgs]
    blobs[3] = blobs[3][:40]  # truncated JPEG
    path = write_bin(tmp_path / 'corrupt.bin', blobs, [True, False])
    ds = InsightFaceBinDataset(path)  # decoding is lazy
    ds[2]
    with pytest.raises(DataError, match=r'corrupt\.bin: image 3 cannot be '
                       'decoded'):
        ds[3]


def test_indices_subset_rejected(tmp_path):
    path = write_bin(tmp_path / 't.bin', [encode(i) for i in
                                          random_images(2)], [True])
    with pytest.raises(ConfigError, match='indices'):
        InsightFaceBinDataset(path, indices=[0])


def test_dataset_metainfo_feeds_verification_metric(tmp_path):
    imgs = random_images(40)
    issame = [i % 2 == 0 for i in range(20)]
    path = write_bin(tmp_path / 'mini.bin', [encode(i) for i in imgs],
                     issame)
    ds = InsightFaceBinDataset(path)
    # 10 negatives: FAR 0.1 would rest on one, so it is only reported
    # when the metric is told one false accept suffices
    metric = FaceVerificationMetric(fars=(0.1, ), min_false_accepts=1)
    metric.dataset_meta = ds.metainfo
    # embedding = the image itself (flattened): same pairs get a copy.
    for i in range(len(ds)):
        src = i - 1 if i % 2 and issame[i // 2] else i
        metric.process(None, [dict(index=i, embedding=torch.from_numpy(
            imgs[src].astype(np.float32).ravel()))])
    out = metric.evaluate(len(ds))
    assert out['mini/accuracy'] == 100.0
    assert out['mini/TAR@FAR=1e-1'] == 1.0 and out['mini/roc_auc'] == 1.0


# ---------------------------------------------------------------- real data
def test_small_lfw_fixture():
    path = shared_path('data', 'verification', 'small_lfw.bin')
    ds = InsightFaceBinDataset(path)
    assert len(ds) == 20
    ver = ds.metainfo['verification']['small_lfw']
    assert ver['pairs'].shape == (10, 2) and ver['issame'].all()
    item = ds[7]
    assert item['inputs'].shape == (3, 112, 112)
    assert item['inputs'].dtype == torch.uint8
    assert item['data_samples']['index'] == 7
    assert 20 < item['inputs'].float().mean() < 235  # a real photo


@pytest.mark.parametrize('name,n_pairs', [('lfw', 6000), ('cfp_ff', 7000)])
def test_real_bin_headers(name, n_pairs):
    path = shared_path('data', 'verification', f'{name}.bin')
    blobs, issame = load_bin_pairs(path)
    assert len(blobs) == 2 * n_pairs and len(issame) == n_pairs
    assert issame.sum() == n_pairs // 2
    if name == 'lfw':  # pairs.txt order: 10 folds of 300 same + 300 diff
        assert issame[:300].all() and not issame[300:600].any()
    ds = InsightFaceBinDataset(path)
    assert len(ds) == 2 * n_pairs
    assert ds.get_data_info(len(ds) - 1)['img'].shape == (112, 112, 3)


def test_bin_sets_concatenate_files_with_offset_protocols(tmp_path):
    a_imgs, b_imgs = random_images(4, seed=1), random_images(6, seed=2)
    write_bin(tmp_path / 'a.bin', [encode(i) for i in a_imgs], [True, False])
    write_bin(tmp_path / 'b.bin', [encode(i) for i in b_imgs],
              [False, True, True])
    ds = DATASETS.build(dict(type='InsightFaceBinSets',
                             ann_files=['a.bin', 'b.bin'],
                             data_root=str(tmp_path)))
    assert len(ds) == 10
    ver = ds.metainfo['verification']
    assert list(ver) == ['a', 'b']
    assert ver['a']['pairs'].tolist() == [[0, 1], [2, 3]]
    assert ver['b']['pairs'].tolist() == [[4, 5], [6, 7], [8, 9]]
    assert ver['b']['issame'].tolist() == [False, True, True]
    # image 7 of the set is image 3 of b.bin
    assert np.array_equal(ds[7]['inputs'].permute(1, 2, 0).numpy(),
                          b_imgs[3])
    named = DATASETS.build(dict(type='InsightFaceBinSets',
                                ann_files=[str(tmp_path / 'a.bin')],
                                protocols=['lfw']))
    assert list(named.metainfo['verification']) == ['lfw']


def test_bin_sets_errors_name_the_file_and_image(tmp_path):
    imgs = [encode(i) for i in random_images(4)]
    imgs[3] = b'not an image'
    write_bin(tmp_path / 'good.bin', [encode(i) for i in random_images(2)],
              [True])
    write_bin(tmp_path / 'bad.bin', imgs, [True, False])
    ds = DATASETS.build(dict(type='InsightFaceBinSets', ann_files=[
        str(tmp_path / 'good.bin'), str(tmp_path / 'bad.bin')]))
    with pytest.raises(DataError, match=r'bad\.bin: image 3 cannot be '
                       'decoded'):
        ds[5]
    with pytest.raises(ConfigError, match='non-empty list'):
        DATASETS.build(dict(type='InsightFaceBinSets',
                            ann_files=str(tmp_path / 'good.bin')))
    with pytest.raises(ConfigError, match='distinct names'):
        DATASETS.build(dict(type='InsightFaceBinSets', ann_files=[
            str(tmp_path / 'good.bin')] * 2))
    with pytest.raises(DataError, match='missing.bin: verification .bin '
                       'file not found'):
        DATASETS.build(dict(type='InsightFaceBinSets', ann_files=[
            str(tmp_path / 'missing.bin')]))
