"""Write InsightFace data files without mxnet: RecordIO training sets
(``.rec`` + ``.idx``) and ``.bin`` verification sets.

Both are written atomically: a reader sees the old files or the complete new
ones, never a ``.rec`` without its ``.idx``. A ``.bin``'s labels sidecar
(identity and photo key per image) is built from a packed pairs list or from
the LFW / CFP protocol files.
"""
import hashlib
import io
import os
import pickle
import warnings
from typing import Iterable, List, Optional, Sequence, Tuple

import numpy as np
from PIL import Image

from kdzoo.datasets.bin_dataset import (_LIST_HINT, LABELS_COLUMNS,
                                        LABELS_MAGIC, bin_label_arrays,
                                        count_all_pairs, decode_image,
                                        default_labels_path, file_sha256,
                                        load_bin_pairs)
from kdzoo.datasets.image_folder import scan_identity_folders
from kdzoo.datasets.recordio import frame_record, pack_image_record
from kdzoo.utils.errors import ConfigError, DataError
from kdzoo.utils.fileio import (atomic_output_files, atomic_write_bytes,
                                atomic_write_text)

__all__ = ['write_recordio', 'write_bin', 'encode_face_image',
           'read_pairs_file', 'pack_image_folder', 'pack_pairs',
           'write_bin_labels', 'lfw_pairs_labels', 'cfp_protocol_labels',
           'pairs_file_labels']

# InsightFace stores record keys as float32 labels: exact up to 2**24.
_MAX_FLOAT_KEY = 1 << 24
# Header record 0 always frames to 8 + 24 + 2 * 4 bytes (its float labels
# are positive, so never the magic word): room is kept and it is filled in
# once the image and identity counts are known.
_HEADER_RECORD_SIZE = 40


def _header_record(first_identity_key: int, end_key: int) -> bytes:
    record = frame_record(pack_image_record(
        [first_identity_key, end_key], b'', id=0))
    assert len(record) == _HEADER_RECORD_SIZE
    return record


def _is_class_index(label) -> bool:
    try:
        return (not isinstance(label, bool) and int(label) == label and
                0 <= label < _MAX_FLOAT_KEY)
    except (TypeError, ValueError, OverflowError):
        return False


def write_recordio(items: Iterable[Tuple[int, bytes]], rec_path: str,
                   idx_path: str) -> dict:
    """Write ``(label, encoded image)`` items as an InsightFace RecordIO set.

    All images of one identity must be consecutive. Keys follow InsightFace
    (``src/data/dataset_merge.py``; read by arcface_torch's
    ``MXFaceDataset``): record 0 is the header with labels ``(N+1, N+1+C)``,
    images are keys ``1..N`` (header: flag 0, label, id = key), identity
    records keys ``N+1..N+C`` (labels ``(first, end)`` of its image keys).
    Records are stored in key order, header first (InsightFace's scripts
    write record 0 last; readers go through the ``.idx``, so both are
    equivalent). ``items`` may be a generator; images are streamed.
    Returns ``dict(num_images=N, num_identities=C)``.
    """
    ranges: List[Tuple[int, int]] = []  # per identity: first, end key
    seen, last = set(), None
    key = 1
    with atomic_output_files(rec_path, idx_path) as (rec, idx):
        rec.write(bytes(_HEADER_RECORD_SIZE))  # placeholder for record 0
        idx.write(b'0\t0\n')

        def put(record_key: int, payload: bytes) -> None:
            idx.write(f'{record_key}\t{rec.tell()}\n'.encode())
            rec.write(frame_record(payload))

        for label, image in items:
            if not _is_class_index(label):
                raise ConfigError(f'write_recordio: item {key - 1} has label '
                                  f'{label!r}; labels must be integers in '
                                  f'[0, {_MAX_FLOAT_KEY})')
            if not isinstance(image, (bytes, bytearray)) or not image:
                raise ConfigError(f'write_recordio: item {key - 1} (label '
                                  f'{label}) is not encoded image bytes')
            label = int(label)
            if label != last:
                if label in seen:
                    raise ConfigError(
                        f'write_recordio: item {key - 1} has label {label} '
                        'again after other labels; the images of one '
                        'identity must be consecutive (sort items by label)')
                seen.add(label)
                ranges.append((key, key))
                last = label
            put(key, pack_image_record(float(label), bytes(image), id=key))
            ranges[-1] = (ranges[-1][0], key + 1)
            key += 1
        if key == 1:
            raise ConfigError('write_recordio: no images to write')
        first_identity = key
        end = first_identity + len(ranges)
        if end > _MAX_FLOAT_KEY:
            raise ConfigError(f'write_recordio: {end} records exceed the '
                              f'{_MAX_FLOAT_KEY} keys an InsightFace header '
                              '(float32 labels) can address')
        for identity_key, (lo, hi) in enumerate(ranges, first_identity):
            put(identity_key, pack_image_record([lo, hi], b'',
                                                id=identity_key))
        rec.seek(0)
        rec.write(_header_record(first_identity, end))
    return dict(num_images=key - 1, num_identities=len(ranges))


