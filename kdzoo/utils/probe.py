"""One forward pass on a zero batch, with forward hooks for its duration:
how kdzoo finds shapes (stage maps, embedding width) and counts FLOPs
before anything trains."""
from typing import Callable, Iterable, Sequence, Tuple

import torch
from torch import nn

__all__ = ['run_on_zeros']


@torch.no_grad()
def run_on_zeros(module: nn.Module, input_shape: Sequence[int],
                 hooks: Iterable[Tuple[nn.Module, Callable]] = ()):
    """``module``'s output on zeros of ``input_shape`` (on the module's
    device), in eval mode and without gradients; each ``(submodule, hook)``
    is a forward hook for this pass only. The module's training mode is
    restored and the hooks removed, also when the pass fails."""
    param = next(module.parameters(), None)
    device = param.device if param is not None else torch.device('cpu')
    handles = [sub.register_forward_hook(hook) for sub, hook in hooks]
    was_training = module.training
    try:
        module.eval()
        return module(torch.zeros(*input_shape, device=device))
    finally:
        module.train(was_training)
        for handle in handles:
            handle.remove()
