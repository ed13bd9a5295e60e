"""InsightFace ``.bin`` verification sets (LFW, CFP, AgeDB ...) without mxnet.

A ``.bin`` file is a pickle of ``(list_of_encoded_images, issame_list)``;
images ``2i`` and ``2i+1`` form pair ``i`` (InsightFace
``recognition/arcface_torch/eval/verification.py``, ``load_bin``). Images are
JPEG/PNG bytes, or (in older files) 1-D uint8 numpy arrays of those bytes.

A labels sidecar (``lfw.bin.labels.tsv`` beside ``lfw.bin``; written by
``kdzoo pack labels``, see docs/data_formats.md) gives every image of a
``.bin`` its identity and a photo key, so that all pairs of its distinct
images can be scored, not only the file's fixed pairs.
"""
import hashlib
import io
import os
import pickle
from typing import Dict, List, Optional, Sequence, Tuple, Union

import numpy as np
from mmengine.dataset import BaseDataset
from mmengine.logging import print_log
from PIL import Image

from kdzoo.registry import DATASETS
from kdzoo.datasets.dataset_args import LazyMetainfoMixin, build_pipeline
from kdzoo.utils.checks import check_size
from kdzoo.utils.errors import ConfigError, DataError
from kdzoo.utils.fileio import file_sha256

__all__ = ['InsightFaceBinDataset', 'InsightFaceBinSets', 'load_bin_pairs',
           'default_labels_path', 'read_bin_labels', 'bin_label_arrays',
           'check_verification_pairs', 'count_all_pairs', 'file_sha256']

LABELS_SUFFIX = '.labels.tsv'  # lfw.bin -> lfw.bin.labels.tsv
LABELS_MAGIC = '# kdzoo bin labels v1'
LABELS_COLUMNS = 'identity\timage_key'
_BUILD_HINT = ('build it with `kdzoo pack labels` (docs/data_formats.md, '
               '"Labels sidecar")')
_REBUILD_HINT = 'rebuild it with `kdzoo pack labels`'
_LIST_HINT = ('give the pairs list this .bin was packed from, in its order '
              '(docs/data_formats.md, "Labels sidecar")')

# The only globals a .bin pickle may reference (numpy arrays of bytes in
# files written by Python 2/mxnet tooling). Anything else is refused instead
# of executed: unpickling runs code.
_ALLOWED_GLOBALS = {
    ('numpy', 'ndarray'), ('numpy', 'dtype'),
    ('numpy.core.multiarray', '_reconstruct'),
    ('numpy._core.multiarray', '_reconstruct'),
    ('numpy.core.multiarray', 'scalar'), ('numpy._core.multiarray', 'scalar'),
    ('numpy.core.numeric', '_frombuffer'),  # pickle protocol 5 (numpy >= 1.16)
    ('numpy._core.numeric', '_frombuffer'),
    ('_codecs', 'encode'), ('builtins', 'bytearray'),
}


class _BinUnpickler(pickle.Unpickler):

    def find_class(self, module, name):
        if (module, name) not in _ALLOWED_GLOBALS:
            raise pickle.UnpicklingError(
                f'refusing global {module}.{name} (not part of the '
                'InsightFace .bin format)')
        return super().find_class(module, name)


def _as_bytes(item) -> Optional[bytes]:
    if isinstance(item, (bytes, bytearray)):
        return bytes(item)
    if isinstance(item, np.ndarray) and item.dtype == np.uint8:
        return item.tobytes()
    return None


