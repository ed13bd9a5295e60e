"""Frozen teacher adapters, the teacher-output cache and the provider that
serves a distiller its teachers' outputs (online or cached)."""
from .adapters import (ArcFaceTorchTeacher, CheckpointTeacher, OnnxTeacher,
                       TFaceTeacher, TimmTeacher)
from .base import FrozenTeacher
from .cache import TeacherOutputCache
from .provider import TeacherOutputs

__all__ = ['FrozenTeacher', 'CheckpointTeacher', 'OnnxTeacher',
           'ArcFaceTorchTeacher', 'TFaceTeacher', 'TimmTeacher',
           'TeacherOutputCache', 'TeacherOutputs']
