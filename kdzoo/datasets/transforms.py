"""Data transforms for face datasets (mmcv-style: each maps a results dict).

Face training uses horizontal flip as its only augmentation; images reach the
model as uint8 RGB and are normalised by the model's data preprocessor.
"""
import numpy as np
import torch
from mmcv.transforms import BaseTransform

from kdzoo.registry import TRANSFORMS


@TRANSFORMS.register_module()
class RandomHorizontalFlip(BaseTransform):
    """Flip ``results['img']`` (H×W×C) left-right with probability ``prob``."""

    def __init__(self, prob: float = 0.5):
        if not 0.0 <= prob <= 1.0:
            raise ValueError(f'RandomHorizontalFlip: prob must be in [0, 1], '
                             f'got {prob}')
        self.prob = prob

    def transform(self, results: dict) -> dict:
        if np.random.rand() < self.prob:
            results['img'] = np.ascontiguousarray(results['img'][:, ::-1])
            results['flip'] = True
        else:
            results['flip'] = False
        return results

    def __repr__(self):
        return f'{self.__class__.__name__}(prob={self.prob})'


@TRANSFORMS.register_module()
class PackFaceInputs(BaseTransform):
    """Pack a face sample as ``dict(inputs, data_samples)``.

    ``inputs`` is a uint8 tensor 3×H×W (RGB); ``data_samples`` is a dict of
    ints: ``index`` (dataset index), ``label`` (identity, -1 if unknown),
    ``age`` (years, -1 if unknown) and ``flip`` (1 if mirrored; a cached
    teacher reads its embedding by index and flip). With mmengine's
    ``default_collate`` a batch becomes ``inputs`` B×3×H×W and ``data_samples`` a dict of B-tensors.
    """

    def transform(self, results: dict) -> dict:
        img = results['img']
        if img.ndim == 2:
            img = np.repeat(img[:, :, None], 3, axis=2)
        if img.dtype != np.uint8:
            raise ValueError(f'PackFaceInputs expects uint8 images, got '
                             f'{img.dtype} (sample {results.get("sample_idx")})')
        inputs = torch.from_numpy(np.ascontiguousarray(img.transpose(2, 0, 1)))
        data_samples = dict(
            index=int(results.get('sample_idx', -1)),
            label=int(results.get('label', -1)),
            age=int(results.get('age', -1)),
            flip=int(bool(results.get('flip', False))),
        )
        return dict(inputs=inputs, data_samples=data_samples)
