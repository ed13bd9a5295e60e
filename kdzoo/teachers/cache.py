"""Teacher-output cache: each frozen teacher's embeddings, computed once.

Face training's only augmentation is a horizontal flip, so a frozen teacher
sees exactly two versions of each training image. Embedding-level losses
(KD on embeddings, angular, RKD, EKD, ...) therefore need the teacher run
once per image and flip, not once per step: ``build_teacher_cache`` embeds
the whole training set (image and mirror) and stores a memory-mapped
``(N, 2, D)`` array; training then reads rows by ``(index, flip)``.
Feature maps a loss taps inside a cached teacher (``teacher.stage3``) are
stored the same way, one ``(N, 2, C, H, W)`` file per tapped module, filled
in the same teacher pass, so an attention or feature term does not need the
teacher online either (at a cost in disk: C*H*W values per image and flip).

The file name is a SHA-256 of the dataset's content (its
``content_fingerprint()``: source files' bytes, or SynthFaceAge's
generation parameters; else every decoded image, in dataset order), the
teacher's weights, class, input normalisation and size, the batch
normalisation the student uses, and the batch size the embeddings were
computed at. Batches are always full (the last one is padded): on CPU and
GPU a convolution's per-sample result can depend on the batch *size*, not
on the other samples, so a cache built at the training batch size equals
the online teacher's output exactly on full training batches (tested, in
fp32). The cache is computed in fp32: under AMP training the online
teacher would run in reduced precision, so there the two differ slightly.
"""
import hashlib
import json
import os
import tempfile
import warnings
from typing import Callable, Dict, Iterable, Iterator, Optional, Tuple

import numpy as np
import torch

from kdzoo.utils import ConfigError, DataError, atomic_write_json
from kdzoo.utils.fileio import kdzoo_cache_dir, new_file_mode

__all__ = ['TeacherOutputCache', 'teacher_checksum', 'dataset_checksum',
           'default_teacher_cache_dir', 'build_teacher_cache',
           'build_teacher_caches', 'CACHE_VERSION']

# Part of every cache key: bump when what is stored changes.
CACHE_VERSION = 'teacher-cache-1'
_DTYPES = {'float32': np.float32, 'float16': np.float16}


def default_teacher_cache_dir() -> str:
    """``$KDZOO_CACHE/teacher_outputs``, else ``~/.cache/kdzoo/...``."""
    return kdzoo_cache_dir('teacher_outputs')


def teacher_checksum(teacher: torch.nn.Module) -> str:
    """SHA-256 of a frozen teacher: class, weights and buffers (for an ONNX
    network, its file's SHA-256 and runtime), input normalisation (its own
    and the student's) and input size."""
    h = hashlib.sha256()
    h.update(type(teacher).__name__.encode())
    h.update(type(getattr(teacher, 'network', teacher)).__name__.encode())
    state = teacher.state_dict()
    for extra in ('mean', 'std', 'src_mean', 'src_std'):
        value = getattr(teacher, extra, None)
        if isinstance(value, torch.Tensor):
            state[f'<{extra}>'] = value
    for name in sorted(state):
        tensor = state[name].detach().cpu().contiguous()
        h.update(f'{name}|{tensor.dtype}|{tuple(tensor.shape)}'.encode())
        h.update(tensor.reshape(-1).view(torch.uint8).numpy().tobytes())
    h.update(repr(getattr(teacher, 'input_size', None)).encode())
    # a network run outside torch (an ONNX file in onnxruntime) has no
    # state dict: its file's digest and the runtime stand for the weights
    network = getattr(teacher, 'network', teacher)
    for extra in ('file_sha256', 'runtime'):
        if getattr(network, extra, None) is not None:
            h.update(f'{extra}|{getattr(network, extra)}'.encode())
    return h.hexdigest()


