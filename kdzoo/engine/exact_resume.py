"""Exact resume: random-number states in checkpoints, and mid-epoch resume.

mmengine checkpoints hold the model, optimizer, schedulers and message hub,
but not the random-number generators that augmentations draw from
(``RandomHorizontalFlip`` uses numpy's global RNG), and its
``EpochBasedTrainLoop`` restarts an interrupted epoch from its first batch.
kdzoo runners (``KdzooRunner``) therefore

- save Python's, numpy's and torch's (CPU and CUDA) RNG states in every
  checkpoint and restore them on resume (``RngStateHook``);
- train with ``ResumableEpochBasedTrainLoop`` wherever a recipe asks for
  ``EpochBasedTrainLoop``: resumed from an iteration checkpoint in the middle
  of an epoch (``default_hooks.checkpoint`` with ``by_epoch=False``), it
  skips the batches that epoch already trained (the sampler draws the same
  order: it is seeded by seed and epoch), then restores the RNG states of
  the checkpoint, so the next batch is the one the interrupted run would
  have trained next, with the same flips.

The result is bit-identical on CPU (tested with ``num_workers=0`` and with
2 workers). Workers draw their flips from their own RNGs, which mmengine
seeds from (seed, rank, worker id) whenever workers start, i.e. every
epoch; skipped batches are read (decoded, flips drawn) but not trained, so
a resumed epoch's workers reach the same RNG state. With
``persistent_workers=True`` the workers' streams run on across epochs in an
uninterrupted run but restart on resume: the position is exact, the flips
after the resume are not.
"""
import random

import numpy as np
import torch
from mmengine.hooks import Hook
from mmengine.logging import print_log
from mmengine.runner import EpochBasedTrainLoop

from kdzoo.registry import HOOKS, LOOPS

__all__ = ['RngStateHook', 'ResumableEpochBasedTrainLoop', 'get_rng_state',
           'set_rng_state']

_KEY = 'kdzoo_rng_state'


def get_rng_state() -> dict:
    """Python, numpy and torch RNG states (picklable, weights_only-safe)."""
    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    state = dict(python=random.getstate(),
                 numpy=(kind, np.asarray(keys), int(pos), int(has_gauss),
                        float(gauss)),
                 torch=torch.get_rng_state())
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state['cuda'] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    random.setstate(_as_tuples(state['python']))
    np.random.set_state(tuple(state['numpy']))
    torch.set_rng_state(state['torch'])
    if 'cuda' in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state['cuda'])


def _as_tuples(value):
    # random.setstate wants tuples; a round trip may have made lists
    if isinstance(value, (list, tuple)):
        return tuple(_as_tuples(v) for v in value)
    return value


@HOOKS.register_module()
class RngStateHook(Hook):
    """Save the RNG states in checkpoints; restore them on resume."""

    priority = 'VERY_LOW'  # after the other hooks drew what they draw

    def before_save_checkpoint(self, runner, checkpoint: dict) -> None:
        checkpoint[_KEY] = get_rng_state()

    def after_load_checkpoint(self, runner, checkpoint: dict) -> None:
        state = checkpoint.get(_KEY)
        if state is None:  # written before kdzoo stored RNG states
            return
        set_rng_state(state)
        # the loop re-applies them after skipping a partial epoch's batches
        runner.kdzoo_resumed_rng_state = state


@LOOPS.register_module()
class ResumableEpochBasedTrainLoop(EpochBasedTrainLoop):
    """``EpochBasedTrainLoop`` that resumes in the middle of an epoch."""

    def run_epoch(self) -> None:
        done = self._iter - self._epoch * len(self.dataloader)
        if done <= 0:
            return super().run_epoch()
        self.runner.call_hook('before_train_epoch')
        self.runner.model.train()
        batches = iter(self.dataloader)
        for _ in range(done):  # trained before the interruption
            next(batches)
        state = getattr(self.runner, 'kdzoo_resumed_rng_state', None)
        if state is not None:
            set_rng_state(state)
        print_log(f'resumed in epoch {self._epoch + 1} after batch {done} of '
                  f'{len(self.dataloader)}', logger='current')
        for idx, data_batch in enumerate(batches, start=done):
            self.run_iter(idx, data_batch)
        self.runner.call_hook('after_train_epoch')
        self._epoch += 1
