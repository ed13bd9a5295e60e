"""Datasets, samplers and transforms for face recognition."""
from .transforms import PackFaceInputs, RandomHorizontalFlip

__all__ = ['PackFaceInputs', 'RandomHorizontalFlip']
