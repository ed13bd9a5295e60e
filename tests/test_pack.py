"""Writers (write_recordio, write_bin) and `kdzoo pack rec|bin`."""
import io
import os
import tarfile

import numpy as np
import pytest
from conftest import shared_path
from PIL import Image

from kdzoo.cli import main
from kdzoo.datasets import (ImageFolderFaces, InsightFaceBinDataset,
                            RecordIODataset, write_bin, write_recordio)
from kdzoo.datasets.bin_dataset import load_bin_pairs
from kdzoo.datasets.pack import encode_face_image, read_pairs_file
from kdzoo.utils.errors import ConfigError, DataError


def png(img):
    buf = io.BytesIO()
    Image.fromarray(img).save(buf, format='PNG')
    return buf.getvalue()


def random_images(n, h=12, w=10, seed=0):
    rng = np.random.default_rng(seed)
    return [rng.integers(0, 256, (h, w, 3), dtype=np.uint8) for _ in range(n)]


def make_folder(root, counts, fmt='PNG', size=(12, 10)):
    """{identity: n images} -> {relative path: file bytes}."""
    imgs = iter(random_images(sum(counts.values()), *size))
    files = {}
    for identity, n in counts.items():
        os.makedirs(os.path.join(root, identity), exist_ok=True)
        for i in range(n):
            rel = os.path.join(identity, f'{i}.{fmt.lower()}')
            Image.fromarray(next(imgs)).save(os.path.join(root, rel),
                                             format=fmt)
            files[rel] = open(os.path.join(root, rel), 'rb').read()
    return files


def test_write_recordio_rejects_bad_items_and_leaves_nothing(tmp_path):
    rec, idx = str(tmp_path / 'a.rec'), str(tmp_path / 'a.idx')
    blob = png(random_images(1)[0])
    with pytest.raises(ConfigError, match='item 2 has label 0 again after '
                       'other labels'):
        write_recordio([(0, blob), (1, blob), (0, blob)], rec, idx)
    with pytest.raises(ConfigError, match=r"item 0 has label 1\.5"):
        write_recordio([(1.5, blob)], rec, idx)
    with pytest.raises(ConfigError, match='no images to write'):
        write_recordio([], rec, idx)

    def failing():
        yield 0, blob
        raise DataError('x.jpg: cannot be decoded')
    with pytest.raises(DataError, match='x.jpg'):
        write_recordio(failing(), rec, idx)
    assert os.listdir(tmp_path) == []  # no .rec, .idx or temporary left
    # an existing pair is left untouched by a failed write
    write_recordio([(0, blob)], rec, idx)
    before = open(rec, 'rb').read(), open(idx).read()
    with pytest.raises(DataError):
        write_recordio(failing(), rec, idx)
    assert (open(rec, 'rb').read(), open(idx).read()) == before
    assert sorted(os.listdir(tmp_path)) == ['a.idx', 'a.rec']


def test_write_bin_round_trip(tmp_path):
    imgs = random_images(6)
    pairs = [(png(imgs[0]), png(imgs[1])), (png(imgs[2]), png(imgs[3])),
             (png(imgs[4]), png(imgs[5]))]
    path = str(tmp_path / 'ver.bin')
    assert write_bin(pairs, [True, False, True], path) == 3
    blobs, issame = load_bin_pairs(path)
    assert blobs == [b for pair in pairs for b in pair]
    assert issame.tolist() == [True, False, True]
    ds = InsightFaceBinDataset(path)
    ver = ds.metainfo['verification']['ver']
    assert ver['pairs'].tolist() == [[0, 1], [2, 3], [4, 5]]
    assert ver['issame'].tolist() == [True, False, True]
    np.testing.assert_array_equal(ds.get_data_info(3)['img'], imgs[3])
    with pytest.raises(ConfigError, match='2 pairs but 1 issame'):
        write_bin(pairs[:2], [True], path)
    with pytest.raises(ConfigError, match='pair 1 is not two encoded'):
        write_bin([pairs[0], (b'x', None)], [True, True], path)
    with pytest.raises(ConfigError, match="issame\\[0\\] is 'yes'"):
        write_bin(pairs[:1], ['yes'], path)


def test_read_pairs_file(tmp_path):
    path = tmp_path / 'pairs.txt'
    path.write_text('# comment\n\na/1.png b/2.png 0\n'
                    'with space/1.png\tb/1.png\t1\n')
    assert read_pairs_file(str(path)) == [
        ('a/1.png', 'b/2.png', False), ('with space/1.png', 'b/1.png', True)]
    path.write_text('a.png b.png 1\na.png b.png yes\n')
    with pytest.raises(DataError, match=r"pairs\.txt: line 2 is 'a\.png "
                       r"b\.png yes'; expected"):
        read_pairs_file(str(path))
    with pytest.raises(DataError, match='pairs file not found'):
        read_pairs_file(str(tmp_path / 'none.txt'))


