"""Check a recipe's registry types before anything is built."""
from mmengine.config import Config

from kdzoo.registry import (DATA_SAMPLERS, DATASETS, HOOKS, METRICS, MODELS,
                            TRANSFORMS)
from kdzoo.utils import ConfigError, did_you_mean

# Model sub-dicts whose "type" is a kdzoo model component (all in MODELS).
_MODEL_KEYS_WITHOUT_TYPE = ('student', 'teachers', 'connectors',
                            'distill_losses', 'inputs', 'test_cfg')


def _check_type(cfg: dict, registry, where: str) -> None:
    t = cfg.get('type')
    if t is None or not isinstance(t, str):
        return
    if registry.get(t) is None:
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
            _check_type(node, MODELS, where)
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
    _check_type(dataset, DATASETS, f'{name}.dataset')
    for i, step in enumerate(dataset.get('pipeline') or []):
        if isinstance(step, dict):
            _check_type(step, TRANSFORMS, f'{name}.dataset.pipeline[{i}]')
    sampler = loader.get('sampler')
    if isinstance(sampler, dict):
        _check_type(sampler, DATA_SAMPLERS, f'{name}.sampler')


def validate_config(cfg: Config, source: str = 'recipe') -> None:
    """Raise ``ConfigError`` naming the key of the first unknown type."""
    import kdzoo  # noqa: F401  (register everything)
    if cfg.get('custom_imports'):
        from mmengine.utils import import_modules_from_strings
        try:
            import_modules_from_strings(**cfg['custom_imports'])
        except ImportError as e:
            raise ConfigError(f'{source}: custom_imports failed: {e}. Is the '
                              'module on PYTHONPATH?') from None
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
                _check_type(metric, METRICS, f'{name}[{i}]')
    for i, hook in enumerate(cfg.get('custom_hooks') or []):
        _check_type(hook, HOOKS, f'custom_hooks[{i}]')