def write_bin(pairs: Sequence[Tuple[bytes, bytes]], issame: Sequence[bool],
              path: str) -> int:
    """Write an InsightFace ``.bin`` verification set: the pickle of
    ``(images, issame)`` where images ``2i`` and ``2i+1`` form pair ``i``
    (InsightFace ``recognition/arcface_torch/eval/verification.py``,
    ``load_bin``). Returns the number of pairs. A labels sidecar left
    beside ``path`` by an earlier, different file is removed (with a
    warning): it would be refused on reading anyway."""
    data = _bin_bytes(pairs, issame)
    atomic_write_bytes(path, data)
    _drop_stale_labels(path, hashlib.sha256(data).hexdigest())
    return len(pairs)


def _drop_stale_labels(bin_path: str, sha256: str) -> Optional[str]:
    sidecar = default_labels_path(bin_path)
    if not os.path.isfile(sidecar):
        return None
    try:
        with open(sidecar, encoding='utf-8') as f:
            head = [next(f, '') for _ in range(8)]
    except (OSError, UnicodeDecodeError):
        return None
    if head[0].strip() != LABELS_MAGIC or f'# bin_sha256: {sha256}\n' in head:
        return None  # not ours, or still describes this file
    os.unlink(sidecar)
    warnings.warn(f'removed {sidecar}: it labelled the previous {bin_path}')
    return sidecar


def _bin_bytes(pairs: Sequence[Tuple[bytes, bytes]],
               issame: Sequence[bool]) -> bytes:
    pairs, issame = list(pairs), list(issame)
    if len(pairs) != len(issame):
        raise ConfigError(f'write_bin: {len(pairs)} pairs but '
                          f'{len(issame)} issame labels; give one per pair')
    if not pairs:
        raise ConfigError('write_bin: no pairs to write')
    images = []
    for i, pair in enumerate(pairs):
        if len(pair) != 2 or not all(
                isinstance(b, (bytes, bytearray)) and b for b in pair):
            raise ConfigError(f'write_bin: pair {i} is not two encoded '
                              'images (bytes)')
        images += [bytes(pair[0]), bytes(pair[1])]
    flags = []
    for i, same in enumerate(issame):
        if same not in (0, 1):  # True/False, 0/1
            raise ConfigError(f'write_bin: issame[{i}] is {same!r}; expected '
                              'a boolean')
        flags.append(bool(same))
    return pickle.dumps((images, flags), protocol=4)


