"""MXNet RecordIO face training sets (InsightFace ``train.rec`` +
``train.idx``) read without mxnet.

Framing (dmlc-core ``src/recordio.cc``): every record starts on a 4-byte
boundary with two little-endian uint32 words, the magic ``0xced7230a`` and
``lrec`` = ``cflag << 29 | length``; ``length`` payload bytes follow, zero
padded to a multiple of 4. A payload that contains the magic word at a 4-byte
aligned position is split there into parts (the magic itself is dropped):
``cflag`` 0 = whole record, 1 = first part, 2 = middle part, 3 = last part;
a reader joins the parts with the magic in between.

Image records (mxnet ``python/mxnet/recordio.py``, ``pack``/``unpack``): the
payload starts with ``IRHeader`` = flag uint32, label float32, id uint64,
id2 uint64 (24 bytes). When ``flag > 0`` the header's label is unused and
``flag`` float32 labels follow; the encoded image (JPEG) comes last.

The ``.idx`` file is text, one ``key<TAB>offset`` line per record: the byte
offset of the record's first frame in the ``.rec``.

InsightFace layout (read by ``recognition/arcface_torch/dataset.py``
``MXFaceDataset``; written by ``src/data/face2rec2.py`` and
``dataset_merge.py``): record 0 is a header with ``flag > 0``, no image and
labels ``(A, B)``: image records have keys ``1 .. A-1``, identity records
keys ``A .. B-1``. Identity record ``k`` carries labels ``(a, b)``: the images
of one identity are keys ``a .. b-1``. When record 0 is absent or is not such
a header (``flag == 0``, or it carries an image), every key in the ``.idx``
is an image. An image's class is its header label (the first of several).
"""
import os
import struct
from typing import List, NamedTuple, Optional, Sequence, Tuple, Union

import numpy as np
from mmengine.dataset import BaseDataset

from kdzoo.datasets.bin_dataset import decode_image
from kdzoo.datasets.bad_items import SkipBadItemsMixin
from kdzoo.datasets.dataset_args import LazyMetainfoMixin, build_pipeline
from kdzoo.datasets.fingerprint import files_fingerprint
from kdzoo.registry import DATASETS
from kdzoo.utils.checks import check_size
from kdzoo.utils.errors import ConfigError, DataError

__all__ = ['RECORDIO_MAGIC', 'IRHeader', 'frame_record', 'pack_image_record',
           'unpack_image_record', 'IndexedRecordReader', 'InsightFaceLayout',
           'insightface_layout', 'RecordIODataset']

RECORDIO_MAGIC = 0xCED7230A
_MAGIC_BYTES = struct.pack('<I', RECORDIO_MAGIC)
_FRAME = struct.Struct('<II')  # magic, lrec
_LENGTH_BITS = 29
_MAX_LENGTH = (1 << _LENGTH_BITS) - 1
_IR_HEADER = struct.Struct('<IfQQ')  # flag, label, id, id2
WHOLE, FIRST, MIDDLE, LAST = 0, 1, 2, 3  # continuation flags (cflag)


def _pad4(n: int) -> int:
    return (n + 3) & ~3


class IRHeader(NamedTuple):
    """mxnet's image-record header; ``labels`` are the ``flag`` float32
    labels after it (empty when ``flag == 0``: then ``label`` is the label)."""
    flag: int
    label: float
    id: int
    id2: int
    labels: Tuple[float, ...] = ()

    @property
    def first_label(self) -> float:
        return self.labels[0] if self.flag > 0 else self.label


