"""Write InsightFace data files without mxnet: RecordIO training sets
(``.rec`` + ``.idx``) and ``.bin`` verification sets.

Both are written atomically: a reader sees the old files or the complete new
ones, never a ``.rec`` without its ``.idx``.
"""
import io
import os
import pickle
from typing import Iterable, List, Optional, Sequence, Tuple

from PIL import Image

from kdzoo.datasets.image_folder import scan_identity_folders
from kdzoo.datasets.recordio import frame_record, pack_image_record
from kdzoo.utils.errors import ConfigError, DataError
from kdzoo.utils.fileio import atomic_output_files, atomic_write_bytes

__all__ = ['write_recordio', 'write_bin', 'encode_face_image',
           'read_pairs_file', 'pack_image_folder', 'pack_pairs']

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
    ``load_bin``). Returns the number of pairs."""
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
    atomic_write_bytes(path, pickle.dumps((images, flags), protocol=4))
    return len(pairs)


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
            pairs.append((fields[0], fields[1], fields[2] == '1'))
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
               quality: int = 95) -> dict:
    """Pack the pairs of ``pairs_file`` (paths relative to ``root``) into an
    InsightFace ``.bin`` at ``out_path``."""
    quality = _quality(quality)
    pairs = read_pairs_file(pairs_file)
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
    write_bin(blobs, same, out_path)
    return dict(num_pairs=len(pairs), num_same=sum(same),
                num_images=len(cache))