def encode_face_image(path: str, image_size: Optional[Tuple[int, int]] = None,
                      quality: int = 95) -> bytes:
    """An image file as JPEG bytes for packing: a JPEG already of the
    wanted size is kept byte for byte; anything else is converted to RGB,
    resized to ``image_size`` (h, w) and encoded at ``quality``. The file is
    fully decoded either way, so a corrupt image fails here."""
    try:
        with open(path, 'rb') as f:
            data = f.read()
    except OSError as e:
        raise DataError(f'{path}: cannot be read ({e.strerror})') from None
    try:
        with Image.open(io.BytesIO(data)) as im:
            im.load()
            keep = (im.format == 'JPEG' and im.mode in ('RGB', 'L') and
                    (image_size is None or im.size == image_size[::-1]))
            if keep:
                return data
            im = im.convert('RGB')
            if image_size is not None and im.size != image_size[::-1]:
                im = im.resize(image_size[::-1], Image.BILINEAR)
            out = io.BytesIO()
            im.save(out, format='JPEG', quality=quality)
            return out.getvalue()
    except Exception as e:
        raise DataError(f'{path}: cannot be decoded as an image '
                        f'({type(e).__name__}: {e})') from None


def read_pairs_file(path: str) -> List[Tuple[str, str, bool]]:
    """Parse a pairs file: one pair per line, ``path_a path_b 0|1`` (1 = same
    identity). Fields are separated by tabs, or by spaces when a line has no
    tab (paths with spaces need tabs); blank lines and ``#`` comments are
    skipped."""
    return [(a, b, same) for _, a, b, same in _read_pairs(path)]


def _read_pairs(path: str) -> List[Tuple[int, str, str, bool]]:
    """``read_pairs_file`` with each pair's line number first."""
    if not os.path.isfile(path):
        raise DataError(f'{path}: pairs file not found')
    pairs = []
    with open(path, encoding='utf-8') as f:
        for n, line in enumerate(f, 1):
            text = line.strip()
            if not text or text.startswith('#'):
                continue
            fields = [x.strip() for x in text.split('\t')] if '\t' in text \
                else text.split()
            if len(fields) != 3 or fields[2] not in ('0', '1') or \
                    not fields[0] or not fields[1]:
                raise DataError(f'{path}: line {n} is {text!r}; expected '
                                '"path_a path_b 0|1"')
            pairs.append((n, fields[0], fields[1], fields[2] == '1'))
    if not pairs:
        raise DataError(f'{path}: no pairs (expected "path_a path_b 0|1" '
                        'lines)')
    return pairs


def _quality(quality: int) -> int:
    if isinstance(quality, bool) or not isinstance(quality, int) or \
            not 1 <= quality <= 100:
        raise ConfigError(f'quality must be an integer in 1..100, got '
                          f'{quality!r}')
    return quality


def pack_image_folder(folder: str, rec_path: str, idx_path: str,
                      image_size: Optional[Tuple[int, int]] = None,
                      quality: int = 95, **subsample) -> dict:
    """Pack a folder of identity folders (see
    :func:`~kdzoo.datasets.image_folder.scan_identity_folders`, whose
    subsampling options ``subsample`` takes) into ``rec_path`` +
    ``idx_path``; labels as :class:`ImageFolderFaces` gives them."""
    quality = _quality(quality)
    scan = scan_identity_folders(folder, owner='kdzoo pack rec', **subsample)
    items = ((label, encode_face_image(p, image_size, quality))
             for p, label in scan.samples)
    return write_recordio(items, rec_path, idx_path)


