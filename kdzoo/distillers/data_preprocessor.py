"""Batch preparation: uint8 RGB -> normalised float on the model's device."""
from typing import Sequence, Union

import torch
from mmengine.model import BaseDataPreprocessor

from kdzoo.registry import MODELS


@MODELS.register_module()
class FaceDataPreprocessor(BaseDataPreprocessor):
    """Normalise face batches as insightface does: ``(pixel - 127.5) / 128``.

    Takes ``dict(inputs=uint8 B×3×H×W, data_samples=dict of B-tensors)``
    from ``default_collate``, moves it to the device, converts to float and
    normalises. ``channels_last=True`` returns channels-last memory format
    (faster convolutions on GPUs).
    """

    def __init__(self, mean: Union[float, Sequence[float]] = 127.5,
                 std: Union[float, Sequence[float]] = 128.0,
                 channels_last: bool = False):
        super().__init__()
        self.mean_value = mean
        self.std_value = std
        self.register_buffer(
            'mean', torch.as_tensor(mean, dtype=torch.float32).view(-1, 1, 1)
            .expand(3, 1, 1).clone(), persistent=False)
        self.register_buffer(
            'std', torch.as_tensor(std, dtype=torch.float32).view(-1, 1, 1)
            .expand(3, 1, 1).clone(), persistent=False)
        self.channels_last = channels_last

    def forward(self, data: dict, training: bool = False) -> dict:
        data = self.cast_data(data)
        inputs = data['inputs']
        if isinstance(inputs, (list, tuple)):
            inputs = torch.stack(list(inputs))
        inputs = (inputs.float() - self.mean) / self.std
        if self.channels_last:
            inputs = inputs.contiguous(memory_format=torch.channels_last)
        return dict(inputs=inputs, data_samples=data.get('data_samples'))