def dataset_checksum(images: Iterable[np.ndarray]) -> Tuple[str, int]:
    """SHA-256 of the images in order (shape and pixels) and their count."""
    h = hashlib.sha256()
    count = 0
    for img in images:
        img = np.ascontiguousarray(img)
        h.update(f'{img.shape}|{img.dtype}'.encode())
        h.update(img.tobytes())
        count += 1
    return h.hexdigest(), count


class TeacherOutputCache:
    """A built cache: rows ``(index, flip)`` of a memory-mapped array.

    Args:
        path: the ``.npy`` file (N×2×D, or N×2×C×H×W for a tapped feature
            map; ``[:, 0]`` image, ``[:, 1]`` mirror).
    """

    def __init__(self, path: str):
        self.path = path
        try:
            self.array = np.load(path, mmap_mode='r')
        except (OSError, ValueError) as e:
            raise DataError(f'{path}: unreadable teacher-output cache '
                            f'({e}); delete it to rebuild') from None
        if self.array.ndim < 3 or self.array.shape[1] != 2:
            raise DataError(f'{path}: teacher-output cache has shape '
                            f'{self.array.shape}, expected (N, 2, D) or '
                            '(N, 2, C, H, W); delete it to rebuild')

    def __len__(self) -> int:
        return self.array.shape[0]

    @property
    def embedding_size(self) -> int:
        return self.array.shape[2]

    @property
    def item_shape(self) -> Tuple[int, ...]:
        """The shape of one sample's output (D, or C×H×W)."""
        return tuple(self.array.shape[2:])

    def lookup(self, index: torch.Tensor, flip: torch.Tensor,
               device=None, dtype=torch.float32) -> torch.Tensor:
        """Embeddings of samples ``index`` (B,), mirrored where ``flip``."""
        idx = index.detach().cpu().long().numpy()
        flp = flip.detach().cpu().long().numpy()
        if idx.size and (idx.min() < 0 or idx.max() >= len(self)):
            raise DataError(
                f'{self.path}: sample index {int(idx.max())} out of range; '
                f'the cache holds {len(self)} samples (was the dataset '
                'changed after the cache was prepared?)')
        if flp.size and not np.isin(flp, (0, 1)).all():
            raise DataError(f'{self.path}: flip flags must be 0 or 1')
        rows = np.asarray(self.array[idx, flp], dtype=np.float32)
        return torch.from_numpy(rows).to(device=device, dtype=dtype)


def build_teacher_cache(teacher: torch.nn.Module,
                        batches: Iterator[Tuple[torch.Tensor, int]],
                        num_samples: int, path: str,
                        dtype: str = 'float32',
                        info: Optional[dict] = None) -> TeacherOutputCache:
    """Embed every batch and its mirror with ``teacher``; write ``path``.

    Args:
        teacher: the frozen teacher (its ``forward`` takes student-normalised
            batches, as in training).
        batches: yields ``(inputs B×3×H×W normalised, num_valid)``: every
            batch has the same size; rows past ``num_valid`` are padding.
        num_samples: N, the dataset length.
        path: the ``.npy`` to write (atomically: temp file, then rename);
            ``info`` goes to a ``.json`` beside it.
    """
    caches = build_teacher_caches(
        lambda x: {'embedding': teacher(x)}, batches, num_samples,
        {'embedding': path}, dtype,
        None if info is None else {'embedding': info})
    return caches['embedding']