def pack_pairs(pairs_file: str, root: str, out_path: str,
               image_size: Optional[Tuple[int, int]] = None,
               quality: int = 95, labels: bool = False) -> dict:
    """Pack the pairs of ``pairs_file`` (paths relative to ``root``) into an
    InsightFace ``.bin`` at ``out_path``.

    With ``labels``, paths must be ``<identity>/<image>`` and the labels
    sidecar ``<out_path>.labels.tsv`` (identity = first folder, image key =
    the path) is written together with the ``.bin`` (both or neither); the
    result then also has ``labels`` (its path) and the counts of
    ``write_bin_labels``."""
    quality = _quality(quality)
    pairs = read_pairs_file(pairs_file)
    if labels:  # before any image is read: a bad line fails at once
        identities, keys = pairs_file_labels(pairs_file)
    cache = {}

    def image(rel: str) -> bytes:
        if rel not in cache:
            if not os.path.isfile(os.path.join(root, rel)):
                raise DataError(f'{pairs_file}: image {rel!r} not found '
                                f'under root {root}')
            cache[rel] = encode_face_image(os.path.join(root, rel),
                                           image_size, quality)
        return cache[rel]

    blobs = [(image(a), image(b)) for a, b, _ in pairs]
    same = [s for _, _, s in pairs]
    done = dict(num_pairs=len(pairs), num_same=sum(same),
                num_images=len(cache))
    if not labels:
        write_bin(blobs, same, out_path)
        return done
    data = _bin_bytes(blobs, same)
    flat = [b for pair in blobs for b in pair]
    image_labels, image_ids, _ = bin_label_arrays(
        identities, keys, flat, same, where=pairs_file,
        fix='two different images were given one path or one photo two '
        'identity folders')
    sidecar = default_labels_path(out_path)
    text = bin_labels_text(identities, keys, out_path,
                           hashlib.sha256(data).hexdigest(),
                           source=f'kdzoo pack bin --pairs '
                           f'{os.path.basename(pairs_file)}')
    with atomic_output_files(out_path, sidecar) as (f_bin, f_labels):
        f_bin.write(data)
        f_labels.write(text.encode('utf-8'))
    done.update(count_all_pairs(image_labels, image_ids), labels=sidecar)
    return done



# ------------------------------------------------------------ labels sidecar
def _check_label_field(value: str, what: str, where: str) -> str:
    if not isinstance(value, str) or not value or value.strip() != value or \
            any(c in value for c in '\t\r\n'):
        raise DataError(f'{where}: {what} {value!r} cannot be stored: it '
                        'must be non-empty text without tabs, newlines or '
                        'surrounding spaces')
    return value


def bin_labels_text(identities: Sequence[str], keys: Sequence[str],
                    bin_path: str, bin_sha256: str, source: str = '') -> str:
    """The text of a labels sidecar (format in docs/data_formats.md)."""
    lines = [LABELS_MAGIC, f'# bin: {os.path.basename(bin_path)}',
             f'# bin_sha256: {bin_sha256}', f'# images: {len(keys)}']
    if source:
        lines.append(f'# source: {" ".join(source.split())}')
    lines.append(LABELS_COLUMNS)
    for i, (name, key) in enumerate(zip(identities, keys)):
        lines.append(f'{_check_label_field(name, "identity", f"image {i}")}'
                     f'\t{_check_label_field(key, "image key", f"image {i}")}')
    return '\n'.join(lines) + '\n'


def _same_pixels(a: bytes, b: bytes) -> bool:
    try:
        return np.array_equal(decode_image(a), decode_image(b))
    except DataError:
        return False


def write_bin_labels(bin_path: str, identities: Sequence[str],
                     keys: Sequence[str], out: Optional[str] = None,
                     source: str = '') -> dict:
    """Write the labels sidecar of ``bin_path`` (default
    ``<bin_path>.labels.tsv``) atomically: ``identities[i]`` and
    ``keys[i]`` describe image ``i`` of the ``.bin``.

    Checked first, each failure a ``DataError`` naming ``source`` and the
    fix: one entry per image; every pair's identities agree with the
    file's ``issame``; images with the same key are the same picture
    (identical bytes or decoded pixels) and no picture has two identities.
    Returns counts (``count_all_pairs``) and ``path``.
    """
    where = source or 'labels'
    blobs, issame = load_bin_pairs(bin_path)
    if len(keys) != len(blobs) or len(identities) != len(keys):
        raise DataError(
            f'{where}: lists {len(keys) // 2} pairs ({len(keys)} images) but '
            f'{bin_path} holds {len(issame)} pairs ({len(blobs)} images): '
            'the pairs list does not belong to this .bin')
    first = {}
    for i, key in enumerate(keys):
        j = first.setdefault(key, i)
        if j != i and blobs[i] != blobs[j] and \
                not _same_pixels(blobs[i], blobs[j]):
            raise DataError(
                f'{where}: images {j} and {i} of {bin_path} both have the '
                f'key {key!r} but are different pictures: the list is not '
                'in .bin order (or its keys do not identify photos)')
    labels, image_ids, _ = bin_label_arrays(identities, keys, blobs, issame,
                                            where=f'{where} vs {bin_path}',
                                            fix=_LIST_HINT)
    out = out or default_labels_path(bin_path)
    atomic_write_text(out, bin_labels_text(identities, keys, bin_path,
                                           file_sha256(bin_path), source))
    done = count_all_pairs(labels, image_ids)
    done.update(path=out, pairs=len(issame), distinct_keys=len(first))
    return done


