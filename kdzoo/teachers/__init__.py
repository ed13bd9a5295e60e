"""Frozen teacher adapters."""
from .adapters import (ArcFaceTorchTeacher, CheckpointTeacher, OnnxTeacher,
                       TFaceTeacher, TimmTeacher)
from .base import FrozenTeacher
from .cache import TeacherOutputCache

__all__ = ['FrozenTeacher', 'CheckpointTeacher', 'OnnxTeacher',
           'ArcFaceTorchTeacher', 'TFaceTeacher', 'TimmTeacher',
           'TeacherOutputCache']
