"""The loss plugin contract.

A kdzoo distillation loss is an ``nn.Module`` registered in ``LOSSES`` whose
``forward`` takes **named tensors** and returns a scalar that is already
multiplied by ``loss_weight``. The recipe binds each forward argument to a
tapped tensor through the loss's ``inputs`` mapping, e.g.::

    loss_ang=dict(type='AngularDistillationLoss', loss_weight=1.0,
                  inputs=dict(s_emb='student.embedding',
                              t_emb='teacher_fr.embedding'))

The distiller reads the argument names from the ``forward`` signature
(arguments without a default are required) and, once at build time, calls
``check_shapes`` with the shapes the bound tensors will have, so a recipe with
mismatched shapes fails before training starts.
"""
import contextlib
import math
from typing import Dict

import torch
from torch import nn

from kdzoo.utils import ConfigError


class BaseDistillLoss(nn.Module):
    """Base class of kdzoo loss plugins (forward returns weighted scalar)."""

    def __init__(self, loss_weight: float = 1.0):
        super().__init__()
        if not isinstance(loss_weight, (int, float)) or not math.isfinite(
                loss_weight) or loss_weight < 0:
            raise ConfigError(
                f'{type(self).__name__}: loss_weight must be a finite number '
                f'>= 0, got {loss_weight!r}')
        self.loss_weight = float(loss_weight)

    def check_shapes(self, shapes: Dict[str, torch.Size]) -> None:
        """Raise ``ValueError`` if the bound tensors' shapes cannot work.

        ``shapes`` maps forward argument names to shapes (batch included).
        The default accepts anything; plugins override it.
        """

    def log_vars(self) -> Dict[str, float]:
        """Extra scalars to log after a forward (none by default).

        The distiller logs them as ``<loss name>_<key>`` next to the loss
        terms (never summed into the total, their names hold no "loss").
        """
        return {}

    @staticmethod
    def current_epoch() -> int:
        """The runner's current epoch (0-based), 0 outside a runner.

        mmengine's ``RuntimeInfoHook`` publishes it in the ``MessageHub``
        before every training epoch; losses with a warm-up (DKD) read it here.
        """
        from mmengine.logging import MessageHub
        hub = MessageHub.get_current_instance()
        return int(hub.get_info('epoch', 0) or 0)

    def extra_repr(self) -> str:
        return f'loss_weight={self.loss_weight}'


def require_ndim(name: str, shape, ndim: int, what: str) -> None:
    """Raise if ``shape`` (of argument ``name``) is not ``ndim``-D."""
    if len(shape) != ndim:
        raise ValueError(f'{name} must be {what} ({ndim}-D), got shape '
                         f'{tuple(shape)}')


def require_same_shape(name_a: str, shape_a, name_b: str, shape_b,
                       hint: str = '') -> None:
    """Raise if two bound tensors differ in shape; ``hint`` says the fix."""
    if tuple(shape_a) != tuple(shape_b):
        raise ValueError(f'{name_a} has shape {tuple(shape_a)} but {name_b} '
                         f'has shape {tuple(shape_b)}; they must match.'
                         + (f' {hint}' if hint else ''))


def is_finite_number(value) -> bool:
    """True for a finite int/float (bools excluded): for argument checks."""
    return (isinstance(value, (int, float)) and not isinstance(value, bool)
            and math.isfinite(value))


def no_autocast(device_type: str):
    """Disable autocast on ``device_type`` (float32 similarity math)."""
    try:
        return torch.autocast(device_type=device_type, enabled=False)
    except RuntimeError:  # a device type autocast does not know
        return contextlib.nullcontext()


def require_embeddings_and_labels(shapes) -> None:
    """``s_emb``/``t_emb`` (B×D) and ``labels`` (B) sharing one batch."""
    require_ndim('s_emb', shapes['s_emb'], 2, 'B×D embeddings')
    require_ndim('t_emb', shapes['t_emb'], 2, 'B×D embeddings')
    require_ndim('labels', shapes['labels'], 1, 'B identity labels')
    batch = shapes['s_emb'][0]
    if shapes['t_emb'][0] != batch or shapes['labels'][0] != batch:
        raise ValueError(
            f's_emb has shape {tuple(shapes["s_emb"])}, t_emb '
            f'{tuple(shapes["t_emb"])} and labels '
            f'{tuple(shapes["labels"])}; they must share the batch size '
            '(bind labels to "data.label" and both embeddings to the '
            'same batch).')
