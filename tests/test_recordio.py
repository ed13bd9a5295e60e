"""RecordIODataset / IndexedRecordReader: InsightFace .rec + .idx without
mxnet, checked against hand-built bytes, a second minimal parser in this
file and bytes written by mxnet itself."""
import io
import os
import pickle
import struct

import numpy as np
import pytest
import torch
from mmengine.dataset import BaseDataset, default_collate
from PIL import Image
from torch.utils.data import DataLoader

from kdzoo.datasets import RecordIODataset
from kdzoo.datasets.pack import write_recordio
from kdzoo.datasets.recordio import (IndexedRecordReader, frame_record,
                                     insightface_layout, pack_image_record,
                                     unpack_image_record)
from kdzoo.registry import DATASETS
from kdzoo.utils.errors import ConfigError, DataError

MAGIC = 0xCED7230A
M = struct.pack('<I', MAGIC)

# A set written by mxnet 1.9.1 itself (MXIndexedRecordIO.write_idx with
# recordio.pack), laid out as InsightFace's dataset_merge.py writes it:
# images 1..4 (labels 0, 0, 1, 1; payloads below, three of which hold the
# magic word at aligned positions, i.e. multi-part records), identity
# records 5 = (1, 3) and 6 = (3, 5), then header record 0 = (5, 7) LAST.
MX_PAYLOADS = [b'\x01\x02\x03\x00' + M + b'abc', M + M + b'xy',
               b'plain-bytes!', M]
MX_REC = bytes.fromhex(
    '0a23d7ce1c000020000000000000000001000000000000000000000000000000'
    '010203000a23d7ce03000060616263000a23d7ce180000200000000000000000'
    '020000000000000000000000000000000a23d7ce000000400a23d7ce02000060'
    '787900000a23d7ce24000000000000000000803f030000000000000000000000'
    '00000000706c61696e2d6279746573210a23d7ce18000020000000000000803f'
    '040000000000000000000000000000000a23d7ce000000600a23d7ce20000000'
    '0200000000000000050000000000000000000000000000000000803f00004040'
    '0a23d7ce20000000020000000000000006000000000000000000000000000000'
    '000040400000a0400a23d7ce2000000002000000000000000000000000000000'
    '00000000000000000000a0400000e040')
MX_IDX = '1\t0\n2\t48\n3\t100\n4\t144\n5\t184\n6\t224\n0\t264\n'


# -- an independent minimal reader of the format (dmlc recordio.cc, mxnet
# recordio.py), used to check what kdzoo writes --------------------------
def parse_rec(data):
    """All records of a .rec: list of (offset, payload)."""
    out, pos = [], 0
    while pos < len(data):
        start, parts = pos, []
        while True:
            magic, lrec = struct.unpack_from('<II', data, pos)
            assert magic == MAGIC
            cflag, n = lrec >> 29, lrec & (2**29 - 1)
            parts.append(data[pos + 8:pos + 8 + n])
            pos += 8 + (n + 3) // 4 * 4
            if cflag in (0, 3):
                break
        out.append((start, M.join(parts)))
    return out


def parse_payload(payload):
    flag, label, id_, id2 = struct.unpack_from('<IfQQ', payload)
    labels = list(struct.unpack_from(f'<{flag}f', payload, 24))
    return flag, label, id_, labels, payload[24 + 4 * flag:]


def png(img):
    buf = io.BytesIO()
    Image.fromarray(img).save(buf, format='PNG')
    return buf.getvalue()


def random_images(n, h=12, w=10, seed=0):
    rng = np.random.default_rng(seed)
    return [rng.integers(0, 256, (h, w, 3), dtype=np.uint8) for _ in range(n)]


def write_set(tmp_path, labels, images=None, name='train'):
    images = images or random_images(len(labels))
    rec, idx = str(tmp_path / f'{name}.rec'), str(tmp_path / f'{name}.idx')
    write_recordio(zip(labels, [png(i) for i in images]), rec, idx)
    return rec, idx, images


def write_raw(tmp_path, records, name='raw'):
    """Records {key: payload} framed in order, with their .idx."""
    rec, idx = tmp_path / f'{name}.rec', tmp_path / f'{name}.idx'
    data, lines = b'', ''
    for key, payload in records.items():
        lines += f'{key}\t{len(data)}\n'
        data += frame_record(payload)
    rec.write_bytes(data)
    idx.write_text(lines)
    return str(rec), str(idx)


