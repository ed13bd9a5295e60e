"""SynthFaceAge: procedurally rendered faces for age-invariant recognition.

kdzoo's embedded default data. Every image is a deterministic function of
``(seed, identity uid, image index, age, difficulty, image_size)`` and of the
renderer version; nothing is downloaded.

Generative model
----------------
* **Identity** (fixed per identity, drawn from ``SeedSequence([seed, uid])``):
  face shape (width, crown and chin height, jaw taper, cheeks), skin tone on
  a light-to-dark curve with hue jitter, eye spacing/height/size/shape/tilt
  and iris colour, brow thickness/angle/arch/length, nose length and width,
  mouth height and width, lip thickness and colour, ear size, hair colour,
  style (short, medium, long, bob, buzz, curly, fringe), volume, length,
  hairline, parting and fringe, moles (0-3 at fixed places), freckles, and
  facial-hair style. Identities also carry their own *ageing traits*: ageing
  rate, greying onset and speed, balding propensity, wrinkle strength, age
  spot propensity and childhood hair lightness, so age is not one global
  transform.
* **Age** (years, each identity spans the whole ``age_range``: its images
  fall in equal age bands): children have rounder faces with a short lower
  face, large eyes set low, small nose and mouth, rosy cheeks and lighter
  hair; adults grow a longer jaw and, if male-like, facial hair (stubble,
  moustache, goatee or beard); with biological age (identity rate) come
  forehead lines, crow's feet, nasolabial folds, eye bags, drooping eyes
  and brows, thinner paler lips, jowls, larger ears and nose, sallow skin
  and age spots, greying hair, brows and beard, receding hairline and
  crown baldness.
* **Nuisance** (per image, scaled by ``difficulty``): pose (roll, yaw as a
  shift and squash of the inner features, scale and translation), lighting
  (directional gradient and face shading, brightness, contrast, colour
  cast), background colour and gradient, shirt colour, expression (smile,
  open mouth, raised brows, squint), sensor noise, blur, and occlusion
  (sunglasses, surgical mask or a random block) with probability
  0.15 × difficulty.

``difficulty`` is a float scaling every nuisance (0 = clean frontal images)
or a dict with keys ``pose, lighting, expression, noise, blur, occlusion,
background, age`` (missing keys 1.0); ``age`` scales how strongly age
changes a face (a float ``difficulty`` leaves it at 1).

Splits and cache
----------------
``train`` and ``test`` draw identities from disjoint uid ranges; the test
split appends distractor identities (a third range). Images are cached under
``cache_dir`` (default ``$KDZOO_CACHE/synthface`` or
``~/.cache/kdzoo/synthface``) as ``<name>.npy`` (memory-mapped on load) plus
``<name>.npz`` (labels, ages, uids and the image checksum), both named by a
SHA-256 of every generation parameter and the renderer version, written
atomically; a corrupt or mismatching entry is regenerated with a warning.
"""
import copy
import hashlib
import io
import json
import os
import tempfile
import time
import warnings
from typing import List, Mapping, Optional, Sequence, Union

import numpy as np
from mmengine.dataset import BaseDataset
from mmengine.logging import print_log

from kdzoo.registry import DATASETS, TRANSFORMS
from kdzoo.utils.checks import check_int
from kdzoo.utils.errors import ConfigError, did_you_mean
from kdzoo.utils.fileio import (atomic_write_bytes, file_sha256,
                                 kdzoo_cache_dir)

from .generate import generate_split, split_layout
from .identities import NUISANCE_KEYS, normalize_difficulty
from .protocols import build_protocols
from .render import RENDER_VERSION

__all__ = ['SynthFaceAge', 'SYNTHFACE_VERSION', 'default_cache_dir']

# Part of every cache key: bump on any change to sampling or rendering.
SYNTHFACE_VERSION = f'synthface-1.r{RENDER_VERSION}'

_DEFAULTS = {
    'train': dict(num_identities=1000, images_per_identity=20,
                  num_distractors=0),
    'test': dict(num_identities=200, images_per_identity=12,
                 num_distractors=1000),
}


def default_cache_dir() -> str:
    """``$KDZOO_CACHE/synthface`` if set, else ``~/.cache/kdzoo/synthface``."""
    return kdzoo_cache_dir('synthface')


def _share(path: str) -> None:
    """Give a cache file the usual permissions (mkstemp makes it 0600)."""
    mask = os.umask(0)
    os.umask(mask)
    os.chmod(path, 0o666 & ~mask)


