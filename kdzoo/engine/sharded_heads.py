"""Row-sharded heads (PartialFC under DDP) in checkpoints and ``head.pth``.

PartialFC keeps only its own classes' centres on each rank, but mmengine
writes checkpoints from rank 0 alone (``Runner.save_checkpoint`` is
``master_only``), so a plain checkpoint would hold rank 0's rows and lose
the others'. kdzoo therefore

- gathers to rank 0 (no other rank holds the whole matrix) each sharded
  parameter and the optimizer state that has its shape (SGD momentum, Adam
  moments), on every rank, *before* rank 0 writes
  (``KdzooRunner.save_checkpoint`` calls :func:`gather_sharded_state`; the
  gather is a collective, which is why it cannot run inside the
  rank-0-only ``before_save_checkpoint``);
- puts the whole ``(C, ...)`` tensors into the checkpoint
  (``ShardedHeadCheckpointHook.before_save_checkpoint``): the file looks
  like a single-process checkpoint;
- on load, each rank keeps its own rows: PartialFC's
  ``_load_from_state_dict`` slices the weight, and
  ``after_load_checkpoint`` slices the optimizer state, so a run resumes
  on another world size at an epoch boundary (``KdzooRunner.resume`` maps
  such checkpoints to the CPU first, not each GPU);
- refuses ``EMAHook`` (its averaged copy is not gathered) and custom
  optimizer wrappers that would clip with a per-rank norm.

A sharded module declares ``row_sharded_params`` (names relative to it) and
provides ``world_size``, ``num_classes``, ``gather_rows(shard)`` (collective)
and ``local_rows(full)``.
"""
from typing import Dict, List, Optional, Tuple

import torch
from mmengine.hooks import Hook
from mmengine.model import is_model_wrapper
from mmengine.optim import OptimWrapper, OptimWrapperDict

from kdzoo.registry import HOOKS
from kdzoo.utils import ConfigError

__all__ = ['sharded_params', 'gather_sharded_state', 'full_state_dict',
           'check_sharded_training', 'ShardedHeadCheckpointHook',
           'ShardAwareClipMixin']


def _unwrap(model):
    return model.module if is_model_wrapper(model) else model


def sharded_params(model) -> List[Tuple[str, torch.nn.Module,
                                        torch.nn.Parameter]]:
    """``(state-dict key, owning module, parameter)`` of every parameter
    split over more than one rank."""
    found = []
    for prefix, module in _unwrap(model).named_modules():
        if getattr(module, 'world_size', 1) <= 1:
            continue
        for name in getattr(module, 'row_sharded_params', ()):
            key = f'{prefix}.{name}' if prefix else name
            found.append((key, module, getattr(module, name)))
    return found


def _optimizer(runner):
    wrapper = getattr(runner, 'optim_wrapper', None)
    if wrapper is None or isinstance(wrapper, dict):
        return None  # not built (test-only runner)
    if isinstance(wrapper, OptimWrapperDict) or \
            not isinstance(wrapper, OptimWrapper):
        raise ConfigError(
            'optim_wrapper: kdzoo saves PartialFC centre shards with the '
            f'state of a single OptimWrapper, got {type(wrapper).__name__}; '
            'use one OptimWrapper (AmpOptimWrapper) for the distiller')
    return wrapper.optimizer


def _param_index(optimizer, param) -> int:
    """Position of ``param`` in ``optimizer.state_dict()['state']``."""
    flat = [p for group in optimizer.param_groups for p in group['params']]
    for i, p in enumerate(flat):
        if p is param:
            return i
    return -1


def _gathered(module, tensor) -> Optional[torch.Tensor]:
    """Whole tensor on CPU on rank 0, ``None`` elsewhere (collective)."""
    full = module.gather_rows(tensor, dst=0)
    return None if full is None else full.cpu()


def gather_sharded_state(runner, with_optimizer: bool = True
                         ) -> Dict[str, dict]:
    """Whole tensors of every sharded parameter and of its optimizer state
    (gathered to rank 0 only); a collective: every rank calls it. Rank 0
    gets (empty without sharded params; other ranks always get ``{}``)::

        {key: dict(weight=(C, D), index=optimizer index or -1,
                   optim={state name: (C, D)})}
    """
    gathered = {}
    params = sharded_params(runner.model)
    optimizer = _optimizer(runner) if params and with_optimizer else None
    for key, module, param in params:
        entry = dict(weight=_gathered(module, param), index=-1, optim={})
        if optimizer is not None:
            entry['index'] = _param_index(optimizer, param)
            state = optimizer.state.get(param, {})
            for name in sorted(state):  # same order on every rank
                value = state[name]
                if isinstance(value, torch.Tensor) and \
                        value.shape == param.shape:
                    entry['optim'][name] = _gathered(module, value)
        if entry['weight'] is not None:  # rank 0
            gathered[key] = entry
    return gathered


