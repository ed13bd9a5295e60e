"""Datasets, samplers and transforms for face recognition."""
from .bin_dataset import InsightFaceBinDataset, InsightFaceBinSets
from .image_folder import ImageFolderFaces, ImageFolderVerification
from .pack import write_bin, write_recordio
from .recordio import RecordIODataset
from .samplers import IdentityBalancedSampler
from .synthface import SynthFaceAge
from .transforms import PackFaceInputs, RandomHorizontalFlip

__all__ = ['PackFaceInputs', 'RandomHorizontalFlip', 'InsightFaceBinDataset',
           'InsightFaceBinSets', 'SynthFaceAge', 'IdentityBalancedSampler',
           'RecordIODataset',
           'ImageFolderFaces', 'ImageFolderVerification', 'write_recordio',
           'write_bin']
