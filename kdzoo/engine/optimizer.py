"""Optimizer construction that only ever sees trainable parameters."""
from mmengine.optim import DefaultOptimWrapperConstructor

from kdzoo.registry import OPTIM_WRAPPER_CONSTRUCTORS


@OPTIM_WRAPPER_CONSTRUCTORS.register_module()
class TrainableOptimWrapperConstructor(DefaultOptimWrapperConstructor):
    """Like mmengine's default, minus parameters with ``requires_grad=False``.

    Frozen teachers (and fixed parameters such as IResNet's
    ``features.weight``) are never handed to the optimizer, so weight decay
    or momentum can not touch them.
    """

    def __call__(self, model):
        optim_wrapper = super().__call__(model)
        optimizer = optim_wrapper.optimizer
        for group in optimizer.param_groups:
            group['params'] = [p for p in group['params'] if p.requires_grad]
        optimizer.param_groups[:] = [g for g in optimizer.param_groups
                                     if g['params']]
        return optim_wrapper