def ir(flag, label, id_, labels=(), image=b''):
    """An image-record payload built by hand with struct."""
    return (struct.pack('<IfQQ', flag, label, id_, 0) +
            struct.pack(f'<{len(labels)}f', *labels) + image)


def test_framing_matches_hand_built_and_mxnet_bytes():
    assert frame_record(b'hello') == \
        struct.pack('<II', MAGIC, 5) + b'hello' + b'\0\0\0'
    assert frame_record(b'') == struct.pack('<II', MAGIC, 0)
    # aligned magic words split the record: first / middle / last parts
    assert frame_record(b'ABCD' + M + b'EFGH' + M + b'I') == (
        struct.pack('<II', MAGIC, 1 << 29 | 4) + b'ABCD' +
        struct.pack('<II', MAGIC, 2 << 29 | 4) + b'EFGH' +
        struct.pack('<II', MAGIC, 3 << 29 | 1) + b'I\0\0\0')
    # bytes mxnet 1.9.1 wrote for this payload (unaligned magic kept inline)
    assert frame_record(b'AB\0\0' + M + b'CD' + M + M + b'E') == \
        bytes.fromhex('0a23d7ce04000020414200000a23d7ce0b0000604344'
                      '0a23d7ce0a23d7ce4500')
    # and a whole mxnet-written image record
    assert frame_record(pack_image_record(1.0, b'plain-bytes!', id=3)) == \
        MX_REC[100:144]


def test_image_record_header_by_hand():
    assert pack_image_record(7, b'JPG', id=5) == ir(0, 7.0, 5, image=b'JPG')
    assert pack_image_record([3, 1], b'x', id=2) == \
        ir(2, 0.0, 2, (3.0, 1.0), b'x')
    header, image = unpack_image_record(ir(2, 0.0, 9, (4.0, 1.0), b'IMG'))
    assert (header.flag, header.id, header.labels, image) == \
        (2, 9, (4.0, 1.0), b'IMG')
    assert header.first_label == 4.0
    with pytest.raises(ValueError, match='announces 3 labels'):
        unpack_image_record(ir(3, 0.0, 0, (1.0, )))


def test_reads_mxnet_written_file(tmp_path):
    (tmp_path / 'mx.rec').write_bytes(MX_REC)
    (tmp_path / 'mx.idx').write_text(MX_IDX)
    reader = IndexedRecordReader(str(tmp_path / 'mx.rec'),
                                 str(tmp_path / 'mx.idx'))
    layout = insightface_layout(reader)
    assert layout.image_keys.tolist() == [1, 2, 3, 4]
    assert layout.identity_ranges == [(1, 3), (3, 5)]
    for key, payload in enumerate(MX_PAYLOADS, 1):
        header, image = reader.read_header(key)
        assert image == payload  # multi-part records re-joined
        assert (header.flag, header.id) == (0, key)
    assert [reader.label_of(k) for k in (1, 2, 3, 4)] == [0, 0, 1, 1]


def test_writer_layout_matches_insightface(tmp_path):
    labels = [0, 0, 0, 1, 2, 2]
    rec, idx, _ = write_set(tmp_path, labels)
    records = parse_rec(open(rec, 'rb').read())
    index = [tuple(map(int, line.split('\t')))
             for line in open(idx).read().splitlines()]
    # keys in order 0..N+C, offsets of the records as parsed independently
    assert index == [(k, off) for k, (off, _) in enumerate(records)]
    n, c = 6, 3
    flag, _, id_, lab, image = parse_payload(records[0][1])
    assert (flag, id_, lab, image) == (2, 0, [n + 1, n + 1 + c], b'')
    for key in range(1, n + 1):
        flag, label, id_, _, image = parse_payload(records[key][1])
        assert (flag, label, id_) == (0, labels[key - 1], key)
        assert image.startswith(b'\x89PNG')
    ranges = [parse_payload(records[k][1])[3] for k in range(n + 1, n + c + 1)]
    assert ranges == [[1, 4], [4, 5], [5, 7]]
    assert [parse_payload(records[k][1])[2]
            for k in range(n + 1, n + c + 1)] == [7, 8, 9]


