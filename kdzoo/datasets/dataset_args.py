"""Pieces shared by the file-backed face datasets (their argument checks
live in ``kdzoo.utils.checks``)."""
from typing import Optional

from kdzoo.registry import TRANSFORMS


def build_pipeline(pipeline: Optional[list]) -> list:
    """Transforms from configs (default ``[PackFaceInputs]``), built with
    kdzoo's registry so no mmengine default scope is needed."""
    if pipeline is None:
        pipeline = [dict(type='PackFaceInputs')]
    return [TRANSFORMS.build(t) if isinstance(t, dict) else t
            for t in pipeline]


class LazyMetainfoMixin:
    """For datasets whose metainfo (classes, protocols) is known only once
    the data is read: reading ``metainfo`` reads the data first (mmengine's
    ``lazy_init`` otherwise leaves it incomplete)."""

    @property
    def metainfo(self) -> dict:
        if not self._fully_initialized:
            self.full_init()
        return super().metainfo