def frame_record(payload: bytes) -> bytes:
    """One record's bytes as dmlc's ``RecordIOWriter::WriteRecord`` writes
    them: split at every 4-byte aligned magic word, each part framed, the
    last part zero padded to 4 bytes."""
    if len(payload) > _MAX_LENGTH:
        raise ValueError(f'a RecordIO record holds at most {_MAX_LENGTH} '
                         f'bytes, got {len(payload)}')
    out, start = [], 0
    for i in range(0, len(payload) & ~3, 4):
        if payload[i:i + 4] == _MAGIC_BYTES:
            cflag = FIRST if start == 0 else MIDDLE
            out += [_FRAME.pack(RECORDIO_MAGIC, cflag << _LENGTH_BITS |
                                (i - start)), payload[start:i]]
            start = i + 4
    cflag = LAST if start else WHOLE
    rest = len(payload) - start
    out += [_FRAME.pack(RECORDIO_MAGIC, cflag << _LENGTH_BITS | rest),
            payload[start:], bytes(_pad4(rest) - rest)]
    return b''.join(out)


def pack_image_record(label: Union[float, Sequence[float]], image: bytes,
                      id: int = 0, id2: int = 0) -> bytes:
    """IRHeader + labels + image, as mxnet's ``recordio.pack``: a scalar
    label goes in the header (flag 0); a sequence sets ``flag`` to its
    length, the header label to 0 and is stored as float32 after it."""
    if np.isscalar(label):
        return _IR_HEADER.pack(0, float(label), id, id2) + image
    labels = np.asarray(label, dtype='<f4').ravel()
    return (_IR_HEADER.pack(labels.size, 0.0, id, id2) + labels.tobytes() +
            image)


def unpack_image_record(payload: bytes) -> Tuple[IRHeader, bytes]:
    """Inverse of :func:`pack_image_record` -> (header, image bytes).
    Raises ``ValueError`` when the payload is too short for its header."""
    if len(payload) < _IR_HEADER.size:
        raise ValueError(f'{len(payload)} bytes, shorter than the '
                         f'{_IR_HEADER.size}-byte image-record header')
    flag, label, id_, id2 = _IR_HEADER.unpack_from(payload)
    end = _IR_HEADER.size + 4 * flag
    if len(payload) < end:
        raise ValueError(f'header flag {flag} announces {flag} labels but '
                         f'the record has {len(payload)} bytes')
    labels = tuple(float(x) for x in np.frombuffer(
        payload, '<f4', flag, _IR_HEADER.size)) if flag else ()
    return IRHeader(flag, label, id_, id2, labels), payload[end:]


def _read_index(idx_path: str) -> Tuple[np.ndarray, np.ndarray]:
    """``.idx`` text -> (keys, offsets), int64, sorted by key."""
    with open(idx_path, 'rb') as f:
        text = f.read().decode('ascii', errors='replace')
    fields = text.split()
    try:
        if len(fields) % 2:
            raise ValueError
        table = np.array(fields, dtype=np.int64).reshape(-1, 2)
    except (ValueError, OverflowError):
        table = None
    if table is None or (table < 0).any():
        for n, line in enumerate(text.splitlines(), 1):
            parts = line.split()
            if parts and not (len(parts) == 2 and all(
                    p.isdigit() for p in parts)):
                raise DataError(f'{idx_path}: line {n} is {line.strip()!r}; '
                                'expected "<key><TAB><offset>" (integers)')
        raise DataError(f'{idx_path}: not a RecordIO index (expected '
                        '"<key><TAB><offset>" lines of 64-bit integers)')
    order = np.argsort(table[:, 0], kind='stable')
    keys, offsets = table[order, 0], table[order, 1]
    dup = keys[1:][keys[1:] == keys[:-1]]
    if dup.size:
        raise DataError(f'{idx_path}: key {int(dup[0])} is listed more than '
                        'once; each record key must appear on one line')
    return keys, offsets


