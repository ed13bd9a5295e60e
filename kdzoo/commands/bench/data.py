"""``kdzoo bench`` inputs: one in-memory synthetic batch, or SynthFaceAge /
an image folder through a DataLoader."""
import math
from typing import List

import numpy as np
import torch
from mmengine.dataset import BaseDataset, default_collate

from kdzoo.utils import ConfigError
from .config import BenchConfig, LOADER_BATCHES, SYNTH_IMAGES_PER_IDENTITY


# ------------------------------------------------------------ data
class _MemoryFaces(BaseDataset):
    """Images held in memory as a kdzoo training dataset (the synthetic
    batch), so ``TeacherCacheHook`` can embed them like any dataset."""

    def __init__(self, images: np.ndarray, labels: np.ndarray, pipeline):
        self._images, self._labels = images, labels
        super().__init__(ann_file='', pipeline=pipeline,
                         serialize_data=False)

    def load_data_list(self) -> List[dict]:
        return [dict(img=img, label=int(label), age=-1)
                for img, label in zip(self._images, self._labels)]


def _train_pipeline():
    from kdzoo.datasets import PackFaceInputs, RandomHorizontalFlip
    return [RandomHorizontalFlip(prob=0.5), PackFaceInputs()]


def _to_device(batch: dict, device: torch.device,
               non_blocking: bool = False) -> dict:
    samples = {k: v.to(device, non_blocking=non_blocking)
               for k, v in batch['data_samples'].items()}
    return dict(inputs=batch['inputs'].to(device, non_blocking=non_blocking),
                data_samples=samples)


def _synthetic(cfg: BenchConfig, device: torch.device):
    """Dataset of one batch of random images and that batch on the device,
    every second image mirrored (flip flag set, as the pipeline does)."""
    from kdzoo.datasets import PackFaceInputs
    rng = np.random.default_rng(cfg.seed)
    n, size = cfg.batch_size, cfg.image_size
    images = rng.integers(0, 256, (n, size, size, 3), dtype=np.uint8)
    labels = np.arange(n) % cfg.num_classes
    dataset = _MemoryFaces(images, labels, _train_pipeline())
    pack = PackFaceInputs()
    packed = []
    for i in range(n):
        info = dataset.get_data_info(i)
        info['flip'] = bool(i % 2)
        if info['flip']:
            info['img'] = np.ascontiguousarray(info['img'][:, ::-1])
        packed.append(pack(info))
    batch = _to_device(default_collate(packed), device)
    return dataset, batch


def _loader_dataset(cfg: BenchConfig):
    if cfg.data_root:
        from kdzoo.datasets import ImageFolderFaces
        dataset = ImageFolderFaces(cfg.data_root, image_size=cfg.image_size,
                                   pipeline=_train_pipeline())
        classes = dataset.metainfo['num_classes']
        if classes > cfg.num_classes:
            raise ConfigError(f'--data-root {cfg.data_root} has {classes} '
                              f'identities, more than --num-classes '
                              f'{cfg.num_classes}; set --num-classes '
                              f'{classes}')
    else:
        from kdzoo.datasets import SynthFaceAge
        count = cfg.batch_size * LOADER_BATCHES
        per_id = max(SYNTH_IMAGES_PER_IDENTITY,
                     math.ceil(count / cfg.num_classes))
        dataset = SynthFaceAge(split='train',
                               num_identities=math.ceil(count / per_id),
                               images_per_identity=per_id,
                               image_size=cfg.image_size, seed=cfg.seed,
                               pipeline=_train_pipeline())
    if len(dataset) < cfg.batch_size:
        raise ConfigError(f'--data-root {cfg.data_root} has {len(dataset)} '
                          f'images, fewer than one batch; lower --batch-size '
                          f'to at most {len(dataset)}')
    return dataset


def _endless(loader):
    while True:
        yield from loader
