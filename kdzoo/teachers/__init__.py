"""Frozen teacher adapters."""
from .adapters import CheckpointTeacher, OnnxTeacher
from .base import FrozenTeacher

__all__ = ['FrozenTeacher', 'CheckpointTeacher', 'OnnxTeacher']