@DATASETS.register_module()
class SynthFaceAge(BaseDataset):
    """Procedural face identities across ages 5-80 (cached, CPU-friendly).

    Each item is one image: ``img`` (H×W×3 uint8 RGB), ``label`` (identity
    index in the split; test distractors get labels after the test
    identities), ``age`` (years) and ``sample_idx``. The test split's
    metainfo carries ``verification`` (``standard``, ``cross_age``) and
    ``identification`` (``cross_age``) protocols for
    :class:`~kdzoo.evaluation.FaceVerificationMetric` and
    :class:`~kdzoo.evaluation.FaceIdentificationMetric`; ``num_classes``
    is the number of labels (train: identities, the classifier size; test:
    identities plus distractor identities). See the module docstring for
    the generative model.

    Args:
        split: ``'train'`` or ``'test'`` (disjoint identities).
        num_identities: identities (default 1000 train, 200 test).
        images_per_identity: images per identity, one per equal age band
            (default 20 train, 12 test).
        image_size: square image side in pixels (default 112).
        age_range: ``(youngest, oldest)`` years, default ``(5, 80)``.
        seed: data seed; changes every identity and image.
        num_distractors: test only: distractor identities (default 1000).
        images_per_distractor: images of each distractor identity (1).
        difficulty: nuisance strength, a float or dict (module docstring).
        cross_age_gap: minimum age gap (years) of cross-age pairs and
            probes (default 30).
        num_folds: verification folds (default 10).
        cache_dir: cache folder (default :func:`default_cache_dir`);
            ``False`` keeps images in memory only.
        num_threads: rendering threads (default 1; the output does not
            depend on it, and on 2 cores a second thread barely helps
            because most numpy calls are short).
        pipeline: transforms, default ``[dict(type='PackFaceInputs')]``.
        **kwargs: passed to mmengine's ``BaseDataset`` (``lazy_init``,
            ``indices`` (train only), ``serialize_data``, ...).
    """

    METAINFO = dict(dataset_name='SynthFaceAge')

    def __init__(self, split: str = 'train',
                 num_identities: Optional[int] = None,
                 images_per_identity: Optional[int] = None,
                 image_size: int = 112,
                 age_range: Sequence[int] = (5, 80), seed: int = 0,
                 num_distractors: Optional[int] = None,
                 images_per_distractor: int = 1,
                 difficulty: Union[float, Mapping[str, float]] = 1.0,
                 cross_age_gap: int = 30, num_folds: int = 10,
                 cache_dir: Union[str, bool, None] = None,
                 num_threads: Optional[int] = None,
                 pipeline: Optional[list] = None, **kwargs):
        if split not in _DEFAULTS:
            raise ConfigError(
                f"SynthFaceAge: split must be 'train' or 'test', got "
                f'{split!r}.{did_you_mean(str(split), _DEFAULTS)}')
        d = _DEFAULTS[split]
        self.split = split
        owner = 'SynthFaceAge'
        self.num_identities = check_int(
            owner, 'num_identities', d['num_identities']
            if num_identities is None else num_identities, 1)
        self.images_per_identity = check_int(
            owner, 'images_per_identity', d['images_per_identity']
            if images_per_identity is None else images_per_identity, 1)
        self.image_size = check_int(owner, 'image_size', image_size, 8)
        self.seed = check_int(owner, 'seed', seed, 0)
        self.num_distractors = check_int(
            owner, 'num_distractors', d['num_distractors']
            if num_distractors is None else num_distractors, 0)
        self.images_per_distractor = check_int(
            owner, 'images_per_distractor', images_per_distractor, 1)
        self.cross_age_gap = check_int(owner, 'cross_age_gap', cross_age_gap,
                                       1)
        self.num_folds = check_int(owner, 'num_folds', num_folds, 1)
        self.age_range = self._age_range(age_range)
        self.difficulty = self._difficulty(difficulty)
        self.num_threads = num_threads
        if split == 'train' and self.num_distractors:
            raise ConfigError(
                'SynthFaceAge: num_distractors is for the test split; set it '
                "to 0 (or leave it out) for split='train'")
        if split == 'test':
            self._check_test()
            if kwargs.get('indices') is not None:
                raise ConfigError(
                    "SynthFaceAge: `indices` is not supported for split="
                    "'test' (the protocols refer to positions in the whole "
                    'split); lower num_identities/num_distractors instead')
        if cache_dir is None:
            cache_dir = default_cache_dir()
        self.cache_dir = None if cache_dir is False else \
            os.path.expanduser(str(cache_dir))
        self._images = None
        if pipeline is None:
            pipeline = [dict(type='PackFaceInputs')]
        pipeline = [TRANSFORMS.build(t) if isinstance(t, dict) else t
                    for t in pipeline]
        super().__init__(pipeline=pipeline, **kwargs)

    # ---- validation ------------------------------------------------------
    @staticmethod
    def _age_range(age_range):
        try:
            lo, hi = (int(a) for a in age_range)
        except (TypeError, ValueError):
            raise ConfigError(f'SynthFaceAge: age_range must be (youngest, '
                              f'oldest) in years, got {age_range!r}') from None
        if not 0 <= lo < hi <= 100:
            raise ConfigError(f'SynthFaceAge: age_range must satisfy 0 <= '
                              f'youngest < oldest <= 100, got {age_range!r}')
        return (lo, hi)

    @staticmethod
    def _difficulty(difficulty):
        if isinstance(difficulty, Mapping):
            bad = [k for k in difficulty if k not in NUISANCE_KEYS]
            if bad:
                raise ConfigError(
                    f'SynthFaceAge: unknown difficulty key {bad[0]!r}; known '
                    f'keys: {", ".join(NUISANCE_KEYS)}.'
                    f'{did_you_mean(str(bad[0]), NUISANCE_KEYS)}')
        else:
            try:
                float(difficulty)
            except (TypeError, ValueError):
                raise ConfigError(
                    'SynthFaceAge: difficulty must be a number or a dict of '
                    f'{", ".join(NUISANCE_KEYS)}; got {difficulty!r}') \
                    from None
        norm = normalize_difficulty(difficulty)
        for k, v in norm.items():
            if not (np.isfinite(v) and 0 <= v <= 5):
                raise ConfigError(f'SynthFaceAge: difficulty {k!r} must be '
                                  f'in [0, 5], got {v}')
        return norm

    def _check_test(self):
        lo, hi = self.age_range
        if self.num_identities < 2 * self.num_folds:
            raise ConfigError(
                f'SynthFaceAge: the test split needs num_identities >= 2 * '
                f'num_folds = {2 * self.num_folds} (each verification fold '
                f'needs two identities); got {self.num_identities}')
        if self.cross_age_gap >= hi - lo:
            raise ConfigError(
                f'SynthFaceAge: cross_age_gap={self.cross_age_gap} must be '
                f'smaller than the age_range span {hi - lo}; lower '
                'cross_age_gap or widen age_range')
        # stratified ages: an identity's youngest and oldest images are at
        # least (n - 2) / n of the span apart (minus 1 for rounding)
        n = self.images_per_identity

        def gap(k):
            return (k - 2) / k * (hi - lo) - 1

        if n < 2 or gap(n) < self.cross_age_gap:
            need = next((k for k in range(2, 1000)
                         if gap(k) >= self.cross_age_gap), None)
            fix = (f'use images_per_identity >= {need} or lower '
                   'cross_age_gap') if need else \
                'lower cross_age_gap or widen age_range'
            raise ConfigError(
                f'SynthFaceAge: images_per_identity={n} is too few for '
                f'cross-age pairs with cross_age_gap={self.cross_age_gap} '
                f'over age_range={self.age_range}; {fix}')

    # ---- generation and cache -------------------------------------------
    def generation_params(self) -> dict:
        """Everything the images depend on (hashed into the cache name)."""
        return dict(version=SYNTHFACE_VERSION, split=self.split,
                    num_identities=self.num_identities,
                    images_per_identity=self.images_per_identity,
                    image_size=self.image_size,
                    age_range=list(self.age_range), seed=self.seed,
                    num_distractors=self.num_distractors,
                    images_per_distractor=self.images_per_distractor,
                    difficulty={k: self.difficulty[k]
                                for k in sorted(self.difficulty)})

    def cache_key(self) -> str:
        blob = json.dumps(self.generation_params(), sort_keys=True)
        return hashlib.sha256(blob.encode()).hexdigest()

    def content_fingerprint(self) -> str:
        """Identity of the images without rendering them (teacher cache
        key): they are a pure function of :meth:`generation_params`."""
        return hashlib.sha256(
            f'SynthFaceAge|{self.cache_key()}'.encode()).hexdigest()

    def cache_paths(self):
        """(images .npy, metadata .npz) paths, or None without a cache."""
        if self.cache_dir is None:
            return None
        name = f'synthface_{self.split}_{self.cache_key()[:32]}'
        base = os.path.join(self.cache_dir, name)
        return base + '.npy', base + '.npz'

    def _layout(self):
        return split_layout(self.seed, self.split, self.num_identities,
                            self.images_per_identity, self.age_range,
                            self.num_distractors, self.images_per_distractor)

    def _render(self, layout, out=None):
        t = time.time()
        images = generate_split(layout, self.seed, self.image_size,
                                self.difficulty, self.num_threads, out=out)
        n = len(layout['uid'])
        dt = time.time() - t
        print_log(f'SynthFaceAge: rendered {n} {self.split} images at '
                  f'{self.image_size}px in {dt:.1f}s '
                  f'({n / max(dt, 1e-9):.0f}/s)', logger='current')
        return images

    def _load_cache(self, layout, paths) -> Optional[np.ndarray]:
        npy, npz = paths
        if not (os.path.exists(npy) and os.path.exists(npz)):
            return None
        try:
            with np.load(npz, allow_pickle=False) as meta:
                params = json.loads(str(meta['params']))
                if params != json.loads(json.dumps(self.generation_params())):
                    raise ValueError('generation parameters differ')
                for key in ('uid', 'label', 'age'):
                    if not np.array_equal(meta[key], layout[key]):
                        raise ValueError(f'{key} differs')
                digest = str(meta['images_sha256'])
            if file_sha256(npy) != digest:
                raise ValueError('image checksum mismatch')
            images = np.load(npy, mmap_mode='r')
            shape = (len(layout['uid']), self.image_size, self.image_size, 3)
            if images.shape != shape or images.dtype != np.uint8:
                raise ValueError(f'images have shape {images.shape}, '
                                 f'expected {shape}')
            return images
        except Exception as e:  # unreadable, truncated, mismatching
            warnings.warn(f'SynthFaceAge: cache entry {npy} is corrupt or '
                          f'stale ({type(e).__name__}: {e}); regenerating it',
                          stacklevel=2)
            return None

    def _write_cache(self, layout, paths) -> np.ndarray:
        npy, npz = paths
        os.makedirs(self.cache_dir, exist_ok=True)
        shape = (len(layout['uid']), self.image_size, self.image_size, 3)
        # Render straight into a memory-mapped temporary .npy beside the
        # target, fsync, then rename: readers never see a partial file.
        fd, tmp = tempfile.mkstemp(dir=self.cache_dir, suffix='.npy.tmp',
                                   prefix='.' + os.path.basename(npy) + '.')
        os.close(fd)
        try:
            mm = np.lib.format.open_memmap(tmp, mode='w+', dtype=np.uint8,
                                           shape=shape)
            self._render(layout, out=mm)
            mm.flush()
            del mm
            with open(tmp, 'rb+') as f:
                os.fsync(f.fileno())
            digest = file_sha256(tmp)
            _share(tmp)
            os.replace(tmp, npy)
        except BaseException:
            if os.path.exists(tmp):
                os.unlink(tmp)
            raise
        buf = io.BytesIO()
        np.savez(buf, params=np.array(json.dumps(self.generation_params())),
                 images_sha256=np.array(digest), uid=layout['uid'],
                 label=layout['label'], age=layout['age'],
                 image_index=layout['image_index'],
                 distractor=layout['distractor'])
        atomic_write_bytes(npz, buf.getvalue())
        _share(npz)
        return np.load(npy, mmap_mode='r')

    def _images_for(self, layout) -> np.ndarray:
        paths = self.cache_paths()
        if paths is None:
            return self._render(layout)
        images = self._load_cache(layout, paths)
        if images is None:
            images = self._write_cache(layout, paths)
        return images

    # ---- mmengine BaseDataset -------------------------------------------
    @property
    def metainfo(self) -> dict:
        # The protocols exist once the data is loaded (lazy_init).
        if not self._fully_initialized:
            self.full_init()
        return copy.deepcopy(self._metainfo)

    def load_data_list(self) -> List[dict]:
        layout = self._layout()
        self._images = self._images_for(layout)
        self.labels = layout['label']
        self.ages = layout['age']
        self.uids = layout['uid']
        self.is_distractor = layout['distractor']
        meta = self._metainfo
        meta.update(split=self.split, image_size=self.image_size,
                    age_range=self.age_range, seed=self.seed,
                    num_identities=self.num_identities,
                    images_per_identity=self.images_per_identity,
                    difficulty=dict(self.difficulty),
                    num_classes=int(layout['label'].max()) + 1)
        if self.split == 'test':
            ver, ide = build_protocols(layout['label'], layout['age'],
                                       layout['distractor'],
                                       self.num_identities, self.seed,
                                       self.cross_age_gap, self.num_folds)
            meta.update(verification=ver, identification=ide,
                        num_distractors=self.num_distractors,
                        cross_age_gap=self.cross_age_gap)
        return [dict(img_index=i, label=int(lab), age=int(age),
                     identity_uid=int(uid))
                for i, (lab, age, uid) in enumerate(
                    zip(layout['label'], layout['age'], layout['uid']))]

    def get_data_info(self, idx: int) -> dict:
        info = super().get_data_info(idx)
        if self._images is None:  # unpickled in a spawned worker
            self._images = np.load(self.cache_paths()[0], mmap_mode='r')
        info['img'] = np.array(self._images[info.pop('img_index')])
        return info

    def __getstate__(self):
        # A cached split travels as its path (workers re-map the .npy)
        # instead of a copy of every image.
        state = self.__dict__.copy()
        if isinstance(self._images, np.memmap):
            state['_images'] = None
        return state
