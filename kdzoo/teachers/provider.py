"""Where a distiller gets its teachers' outputs: the teacher run online, or
rows of the teacher-output cache (``TeacherOutputCache``) built before
training. One object answers both, so the model's data path asks for "the
embedding of teacher T on this batch" and never for how it is made."""
from typing import Dict, Iterable, List, Optional, Sequence, Tuple

import torch
from torch import nn

from kdzoo.utils import ConfigError, did_you_mean

__all__ = ['TeacherOutputs']

_WHERE = 'model.teacher_cache'


class TeacherOutputs:
    """Teacher embeddings (and logits) for a batch, online or cached.

    Args:
        teachers: the distiller's ``{name: FrozenTeacher}``.
        cache_cfg: ``model.teacher_cache``: ``dict(teachers=[...] | 'all',
            cache_dir=None, dtype='float32')`` or ``None`` (all online).
        used: the teachers the losses read ('all' means these).
        module_taps: ``(loss name, argument, tap)`` of every binding that
            taps a module inside a network: a cached teacher's tapped
            feature maps are cached with its embeddings (see
            :attr:`cached_taps`).
    """

    def __init__(self, teachers: nn.ModuleDict, cache_cfg: Optional[dict],
                 used: Sequence[str],
                 module_taps: Iterable[Tuple[str, str, object]] = ()):
        self.teachers = teachers
        self.cfg = _check_cache_cfg(cache_cfg, teachers, used)
        self._caches: Dict[str, object] = {}
        self._tap_caches: Dict[str, Dict[str, object]] = {}
        self.cached_taps: Dict[str, List[object]] = {}
        for _loss, _arg, tap in module_taps:
            if tap.source in self.cached:
                taps = self.cached_taps.setdefault(tap.source, [])
                if all(t.text != tap.text for t in taps):
                    taps.append(tap)

    @property
    def cached(self) -> Tuple[str, ...]:
        """The teachers served from the cache during training."""
        return tuple(self.cfg['teachers']) if self.cfg else ()

    def set_cache(self, name: str, cache, taps: Optional[dict] = None
                  ) -> None:
        """Serve teacher ``name``'s embeddings from ``cache`` (a
        ``TeacherOutputCache`` over the training set) from now on, and its
        tapped feature maps from ``taps`` (``{tap text: cache}``, one for
        each of :attr:`cached_taps`)."""
        if name not in self.cached:
            raise ConfigError(f'teacher {name!r} is not in {_WHERE}.teachers')
        taps = dict(taps or {})
        missing = [t.text for t in self.cached_taps.get(name, ())
                   if t.text not in taps]
        if missing:
            raise ConfigError(f'teacher {name!r}: no cache given for its '
                              f'tapped feature maps {missing}')
        self._caches[name] = cache
        self._tap_caches[name] = taps

    def embedding(self, name: str, inputs: torch.Tensor, data: dict,
                  use_cache: bool = True) -> torch.Tensor:
        """Teacher ``name``'s embedding of the (student-normalised) batch:
        from the cache when it serves this teacher and ``use_cache``, else
        by running the teacher."""
        if not (use_cache and name in self.cached):
            return self.teachers[name](inputs)
        cache = self._caches.get(name)
        if cache is None:
            raise ConfigError(
                f'{_WHERE} lists {name!r} but its cache was not prepared: '
                'train through `kdzoo train` (which adds TeacherCacheHook) or '
                "add custom_hooks=[dict(type='TeacherCacheHook')]")
        if 'flip' not in data or 'index' not in data:
            raise ConfigError(
                'a cached teacher needs data_samples with index and flip: '
                'end the training pipeline with PackFaceInputs')
        return cache.lookup(data['index'], data['flip'],
                            device=inputs.device, dtype=inputs.dtype)

    @torch.no_grad()
    def outputs(self, names: Sequence[str], inputs: torch.Tensor, data: dict,
                use_cache: bool = True) -> Dict[str, torch.Tensor]:
        """``{'<name>.embedding': ..., '<name>.logits': ...}`` for each
        teacher in ``names`` (logits where the teacher has a head), plus a
        cached teacher's tapped feature maps under their tap text
        (``'<name>.stage3'``); an online teacher's maps are recorded by the
        distiller's taps instead."""
        out = {}
        for name in names:
            emb = self.embedding(name, inputs, data, use_cache)
            out[f'{name}.embedding'] = emb
            if use_cache and name in self.cached:
                for text, cache in self._tap_caches.get(name, {}).items():
                    out[text] = cache.lookup(data['index'], data['flip'],
                                             device=inputs.device,
                                             dtype=inputs.dtype)
            teacher = self.teachers[name]
            if teacher.head is not None:
                out[f'{name}.logits'] = teacher.logits(emb)
        return out


def _check_cache_cfg(cfg: Optional[dict], teachers,
                     used: Sequence[str]) -> Optional[dict]:
    if not cfg:
        return None
    if not isinstance(cfg, dict):
        raise ConfigError(f'{_WHERE} must be dict(teachers=[...], '
                          "cache_dir=None, dtype='float32')")
    unknown = set(cfg) - {'teachers', 'cache_dir', 'dtype'}
    if unknown:
        raise ConfigError(f'{_WHERE}: unknown keys {sorted(unknown)}; '
                          'accepted: teachers, cache_dir, dtype')
    names = cfg.get('teachers')
    if names == 'all':
        names = list(used)
    if isinstance(names, str) or not names:
        raise ConfigError(f"{_WHERE}.teachers must be a list of teacher "
                          f"names or 'all'; teachers: {list(teachers)}")
    for name in names:
        if name not in teachers:
            raise ConfigError(f'{_WHERE}.teachers: {name!r} is not a '
                              f'teacher; teachers: {list(teachers)}'
                              + did_you_mean(str(name), teachers))
    dtype = cfg.get('dtype', 'float32')
    if dtype not in ('float32', 'float16'):
        raise ConfigError(f"{_WHERE}.dtype must be 'float32' or 'float16', "
                          f'got {dtype!r}')
    return dict(teachers=list(names), cache_dir=cfg.get('cache_dir'),
                dtype=dtype)
