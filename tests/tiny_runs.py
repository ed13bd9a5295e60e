"""Helpers for end-to-end tests that train SynthFaceAge recipes in seconds
on CPU (imported as ``from tiny_runs import ...``, like conftest)."""
import torch

from kdzoo.registry import BACKBONES

# = recipes/_base_/models/synthface_cpu_models.py
STUDENT_BACKBONE = dict(type='MobileFaceNet', width_mult=0.125,
                        blocks=(1, 1, 1, 1), embedding_size=64,
                        input_size=(32, 32))
TEACHER_BACKBONE = dict(type='IResNet', width_mult=0.25, layers=(1, 2, 2, 1),
                        embedding_size=128, input_size=(32, 32))


def tiny_options(cache_dir, epochs=1, test=True, **extra):
    """cfg_options shrinking a SynthFaceAge recipe to seconds on CPU (120
    training images, batch 32: 4 iterations per epoch); ``test=False``
    drops the test loop."""
    options = {
        'train_dataloader.dataset.num_identities': 20,
        'train_dataloader.dataset.images_per_identity': 6,
        'train_dataloader.dataset.cache_dir': cache_dir,
        'train_dataloader.batch_size': 32,
        'model.student.head.num_classes': 20,
        'train_cfg.max_epochs': epochs,
    }
    if test:
        options.update({
            # 20 identities: the minimum for 10 verification folds
            'test_dataloader.dataset.num_identities': 20,
            'test_dataloader.dataset.images_per_identity': 4,
            'test_dataloader.dataset.num_distractors': 20,
            'test_dataloader.dataset.cache_dir': cache_dir})
    else:
        options.update(test_dataloader=None, test_cfg=None,
                       test_evaluator=None)
    options.update(extra)
    return options


def as_cli(options):
    """A cfg_options dict as ``--cfg-options`` arguments."""
    return [f'{k}={v!r}' if isinstance(v, str) else f'{k}={v}'
            for k, v in options.items()]


def random_teacher(path, seed=1):
    """A seeded random teacher ``backbone.pth`` at ``path``."""
    torch.manual_seed(seed)
    torch.save(BACKBONES.build(TEACHER_BACKBONE).state_dict(), path)
    return str(path)
