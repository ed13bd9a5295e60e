"""Datasets, samplers and transforms for face recognition."""
from .bin_dataset import InsightFaceBinDataset
from .samplers import IdentityBalancedSampler
from .synthface import SynthFaceAge
from .transforms import PackFaceInputs, RandomHorizontalFlip

__all__ = ['PackFaceInputs', 'RandomHorizontalFlip', 'InsightFaceBinDataset',
           'SynthFaceAge', 'IdentityBalancedSampler']