def load_bin_pairs(path: str) -> Tuple[List[bytes], np.ndarray]:
    """Read a ``.bin`` file -> (encoded images, issame (P,) bool); validates
    structure, not image content. Raises ``DataError`` naming the file."""
    if not os.path.isfile(path):
        raise DataError(f'{path}: verification .bin file not found')
    try:
        with open(path, 'rb') as f:
            obj = _BinUnpickler(f, encoding='bytes').load()
    except Exception as e:  # truncated, not a pickle, refused global ...
        raise DataError(f'{path}: not a readable InsightFace .bin pickle '
                        f'({type(e).__name__}: {e})') from None
    if not (isinstance(obj, (tuple, list)) and len(obj) == 2):
        raise DataError(f'{path}: expected a pickled (images, issame) pair, '
                        f'got {type(obj).__name__}')
    images, issame = obj
    if not isinstance(images, (list, tuple)):
        raise DataError(f'{path}: images must be a list of encoded bytes, '
                        f'got {type(images).__name__}')
    blobs = []
    for i, item in enumerate(images):
        b = _as_bytes(item)
        if b is None:
            raise DataError(f'{path}: image {i} is {type(item).__name__}, '
                            'not encoded image bytes')
        blobs.append(b)
    if len(blobs) % 2:
        raise DataError(f'{path}: {len(blobs)} images, an odd count; images '
                        '2i and 2i+1 must form pair i')
    try:
        issame = np.asarray(issame)
        ok = issame.ndim == 1 and (issame.dtype == bool or
                                   np.isin(issame, (0, 1)).all())
    except Exception:
        ok = False
    if not ok:
        raise DataError(f'{path}: issame must be a flat list of booleans')
    if len(issame) != len(blobs) // 2:
        raise DataError(f'{path}: {len(issame)} issame labels for '
                        f'{len(blobs)} images (expected {len(blobs) // 2})')
    return blobs, issame.astype(bool)


def decode_image(data: bytes, path: str = '?', index: int = -1,
                 image_size: Optional[Tuple[int, int]] = None) -> np.ndarray:
    """Encoded bytes -> RGB uint8 H×W×3 (grey/RGBA/palette converted);
    optional resize to ``image_size`` (h, w)."""
    try:
        with Image.open(io.BytesIO(data)) as im:
            im = im.convert('RGB')  # forces a full decode
            if image_size is not None and im.size != image_size[::-1]:
                im = im.resize(image_size[::-1], Image.BILINEAR)
            return np.asarray(im, dtype=np.uint8)
    except Exception as e:
        raise DataError(f'{path}: image {index} cannot be decoded '
                        f'({type(e).__name__}: {e})') from None


# ------------------------------------------------------------ labels sidecar
def default_labels_path(bin_path: str) -> str:
    """The sidecar a ``.bin`` is read with by default: ``X.bin`` ->
    ``X.bin.labels.tsv`` in the same folder."""
    return os.fspath(bin_path) + LABELS_SUFFIX