def test_round_trip_labels_and_pixels(tmp_path):
    labels = [0, 0, 1, 2, 2, 2]
    rec, idx, images = write_set(tmp_path, labels)
    ds = DATASETS.build(dict(type='RecordIODataset', path_imgrec=rec))
    assert len(ds) == 6
    assert ds.metainfo['num_classes'] == 3
    for i in range(6):
        info = ds.get_data_info(i)
        assert (info['label'], info['age'], info['sample_idx']) == \
            (labels[i], -1, i)
        np.testing.assert_array_equal(info['img'], images[i])  # PNG lossless
    item = ds[3]
    assert item['inputs'].dtype == torch.uint8
    assert item['inputs'].shape == (3, 12, 10)
    assert item['data_samples']['label'] == 2
    # data_root with InsightFace's file names, resize
    ds = RecordIODataset(data_root=str(tmp_path), image_size=(6, 5))
    assert ds.get_data_info(0)['img'].shape == (6, 5, 3)


def test_jpeg_payload_decodes_like_pil(tmp_path):
    img = random_images(1, 16, 16)[0]
    buf = io.BytesIO()
    Image.fromarray(img).save(buf, format='JPEG', quality=90)
    rec, idx = str(tmp_path / 'j.rec'), str(tmp_path / 'j.idx')
    write_recordio([(4, buf.getvalue())], rec, idx)
    ds = RecordIODataset(rec, idx)
    with Image.open(io.BytesIO(buf.getvalue())) as im:
        expected = np.asarray(im.convert('RGB'))
    np.testing.assert_array_equal(ds.get_data_info(0)['img'], expected)
    assert ds.metainfo['num_classes'] == 5


def test_file_without_header_record(tmp_path):
    images = random_images(3)
    # keys 0..2 are all images (flag 0): no InsightFace header record
    rec, idx = write_raw(tmp_path, {
        k: ir(0, float(lab), k, image=png(images[k]))
        for k, lab in zip(range(3), [2, 0, 1])})
    ds = RecordIODataset(rec, idx)
    assert [ds.get_data_info(i)['label'] for i in range(3)] == [2, 0, 1]
    np.testing.assert_array_equal(ds.get_data_info(0)['img'], images[0])
    assert ds.metainfo['num_classes'] == 3
    # face2rec2-style multi-label images (flag 2: label, aligned); record 0
    # carries an image, so it is an image, not a header
    rec, idx = write_raw(tmp_path, {
        k: ir(2, 0.0, k, (float(lab), 1.0), png(images[k]))
        for k, lab in zip(range(3), [1, 1, 0])}, name='multi')
    ds = RecordIODataset(rec, idx)
    assert [ds.get_data_info(i)['label'] for i in range(3)] == [1, 1, 0]


def test_header_without_identity_records_and_label_check(tmp_path):
    images = random_images(2)
    # header (3, 3): images 1..2, no identity records
    rec, idx = write_raw(tmp_path, {
        0: ir(2, 0.0, 0, (3.0, 3.0)),
        1: ir(0, 5.0, 1, image=png(images[0])),
        2: ir(0, 1.0, 2, image=png(images[1]))})
    ds = RecordIODataset(rec, idx)
    assert [ds.get_data_info(i)['label'] for i in range(2)] == [5, 1]
    # an identity range whose images disagree on the label
    rec, idx = write_raw(tmp_path, {
        0: ir(2, 0.0, 0, (3.0, 4.0)),
        1: ir(0, 5.0, 1, image=png(images[0])),
        2: ir(0, 1.0, 2, image=png(images[1])),
        3: ir(2, 0.0, 3, (1.0, 3.0))}, name='bad')
    ds = RecordIODataset(rec, idx)
    with pytest.raises(DataError, match=r'record 2 at offset \d+ in .*bad.rec'
                       r': label 1 differs from label 5'):
        ds.get_data_info(1)


def test_missing_files(tmp_path):
    rec, idx, _ = write_set(tmp_path, [0, 1])
    os.remove(idx)
    with pytest.raises(DataError, match=r'train\.idx: RecordIO index .idx '
                       'file not found'):
        RecordIODataset(rec)
    with pytest.raises(DataError, match=r'nope\.rec: RecordIO .rec file not'):
        RecordIODataset(str(tmp_path / 'nope.rec'))
    with pytest.raises(ConfigError, match='path_imgrec.*data_root'):
        RecordIODataset()


