"""Check a recipe's registry types and arguments before anything is built."""
import inspect
import os

from mmengine.config import Config

from kdzoo.registry import (DATA_SAMPLERS, DATASETS, HOOKS, METRICS, MODELS,
                            PARAM_SCHEDULERS, TRANSFORMS)
from kdzoo.utils import ConfigError, did_you_mean

# keys a component config may carry that are not constructor arguments
_NON_ARGUMENTS = ('type', '_scope_', 'inputs')

# Model sub-dicts whose "type" is a kdzoo model component (all in MODELS).
_MODEL_KEYS_WITHOUT_TYPE = ('student', 'teachers', 'connectors',
                            'distill_losses', 'inputs', 'test_cfg')


def _accepted_arguments(cls):
    """Constructor argument names of ``cls``, or None if it takes any.

    A ``**kwargs`` that is passed up the class hierarchy is followed to the
    base classes' constructors (e.g. a dataset forwarding to BaseDataset).
    """
    names = set()
    for klass in getattr(cls, '__mro__', (cls,)):
        init = klass.__dict__.get('__init__')
        if init is None:
            continue
        try:
            params = inspect.signature(init).parameters
        except (TypeError, ValueError):
            return None
        names |= {n for n, p in params.items() if n != 'self' and p.kind in (
            p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)}
        if not any(p.kind == p.VAR_KEYWORD for p in params.values()):
            return names
    return None


def _check_arguments(cfg: dict, cls, where: str) -> None:
    accepted = _accepted_arguments(cls)
    if accepted is None:
        return
    for key in cfg:
        if key not in accepted and key not in _NON_ARGUMENTS:
            raise ConfigError(
                f'{where}: {getattr(cls, "__name__", cls)} has no argument '
                f'{key!r}.' + did_you_mean(str(key), accepted) +
                f' Accepted arguments: {sorted(accepted)}')


def check_registered_config(cfg: dict, registry, where: str,
                            check_args: bool = True) -> None:
    """``ConfigError`` naming ``where`` if ``cfg['type']`` is not in
    ``registry`` (with close names) or an argument is not accepted (with
    the accepted ones)."""
    t = cfg.get('type')
    if t is None or not isinstance(t, str):
        return
    cls = registry.get(t)
    if cls is not None:
        if check_args:
            _check_arguments(cfg, cls, where)
    else:
        known = list(registry.module_dict)
        parent = registry.parent
        while parent is not None:
            known += list(parent.module_dict)
            parent = parent.parent
        raise ConfigError(f'{where}: type {t!r} is not registered in kdzoo '
                          f'{registry.name}s.' + did_you_mean(t, known) +
                          ' Run `kdzoo list` for registered names, or load '
                          'your own module with custom_imports.')


def _walk_model(node, where: str) -> None:
    if isinstance(node, dict):
        if 'type' in node:
            check_registered_config(node, MODELS, where)
        for key, value in node.items():
            if key != 'inputs':
                _walk_model(value, f'{where}.{key}')
    elif isinstance(node, (list, tuple)):
        for i, value in enumerate(node):
            _walk_model(value, f'{where}[{i}]')


def _check_loader(cfg: Config, name: str) -> None:
    loader = cfg.get(name)
    if not loader:
        return
    dataset = loader.get('dataset') or {}
    check_registered_config(dataset, DATASETS, f'{name}.dataset')
    for i, step in enumerate(dataset.get('pipeline') or []):
        if isinstance(step, dict):
            check_registered_config(step, TRANSFORMS,
                                    f'{name}.dataset.pipeline[{i}]')
    sampler = loader.get('sampler')
    if isinstance(sampler, dict):
        check_registered_config(sampler, DATA_SAMPLERS, f'{name}.sampler')


def import_custom_modules(cfg: Config, source: str) -> None:
    """Import the recipe's ``custom_imports`` (the user's plugin modules);
    a module that cannot be imported is a ``ConfigError`` naming it."""
    if cfg.get('custom_imports'):
        from mmengine.utils import import_modules_from_strings
        try:
            import_modules_from_strings(**cfg['custom_imports'])
        except ImportError as e:
            raise ConfigError(f'{source}: custom_imports failed: {e}. Is the '
                              'module on PYTHONPATH?') from None


def validate_config(cfg: Config, source: str = 'recipe') -> None:
    """Raise ``ConfigError`` naming the key of the first unknown type."""
    import kdzoo  # noqa: F401  (register everything)
    import_custom_modules(cfg, source)
    if 'model' not in cfg:
        raise ConfigError(f'{source}: no "model" in the recipe')
    _walk_model(cfg['model'], 'model')
    for name in ('train_dataloader', 'val_dataloader', 'test_dataloader'):
        _check_loader(cfg, name)
    for name in ('val_evaluator', 'test_evaluator'):
        ev = cfg.get(name)
        for i, metric in enumerate(ev if isinstance(ev, (list, tuple))
                                   else [ev] if ev else []):
            if isinstance(metric, dict):
                check_registered_config(metric, METRICS, f'{name}[{i}]')
    for i, hook in enumerate(cfg.get('custom_hooks') or []):
        check_registered_config(hook, HOOKS, f'custom_hooks[{i}]')
    schedulers = cfg.get('param_scheduler') or []
    for i, sched in enumerate(schedulers if isinstance(schedulers, list)
                              else [schedulers]):
        if isinstance(sched, dict):
            # arguments: mmengine consumes some itself (convert_to_iter_based)
            check_registered_config(sched, PARAM_SCHEDULERS,
                                    f'param_scheduler[{i}]',
                                    check_args=False)
    _check_scheduler_windows(cfg)
    _check_optim_wrapper(cfg.get('optim_wrapper'))
    load_from = cfg.get('load_from')
    if load_from and not os.path.isfile(load_from):
        raise ConfigError(f'load_from: file not found: {load_from!r}')


def _check_scheduler_windows(cfg: Config) -> None:
    """Every epoch-based scheduler phase spans at least one epoch of the
    run (mmengine would stop at runner build with ``end should be larger
    than begin``, in iterations, naming no key)."""
    schedulers = cfg.get('param_scheduler') or []
    epochs = (cfg.get('train_cfg') or {}).get('max_epochs')
    for i, sched in enumerate(schedulers if isinstance(schedulers, list)
                              else [schedulers]):
        if not isinstance(sched, dict) or not sched.get('by_epoch', True):
            continue
        begin, end = sched.get('begin', 0), sched.get('end')
        if not all(isinstance(v, (int, float)) for v in (begin, end)):
            continue
        kind = sched.get('type', 'scheduler')
        if end <= begin:
            raise ConfigError(
                f'param_scheduler[{i}] ({kind}): begin={begin} and end={end} '
                f'leave no epoch (train_cfg.max_epochs={epochs}); set '
                f'param_scheduler[{i}].end above its begin, or drop the phase')


def _check_optim_wrapper(wrapper) -> None:
    """The non-finite guard's arguments (kdzoo.engine.numerics)."""
    from .numerics import check_guard_args
    if not isinstance(wrapper, dict):
        return
    guard = {k: wrapper[k] for k in ('nonfinite', 'max_consecutive',
                                     'check_grads') if k in wrapper}
    if guard:
        check_guard_args(str(wrapper.get('type', 'OptimWrapper')), **guard)
