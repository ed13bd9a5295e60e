"""The mmengine model that wires student, teachers, taps, connectors, losses."""
from .data_preprocessor import FaceDataPreprocessor
from .face_distiller import FaceDistiller, Student
from .taps import Tap, TapRecorder, parse_tap

__all__ = ['FaceDistiller', 'Student', 'FaceDataPreprocessor', 'Tap',
           'TapRecorder', 'parse_tap']
