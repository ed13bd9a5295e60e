"""Non-finite losses and gradients: caught before the optimizer steps.

A NaN/Inf loss or gradient that reaches ``optimizer.step()`` poisons the
weights (and SGD's momentum) for good. kdzoo's optimizer wrappers
(``GuardedOptimWrapper``, ``GuardedAmpOptimWrapper``) never step on one:

- the total loss handed to ``update_params`` is checked, and, without AMP,
  every gradient after ``backward()`` (before clipping and stepping);
- the model's per-term losses (``loss_cls``, ``loss_<name>``...) are checked
  in ``parse_losses``, so the report names the term that went non-finite.

What then happens is ``optim_wrapper.nonfinite``:

- ``'skip'`` (default): the step is dropped (gradients zeroed, optimizer,
  momentum and LR schedule untouched), a warning names the term(s), epoch and
  iteration, and the count goes to the message hub (runtime info and logged
  scalar ``nonfinite_skipped``; it is saved in checkpoints). The
  ``max_consecutive``-th non-finite step *in a row* (default 5) raises
  ``NonFiniteLossError``: one bad batch is survivable, a diverged run is not.
- ``'stop'``: the first non-finite step raises ``NonFiniteLossError``.

``'skip'`` is the default because a single overflowing batch (margin losses
in fp16, a degenerate batch for a relational loss) should not cost a
multi-hour run, while a run that keeps producing NaN still stops within a
few iterations with the same clear message. ``NonFiniteLossError`` is a
``KdzooError``: the CLI prints it as one line and exits with status 2.

Under AMP (``AmpOptimWrapper``) the ``GradScaler`` already skips steps whose
scaled gradients overflow and lowers the scale; that is normal while the
scale calibrates, so the guard does not check gradients there (and does not
count those steps): only the loss check applies.

With gradient accumulation, a window (the micro-batches of one update) that
contains a non-finite loss is dropped whole. Under distributed training all
ranks agree on the decision (one all-reduce of a flag per update), so the
replicas never diverge.

``TrainableOptimWrapperConstructor`` (every kdzoo schedule) turns
``OptimWrapper``/``AmpOptimWrapper`` into the guarded versions, so recipes get
the guard without naming it; configure it with e.g.
``optim_wrapper = dict(nonfinite='stop')`` or ``max_consecutive=20``.
"""
import logging
import math
import types
from collections import OrderedDict
from contextlib import contextmanager
from typing import Dict, Optional

import torch
from mmengine.dist import all_reduce, is_distributed
from mmengine.logging import MessageHub, print_log
from mmengine.model import is_model_wrapper
from mmengine.optim import AmpOptimWrapper, OptimWrapper
from mmengine.utils import is_list_of

from kdzoo.utils import ConfigError, KdzooError
from .sharded_heads import ShardAwareClipMixin

from kdzoo.registry import OPTIM_WRAPPERS

NONFINITE_MODES = ('skip', 'stop')
# message-hub keys
SKIPPED_KEY = 'nonfinite_skipped'
_TERMS_KEY = 'nonfinite_terms'

FIX = ('Fix: lower optim_wrapper.optimizer.lr or the loss_weight of the '
       'term, train with AmpOptimWrapper dtype=\'bfloat16\' rather than '
       'float16, or enable gradient clipping (optim_wrapper.clip_grad='
       'dict(max_norm=5.0)).')


class NonFiniteLossError(KdzooError, FloatingPointError):
    """A loss term or gradient went NaN/Inf; names the term, where and fix."""


# ------------------------------------------------------------ loss terms
def _term_value(value) -> Optional[torch.Tensor]:
    """The scalar ``parse_losses`` would log for one entry, detached."""
    if isinstance(value, torch.Tensor):
        return value.detach().float().mean()
    if is_list_of(value, torch.Tensor) and value:
        return sum(v.detach().float().mean() for v in value)
    return None


