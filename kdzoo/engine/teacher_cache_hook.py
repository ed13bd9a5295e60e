"""Prepare the distiller's teacher-output caches before training starts."""
import hashlib
import os
import re
import time

import torch
from mmengine.dataset import BaseDataset, Compose
from mmengine.dist import barrier, get_rank
from mmengine.hooks import Hook
from mmengine.logging import print_log

from kdzoo.registry import HOOKS
from kdzoo.teachers.cache import (build_teacher_caches, cache_file_name,
                                  cache_key, dataset_checksum,
                                  default_teacher_cache_dir, open_valid_cache,
                                  teacher_checksum)
from kdzoo.utils import ConfigError
from kdzoo.utils.fileio import exclusive_lock
from kdzoo.version import __version__

# Transforms a cached teacher's input may pass through: decoding, the flip
# (the cache holds both versions) and packing. Anything else (crops, colour
# jitter) would make the teacher's real input differ from the cached one.
CACHE_SAFE_TRANSFORMS = ('RandomHorizontalFlip', 'PackFaceInputs')


@HOOKS.register_module()
class TeacherCacheHook(Hook):
    """Build or load the cache of every teacher in ``model.teacher_cache``.

    Embeds the training set (image and mirror) with each listed teacher once,
    at the training batch size, in dataset order, and hands the distiller a
    memory-mapped cache it reads instead of running the teacher; feature
    maps the losses tap inside a cached teacher (``teacher_fr2.stage3``) are
    cached in the same pass, one file per tapped module. Files are
    keyed by content (see ``kdzoo.teachers.cache``), so every run that shares
    data and teacher (a whole ``kdzoo compare`` suite) reuses them. With
    several processes, rank 0 builds and the others wait and read.

    ``kdzoo train``/``compare`` add this hook when the recipe sets
    ``model.teacher_cache``.
    """

    priority = 'VERY_HIGH'

    def before_train(self, runner):
        model = runner.model.module if hasattr(runner.model, 'module') \
            else runner.model
        cfg = getattr(model, 'teacher_cache_cfg', None)
        if not cfg or not cfg['teachers']:
            return
        loader = runner.train_dataloader
        dataset = loader.dataset
        _check_dataset(dataset)
        batch_size = int(loader.batch_size)
        cache_dir = cfg.get('cache_dir') or default_teacher_cache_dir()
        pack_only = Compose([t for t in dataset.pipeline.transforms
                             if type(t).__name__ == 'PackFaceInputs'])
        data_sum, count = dataset_identity(dataset, pack_only)
        device = next(model.student.parameters()).device
        for name in cfg['teachers']:
            teacher = model.teachers[name]
            key = cache_key(teacher_checksum(teacher), data_sum, batch_size,
                            cfg['dtype'])
            path = os.path.join(cache_dir, cache_file_name(name, key))
            size = teacher.embedding_size
            taps = {tap.text: os.path.join(cache_dir, cache_file_name(
                _tap_file_stem(name, model._module_taps[tap.text],
                               tap.record_input), key))
                for tap in model.teacher_outputs.cached_taps.get(name, ())}
            shapes = _tap_shapes(model, teacher, taps, device) if taps \
                else {}

            def usable():
                found = {t: open_valid_cache(p, count, None, shapes[t])
                         for t, p in taps.items()}
                found['embedding'] = open_valid_cache(path, count, size)
                return found

            if get_rank() == 0:
                # runs of a suite trained side by side (--jobs) need the same
                # cache: one builds it while the others wait, then read it
                with exclusive_lock(path + '.lock'):
                    missing = [k for k, c in usable().items() if c is None]
                    if missing:
                        self._build(model, teacher, name, dataset, pack_only,
                                    batch_size, device, count, key,
                                    cfg['dtype'],
                                    {k: taps.get(k, path) for k in missing})
            barrier()
            found = usable()
            if any(c is None for c in found.values()):
                raise ConfigError(f'teacher cache for {name!r} at {path} '
                                  'could not be opened after building it')
            cache = found.pop('embedding')
            model.set_teacher_cache(name, cache, found)
            print_log(f'teacher cache {name!r}: {path} ({count}x2x'
                      f'{cache.embedding_size})' + ''.join(
                          f'; {t}: {found[t].path} ({count}x2x'
                          f'{"x".join(map(str, found[t].item_shape))})'
                          for t in found), logger='current')

    @staticmethod
    def _build(model, teacher, name, dataset, pack_only, batch_size, device,
               count, key, dtype, paths):
        t0 = time.time()
        print_log(f'teacher cache: {sorted(paths)} of {count} images and '
                  f'their mirrors with {name!r} -> '
                  f'{sorted(paths.values())}', logger='current')
        info = dict(teacher=name, teacher_type=type(teacher).__name__,
                    source=getattr(teacher, 'checkpoint', None) or
                    getattr(teacher, 'file', None),
                    dataset=type(dataset).__name__, num_samples=count,
                    batch_size=batch_size, dtype=dtype, key=key,
                    kdzoo=__version__)
        taps = [t for t in paths if t != 'embedding']

        def forward(inputs):
            model.recorder.clear()
            with model.recorder.recording():
                out = {'embedding': teacher(inputs)}
            for t in taps:
                out[t] = model.recorder.get(t)
            model.recorder.clear()
            return out

        build_teacher_caches(
            forward, _batches(dataset, pack_only, model.data_preprocessor,
                              batch_size, device),
            count, paths, dtype=dtype,
            infos={k: dict(info, output=k) for k in paths})
        print_log(f'teacher cache {name!r}: built in '
                  f'{time.time() - t0:.1f} s', logger='current')


