"""Frozen teacher adapters."""
from .adapters import CheckpointTeacher, OnnxTeacher
from .base import FrozenTeacher
from .cache import TeacherOutputCache

__all__ = ['FrozenTeacher', 'CheckpointTeacher', 'OnnxTeacher',
           'TeacherOutputCache']
