"""Optimizer construction: trainable parameters only, NaN/Inf-guarded."""
from mmengine.optim import DefaultOptimWrapperConstructor
from mmengine.registry import OPTIMIZERS

from kdzoo.registry import OPTIM_WRAPPER_CONSTRUCTORS
from kdzoo.utils import ConfigError, did_you_mean
from .numerics import GUARDED_WRAPPERS
from .sharded_heads import sharded_params


@OPTIM_WRAPPER_CONSTRUCTORS.register_module()
class TrainableOptimWrapperConstructor(DefaultOptimWrapperConstructor):
    """Like mmengine's default, minus parameters with ``requires_grad=False``.

    Frozen teachers (and fixed parameters such as IResNet's
    ``features.weight``) are never handed to the optimizer, so weight decay
    or momentum can not touch them.

    ``type='OptimWrapper'`` (the default) and ``'AmpOptimWrapper'`` build
    kdzoo's ``GuardedOptimWrapper``/``GuardedAmpOptimWrapper``, which never
    step on a NaN/Inf loss or gradient; ``optim_wrapper`` may then carry
    ``nonfinite='skip'|'stop'`` and ``max_consecutive`` (see
    ``kdzoo.engine.numerics``). Other wrapper types are built as given.
    An unknown optimizer type or argument raises ``ConfigError``.
    """

    def __init__(self, optim_wrapper_cfg: dict, paramwise_cfg=None):
        optim_wrapper_cfg = optim_wrapper_cfg.copy()
        wrapper = optim_wrapper_cfg.get('type', 'OptimWrapper')
        try:
            optim_wrapper_cfg['type'] = GUARDED_WRAPPERS.get(wrapper, wrapper)
        except TypeError:  # an unhashable type value: leave it to mmengine
            pass
        optimizer = optim_wrapper_cfg.get('optimizer')
        if isinstance(optimizer, dict) and isinstance(optimizer.get('type'),
                                                      str):
            with OPTIMIZERS.switch_scope_and_registry(None) as registry:
                found = registry.get(optimizer['type'])
            if found is None:
                known = set(registry.module_dict)
                parent = registry.parent
                while parent is not None:
                    known |= set(parent.module_dict)
                    parent = parent.parent
                raise ConfigError(
                    f'optim_wrapper.optimizer: type {optimizer["type"]!r} is '
                    'not a registered optimizer.' +
                    did_you_mean(optimizer['type'], sorted(known)))
        super().__init__(optim_wrapper_cfg, paramwise_cfg)

    def __call__(self, model):
        try:
            optim_wrapper = super().__call__(model)
        except TypeError as e:  # e.g. "SGD.__init__() got an unexpected ..."
            raise ConfigError(
                f'optim_wrapper: {e}. Check the arguments of '
                f'optim_wrapper.optimizer '
                f'({self.optimizer_cfg.get("type")}) and of optim_wrapper '
                f'({_name(self.optim_wrapper_cfg.get("type"))}).') from e
        optimizer = optim_wrapper.optimizer
        for group in optimizer.param_groups:
            group['params'] = [p for p in group['params'] if p.requires_grad]
        optimizer.param_groups[:] = [g for g in optimizer.param_groups
                                     if g['params']]
        # PartialFC shards: clipped by the norm over all ranks
        optim_wrapper.row_sharded_params = tuple(
            p for _, _, p in sharded_params(model))
        return optim_wrapper


def _name(obj) -> str:
    return getattr(obj, '__name__', None) or str(obj)