class IndexedRecordReader:
    """Random access to the records of a ``.rec`` by key through its
    ``.idx``. The file is opened lazily in each process (DataLoader workers
    reopen it; pickling drops the handle), so one reader can be shared."""

    def __init__(self, rec_path: str, idx_path: str):
        for path, what in ((rec_path, 'RecordIO .rec'),
                           (idx_path, 'RecordIO index .idx')):
            if not os.path.isfile(path):
                raise DataError(f'{path}: {what} file not found')
        self.rec_path, self.idx_path = rec_path, idx_path
        self.size = os.path.getsize(rec_path)
        self.keys, self.offsets = _read_index(idx_path)
        past = np.flatnonzero(self.offsets + _FRAME.size > self.size)
        if past.size:
            i = past[0]
            raise DataError(
                f'{idx_path}: key {self.keys[i]} points to offset '
                f'{self.offsets[i]}, past the end of {rec_path} ({self.size} '
                'bytes); the .idx does not belong to this .rec, or the .rec '
                'is truncated')
        self._file = None
        self._pid = None

    def __len__(self) -> int:
        return len(self.keys)

    def __contains__(self, key: int) -> bool:
        i = np.searchsorted(self.keys, key)
        return bool(i < len(self.keys) and self.keys[i] == key)

    def offset(self, key: int) -> int:
        if key not in self:
            raise DataError(f'{self.idx_path}: no record with key {key}')
        return int(self.offsets[np.searchsorted(self.keys, key)])

    def _handle(self):
        if self._file is None or self._pid != os.getpid():
            self._file = open(self.rec_path, 'rb')
            self._pid = os.getpid()
        return self._file

    def close(self) -> None:
        if self._file is not None and self._pid == os.getpid():
            self._file.close()
        self._file = None

    def __getstate__(self):
        state = self.__dict__.copy()
        state['_file'] = state['_pid'] = None
        return state

    def _where(self, key, offset) -> str:
        return f'record {key} at offset {offset} in {self.rec_path}'

    def read(self, key: int, offset: Optional[int] = None,
             limit: Optional[int] = None) -> bytes:
        """The payload of record ``key`` (parts joined). With ``limit``, at
        most that many leading bytes (enough to read a header cheaply)."""
        if offset is None:
            offset = self.offset(key)
        f = self._handle()
        parts, pos = [], offset
        while True:
            f.seek(pos)
            frame = f.read(_FRAME.size)
            if len(frame) < _FRAME.size:
                raise DataError(
                    f'{self._where(key, offset)}: truncated, the file ends '
                    f'at byte {self.size} inside the record; the .rec is '
                    'incomplete (copy it again)')
            magic, lrec = _FRAME.unpack(frame)
            if magic != RECORDIO_MAGIC:
                raise DataError(
                    f'{self._where(key, offset)}: bad magic 0x{magic:08x} at '
                    f'byte {pos} (expected 0x{RECORDIO_MAGIC:08x}); the .idx '
                    'does not match this .rec')
            cflag, length = lrec >> _LENGTH_BITS, lrec & _MAX_LENGTH
            if (cflag in (WHOLE, FIRST)) != (pos == offset) or cflag > LAST:
                raise DataError(
                    f'{self._where(key, offset)}: unexpected continuation '
                    f'flag {cflag} at byte {pos}; the .idx does not match '
                    'this .rec, or the .rec is corrupt')
            end = pos + _FRAME.size + length
            if end > self.size:
                raise DataError(
                    f'{self._where(key, offset)}: truncated, a {length}-byte '
                    f'part starts at byte {pos} but the file ends at byte '
                    f'{self.size}; the .rec is incomplete (copy it again)')
            if cflag == WHOLE and limit is not None:
                length = min(length, limit)
            parts.append(f.read(length))
            if cflag in (WHOLE, LAST):
                return b''.join(parts)
            parts.append(_MAGIC_BYTES)
            pos = pos + _FRAME.size + _pad4(length)

    def read_header(self, key: int, offset: Optional[int] = None
                    ) -> Tuple[IRHeader, bytes]:
        """(IRHeader, image bytes) of an image record; ``DataError`` naming
        the record when it is too short."""
        if offset is None:
            offset = self.offset(key)
        try:
            return unpack_image_record(self.read(key, offset))
        except ValueError as e:
            raise DataError(f'{self._where(key, offset)}: not an image '
                            f'record ({e})') from None

    def label_of(self, key: int, offset: Optional[int] = None,
                 header: Optional[IRHeader] = None) -> int:
        """The class of image record ``key``: its first label, which must be
        a non-negative integer."""
        if offset is None:
            offset = self.offset(key)
        if header is None:
            # The header and its labels lie in the first bytes: read 24,
            # then the labels if any, not the image.
            head = self.read(key, offset, _IR_HEADER.size)
            flag = _IR_HEADER.unpack_from(head)[0] \
                if len(head) >= _IR_HEADER.size else 0
            head = self.read(key, offset, _IR_HEADER.size + 4 * flag)
            try:
                header = unpack_image_record(head)[0]
            except ValueError as e:
                raise DataError(f'{self._where(key, offset)}: not an image '
                                f'record ({e})') from None
        label = header.first_label
        if not (np.isfinite(label) and label >= 0 and label == int(label)):
            raise DataError(f'{self._where(key, offset)}: label {label} is '
                            'not an integer class index (>= 0)')
        return int(label)


