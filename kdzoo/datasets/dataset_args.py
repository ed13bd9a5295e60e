"""Argument helpers shared by the file-backed face datasets."""
from typing import Optional, Sequence, Tuple, Union

import numpy as np

from kdzoo.registry import TRANSFORMS
from kdzoo.utils.errors import ConfigError


def parse_image_size(value: Union[int, Sequence[int], None],
                     owner: str) -> Optional[Tuple[int, int]]:
    """``None`` | int | (h, w) -> ``None`` or (h, w); ``ConfigError``
    naming ``owner`` otherwise."""
    if value is None:
        return None
    try:
        size = (int(value), ) * 2 if np.isscalar(value) else \
            tuple(int(s) for s in value)
    except (TypeError, ValueError):
        size = ()
    if len(size) != 2 or min(size) < 1:
        raise ConfigError(f'{owner}: image_size must be an int or (h, w), '
                          f'got {value!r}')
    return size


def build_pipeline(pipeline: Optional[list]) -> list:
    """Transforms from configs (default ``[PackFaceInputs]``), built with
    kdzoo's registry so no mmengine default scope is needed."""
    if pipeline is None:
        pipeline = [dict(type='PackFaceInputs')]
    return [TRANSFORMS.build(t) if isinstance(t, dict) else t
            for t in pipeline]