def test_encode_face_image(tmp_path):
    make_folder(tmp_path, {'a': 1}, fmt='JPEG')
    jpg = str(tmp_path / 'a' / '0.jpeg')
    data = open(jpg, 'rb').read()
    assert encode_face_image(jpg) == data  # kept byte for byte
    small = encode_face_image(jpg, (6, 5), quality=80)
    with Image.open(io.BytesIO(small)) as im:
        assert (im.format, im.size) == ('JPEG', (5, 6))
    bad = tmp_path / 'bad.png'
    bad.write_bytes(b'\x89PNG broken')
    with pytest.raises(DataError, match=r'bad\.png: cannot be decoded'):
        encode_face_image(str(bad))
    # a missing file says so, not "cannot be decoded"
    with pytest.raises(DataError, match=r'gone\.png: cannot be read \(No '
                       r'such file'):
        encode_face_image(str(tmp_path / 'gone.png'))


def test_cli_pack_rec_round_trip(tmp_path, capsys):
    folder = str(tmp_path / 'faces')
    files = make_folder(folder, {'id2': 2, 'id1': 3, 'id3': 1}, fmt='JPEG')
    assert main(['pack', 'rec', folder, str(tmp_path / 'out' / 'faces')]) == 0
    out = capsys.readouterr().out.strip().splitlines()
    assert out == [f'packed 6 images of 3 identities -> '
                   f'{tmp_path}/out/faces.rec, {tmp_path}/out/faces.idx']
    ds = RecordIODataset(str(tmp_path / 'out' / 'faces.rec'))
    ref = ImageFolderFaces(folder)
    assert len(ds) == len(ref) == 6
    assert ds.metainfo['num_classes'] == 3
    for i in range(6):
        got, want = ds.get_data_info(i), ref.get_data_info(i)
        assert got['label'] == want['label']
        # JPEGs are stored unchanged: same pixels as PIL decoding the file
        rel = os.path.relpath(want['img_path'], folder)
        header, image = ds.reader.read_header(i + 1)
        assert image == files[rel]
        np.testing.assert_array_equal(got['img'], want['img'])
    # a directory as OUT_PREFIX gets InsightFace's train.rec/train.idx;
    # PNGs are re-encoded as JPEG, resized
    os.makedirs(tmp_path / 'dir')
    assert main(['pack', 'rec', folder, str(tmp_path / 'dir'),
                 '--image-size', '8', '--max-identities', '2',
                 '--quality', '90']) == 0
    ds = RecordIODataset(data_root=str(tmp_path / 'dir'))
    assert len(ds) == 5  # id1 (3) + id2 (2)
    assert ds.get_data_info(0)['img'].shape == (8, 8, 3)
    assert ds.reader.read_header(1)[1][:2] == b'\xff\xd8'


def test_cli_pack_bin_round_trip(tmp_path, capsys):
    root = str(tmp_path / 'faces')
    files = make_folder(root, {'a': 2, 'b': 1}, fmt='JPEG')
    pairs = tmp_path / 'pairs.txt'
    pairs.write_text('a/0.jpeg a/1.jpeg 1\na/0.jpeg b/0.jpeg 0\n')
    out = str(tmp_path / 'my.bin')
    assert main(['pack', 'bin', '--pairs', str(pairs), '--root', root,
                 out]) == 0
    assert capsys.readouterr().out.strip() == \
        f'packed 2 pairs (1 same, 3 images) -> {out}'
    blobs, issame = load_bin_pairs(out)
    assert blobs == [files['a/0.jpeg'], files['a/1.jpeg'],
                     files['a/0.jpeg'], files['b/0.jpeg']]
    assert issame.tolist() == [True, False]
    # errors are one line on stderr, exit code 2, nothing written
    pairs.write_text('a/0.jpeg missing.jpg 1\n')
    assert main(['pack', 'bin', '--pairs', str(pairs), '--root', root,
                 str(tmp_path / 'new.bin')]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith('kdzoo pack: error: ') and '\n' not in err
    assert "image 'missing.jpg' not found under root" in err
    assert not os.path.exists(tmp_path / 'new.bin')
    assert main(['pack', 'rec', str(tmp_path / 'nowhere'),
                 str(tmp_path / 'x')]) == 2
    assert 'nowhere: image folder not found' in capsys.readouterr().err


def test_pack_insightface_small_dataset(tmp_path):
    tar = shared_path('data', 'train', 'insightface_small_dataset.tar')
    with tarfile.open(tar) as t:
        t.extractall(tmp_path, filter='data')
    src = tmp_path / 'small_dataset'
    folder = tmp_path / 'faces'
    expected = []
    for line in (src / 'label.txt').read_text().split('\n'):
        if not line.strip():
            continue
        rel, label = line.split('\t')
        data = (src / rel).read_bytes()
        os.makedirs(folder / f'{int(label):03d}')
        (folder / f'{int(label):03d}' / os.path.basename(rel)).write_bytes(
            data)
        expected.append((int(label), data))
    expected.sort(key=lambda x: x[0])
    assert main(['pack', 'rec', str(folder), str(tmp_path / 'ms1m')]) == 0
    ds = RecordIODataset(str(tmp_path / 'ms1m.rec'))
    assert len(ds) == len(expected) == 10
    for i, (label, data) in enumerate(expected):
        assert ds.get_data_info(i)['label'] == label
        assert ds.reader.read_header(i + 1)[1] == data
    assert ds.get_data_info(0)['img'].shape == (112, 112, 3)
