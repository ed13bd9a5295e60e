"""InsightFace ``.bin`` verification sets (LFW, CFP, AgeDB ...) without mxnet.

A ``.bin`` file is a pickle of ``(list_of_encoded_images, issame_list)``;
images ``2i`` and ``2i+1`` form pair ``i`` (InsightFace
``recognition/arcface_torch/eval/verification.py``, ``load_bin``). Images are
JPEG/PNG bytes, or (in older files) 1-D uint8 numpy arrays of those bytes.
"""
import io
import os
import pickle
from typing import List, Optional, Sequence, Tuple, Union

import numpy as np
from mmengine.dataset import BaseDataset
from PIL import Image

from kdzoo.registry import DATASETS
from kdzoo.datasets.dataset_args import build_pipeline, parse_image_size
from kdzoo.utils.errors import ConfigError, DataError

__all__ = ['InsightFaceBinDataset', 'load_bin_pairs']

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


@DATASETS.register_module()
class InsightFaceBinDataset(BaseDataset):
    """InsightFace .bin verification set (LFW, CFP-FF/FP, AgeDB-30, ...).

    Each item is one image; ``metainfo['verification'][protocol]`` holds
    ``pairs`` (2i, 2i+1), ``issame`` and ``num_folds`` for
    :class:`~kdzoo.evaluation.FaceVerificationMetric`.

    Args:
        ann_file: path of the ``.bin`` file (joined to ``data_root``).
        protocol: protocol name in the metainfo; default the file stem
            (``lfw.bin`` -> ``'lfw'``), so metric keys read ``lfw/accuracy``.
        image_size: int or (h, w); resize images not of this size.
        num_folds: folds recorded for the protocol (10 officially).
        pipeline: transforms, default ``[dict(type='PackFaceInputs')]``.
    """

    def __init__(self, ann_file: str, protocol: Optional[str] = None,
                 image_size: Union[int, Sequence[int], None] = None,
                 num_folds: int = 10,
                 pipeline: Optional[list] = None, data_root: str = '',
                 **kwargs):
        if kwargs.get('indices') is not None:
            raise ConfigError('InsightFaceBinDataset: `indices` is not '
                              'supported (the pairs refer to positions in '
                              'the whole file)')
        self.image_size = parse_image_size(image_size,
                                           type(self).__name__)
        self.num_folds = int(num_folds)
        self.protocol = protocol
        pipeline = build_pipeline(pipeline)
        super().__init__(ann_file=ann_file, data_root=data_root,
                         pipeline=pipeline, **kwargs)

    @property
    def metainfo(self) -> dict:
        # The protocol is only known once the file is read (lazy_init).
        if not self._fully_initialized:
            self.full_init()
        return super().metainfo

    def load_data_list(self) -> List[dict]:
        # Images stay encoded (~3 KB each; 40 MB for LFW) and are decoded in
        # get_data_info: decoding all of LFW up front would hold 450 MB per
        # process, and dataloader workers decode in parallel anyway. A
        # corrupt image is therefore reported when it is first read.
        blobs, issame = load_bin_pairs(self.ann_file)
        name = self.protocol or os.path.splitext(
            os.path.basename(self.ann_file))[0]
        n = len(issame)
        pairs = np.stack([np.arange(n) * 2, np.arange(n) * 2 + 1], axis=1)
        self._metainfo['verification'] = {
            name: dict(pairs=pairs.astype(np.int64), issame=issame,
                       num_folds=self.num_folds)
        }
        return [dict(img_bytes=b, label=-1, age=-1) for b in blobs]

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
        image_size, num_folds, pipeline: as ``InsightFaceBinDataset``.
    """

    def __init__(self, ann_files: Sequence[str],
                 protocols: Optional[Sequence[str]] = None,
                 data_root: str = '', **kwargs):
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
        self.ann_files, self.protocols = files, names
        self._file_of = []  # per image: the file it came from (for errors)
        super().__init__(ann_file=files[0], **kwargs)

    def load_data_list(self) -> List[dict]:
        data, verification, self._file_of = [], {}, []
        for path, name in zip(self.ann_files, self.protocols):
            blobs, issame = load_bin_pairs(path)
            offset, n = len(data), len(issame)
            pairs = offset + np.stack([np.arange(n) * 2,
                                       np.arange(n) * 2 + 1], axis=1)
            verification[name] = dict(pairs=pairs.astype(np.int64),
                                      issame=issame,
                                      num_folds=self.num_folds)
            data += [dict(img_bytes=b, label=-1, age=-1) for b in blobs]
            self._file_of += [(path, offset)] * len(blobs)
        self._metainfo['verification'] = verification
        return data

    def get_data_info(self, idx: int) -> dict:
        info = BaseDataset.get_data_info(self, idx)
        path, offset = self._file_of[idx]
        info['img'] = decode_image(info.pop('img_bytes'), path,
                                   info['sample_idx'] - offset,
                                   self.image_size)
        return info