def _tap_file_stem(teacher: str, module_path: str, record_input: bool) -> str:
    """``<teacher>.<module path>[.input]``: a tapped map's cache file.
    Characters a file name cannot hold safely (ONNX graphs name nodes like
    ``MobileFaceNet/Conv2d_4/Add``) become ``_``, and the path's hash is
    appended so that two paths never share a file."""
    stem = f'{teacher}.{module_path}' + ('.input' if record_input else '')
    safe = re.sub(r'[^A-Za-z0-9_.+-]', '_', stem)
    if safe != stem:
        safe += '-' + hashlib.sha256(stem.encode()).hexdigest()[:8]
    return safe


def _tap_shapes(model, teacher, taps, device) -> dict:
    """Each tapped map's per-sample shape, from one pass on zeros."""
    h, w = model.input_size
    model.recorder.clear()
    try:
        with torch.no_grad(), model.recorder.recording():
            teacher(torch.zeros(1, 3, h, w, device=device))
        return {t: tuple(model.recorder.get(t).shape[1:]) for t in taps}
    finally:
        model.recorder.clear()


def _check_dataset(dataset) -> None:
    if not isinstance(dataset, BaseDataset) or not hasattr(dataset,
                                                          'pipeline'):
        raise ConfigError(
            f'model.teacher_cache needs a plain training dataset (an '
            f'mmengine BaseDataset), got {type(dataset).__name__}; dataset '
            'wrappers renumber samples. Remove model.teacher_cache or use '
            'one dataset')
    names = [type(t).__name__ for t in dataset.pipeline.transforms]
    unsafe = [n for n in names if n not in CACHE_SAFE_TRANSFORMS]
    if unsafe:
        raise ConfigError(
            f'model.teacher_cache: the training pipeline has {unsafe}, which '
            f'change what the teacher sees; a cached teacher allows only '
            f'{list(CACHE_SAFE_TRANSFORMS)}. Remove them or remove '
            'model.teacher_cache')
    if 'PackFaceInputs' not in names:
        raise ConfigError('model.teacher_cache: the training pipeline must '
                          'end with PackFaceInputs (it records each '
                          "sample's index and flip)")


def dataset_identity(dataset, pipeline):
    """``(key, count)``: the dataset's ``content_fingerprint()`` where it
    has one (source files' bytes, generation parameters: no decoding),
    else the SHA-256 of every decoded image."""
    fingerprint = getattr(dataset, 'content_fingerprint', None)
    if callable(fingerprint):
        return f'fingerprint:{fingerprint()}', len(dataset)
    return dataset_checksum(_images(dataset, pipeline))


def _packed(dataset, pipeline, index):
    info = dataset.get_data_info(index)
    return pipeline(info)


def _images(dataset, pipeline):
    for i in range(len(dataset)):
        yield _packed(dataset, pipeline, i)['inputs'].numpy()


def _batches(dataset, pipeline, preprocessor, batch_size, device):
    """Full batches of normalised images in dataset order; the last one is
    padded by repeating its final image."""
    n = len(dataset)
    for start in range(0, n, batch_size):
        idx = list(range(start, min(start + batch_size, n)))
        valid = len(idx)
        idx += [idx[-1]] * (batch_size - valid)
        uint8 = torch.stack([_packed(dataset, pipeline, i)['inputs']
                             for i in idx])
        inputs = preprocessor(dict(inputs=uint8.to(device)), False)['inputs']
        yield inputs, valid