class InsightFaceLayout(NamedTuple):
    """Image keys of a ``.rec``; ``identity_ranges`` are InsightFace's
    ``(first, end)`` image-key ranges, one per identity (empty without a
    header record)."""
    image_keys: np.ndarray
    identity_ranges: List[Tuple[int, int]]


def insightface_layout(reader: IndexedRecordReader) -> InsightFaceLayout:
    """Which keys are images, following InsightFace's record-0 convention
    (see the module docstring)."""
    if 0 in reader:
        header, image = reader.read_header(0)
        if header.flag > 0 and not image:
            return _layout_from_header(reader, header)
    return InsightFaceLayout(reader.keys.copy(), [])


def _layout_from_header(reader, header) -> InsightFaceLayout:
    where = f'{reader.rec_path}: header record 0'
    if len(header.labels) < 2:
        raise DataError(f'{where} has {len(header.labels)} label(s); '
                        'InsightFace headers hold (first identity key, end)')
    first_id, end_id = (int(x) for x in header.labels[:2])
    if not 1 <= first_id <= end_id:
        raise DataError(f'{where}: identity keys [{first_id}, {end_id}) are '
                        'not a valid range after the image keys')
    image_keys = np.arange(1, first_id, dtype=np.int64)
    missing = np.setdiff1d(np.arange(1, end_id), reader.keys)
    if missing.size:
        raise DataError(
            f'{reader.idx_path}: no key {int(missing[0])}, but header record '
            f'0 of {reader.rec_path} declares image keys 1..{first_id - 1} '
            f'and identity keys {first_id}..{end_id - 1}')
    ranges = []
    for key in range(first_id, end_id):
        ident, _ = reader.read_header(key)
        lo, hi = (int(x) for x in ident.labels[:2]) \
            if len(ident.labels) >= 2 else (0, -1)
        if not 1 <= lo < hi <= first_id:
            raise DataError(
                f'{reader.rec_path}: identity record {key} holds '
                f'{ident.labels or ident.label}, not an image-key range '
                f'within 1..{first_id - 1}')
        ranges.append((lo, hi))
    return InsightFaceLayout(image_keys, ranges)


def _image_labels(reader: IndexedRecordReader,
                  layout: InsightFaceLayout) -> np.ndarray:
    """Label of every image key. With identity ranges one header per
    identity is read (MS1M: 85k reads, not 5.8M); ``get_data_info`` checks
    each image's own label when it is decoded."""
    keys = layout.image_keys
    labels = np.full(len(keys), -1, dtype=np.int64)
    for lo, hi in layout.identity_ranges:
        i, j = np.searchsorted(keys, [lo, hi])
        if (labels[i:j] >= 0).any():
            raise DataError(f'{reader.rec_path}: identity ranges overlap at '
                            f'image keys {lo}..{hi - 1}')
        labels[i:j] = reader.label_of(lo)
    for i in np.flatnonzero(labels < 0):
        labels[i] = reader.label_of(int(keys[i]))
    return labels


