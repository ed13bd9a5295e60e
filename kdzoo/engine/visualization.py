"""TensorBoard for kdzoo runs (optional: ``pip install 'kdzoo[tensorboard]'``).

A recipe's ``tensorboard`` key (``default_runtime.py``: ``'auto'``) decides
whether the runner writes TensorBoard event files next to mmengine's
``vis_data/scalars.json``:

- ``'auto'``: when the ``tensorboard`` package can be imported;
- ``True``: always (a clear error when the package is missing);
- ``False``: never.

It applies when the recipe gives no ``visualizer`` of its own (one that
does keeps exactly its backends). What reaches TensorBoard: every logged
training scalar (the total loss, each loss term the distiller logs, the
learning rate, data/step time) every ``default_hooks.logger.interval``
iterations, validation metrics per epoch, and the test metrics of the run
at its last iteration (``test/<key>``). A metric's 95 % interval
(``<key>_ci95: [low, high]``) is written as ``<key>_ci95_low`` and
``<key>_ci95_high``; other non-scalar values are left out.

    tensorboard --logdir work_dirs/<run>
"""
import numbers
from typing import Dict, Optional

import numpy as np
import torch
from mmengine.registry import VISBACKENDS
from mmengine.visualization import TensorboardVisBackend

from kdzoo.utils import ConfigError

__all__ = ['ScalarTensorboardVisBackend', 'tensorboard_installed',
           'default_visualizer', 'log_test_metrics']


def tensorboard_installed() -> bool:
    """Whether ``torch.utils.tensorboard`` can write (needs the
    ``tensorboard`` package)."""
    try:
        from torch.utils.tensorboard import SummaryWriter  # noqa: F401
    except ImportError:
        return False
    return True


def _scalars(values: Dict[str, object]) -> Dict[str, float]:
    """Plain scalars of ``values``; ``[low, high]`` intervals split in two."""
    out = {}
    for key, value in values.items():
        if isinstance(value, torch.Tensor) and value.numel() == 1:
            value = value.item()
        elif isinstance(value, np.ndarray) and value.size == 1:
            value = value.item()
        if isinstance(value, numbers.Real) and not isinstance(value, bool):
            out[key] = float(value)
        elif (key.endswith('_ci95') and isinstance(value, (list, tuple))
              and len(value) == 2
              and all(isinstance(v, numbers.Real) for v in value)):
            out[f'{key}_low'], out[f'{key}_high'] = map(float, value)
    return out


@VISBACKENDS.register_module()
class ScalarTensorboardVisBackend(TensorboardVisBackend):
    """mmengine's TensorBoard backend that writes kdzoo's interval keys as
    two scalars and skips other non-scalars without a warning each time."""

    def add_scalars(self, scalar_dict: dict, step: int = 0,
                    file_path: Optional[str] = None, **kwargs) -> None:
        super().add_scalars(_scalars(scalar_dict), step=step,
                            file_path=file_path, **kwargs)


def default_visualizer(setting) -> dict:
    """The visualizer config for a recipe without ``visualizer``: mmengine's
    local JSON backend, plus TensorBoard as ``setting`` says."""
    if setting not in ('auto', True, False):
        raise ConfigError(f"tensorboard: expected 'auto', True or False, got "
                          f'{setting!r}')
    backends = [dict(type='LocalVisBackend')]
    installed = tensorboard_installed()
    if setting is True and not installed:
        raise ConfigError(
            "tensorboard=True but the tensorboard package is not installed: "
            "pip install 'kdzoo[tensorboard]', or set tensorboard='auto' "
            '(or False) in the recipe or with --cfg-options')
    if setting is True or (setting == 'auto' and installed):
        backends.append(dict(type='ScalarTensorboardVisBackend'))
    return dict(type='Visualizer', vis_backends=backends)


def log_test_metrics(runner, metrics: Dict[str, object]) -> None:
    """The run's test metrics into its TensorBoard backend (``test/<key>``,
    at the run's last iteration); mmengine's logger hook writes validation
    metrics only."""
    visualizer = getattr(runner, 'visualizer', None)
    backends = getattr(visualizer, '_vis_backends', None) or {}
    for backend in backends.values():
        if isinstance(backend, TensorboardVisBackend):
            scalars = _scalars({f'test/{k}': v for k, v in metrics.items()})
            backend.add_scalars(scalars, step=runner.iter)
            backend.experiment.flush()