def check_finite_losses(losses: Dict[str, torch.Tensor],
                        where: Optional[str] = None) -> Dict[str, float]:
    """Check the loss terms of one iteration; return the non-finite ones.

    Looks at the entries ``parse_losses`` sums (keys containing ``'loss'``).
    When one is NaN/Inf, every term's value is recorded in the current
    ``MessageHub`` (runtime info ``nonfinite_terms``, not checkpointed), where
    the guarded optimizer wrapper reads it to name the term in its warning or
    error. Costs one host sync per call. Call it from a model's
    ``parse_losses`` (``NonFiniteLossCheckMixin`` does) or ``train_step``.

    Args:
        losses: the model's loss dict (name -> tensor or list of tensors).
        where: what produced ``losses`` (e.g. the model's class name).

    Returns:
        ``{name: value}`` of the non-finite terms; empty when all are finite.
    """
    values = OrderedDict()
    for name, value in losses.items():
        if 'loss' in name:
            v = _term_value(value)
            if v is not None:
                values[name] = v
    if not values:
        return {}
    first = next(iter(values.values()))
    stacked = torch.stack([v.to(first.device) for v in values.values()])
    if bool(torch.isfinite(stacked).all()):
        return {}
    terms = OrderedDict((k, float(v)) for k, v in
                        zip(values, stacked.cpu().tolist()))
    MessageHub.get_current_instance().update_info(
        _TERMS_KEY, dict(terms=terms, where=where), resumed=False)
    return {k: v for k, v in terms.items() if not math.isfinite(v)}


def _attach_log_vars(log_vars) -> None:
    """Let the guard drop a skipped step's NaN/Inf from the logged values
    (else the log's 20-iteration means read ``loss: nan`` long after)."""
    info = MessageHub.get_current_instance().get_info(_TERMS_KEY)
    if isinstance(info, dict):
        info['log_vars'] = log_vars


class NonFiniteLossCheckMixin:
    """Mix into an mmengine ``BaseModel`` to name non-finite loss terms.

    ``class MyModel(NonFiniteLossCheckMixin, BaseModel)``: ``parse_losses``
    runs :func:`check_finite_losses` on the loss dict. The guarded optimizer
    wrappers install the same check on models without the mixin.
    """

    def parse_losses(self, losses):
        bad = check_finite_losses(losses, where=type(self).__name__)
        parsed, log_vars = super().parse_losses(losses)
        if bad:
            _attach_log_vars(log_vars)
        return parsed, log_vars


def _checked_parse_losses(self, losses):
    bad = check_finite_losses(losses, where=type(self).__name__)
    parsed, log_vars = type(self).parse_losses(self, losses)
    if bad:
        _attach_log_vars(log_vars)
    return parsed, log_vars


def install_loss_term_check(model) -> None:
    """Make ``model.parse_losses`` call :func:`check_finite_losses`.

    A no-op for models with :class:`NonFiniteLossCheckMixin` or already
    patched; otherwise ``parse_losses`` is wrapped on this instance only.
    """
    module = model.module if is_model_wrapper(model) else model
    if (isinstance(module, NonFiniteLossCheckMixin)
            or 'parse_losses' in vars(module)
            or not callable(getattr(type(module), 'parse_losses', None))):
        return
    module.parse_losses = types.MethodType(_checked_parse_losses, module)


# ------------------------------------------------------------ the guard
def _where(hub: MessageHub) -> str:
    epoch, it = hub.get_info('epoch'), hub.get_info('iter')
    if it is None:
        return 'outside the training loop'
    total = hub.get_info('max_iters')
    # the global iteration, 1-based like mmengine's log lines
    text = f'iteration {int(it) + 1}' + (f'/{total}' if total else '')
    return (f'epoch {int(epoch) + 1}, ' if epoch is not None else '') + text


def _drop_nonfinite(log_vars) -> None:
    if not isinstance(log_vars, dict):
        return
    for key in [k for k, v in log_vars.items() if 'loss' in k
                and isinstance(v, torch.Tensor)
                and not bool(torch.isfinite(v.detach()).all())]:
        del log_vars[key]


def _total_norm(grads) -> torch.Tensor:
    get_total_norm = getattr(torch.nn.utils, 'get_total_norm', None)
    if get_total_norm is not None:  # torch >= 2.6: foreach, per device
        return get_total_norm(grads, 2.0)
    device = grads[0].device
    return torch.linalg.vector_norm(torch.stack(
        [torch.linalg.vector_norm(g.float()).to(device) for g in grads]))


