"""``kdzoo bench`` settings: the five settings, presets and the checked
configuration of a session."""
import os
from dataclasses import dataclass
from typing import Optional, Sequence, Tuple

import torch

from kdzoo.registry import BACKBONES
from kdzoo.utils import ConfigError, check_int, check_size, did_you_mean
from kdzoo.engine.validate import check_registered_config


SETTINGS = ('student_alone', 'one_teacher_online', 'two_teachers_online',
            'two_teachers_cached', 'plain_pytorch')
TEACHERS_USED = {'student_alone': 0, 'one_teacher_online': 1,
                 'two_teachers_online': 2, 'two_teachers_cached': 2,
                 'plain_pytorch': 0}
DATA_MODES = ('synthetic', 'loader')
PRECISIONS = {'fp32': None, 'bf16': 'bfloat16', 'fp16': 'float16'}

# the student's margin head (CosFace paper defaults, insightface's s)
COSFACE_S, COSFACE_M = 64.0, 0.35
# recipes/_base_/schedules/sgd_cpu.py
OPTIMIZER = dict(type='SGD', lr=0.1, momentum=0.9, weight_decay=5e-4)
CLIP_GRAD_MAX_NORM = 5.0
# loader mode on SynthFaceAge: this many batches of distinct images
LOADER_BATCHES = 8
SYNTH_IMAGES_PER_IDENTITY = 10

PRESETS = {
    # arcface_torch's mbf student, r50 and r100 teachers, 112 px
    'default': dict(
        student=dict(type='MobileFaceNet', embedding_size=512),
        teachers=(dict(type='IResNet', depth=50, embedding_size=512),
                  dict(type='IResNet', depth=100, embedding_size=512)),
        image_size=112),
    # a CPU run of about a minute
    'cpu-small': dict(
        student=dict(type='MobileFaceNet', width_mult=0.5,
                     embedding_size=128),
        teachers=(dict(type='IResNet', depth=18, width_mult=0.25,
                       embedding_size=128),
                  dict(type='IResNet', depth=34, width_mult=0.25,
                       embedding_size=128)),
        image_size=64),
}

# (setting, reference, minimum speed ratio): the speed targets kdzoo holds
# itself to on a GPU (reported, not asserted)
TARGETS = (('student_alone', 'plain_pytorch', 0.95),
           ('two_teachers_cached', 'student_alone', 0.90))


# ------------------------------------------------------------ config
@dataclass
class BenchConfig:
    """Everything a benchmark run depends on (validated by make_config)."""
    device: str
    precision: str
    batch_size: int
    steps: int
    warmup: int
    image_size: int
    student: dict
    teachers: Tuple[dict, dict]
    preset: str
    settings: Tuple[str, ...]
    data: Tuple[str, ...]
    num_workers: int
    num_classes: int
    channels_last: bool
    compile: bool
    data_root: Optional[str]
    seed: int


def _names(option: str, value, allowed: Sequence[str],
           aliases: Optional[dict] = None) -> Tuple[str, ...]:
    """A comma list (or sequence) of names from ``allowed``, in that order."""
    items = value.split(',') if isinstance(value, str) else list(value)
    chosen = set()
    for item in (i.strip() for i in items):
        if aliases and item in aliases:
            chosen.update(aliases[item])
        elif item in allowed:
            chosen.add(item)
        else:
            choices = list(allowed) + list(aliases or ())
            raise ConfigError(f'{option}: unknown name {item!r}; choose from '
                              f'{", ".join(choices)}' +
                              did_you_mean(item, choices))
    if not chosen:
        raise ConfigError(f'{option} is empty; choose from '
                          f'{", ".join(allowed)}')
    return tuple(a for a in allowed if a in chosen)


def _backbone_cfg(option: str, cfg, image_size: int) -> dict:
    if not isinstance(cfg, dict) or not isinstance(cfg.get('type'), str):
        raise ConfigError(f'{option} must be a backbone config with a '
                          f'"type", e.g. {{"type": "IResNet", "depth": 50}}'
                          f', got {cfg!r}')
    check_registered_config(cfg, BACKBONES, option)
    cfg = dict(cfg)
    size = check_size(f'{option} input_size',
                      cfg.setdefault('input_size', image_size),
                      name='image_size')
    cfg['input_size'] = size
    if size != (image_size, image_size) and option == '--student':
        raise ConfigError(f'--student input_size {tuple(size)} differs from '
                          f'--image-size {image_size}; drop input_size from '
                          '--student')
    return cfg


