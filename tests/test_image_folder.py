"""ImageFolderFaces: one folder per identity, labels in sorted folder order."""
import os
import pickle

import numpy as np
import pytest
import torch
from conftest import shared_path
from mmengine.dataset import default_collate
from PIL import Image

from kdzoo.datasets import ImageFolderFaces
from kdzoo.datasets.image_folder import scan_identity_folders
from kdzoo.registry import DATASETS
from kdzoo.utils.errors import ConfigError, DataError


def make_folder(root, layout, h=10, w=8, seed=0):
    """layout: {identity: [file names]} -> {relative path: pixels}."""
    rng = np.random.default_rng(seed)
    pixels = {}
    for identity, files in layout.items():
        os.makedirs(os.path.join(root, identity), exist_ok=True)
        for name in files:
            img = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
            path = os.path.join(root, identity, name)
            ext = os.path.splitext(name)[1].lower()
            if ext in ('.png', '.bmp'):
                Image.fromarray(img).save(path)
            elif ext == '.pgm':
                img = img[:, :, 0]
                Image.fromarray(img).save(path)
            elif ext in ('.jpg', '.jpeg'):
                Image.fromarray(img).save(path, format='JPEG')
                img = np.asarray(Image.open(path).convert('RGB'))
            else:
                open(path, 'w').write('not an image')
            pixels[os.path.join(identity, name)] = img
    return pixels


def test_labels_pixels_and_metainfo(tmp_path):
    pixels = make_folder(tmp_path, {
        'bob': ['b.png', 'a.PNG', 'notes.txt', '.hidden.png'],
        'alice': ['x.bmp'],
        'carl': ['1.jpg', '2.jpeg', '3.pgm'],
        '.trash': ['z.png']})
    ds = DATASETS.build(dict(type='ImageFolderFaces',
                             data_root=str(tmp_path)))
    assert ds.metainfo['classes'] == ['alice', 'bob', 'carl']
    assert ds.metainfo['num_classes'] == 3
    expected = [('alice/x.bmp', 0), ('bob/a.PNG', 1), ('bob/b.png', 1),
                ('carl/1.jpg', 2), ('carl/2.jpeg', 2), ('carl/3.pgm', 2)]
    assert len(ds) == len(expected)
    for i, (rel, label) in enumerate(expected):
        info = ds.get_data_info(i)
        assert info['img_path'] == os.path.join(str(tmp_path), rel)
        assert (info['label'], info['age']) == (label, -1)
        img = pixels[rel]
        if img.ndim == 2:  # grey PGM -> RGB
            img = np.repeat(img[:, :, None], 3, axis=2)
        np.testing.assert_array_equal(info['img'], img)
    batch = default_collate([ds[i] for i in range(len(ds))])
    assert batch['inputs'].shape == (6, 3, 10, 8)
    assert batch['inputs'].dtype == torch.uint8
    assert batch['data_samples']['label'].tolist() == [0, 1, 1, 2, 2, 2]


def test_subsampling_is_deterministic(tmp_path):
    make_folder(tmp_path, {'a': ['1.png'], 'b': ['1.png', '2.png', '3.png'],
                           'c': ['1.png', '2.png'], 'd': ['9.png', '8.png']})
    ds = ImageFolderFaces(str(tmp_path), min_images_per_identity=2)
    assert ds.metainfo['classes'] == ['b', 'c', 'd']
    ds = ImageFolderFaces(str(tmp_path), min_images_per_identity=2,
                          max_identities=2, max_images_per_identity=2)
    assert ds.metainfo['classes'] == ['b', 'c']
    assert [(os.path.relpath(ds.get_data_info(i)['img_path'], tmp_path),
             ds.get_data_info(i)['label']) for i in range(len(ds))] == \
        [('b/1.png', 0), ('b/2.png', 0), ('c/1.png', 1), ('c/2.png', 1)]
    ds = ImageFolderFaces(str(tmp_path), max_images_per_identity=1,
                          image_size=4)
    assert len(ds) == 4
    assert os.path.basename(ds.get_data_info(3)['img_path']) == '8.png'
    assert ds.get_data_info(0)['img'].shape == (4, 4, 3)


def test_errors(tmp_path):
    with pytest.raises(DataError, match=r'missing: image folder not found'):
        ImageFolderFaces(str(tmp_path / 'missing'))
    flat = tmp_path / 'flat'
    flat.mkdir()
    Image.new('RGB', (4, 4)).save(flat / 'a.png')
    with pytest.raises(DataError, match=r'flat: no identity folders'):
        ImageFolderFaces(str(flat))
    make_folder(tmp_path / 'empty', {'a': ['x.txt'], 'b': []})
    with pytest.raises(DataError, match=r'empty: no images .* in its 2 '
                       'identity folders'):
        ImageFolderFaces(str(tmp_path / 'empty'))
    make_folder(tmp_path / 'ok', {'a': ['1.png'], 'b': ['bad.jpg']})
    (tmp_path / 'ok' / 'b' / 'bad.jpg').write_bytes(b'\xff\xd8 truncated')
    with pytest.raises(ConfigError, match='min_images_per_identity=5'):
        ImageFolderFaces(str(tmp_path / 'ok'), min_images_per_identity=5)
    with pytest.raises(ConfigError, match='max_identities must be an '
                       'integer >= 1'):
        ImageFolderFaces(str(tmp_path / 'ok'), max_identities=0)
    with pytest.raises(ConfigError, match='image_size must be'):
        ImageFolderFaces(str(tmp_path / 'ok'), image_size=(1, 2, 3))
    ds = ImageFolderFaces(str(tmp_path / 'ok'))
    ds[0]
    with pytest.raises(DataError, match=r'ok/b/bad\.jpg: image 1 cannot be '
                       'decoded'):
        ds[1]


def test_pickle_lazy_init_and_extensions(tmp_path):
    pixels = make_folder(tmp_path, {'p': ['a.png', 'b.jpg']})
    ds = ImageFolderFaces(str(tmp_path), extensions=['png'], lazy_init=True)
    assert ds.metainfo['num_classes'] == 1  # triggers the scan
    clone = pickle.loads(pickle.dumps(ds))
    assert len(clone) == 1
    np.testing.assert_array_equal(clone.get_data_info(0)['img'],
                                  pixels['p/a.png'])
    scan = scan_identity_folders(str(tmp_path), extensions=('.JPG', ))
    assert scan.samples == [(os.path.join(str(tmp_path), 'p', 'b.jpg'), 0)]


def test_celeba299_layout():
    root = shared_path('data', 'train', 'celeba299', 'images')
    scan = scan_identity_folders(root)
    assert len(scan.classes) == 299
    assert len(scan.samples) == 6246
    ds = ImageFolderFaces(root, max_identities=3, max_images_per_identity=2)
    assert len(ds) == 6
    assert ds.get_data_info(5)['img'].shape == (112, 112, 3)


def test_extensions_as_a_plain_string_is_refused(tmp_path):
    from kdzoo.registry import DATASETS
    from kdzoo.utils.errors import ConfigError
    (tmp_path / 'id0').mkdir()
    with pytest.raises(ConfigError, match=r"extensions must be a list.*"
                       r"got 'jpg'"):
        DATASETS.build(dict(type='ImageFolderFaces', data_root=str(tmp_path),
                            extensions='jpg'))