def _fmt(value: float) -> str:
    return f'{value:.4g}' if math.isfinite(value) else str(value)


def check_guard_args(name: str = 'GuardedOptimWrapper',
                     nonfinite: str = 'skip', max_consecutive: int = 5,
                     check_grads: Optional[bool] = None) -> None:
    """Raise ``ConfigError`` for bad ``optim_wrapper`` guard arguments (so a
    config check can call it before anything is built)."""
    if nonfinite not in NONFINITE_MODES:
        raise ConfigError(f'{name}: nonfinite must be one of '
                          f'{NONFINITE_MODES}, got {nonfinite!r} '
                          '(optim_wrapper.nonfinite)')
    if isinstance(max_consecutive, bool) or not isinstance(
            max_consecutive, int) or max_consecutive < 1:
        raise ConfigError(f'{name}: max_consecutive must be an integer >= 1, '
                          f'got {max_consecutive!r} '
                          '(optim_wrapper.max_consecutive)')
    if check_grads is not None and not isinstance(check_grads, bool):
        raise ConfigError(f'{name}: check_grads must be True, False or None, '
                          f'got {check_grads!r} (optim_wrapper.check_grads)')


class NonFiniteGuardMixin:
    """Never step on NaN/Inf; see :mod:`kdzoo.engine.numerics`.

    Args (besides the wrapped class's):
        nonfinite: ``'skip'`` (default) or ``'stop'``.
        max_consecutive: with ``'skip'``, the number of non-finite steps in a
            row that stops training (>= 1; default 5).
        check_grads: also check gradients before stepping; defaults to True
            without AMP and False under AMP (the GradScaler handles them).
    """

    _check_grads_default = True

    def __init__(self, *args, nonfinite: str = 'skip',
                 max_consecutive: int = 5,
                 check_grads: Optional[bool] = None, **kwargs):
        check_guard_args(type(self).__name__, nonfinite, max_consecutive,
                         check_grads)
        super().__init__(*args, **kwargs)
        self.nonfinite = nonfinite
        self.max_consecutive = max_consecutive
        self.check_grads = (self._check_grads_default if check_grads is None
                            else check_grads)
        self.consecutive_nonfinite = 0
        self._window_problem: Optional[str] = None

    @contextmanager
    def optim_context(self, model):
        install_loss_term_check(model)
        with super().optim_context(model):
            yield

    def update_params(self, loss: torch.Tensor,
                      step_kwargs: Optional[Dict] = None,
                      zero_kwargs: Optional[Dict] = None) -> None:
        """Backward, then step only if the loss and gradients are finite."""
        step_kwargs = step_kwargs or {}
        zero_kwargs = zero_kwargs or {}
        self._note_loss(loss)
        # backward even on a NaN loss: distributed ranks must all reduce
        self.backward(self.scale_loss(loss))
        if not self.should_update():
            return
        problem, self._window_problem = self._window_problem, None
        if problem is None and self.check_grads:
            problem = self._check_gradients()
        problem = self._agree(problem, loss.device)
        if problem is None:
            self.consecutive_nonfinite = 0
            self.step(**step_kwargs)
            self.zero_grad(**zero_kwargs)
        else:
            self.zero_grad(**zero_kwargs)  # drop the NaN/Inf gradients
            self._nonfinite_step(problem)

    # ---------------------------------------------------------- checks
    def _note_loss(self, loss: torch.Tensor) -> None:
        # check_finite_losses wrote to the current hub (the runner's)
        info = MessageHub.get_current_instance().pop_info(_TERMS_KEY)
        if bool(torch.isfinite(loss.detach()).all()):
            return
        info = info if isinstance(info, dict) else {}
        if self.nonfinite == 'skip':  # the step is skipped (or we stop)
            _drop_nonfinite(info.get('log_vars'))
        if self._window_problem is not None:  # keep the first in the window
            return
        terms = info.get('terms') or {}
        bad = [f'{k}={_fmt(v)}' for k, v in terms.items()
               if not math.isfinite(v)]
        good = [f'{k}={_fmt(v)}' for k, v in terms.items()
                if math.isfinite(v)]
        if bad:
            text = 'non-finite loss term ' + ', '.join(bad)
            if good:
                text += f' (finite: {", ".join(good)})'
            if info.get('where'):
                text += f' in {info["where"]}'
        else:
            value = float(loss.detach().float().mean())
            text = f'non-finite total loss (loss={_fmt(value)})'
        self._window_problem = f'{text} at {_where(self.message_hub)}'

    def _check_gradients(self) -> Optional[str]:
        grads = [p.grad for group in self.optimizer.param_groups
                 for p in group['params'] if p.grad is not None]
        grads = [g.coalesce().values() if g.is_sparse else g for g in grads]
        if not grads:
            return None
        # one fused L2 norm (a few kernels, one sync): NaN/Inf anywhere make
        # it non-finite, as does a norm beyond float32 range
        norm = _total_norm(grads)
        if bool(torch.isfinite(norm)):
            return None
        n_bad = sum(not bool(torch.isfinite(g).all()) for g in grads)
        return (f'non-finite gradients (norm {_fmt(float(norm))}; NaN/Inf '
                f'in {n_bad} of {len(grads)} parameter tensors) with a '
                f'finite loss at {_where(self.message_hub)}')

    def _agree(self, problem: Optional[str], device) -> Optional[str]:
        """Distributed: one rank's problem is every rank's (same decision)."""
        if not is_distributed():
            return problem
        flag = torch.tensor([0.0 if problem is None else 1.0], device=device)
        all_reduce(flag, op='sum')
        if problem is None and float(flag) > 0:
            problem = ('a non-finite loss or gradient on another rank at '
                       f'{_where(self.message_hub)}')
        return problem

    def _nonfinite_step(self, problem: str) -> None:
        if self.nonfinite == 'stop':
            raise NonFiniteLossError(
                f'{problem}; training stopped before the optimizer step '
                f"(optim_wrapper.nonfinite='stop'). {FIX} Or set "
                "optim_wrapper.nonfinite='skip' to skip such steps.")
        self.consecutive_nonfinite += 1
        skipped = int(self.message_hub.get_info(SKIPPED_KEY, 0) or 0) + 1
        self.message_hub.update_info(SKIPPED_KEY, skipped)
        self.message_hub.update_scalar(f'train/{SKIPPED_KEY}', skipped)
        if self.consecutive_nonfinite >= self.max_consecutive:
            raise NonFiniteLossError(
                f'{problem}; {self.consecutive_nonfinite} optimizer steps in '
                'a row had non-finite values, training stopped '
                f"(optim_wrapper.nonfinite='skip', max_consecutive="
                f'{self.max_consecutive}). {FIX}')
        print_log(f'skipped the optimizer step: {problem} ({skipped} '
                  f'skipped so far, {self.consecutive_nonfinite} in a row; '
                  f'training stops at {self.max_consecutive} in a row)',
                  logger='current', level=logging.WARNING)


@OPTIM_WRAPPERS.register_module()
class GuardedOptimWrapper(NonFiniteGuardMixin, ShardAwareClipMixin,
                          OptimWrapper):
    """OptimWrapper that never steps on a NaN/Inf loss or gradient."""


@OPTIM_WRAPPERS.register_module()
class GuardedAmpOptimWrapper(NonFiniteGuardMixin, ShardAwareClipMixin,
                             AmpOptimWrapper):
    """AmpOptimWrapper that never steps on a NaN/Inf loss (GradScaler
    handles gradient overflow)."""

    _check_grads_default = False


#: plain mmengine wrapper -> guarded kdzoo wrapper (used by
#: ``TrainableOptimWrapperConstructor``)
GUARDED_WRAPPERS = {
    'OptimWrapper': GuardedOptimWrapper,
    OptimWrapper: GuardedOptimWrapper,
    'AmpOptimWrapper': GuardedAmpOptimWrapper,
    AmpOptimWrapper: GuardedAmpOptimWrapper,
}