def full_state_dict(module: torch.nn.Module) -> Dict[str, torch.Tensor]:
    """``module.state_dict()`` (detached, on CPU) with sharded parameters
    gathered whole; a collective wherever ``module`` holds shards, whose
    whole matrices only rank 0 receives (use the result there)."""
    state = {k: v.detach().cpu().clone() for k, v in
             module.state_dict().items()}
    for key, owner, param in sharded_params(module):
        state[key] = _gathered(owner, param)
    return state


def check_sharded_training(runner) -> None:
    """Refuse set-ups that would lose or mix sharded rows (every rank)."""
    params = sharded_params(runner.model)
    if not params:
        return
    from mmengine.hooks import EMAHook
    if any(isinstance(h, EMAHook) for h in runner.hooks):
        raise ConfigError(
            'custom_hooks: EMAHook averages a copy of the model whose '
            f'PartialFC shards ({params[0][0]}) kdzoo does not gather into '
            'checkpoints; remove EMAHook or train the head with one process')
    optimizer = _optimizer(runner)
    wrapper = runner.optim_wrapper
    if optimizer is not None and wrapper.clip_grad_kwargs and \
            not isinstance(wrapper, ShardAwareClipMixin):
        raise ConfigError(
            f'optim_wrapper.type: {type(wrapper).__name__} clips with each '
            "rank's own gradient norm, which differs between ranks with a "
            'PartialFC head and lets the replicas drift apart; use '
            "'OptimWrapper' or 'AmpOptimWrapper' (kdzoo's guarded wrappers "
            'clip with the norm over all ranks) or remove clip_grad')


@HOOKS.register_module()
class ShardedHeadCheckpointHook(Hook):
    """Writes whole sharded tensors into checkpoints, slices them on load
    (see the module docstring). ``KdzooRunner`` registers it; it does
    nothing for models without sharded parameters."""

    priority = 'VERY_LOW'

    def before_train(self, runner) -> None:
        check_sharded_training(runner)

    def before_save_checkpoint(self, runner, checkpoint: dict) -> None:
        gathered = getattr(runner, 'gathered_shards', None) or {}
        for key, entry in gathered.items():
            checkpoint['state_dict'][key] = entry['weight']
            optim_state = (checkpoint.get('optimizer') or {}).get('state')
            if optim_state is not None and entry['index'] in optim_state:
                optim_state[entry['index']].update(entry['optim'])

    def after_load_checkpoint(self, runner, checkpoint: dict) -> None:
        params = sharded_params(runner.model)
        optim_state = (checkpoint.get('optimizer') or {}).get('state')
        if not params or not optim_state:
            return
        optimizer = _optimizer(runner)
        if optimizer is None:
            return
        for key, module, param in params:
            state = optim_state.get(_param_index(optimizer, param), {})
            for name, value in state.items():
                if isinstance(value, torch.Tensor) and value.dim() >= 1 \
                        and value.shape[0] == module.num_classes \
                        and value.shape[1:] == param.shape[1:]:
                    # a copy: a view would keep the whole matrix alive
                    state[name] = module.local_rows(value).clone()


class ShardAwareClipMixin:
    """Gradient-norm clipping that sees every rank's centre shard.

    mmengine clips with ``clip_grad_norm_`` over this rank's parameters;
    with a sharded head the shard's gradient differs per rank, so each rank
    would compute a different norm, scale the (DDP-averaged, identical)
    backbone gradients differently, and the replicas would drift apart.
    Here the norm is that of the whole model, as one process would compute
    it: replicated gradients counted once, the shards' squared norms summed
    over the ranks; every rank then applies the same coefficient
    (``max_norm / (norm + 1e-6)``, at most 1, as ``clip_grad_norm_``).
    ``row_sharded_params`` is set by ``TrainableOptimWrapperConstructor``.
    """

    row_sharded_params: tuple = ()

    def _clip_grad(self) -> None:
        sharded = {id(p) for p in self.row_sharded_params}
        if not sharded or self.grad_name != 'grad_norm' or \
                not torch.distributed.is_initialized():
            return super()._clip_grad()
        norm_type = float(self.clip_grad_kwargs.get('norm_type', 2.0))
        if norm_type != 2.0:
            raise ConfigError(
                'optim_wrapper.clip_grad: with a PartialFC head sharded over '
                f'ranks kdzoo clips the L2 norm only, got norm_type='
                f'{norm_type}; remove norm_type (or use type="value")')
        params = [p for group in self.optimizer.param_groups
                  for p in group['params']
                  if p.requires_grad and p.grad is not None]
        if not params:
            return
        device = params[0].grad.device

        def squared(grads):
            return sum((g.detach().float().pow(2).sum().to(device)
                        for g in grads), torch.zeros((), device=device))

        shard_sq = squared(p.grad for p in params if id(p) in sharded)
        torch.distributed.all_reduce(shard_sq)
        norm = (squared(p.grad for p in params if id(p) not in sharded)
                + shard_sq).sqrt()
        coef = (float(self.clip_grad_kwargs['max_norm']) /
                (norm + 1e-6)).clamp(max=1.0)
        for p in params:
            p.grad.detach().mul_(coef.to(p.grad.device, p.grad.dtype))
        self.message_hub.update_scalar(f'train/{self.grad_name}', float(norm))