def make_config(device: Optional[str] = None,
                precision: Optional[str] = None,
                batch_size: Optional[int] = None,
                steps: Optional[int] = None, warmup: Optional[int] = None,
                image_size: Optional[int] = None,
                student: Optional[dict] = None,
                teachers: Optional[Sequence[dict]] = None,
                preset: str = 'default', settings=SETTINGS,
                data='synthetic', num_workers: Optional[int] = None,
                num_classes: int = 1000, channels_last: bool = False,
                compile: bool = False, data_root: Optional[str] = None,
                seed: int = 0) -> BenchConfig:
    """Validate the options and fill the defaults (explicit value, else the
    preset's, else the device's). Raises ``ConfigError`` naming the option."""
    if preset not in PRESETS:
        raise ConfigError(f'--preset: unknown preset {preset!r}; choose from '
                          f'{", ".join(PRESETS)}' +
                          did_you_mean(str(preset), PRESETS))
    defaults = PRESETS[preset]
    if device is None:
        device = 'cuda' if torch.cuda.is_available() else 'cpu'
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError):
        dev = None
    if dev is None or dev.type not in ('cpu', 'cuda'):
        raise ConfigError(f"--device must be 'cpu', 'cuda' or 'cuda:N', got "
                          f'{device!r}')
    if dev.type == 'cuda':
        if not torch.cuda.is_available():
            raise ConfigError(f'--device {device}: no CUDA device is '
                              'available here; use --device cpu')
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise ConfigError(f'--device {device}: only '
                              f'{torch.cuda.device_count()} CUDA device(s)')
    gpu = dev.type == 'cuda'
    if precision is None:
        precision = ('bf16' if torch.cuda.is_bf16_supported() else 'fp16') \
            if gpu else 'fp32'
    if precision not in PRECISIONS:
        raise ConfigError(f'--precision must be one of '
                          f'{", ".join(PRECISIONS)}, got {precision!r}' +
                          did_you_mean(str(precision), PRECISIONS))
    if precision != 'fp32' and not gpu:
        raise ConfigError(f'--precision {precision} needs a GPU: kdzoo\'s '
                          'mixed precision (mmengine AmpOptimWrapper) trains '
                          'on CUDA only; use --precision fp32 on CPU')
    if precision == 'bf16' and not torch.cuda.is_bf16_supported():
        raise ConfigError('--precision bf16: this GPU does not support '
                          'bfloat16; use --precision fp16')
    if batch_size is None:
        batch_size = 256 if gpu else 32
    check_int(None, '--batch-size', batch_size, 2)  # BatchNorm needs 2
    steps = check_int(None, '--steps', (50 if gpu else 10) if steps is None
                      else steps, 1)
    warmup = check_int(None, '--warmup', (10 if gpu else 2) if warmup is None
                       else warmup, 0)
    image_size = defaults['image_size'] if image_size is None else image_size
    check_int(None, '--image-size', image_size, 16)
    if image_size % 16:
        lower = 16 * (image_size // 16)
        raise ConfigError(f'--image-size must be a multiple of 16 (the '
                          f'backbones\' total stride), got {image_size}; '
                          f'e.g. {lower} or {lower + 16}')
    student = _backbone_cfg('--student', student or defaults['student'],
                            image_size)
    if teachers is None:
        teachers = defaults['teachers']
    if isinstance(teachers, dict) or len(teachers) != 2:
        count = 1 if isinstance(teachers, dict) else len(teachers)
        raise ConfigError(f'--teacher must be given twice (the first and '
                          f'the second teacher), got {count}')
    teachers = tuple(_backbone_cfg(f'--teacher #{i + 1}', t, image_size)
                     for i, t in enumerate(teachers))
    settings = _names('--settings', settings, SETTINGS)
    data = _names('--data', data, DATA_MODES, aliases={'both': DATA_MODES})
    if num_workers is None:
        num_workers = min(4, os.cpu_count() or 1)
    check_int(None, '--num-workers', num_workers, 0)
    check_int(None, '--num-classes', num_classes, 1)
    check_int(None, '--seed', seed, 0)
    if data_root is not None:
        if 'loader' not in data:
            raise ConfigError('--data-root is read only in loader mode; add '
                              '--data loader (or both)')
        if not os.path.isdir(data_root):
            raise ConfigError(f'--data-root {data_root}: not a folder (give '
                              'a folder of identity folders of images)')
    return BenchConfig(
        device=str(dev), precision=precision, batch_size=batch_size,
        steps=steps, warmup=warmup, image_size=image_size, student=student,
        teachers=teachers, preset=preset, settings=settings, data=data,
        num_workers=num_workers, num_classes=num_classes,
        channels_last=bool(channels_last), compile=bool(compile),
        data_root=data_root, seed=seed)