def build_teacher_caches(
        forward: Callable[[torch.Tensor], Dict[str, torch.Tensor]],
        batches: Iterator[Tuple[torch.Tensor, int]], num_samples: int,
        paths: Dict[str, str], dtype: str = 'float32',
        infos: Optional[Dict[str, dict]] = None
) -> Dict[str, TeacherOutputCache]:
    """One teacher pass over every batch and its mirror, several outputs.

    ``forward(inputs)`` returns ``{name: B×...}`` (the embedding and any
    tapped feature maps); the output ``name`` goes to ``paths[name]``
    (N×2×..., each written atomically; none is left if any fails) with
    ``infos[name]`` in a ``.json`` beside it.
    """
    if dtype not in _DTYPES:
        raise ConfigError(f'teacher_cache.dtype must be one of '
                          f'{sorted(_DTYPES)}, got {dtype!r}')
    temps: Dict[str, str] = {}
    outs: Dict[str, np.ndarray] = {}
    try:
        for name, path in paths.items():
            directory = os.path.dirname(os.path.abspath(path))
            os.makedirs(directory, exist_ok=True)
            fd, temps[name] = tempfile.mkstemp(dir=directory, prefix='.tmp-',
                                               suffix='.npy')
            os.close(fd)
        filled = 0
        with torch.no_grad():
            for inputs, valid in batches:
                plain = forward(inputs)
                mirror = forward(torch.flip(inputs, dims=[3]))
                for name in paths:
                    if name not in plain:
                        raise DataError(f'teacher-output cache {paths[name]}:'
                                        f' the teacher pass gave no {name!r}')
                    both = torch.stack([plain[name], mirror[name]],
                                       dim=1)[:valid]
                    if name not in outs:
                        outs[name] = np.lib.format.open_memmap(
                            temps[name], mode='w+', dtype=_DTYPES[dtype],
                            shape=(num_samples,) + tuple(both.shape[1:]))
                    outs[name][filled:filled + valid] = \
                        both.float().cpu().numpy()
                filled += valid
        for name, path in paths.items():
            out = outs.get(name)
            if out is None or filled != num_samples:
                raise DataError(f'teacher-output cache {path}: got {filled} '
                                f'samples, expected {num_samples}')
            if not np.isfinite(out).all():
                raise DataError(f'teacher-output cache {path}: the teacher '
                                'gave non-finite outputs; check its weights '
                                'and input normalisation')
            out.flush()
        outs.clear()
        for name, path in paths.items():
            with open(temps[name], 'rb+') as f:  # on disk before the rename
                os.fsync(f.fileno())
            os.chmod(temps[name], new_file_mode())
        for name, path in paths.items():
            os.replace(temps[name], path)
    except BaseException:
        outs.clear()
        for tmp in temps.values():
            if os.path.exists(tmp):
                os.unlink(tmp)
        raise
    for name, path in paths.items():
        if infos and name in infos:
            atomic_write_json(os.path.splitext(path)[0] + '.json',
                              infos[name])
    return {name: TeacherOutputCache(path) for name, path in paths.items()}


def cache_file_name(teacher_name: str, key: str) -> str:
    return f'{teacher_name}_{key[:32]}.npy'


def cache_key(teacher_sum: str, data_sum: str, batch_size: int,
              dtype: str) -> str:
    blob = json.dumps(dict(version=CACHE_VERSION, teacher=teacher_sum,
                           data=data_sum, batch_size=int(batch_size),
                           dtype=dtype), sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()


def open_valid_cache(path: str, num_samples: int,
                     embedding_size: Optional[int],
                     item_shape: Optional[Tuple[int, ...]] = None
                     ) -> Optional[TeacherOutputCache]:
    """The cache at ``path`` if it matches (``num_samples`` rows of
    ``embedding_size``, or of ``item_shape`` for a feature map), else
    ``None`` (with a warning when a file exists but is unusable, so it is
    rebuilt)."""
    if not os.path.isfile(path):
        return None
    try:
        cache = TeacherOutputCache(path)
    except DataError as e:
        warnings.warn(f'{e}; rebuilding it')
        return None
    if item_shape is not None:
        if len(cache) != num_samples or cache.item_shape != tuple(item_shape):
            warnings.warn(f'{path}: teacher-output cache holds {len(cache)}x'
                          f'{cache.item_shape}, expected {num_samples}x'
                          f'{tuple(item_shape)}; rebuilding it')
            return None
        return cache
    if len(cache) != num_samples or cache.array.ndim != 3 or (
            embedding_size and cache.embedding_size != embedding_size):
        warnings.warn(f'{path}: teacher-output cache holds {len(cache)}x'
                      f'{cache.embedding_size}, expected {num_samples}x'
                      f'{embedding_size}; rebuilding it')
        return None
    return cache