def read_bin_labels(path: str, bin_path: Optional[str] = None,
                    num_images: Optional[int] = None,
                    bin_sha256: Optional[str] = None
                    ) -> Tuple[List[str], List[str], Dict[str, str]]:
    """Read a labels sidecar -> (identity per image, image key per image,
    header fields). With ``bin_path`` the sidecar must have been written for
    that file (sha256; pass ``bin_sha256`` when already known) and, with
    ``num_images``, cover exactly that many images. Every problem is a
    ``DataError`` naming the file (and line) and the fix."""
    if not os.path.isfile(path):
        raise DataError(f'{path}: labels file not found; {_BUILD_HINT}')
    try:
        with open(path, encoding='utf-8', newline='') as f:
            lines = f.read().split('\n')
    except (OSError, UnicodeDecodeError) as e:
        raise DataError(f'{path}: labels file cannot be read as UTF-8 text '
                        f'({type(e).__name__}: {e}); {_BUILD_HINT}') from None
    if lines and lines[-1] == '':
        lines.pop()  # the final newline
    lines = [x[:-1] if x.endswith('\r') else x for x in lines]
    if not lines or lines[0].strip() != LABELS_MAGIC:
        first = lines[0] if lines else ''
        raise DataError(f'{path}: line 1 is {first[:60]!r}, not '
                        f'{LABELS_MAGIC!r}: not a kdzoo .bin labels file; '
                        f'{_BUILD_HINT}')
    header, n = {}, 1
    while n < len(lines) and lines[n].startswith('#'):
        key, sep, value = lines[n][1:].partition(':')
        if sep:
            header[key.strip()] = value.strip()
        n += 1
    if n >= len(lines) or lines[n] != LABELS_COLUMNS:
        got = lines[n] if n < len(lines) else 'the end of the file'
        raise DataError(f'{path}: line {n + 1} is {got!r}; expected the '
                        f'column line {LABELS_COLUMNS!r} after the "# ..." '
                        f'header; {_BUILD_HINT}')
    for key in ('bin_sha256', 'images'):
        if key not in header:
            raise DataError(f'{path}: the header has no "# {key}: ..." line; '
                            f'{_BUILD_HINT}')
    try:
        declared = int(header['images'])
    except ValueError:
        raise DataError(f'{path}: header "# images: {header["images"]}" is '
                        f'not a number; {_BUILD_HINT}') from None
    if bin_path is not None:
        actual = bin_sha256 or file_sha256(bin_path)
        if header['bin_sha256'].lower() != actual:
            raise DataError(
                f'{path} was written for another .bin (sha256 '
                f'{header["bin_sha256"][:12]}..., file '
                f'{header.get("bin", "?")!r}) than {bin_path} (sha256 '
                f'{actual[:12]}...): rebuild the labels for this file with '
                f'`kdzoo pack labels ... {bin_path}`, or remove the stale '
                'sidecar')
    identities, keys = [], []
    for n, line in enumerate(lines[n + 1:], n + 2):
        fields = line.split('\t')
        if len(fields) != 2 or not all(x.strip() == x and x for x in fields):
            raise DataError(f'{path}: line {n} is {line[:80]!r}; expected '
                            '"identity<TAB>image_key" (both non-empty, no '
                            f'surrounding spaces); {_BUILD_HINT}')
        identities.append(fields[0])
        keys.append(fields[1])
    if len(keys) != declared:
        raise DataError(f'{path}: {len(keys)} image lines but the header '
                        f'says "# images: {declared}" (truncated or edited '
                        f'file); {_BUILD_HINT}')
    if num_images is not None and len(keys) != num_images:
        where = f' {bin_path}' if bin_path else ' the .bin'
        raise DataError(f'{path}: labels for {len(keys)} images, but{where} '
                        f'holds {num_images}; {_BUILD_HINT}')
    return identities, keys, header


def bin_label_arrays(identities: Sequence[str], keys: Sequence[str],
                     blobs: Sequence[bytes], issame=None,
                     where: str = 'labels', fix: str = _BUILD_HINT
                     ) -> Tuple[np.ndarray, np.ndarray, List[str]]:
    """Per image identity and photo ids from sidecar entries.

    Returns ``(labels, image_ids, identity_names)``: ``labels[i]`` indexes
    ``identity_names`` (sorted names); ``image_ids[i]`` is equal for images
    that are the same photo: the same image key, or byte-identical encoded
    images under different keys (CFP-FF holds 26 such photos), numbered
    0.. in order of first appearance. With ``issame`` (pair ``p`` = images
    ``2p``, ``2p+1``) every pair must agree with the identities. A photo
    labelled with two identities, or a pair that contradicts ``issame``, is
    a ``DataError`` that starts with ``where`` and ends with ``fix``.
    """
    n = len(keys)
    if len(identities) != n or len(blobs) != n:
        raise DataError(f'{where}: {len(identities)} identities and {n} keys '
                        f'for {len(blobs)} images')
    names = sorted(set(identities))
    index = {name: i for i, name in enumerate(names)}
    labels = np.fromiter((index[x] for x in identities), np.int64, n)
    # union-find over "same key" and "same bytes"
    parent = list(range(n))

    def find(i):
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    by_key, by_bytes = {}, {}
    for i in range(n):
        for table, value in ((by_key, keys[i]),
                             (by_bytes, hashlib.sha1(blobs[i]).digest())):
            j = table.setdefault(value, i)
            if j != i:
                a, b = find(i), find(j)
                if a != b:
                    parent[max(a, b)] = min(a, b)
    roots = np.fromiter((find(i) for i in range(n)), np.int64, n)
    clash = np.flatnonzero(labels != labels[roots])
    if clash.size:
        i = int(clash[0])
        j = int(roots[i])
        how = 'have the same image key' if keys[i] == keys[j] else \
            'are byte-identical images'
        raise DataError(f'{where}: images {j} ({keys[j]!r}, identity '
                        f'{identities[j]!r}) and {i} ({keys[i]!r}, identity '
                        f'{identities[i]!r}) {how} but different '
                        f'identities; {fix}')
    _, image_ids = np.unique(roots, return_inverse=True)  # roots ascend
    if issame is not None:
        issame = np.asarray(issame, dtype=bool)
        agree = (labels[0::2] == labels[1::2]) == issame
        if not agree.all():
            p = int(np.flatnonzero(~agree)[0])
            raise DataError(
                f'{where}: pair {p} (images {2 * p}, {2 * p + 1}: '
                f'{identities[2 * p]!r} vs {identities[2 * p + 1]!r}) is '
                f'{"same" if issame[p] else "different"} in the .bin but the '
                f'identities say {"different" if issame[p] else "same"} '
                f'({int((~agree).sum())} of {len(agree)} pairs disagree): '
                'the labels are not in .bin order or belong to another '
                f'file; {fix}')
    return labels, image_ids.astype(np.int64), names