@DATASETS.register_module()
class RecordIODataset(LazyMetainfoMixin, SkipBadItemsMixin, BaseDataset):
    """InsightFace/MXNet RecordIO training set (``train.rec`` + ``train.idx``,
    e.g. MS1M-ArcFace, Glint360K, WebFace) read without mxnet.

    Each item is one image record: ``img`` (RGB uint8, decoded lazily),
    ``label`` (the record's first label) and ``age`` -1.
    ``metainfo['num_classes']`` is the largest label + 1.

    Args:
        path_imgrec: the ``.rec`` file (joined to ``data_root`` if
            relative); default ``<data_root>/train.rec``.
        path_imgidx: its ``.idx``; default the ``.rec`` path with ``.idx``.
        data_root: folder holding the files.
        image_size: int or (h, w); resize images not of this size.
        pipeline: transforms, default ``[dict(type='PackFaceInputs')]``.
        on_bad_item, max_bad_items: ``'raise'`` (default) stops on an
            unreadable item; ``'skip'`` counts it and serves another (see
            :mod:`kdzoo.datasets.bad_items`).
    """

    def __init__(self, path_imgrec: Optional[str] = None,
                 path_imgidx: Optional[str] = None, data_root: str = '',
                 image_size: Union[int, Sequence[int], None] = None,
                 pipeline: Optional[list] = None, **kwargs):
        if path_imgrec is None:
            if not data_root:
                raise ConfigError('RecordIODataset: set path_imgrec (the '
                                  '.rec file) or data_root (a folder with '
                                  'train.rec and train.idx)')
            path_imgrec = 'train.rec'
        if path_imgidx is None:
            path_imgidx = os.path.splitext(path_imgrec)[0] + '.idx'
        join = (lambda p: os.path.join(data_root, p)
                if data_root and not os.path.isabs(p) else p)
        self.path_imgrec, self.path_imgidx = join(path_imgrec), \
            join(path_imgidx)
        self.image_size = check_size('RecordIODataset', image_size,
                                     name='image_size', allow_none=True)
        self.reader: Optional[IndexedRecordReader] = None
        super().__init__(ann_file='', data_root=data_root,
                         pipeline=build_pipeline(pipeline), **kwargs)

    def load_data_list(self) -> List[dict]:
        self.reader = IndexedRecordReader(self.path_imgrec, self.path_imgidx)
        layout = insightface_layout(self.reader)
        if not len(layout.image_keys):
            raise DataError(f'{self.path_imgrec}: no image records')
        labels = _image_labels(self.reader, layout)
        offsets = self.reader.offsets[np.searchsorted(self.reader.keys,
                                                      layout.image_keys)]
        self._metainfo.update(num_classes=int(labels.max()) + 1,
                              num_identities=int(np.unique(labels).size))
        return [dict(key=int(k), offset=int(o), label=int(lab), age=-1)
                for k, o, lab in zip(layout.image_keys, offsets, labels)]

    def content_fingerprint(self) -> str:
        """Identity of the images without decoding them (teacher cache key;
        ``kdzoo.datasets.fingerprint``): the .rec and .idx files' bytes,
        every record's key, offset and label, the decode size."""
        if not self._fully_initialized:
            self.full_init()
        items = [(self.path_imgidx, '')]
        for i in range(len(self)):
            info = BaseDataset.get_data_info(self, i)
            items.append((self.path_imgrec, f'{info["key"]}|'
                          f'{info["offset"]}|{info["label"]}'))
        return files_fingerprint(type(self).__name__,
                                 dict(image_size=self.image_size), items)

    def get_data_info(self, idx: int) -> dict:
        info = super().get_data_info(idx)
        key, offset = info.pop('key'), info.pop('offset')
        header, image = self.reader.read_header(key, offset)
        label = self.reader.label_of(key, offset, header)
        if label != info['label']:
            raise DataError(
                f'record {key} at offset {offset} in {self.path_imgrec}: '
                f'label {label} differs from label {info["label"]} of its '
                'identity range (header record 0 / identity records)')
        info['img'] = decode_image(
            image, f'record {key} at offset {offset} in {self.path_imgrec}',
            info['sample_idx'], self.image_size)
        return info
