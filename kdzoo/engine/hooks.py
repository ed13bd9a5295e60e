"""Runner hooks: rich progress bars and the student export."""
import os
import time

from mmengine.dist import is_main_process
from mmengine.hooks import Hook
from mmengine.model import is_model_wrapper

from kdzoo.registry import HOOKS
from kdzoo.utils import atomic_torch_save
from .sharded_heads import full_state_dict


def _unwrap(model):
    return model.module if is_model_wrapper(model) else model


@HOOKS.register_module()
class RichProgressHook(Hook):
    """Rich progress bars for training (with the loss terms) and evaluation."""

    priority = 'VERY_LOW'

    def __init__(self, show_losses: bool = True):
        self.show_losses = show_losses
        self._progress = None
        self._task = None

    def _start(self, description, total):
        if not is_main_process():
            return
        from rich.console import Console
        from rich.progress import (BarColumn, MofNCompleteColumn, Progress,
                                   TextColumn, TimeElapsedColumn,
                                   TimeRemainingColumn)
        console = Console(stderr=True)
        self._progress = Progress(
            TextColumn('[bold]{task.description}'), BarColumn(),
            MofNCompleteColumn(), TimeElapsedColumn(), TimeRemainingColumn(),
            TextColumn('{task.fields[info]}'), console=console,
            disable=not console.is_terminal)
        self._progress.start()
        self._task = self._progress.add_task(description, total=total,
                                             info='')

    def _stop(self):
        if self._progress is not None:
            self._progress.stop()
            self._progress = None

    def before_train(self, runner):
        self._t0 = time.time()
        self._start(f'train {runner.experiment_name}', runner.max_iters)
        if self._progress is not None:
            self._progress.update(self._task, completed=runner.iter)

    def after_train_iter(self, runner, batch_idx, data_batch=None,
                         outputs=None):
        if self._progress is None:
            return
        info = ''
        if self.show_losses and outputs:
            info = ' '.join(f'{k.replace("loss_", "")}={float(v.detach() if hasattr(v, "detach") else v):.3f}'
                            for k, v in outputs.items() if 'loss' in k)
        self._progress.update(self._task, advance=1, info=info)

    def after_train(self, runner):
        self._stop()
        runner.logger.info(f'training took {time.time() - self._t0:.1f} s')

    def before_test(self, runner):
        self._start('evaluate', len(runner.test_dataloader))

    def after_test_iter(self, runner, batch_idx, data_batch=None,
                        outputs=None):
        if self._progress is not None:
            self._progress.update(self._task, advance=1)

    def after_test(self, runner):
        self._stop()

    def before_val(self, runner):
        self._start('validate', len(runner.val_dataloader))

    def after_val_iter(self, runner, batch_idx, data_batch=None,
                       outputs=None):
        if self._progress is not None:
            self._progress.update(self._task, advance=1)

    def after_val(self, runner):
        self._stop()


@HOOKS.register_module()
class ExportStudentHook(Hook):
    """After training, write the student alone: ``backbone.pth``/``head.pth``.

    ``backbone.pth`` is a plain state dict (insightface layout for IResNet and
    MobileFaceNet) that ``CheckpointTeacher`` and arcface_torch code load;
    no teacher or connector weights; ``head.pth`` holds all class centres
    (PartialFC shards gathered). Files are written atomically.
    """

    priority = 'LOW'

    def after_train(self, runner):
        student = _unwrap(runner.model).student
        # every rank: sharded parameters (PartialFC's centres) are gathered
        # whole to rank 0 (a collective)
        backbone = full_state_dict(student.backbone)
        head = None if student.head is None else full_state_dict(student.head)
        if not is_main_process():
            return
        atomic_torch_save(backbone,
                          os.path.join(runner.work_dir, 'backbone.pth'))
        if head is not None:
            atomic_torch_save(head, os.path.join(runner.work_dir, 'head.pth'))
