"""The loss plugin contract.

A kdzoo distillation loss is a :class:`BaseDistillLoss` registered in
``LOSSES`` that writes its maths in one method, ``loss``, whose arguments
are **named tensors**. The recipe binds each argument to a tapped tensor
through the loss's ``inputs`` mapping, e.g.::

    loss_ang=dict(type='AngularDistillationLoss', loss_weight=1.0,
                  inputs=dict(s_emb='student.embedding',
                              t_emb='teacher_fr.embedding'))

``BaseDistillLoss.forward`` owns the frame around ``loss``:

1. the shapes are checked (``validate_shapes``, by default
   ``check_shapes``) when the loss is called on its own; inside a
   ``FaceDistiller`` they are checked once, when the model is built
   (``check_shapes``, then ``inputs_checked``), not at every step;
2. the teacher-side arguments (``teacher_args``; by default every argument
   named ``t_*``) are detached: no gradient reaches a teacher;
3. ``loss`` runs with autocast disabled and half-precision floating inputs
   raised to float32 (float32 and float64 inputs are passed as they are);
4. the result is multiplied by ``loss_weight``.

The distiller reads the argument names from the ``loss`` signature
(arguments without a default are required). A plugin that overrides
``forward`` itself (the older form) still works; it then owns the frame.
"""
import inspect
from typing import Dict, Optional, Tuple

import torch
from torch import nn

from kdzoo.utils import check_number, no_autocast

_HALF = (torch.float16, torch.bfloat16)


class BaseDistillLoss(nn.Module):
    """Base class of kdzoo loss plugins: subclasses write ``loss``."""

    #: names of the arguments that come from a teacher (detached before
    #: ``loss`` sees them); ``None``: every argument whose name starts with
    #: ``t_``.
    teacher_args: Optional[Tuple[str, ...]] = None

    def __init__(self, loss_weight: float = 1.0):
        super().__init__()
        self.loss_weight = check_number(type(self).__name__, 'loss_weight',
                                        loss_weight, 0)
        #: set by the distiller once it has checked the bound shapes
        self.inputs_checked = False

    # ------------------------------------------------------------ contract
    def loss(self, *args, **kwargs) -> torch.Tensor:
        """The unweighted loss from the named input tensors (plugins)."""
        raise NotImplementedError(
            f'{type(self).__name__} defines neither loss(...) nor forward(...)')

    @classmethod
    def input_signature(cls) -> inspect.Signature:
        """The signature the distiller binds: ``loss``'s, or ``forward``'s
        for a plugin that overrides ``forward`` itself."""
        own = cls.__dict__.get('_kdzoo_signature')
        if own is None:
            method = (cls.forward if cls.forward is not BaseDistillLoss.forward
                      else cls.loss)
            sig = inspect.signature(method)
            own = sig.replace(parameters=[
                p for name, p in sig.parameters.items() if name != 'self'])
            cls._kdzoo_signature = own
        return own

    @classmethod
    def teacher_arg_names(cls) -> Tuple[str, ...]:
        """The arguments the frame detaches (``teacher_args``, else every
        ``t_*`` argument)."""
        if cls.teacher_args is not None:
            return tuple(cls.teacher_args)
        return tuple(n for n in cls.input_signature().parameters
                     if n.startswith('t_'))

    def forward(self, *args, **kwargs) -> torch.Tensor:
        bound = self.input_signature().bind(*args, **kwargs)
        values = bound.arguments
        if not self.inputs_checked:
            self.validate_shapes({name: value.shape
                                  for name, value in values.items()
                                  if torch.is_tensor(value)})
        device_type = 'cpu'
        teacher = self.teacher_arg_names()
        for name, value in values.items():
            if not torch.is_tensor(value):
                continue
            device_type = value.device.type
            if name in teacher:
                value = value.detach()
            if value.dtype in _HALF:
                value = value.float()
            values[name] = value
        with no_autocast(device_type):
            value = self.loss(*bound.args, **bound.kwargs)
        return self.loss_weight * value

    def check_shapes(self, shapes: Dict[str, torch.Size]) -> None:
        """Raise ``ValueError`` if the bound tensors' shapes cannot work.

        ``shapes`` maps argument names to shapes (batch included). The
        distiller calls it once, at build time, before the optimizer exists,
        so a loss may also build its shape-dependent parameters here. The
        default accepts anything; plugins override it.
        """

    def validate_shapes(self, shapes: Dict[str, torch.Size]) -> None:
        """What ``forward`` checks when the loss is called on its own:
        ``check_shapes`` unless that builds parameters (a loss that does
        overrides this with the checks alone, so that nothing is built
        after the optimizer was made)."""
        self.check_shapes(shapes)

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


def loss_signature(loss: nn.Module) -> inspect.Signature:
    """The named inputs a loss module takes (``self`` excluded): its
    ``input_signature()`` for a :class:`BaseDistillLoss`, else the signature
    of ``forward`` (any ``nn.Module`` registered as a loss)."""
    if isinstance(loss, BaseDistillLoss):
        return loss.input_signature()
    return inspect.signature(loss.forward)


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