def test_truncated_rec_names_key_and_offset(tmp_path):
    rec, idx = write_raw(tmp_path, {k: ir(0, 0.0, k, image=b'x' * 40)
                                    for k in range(3)})
    data = open(rec, 'rb').read()
    open(rec, 'wb').write(data[:-10])
    offset = 2 * len(frame_record(ir(0, 0.0, 0, image=b'x' * 40)))
    with pytest.raises(DataError, match=rf'record 2 at offset {offset} in '
                       r'.*raw\.rec: truncated'):
        RecordIODataset(rec, idx)


def test_idx_not_matching_rec(tmp_path):
    rec, idx, _ = write_set(tmp_path, [0, 1])
    lines = open(idx).read().splitlines()
    key, offset = lines[1].split('\t')  # image record 1
    lines[1] = f'{key}\t{int(offset) + 4}'
    open(idx, 'w').write('\n'.join(lines) + '\n')
    with pytest.raises(DataError, match=rf'record 1 at offset '
                       rf'{int(offset) + 4} in .*train\.rec: bad magic .*'
                       r'the \.idx does not match this \.rec'):
        RecordIODataset(rec, idx)
    lines[1] = f'{key}\t{os.path.getsize(rec) + 100}'
    open(idx, 'w').write('\n'.join(lines) + '\n')
    with pytest.raises(DataError, match=r'train\.idx: key 1 points to offset'
                       r' \d+, past the end of .*train\.rec'):
        RecordIODataset(rec, idx)
    open(idx, 'w').write('0\t0\n1\tforty\n')
    with pytest.raises(DataError, match=r"train\.idx: line 2 is '1\\tforty'"):
        RecordIODataset(rec, idx)


def test_corrupt_image_and_bad_label(tmp_path):
    rec, idx = write_raw(tmp_path, {1: ir(0, 0.0, 1, image=b'not a jpeg'),
                                    2: ir(0, 2.5, 2, image=b'x')})
    with pytest.raises(DataError, match=r'record 2 at offset 44 in .*raw\.rec'
                       r': label 2\.5 is not an integer class index'):
        RecordIODataset(rec, idx)
    rec, idx = write_raw(tmp_path, {1: ir(0, 0.0, 1, image=b'not a jpeg')},
                         name='corrupt')
    ds = RecordIODataset(rec, idx)
    with pytest.raises(DataError, match=r'record 1 at offset 0 in '
                       r'.*corrupt\.rec: image 0 cannot be decoded'):
        ds[0]


def test_pickle_and_dataloader(tmp_path):
    labels = [0, 1, 1, 2, 3]
    rec, idx, images = write_set(tmp_path, labels)
    ds = RecordIODataset(rec, idx)
    first = ds[1]['inputs']  # opens the file in this process
    assert ds.reader._file is not None
    clone = pickle.loads(pickle.dumps(ds))
    assert clone.reader._file is None
    assert torch.equal(clone[1]['inputs'], first)
    np.testing.assert_array_equal(clone.get_data_info(4)['img'], images[4])
    loader = DataLoader(ds, batch_size=2, collate_fn=default_collate,
                        num_workers=0)
    batches = list(loader)
    assert batches[0]['inputs'].shape == (2, 3, 12, 10)
    assert batches[0]['inputs'].dtype == torch.uint8
    assert torch.cat([b['data_samples']['label'] for b in batches]).tolist() \
        == labels
    assert torch.equal(batches[0]['inputs'][1],
                       torch.from_numpy(images[1]).permute(2, 0, 1))
    # worker processes reopen the file (fork keeps the parent's handle)
    loader = DataLoader(ds, batch_size=1, collate_fn=default_collate,
                        num_workers=2)
    batches = list(loader)  # items alternate between the two workers
    assert [b['data_samples']['label'].item() for b in batches] == labels
    for b, img in zip(batches, images):
        assert torch.equal(b['inputs'][0],
                           torch.from_numpy(img).permute(2, 0, 1))


def test_labels_stored_for_samplers(tmp_path):
    # IdentityBalancedSampler reads labels from the stored annotation
    rec, idx, _ = write_set(tmp_path, [0, 0, 1])
    ds = RecordIODataset(rec, idx)
    assert [BaseDataset.get_data_info(ds, i)['label']
            for i in range(3)] == [0, 0, 1]