def count_all_pairs(labels: np.ndarray, image_ids: np.ndarray) -> dict:
    """Distinct photos and identities, and the positive/negative pairs among
    all pairs of distinct photos (ignoring entries with label -1)."""
    labels, image_ids = np.asarray(labels), np.asarray(image_ids)
    keep = labels >= 0
    ids, first = np.unique(image_ids[keep], return_index=True)
    photo_labels = labels[keep][first]
    per_identity = np.unique(photo_labels, return_counts=True)[1]
    n = len(ids)
    positive = int((per_identity * (per_identity - 1) // 2).sum())
    return dict(images=int(keep.sum()), distinct_images=n,
                identities=len(per_identity), positive_pairs=positive,
                negative_pairs=n * (n - 1) // 2 - positive)


def check_verification_pairs(path: str, issame) -> None:
    """A set to be scored needs positive and negative pairs: a ``DataError``
    naming the file and the counts otherwise (e.g. InsightFace's
    ``small_lfw.bin``, 10 positive pairs only)."""
    issame = np.asarray(issame, dtype=bool)
    n_pos = int(issame.sum())
    n_neg = len(issame) - n_pos
    if n_pos == 0 or n_neg == 0:
        raise DataError(
            f'{path}: {n_pos} positive and {n_neg} negative pairs; a '
            'verification set needs both positive and negative pairs to be '
            'scored, so evaluate on a complete set (lfw.bin, cfp_ff.bin, '
            'agedb_30.bin, ...) instead')


def _resolve_labels_file(bin_path: str, labels_file, data_root: str = ''
                         ) -> Optional[str]:
    """``labels_file`` of a dataset -> the sidecar to read, or None.

    None: the default sidecar when it exists; False: none; True: the default
    one, which must exist; a path: that file (joined to ``data_root``)."""
    if labels_file is False:
        return None
    if labels_file is None or labels_file is True:
        path = default_labels_path(bin_path)
        if os.path.isfile(path):
            if labels_file is None:
                print_log(f'{bin_path}: identity labels from {path} '
                          '(labels_file=False to ignore it)',
                          logger='current')
            return path
        if labels_file is True:
            raise DataError(f'{bin_path}: labels_file=True but there is no '
                            f'{os.path.basename(path)} beside it; '
                            f'{_BUILD_HINT}')
        return None
    if not isinstance(labels_file, (str, os.PathLike)):
        raise ConfigError(f'labels_file must be a path, True, False or '
                          f'None, got {labels_file!r}')
    path = os.fspath(labels_file)
    if data_root and not os.path.isabs(path):
        path = os.path.join(data_root, path)
    return path


def _pair_protocol(path: str, blobs: List[bytes], issame: np.ndarray,
                   offset: int, total: int, num_folds: int,
                   labels_path: Optional[str]) -> dict:
    """One file's ``metainfo['verification']`` entry; images are dataset
    indices ``offset ..`` of a dataset of ``total`` items."""
    n = len(issame)
    pairs = offset + np.stack([np.arange(n) * 2, np.arange(n) * 2 + 1],
                              axis=1)
    proto = dict(pairs=pairs.astype(np.int64), issame=issame,
                 num_folds=num_folds)
    if labels_path is not None:
        identities, keys, _ = read_bin_labels(labels_path, path, len(blobs))
        labels, image_ids, names = bin_label_arrays(
            identities, keys, blobs, issame, where=labels_path,
            fix=_REBUILD_HINT)
        proto['labels'] = np.full(total, -1, dtype=np.int64)
        proto['labels'][offset:offset + len(blobs)] = labels
        proto['image_ids'] = np.full(total, -1, dtype=np.int64)
        proto['image_ids'][offset:offset + len(blobs)] = image_ids
        proto['identity_names'] = names
    return proto


@DATASETS.register_module()
class InsightFaceBinDataset(LazyMetainfoMixin, BaseDataset):
    """InsightFace .bin verification set (LFW, CFP-FF/FP, AgeDB-30, ...).

    Each item is one image; ``metainfo['verification'][protocol]`` holds
    ``pairs`` (2i, 2i+1), ``issame`` and ``num_folds`` for
    :class:`~kdzoo.evaluation.FaceVerificationMetric`. When a labels
    sidecar is read it also holds ``labels`` (int64, one per dataset index:
    identity id, -1 where unknown), ``image_ids`` (int64, one per dataset
    index: equal for the same photo, -1 where unknown) and
    ``identity_names`` (``labels`` indexes it). Items keep ``label=-1``.

    Args:
        ann_file: path of the ``.bin`` file (joined to ``data_root``).
        protocol: protocol name in the metainfo; default the file stem
            (``lfw.bin`` -> ``'lfw'``), so metric keys read ``lfw/accuracy``.
        image_size: int or (h, w); resize images not of this size.
        num_folds: folds recorded for the protocol (10 officially).
        labels_file: identity labels sidecar (docs/data_formats.md). None
            (default): ``<ann_file>.labels.tsv`` when it exists (logged);
            a path: that file (joined to ``data_root``); True: the default
            sidecar, which must exist; False: no labels.
        pipeline: transforms, default ``[dict(type='PackFaceInputs')]``.
    """

    def __init__(self, ann_file: str, protocol: Optional[str] = None,
                 image_size: Union[int, Sequence[int], None] = None,
                 num_folds: int = 10,
                 pipeline: Optional[list] = None, data_root: str = '',
                 labels_file: Union[str, bool, None] = None, **kwargs):
        if kwargs.get('indices') is not None:
            raise ConfigError('InsightFaceBinDataset: `indices` is not '
                              'supported (the pairs refer to positions in '
                              'the whole file)')
        self.image_size = check_size(type(self).__name__, image_size,
                                     name='image_size', allow_none=True)
        self.num_folds = int(num_folds)
        self.protocol = protocol
        self.labels_file = labels_file
        self._protocol_files = {}  # protocol name -> .bin path
        pipeline = build_pipeline(pipeline)
        super().__init__(ann_file=ann_file, data_root=data_root,
                         pipeline=pipeline, **kwargs)

    def load_data_list(self) -> List[dict]:
        # Images stay encoded (~3 KB each; 40 MB for LFW) and are decoded in
        # get_data_info: decoding all of LFW up front would hold 450 MB per
        # process, and dataloader workers decode in parallel anyway. A
        # corrupt image is therefore reported when it is first read.
        blobs, issame = load_bin_pairs(self.ann_file)
        name = self.protocol or os.path.splitext(
            os.path.basename(self.ann_file))[0]
        labels_path = _resolve_labels_file(self.ann_file, self.labels_file,
                                           self.data_root)
        self._metainfo['verification'] = {
            name: _pair_protocol(self.ann_file, blobs, issame, 0, len(blobs),
                                 self.num_folds, labels_path)
        }
        self._protocol_files = {name: self.ann_file}
        return [dict(img_bytes=b, label=-1, age=-1) for b in blobs]

    def check_verification(self) -> None:
        """Refuse, before any embedding, a protocol that cannot be scored
        (positive or negative pairs missing): a ``DataError`` naming the
        file and the counts. Reading such a file as a plain dataset is
        fine; call this where it is going to be evaluated."""
        for name, proto in self.metainfo['verification'].items():
            check_verification_pairs(self._protocol_files.get(name, name),
                                     proto['issame'])

    def get_data_info(self, idx: int) -> dict:
        info = super().get_data_info(idx)
        info['img'] = decode_image(info.pop('img_bytes'), self.ann_file,
                                   info['sample_idx'], self.image_size)
        return info


@DATASETS.register_module()
class InsightFaceBinSets(InsightFaceBinDataset):
    """Several ``.bin`` verification sets as one test set (LFW + CFP-FF ...).

    Images of all files are concatenated; each file keeps its own protocol
    (named by its stem, or ``protocols``), with pair indices offset into the
    combined list, so one test loop reports ``lfw/accuracy``,
    ``cfp_ff/accuracy``, ... side by side.

    Args:
        ann_files: the ``.bin`` paths (joined to ``data_root``).
        protocols: protocol names, one per file (default: file stems).
        labels_files: one ``labels_file`` per file (see
            ``InsightFaceBinDataset``; default None each: the sidecar beside
            each file when it exists). A protocol's ``labels`` and
            ``image_ids`` span the whole combined dataset, -1 outside its
            file.
        image_size, num_folds, pipeline: as ``InsightFaceBinDataset``.
    """

    def __init__(self, ann_files: Sequence[str],
                 protocols: Optional[Sequence[str]] = None,
                 data_root: str = '',
                 labels_files: Optional[Sequence[Union[str, bool, None]]]
                 = None, **kwargs):
        if isinstance(ann_files, str) or not ann_files:
            raise ConfigError('InsightFaceBinSets: ann_files must be a '
                              'non-empty list of .bin paths')
        files = [f if not data_root or os.path.isabs(f)
                 else os.path.join(data_root, f) for f in ann_files]
        names = list(protocols) if protocols is not None else [
            os.path.splitext(os.path.basename(f))[0] for f in files]
        if len(names) != len(files) or len(set(names)) != len(names):
            raise ConfigError(f'InsightFaceBinSets: protocols {names} must '
                              f'be {len(files)} distinct names, one per file')
        if kwargs.get('labels_file') is not None:
            raise ConfigError('InsightFaceBinSets: use labels_files (one '
                              'per file), not labels_file')
        if labels_files is None:
            labels_files = [None] * len(files)
        elif isinstance(labels_files, (str, bool)) or \
                len(labels_files) != len(files):
            raise ConfigError(f'InsightFaceBinSets: labels_files must be a '
                              f'list of {len(files)} entries (path, True, '
                              f'False or None), one per file; got '
                              f'{labels_files!r}')
        self.labels_files = [
            f if not data_root or not isinstance(f, str) or os.path.isabs(f)
            else os.path.join(data_root, f) for f in labels_files]
        self.ann_files, self.protocols = files, names
        self._file_of = []  # per image: the file it came from (for errors)
        super().__init__(ann_file=files[0], **kwargs)

    def load_data_list(self) -> List[dict]:
        data, verification, self._file_of, read = [], {}, [], []
        for path in self.ann_files:
            blobs, issame = load_bin_pairs(path)
            read.append((path, len(data), blobs, issame))
            data += [dict(img_bytes=b, label=-1, age=-1) for b in blobs]
            self._file_of += [(path, len(data) - len(blobs))] * len(blobs)
        for (path, offset, blobs, issame), name, labels_file in zip(
                read, self.protocols, self.labels_files):
            verification[name] = _pair_protocol(
                path, blobs, issame, offset, len(data), self.num_folds,
                _resolve_labels_file(path, labels_file))
        self._metainfo['verification'] = verification
        self._protocol_files = dict(zip(self.protocols, self.ann_files))
        return data

    def get_data_info(self, idx: int) -> dict:
        info = BaseDataset.get_data_info(self, idx)
        path, offset = self._file_of[idx]
        info['img'] = decode_image(info.pop('img_bytes'), path,
                                   info['sample_idx'] - offset,
                                   self.image_size)
        return info