def _parse_int(text: str, where: str, what: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = -1
    if value < 0:
        raise DataError(f'{where}: {what} {text!r} is not a non-negative '
                        'integer')
    return value


def lfw_pairs_labels(pairs_txt: str) -> Tuple[List[str], List[str]]:
    """LFW ``pairs.txt`` (first line ``"10 300"``: folds and pairs per
    fold and kind; then ``name n1 n2`` same-person and ``name1 n1 name2
    n2`` different-person lines, in ``lfw.bin`` order) -> identity and
    image key (``Abel_Pacheco/0001`` for ``Abel_Pacheco_0001.jpg``) per
    image of the ``.bin``. ``pairsDevTrain.txt``-style files (one number,
    N same then N different lines) are read too."""
    if not os.path.isfile(pairs_txt):
        raise DataError(f'{pairs_txt}: LFW pairs file not found')
    with open(pairs_txt, encoding='utf-8') as f:
        lines = [(n, line.split()) for n, line in enumerate(f, 1)
                 if line.strip()]
    if not lines or not 1 <= len(lines[0][1]) <= 2:
        raise DataError(f'{pairs_txt}: line 1 should be "<folds> '
                        '<pairs per fold>" (e.g. "10 300"), as in LFW\'s '
                        'pairs.txt')
    counts = [_parse_int(x, f'{pairs_txt}: line 1', 'count')
              for x in lines[0][1]]
    expected = 2 * counts[0] * (counts[1] if len(counts) == 2 else 1)
    if len(lines) - 1 != expected:
        raise DataError(f'{pairs_txt}: {len(lines) - 1} pair lines but line '
                        f'1 ({" ".join(lines[0][1])}) announces {expected}')
    identities, keys = [], []
    for n, fields in lines[1:]:
        where = f'{pairs_txt}: line {n}'
        if len(fields) == 3:
            names, nums = fields[:1] * 2, fields[1:]
        elif len(fields) == 4:
            names, nums = fields[0::2], fields[1::2]
        else:
            raise DataError(f'{where} is {" ".join(fields)!r}; expected '
                            '"name n1 n2" (same person) or "name1 n1 name2 '
                            'n2" (different people)')
        for name, num in zip(names, nums):
            identities.append(name)
            keys.append(f'{name}/{_parse_int(num, where, "image number"):04d}')
    return identities, keys


def _cfp_index(path: str) -> dict:
    """``Pair_list_F.txt`` / ``_P.txt``: ``index ../Data/Images/001/frontal
    /01.jpg`` -> {index: (identity '001', key '001/frontal/01')}."""
    if not os.path.isfile(path):
        raise DataError(f'{path}: CFP pair list not found (give the CFP '
                        'folder that holds Protocol/, or Protocol/ itself)')
    table = {}
    with open(path, encoding='utf-8') as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            fields = line.split()
            parts = fields[1].replace('\\', '/').split('/') \
                if len(fields) == 2 else []
            if len(parts) < 3:
                raise DataError(f'{path}: line {n} is {line.strip()!r}; '
                                'expected "<index> ../Data/Images/<id>/'
                                '<frontal|profile>/<nn>.jpg"')
            index = _parse_int(fields[0], f'{path}: line {n}', 'index')
            stem = os.path.splitext(parts[-1])[0]
            table[index] = (parts[-3], f'{parts[-3]}/{parts[-2]}/{stem}')
    return table


def cfp_protocol_labels(protocol_dir: str, split: str = 'FF'
                        ) -> Tuple[List[str], List[str]]:
    """CFP protocol files -> identity (``'001'``) and image key
    (``'001/frontal/01'``) per image of ``cfp_ff.bin`` / ``cfp_fp.bin``.

    ``protocol_dir`` is the CFP folder holding ``Protocol/`` (or
    ``Protocol/`` itself). Pairs are ``Split/<split>/<fold>/same.txt`` then
    ``diff.txt`` for folds ``01``..``10`` in order (the order of
    InsightFace's ``cfp_ff.bin``, checked against it); each line ``i,j``
    indexes ``Pair_list_F.txt`` (FF: both; FP: ``j`` indexes
    ``Pair_list_P.txt``)."""
    split = split.upper()
    if split not in ('FF', 'FP'):
        raise ConfigError(f'--cfp-split must be FF or FP, got {split!r}')
    root = protocol_dir
    if os.path.isdir(os.path.join(root, 'Protocol')):
        root = os.path.join(root, 'Protocol')
    lists = [_cfp_index(os.path.join(root, 'Pair_list_F.txt'))]
    lists.append(lists[0] if split == 'FF' else
                 _cfp_index(os.path.join(root, 'Pair_list_P.txt')))
    split_dir = os.path.join(root, 'Split', split)
    if not os.path.isdir(split_dir):
        raise DataError(f'{split_dir}: CFP split folder not found (give the '
                        'CFP folder that holds Protocol/, or Protocol/ '
                        'itself)')
    folds = sorted((d for d in os.listdir(split_dir) if d.isdigit()), key=int)
    if not folds:
        raise DataError(f'{split_dir}: no fold folders (01 .. 10)')
    identities, keys = [], []
    for fold in folds:
        for kind in ('same', 'diff'):
            path = os.path.join(split_dir, fold, f'{kind}.txt')
            if not os.path.isfile(path):
                raise DataError(f'{path}: not found (each fold needs '
                                'same.txt and diff.txt)')
            with open(path, encoding='utf-8') as f:
                for n, line in enumerate(f, 1):
                    if not line.strip():
                        continue
                    fields = line.strip().split(',')
                    where = f'{path}: line {n}'
                    if len(fields) != 2:
                        raise DataError(f'{where} is {line.strip()!r}; '
                                        'expected "i,j"')
                    for table, text in zip(lists, fields):
                        i = _parse_int(text.strip(), where, 'index')
                        if i not in table:
                            raise DataError(f'{where}: index {i} is not in '
                                            'the pair list')
                        identities.append(table[i][0])
                        keys.append(table[i][1])
    return identities, keys


def pairs_file_labels(pairs_file: str) -> Tuple[List[str], List[str]]:
    """A ``kdzoo pack bin`` pairs file whose paths are
    ``<identity>/<image>`` -> identity (the first folder) and image key (the
    path, ``/``-separated) per image. A pair whose same/different flag
    contradicts the folders is a ``DataError`` naming the line."""
    identities, keys = [], []
    for n, a, b, same in _read_pairs(pairs_file):
        names = []
        for rel in (a, b):
            parts = [p for p in rel.replace('\\', '/').split('/')
                     if p not in ('', '.')]
            if len(parts) < 2:
                raise DataError(
                    f'{pairs_file}: line {n}: {rel!r} has no identity '
                    'folder; for labels every path must be '
                    '<identity>/<image> (the first folder is the identity)')
            names.append(parts[0])
            identities.append(parts[0])
            keys.append('/'.join(parts))
        if (names[0] == names[1]) != same:
            said = 'same' if same else 'different'
            raise DataError(
                f'{pairs_file}: line {n} says {said} ({int(same)}) but the '
                f'identity folders are {names[0]!r} '
                f'and {names[1]!r}; fix the flag or the paths')
    return identities, keys
