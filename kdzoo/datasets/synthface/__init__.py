"""SynthFaceAge: kdzoo's embedded procedural face data (see ``dataset``)."""
from .dataset import SYNTHFACE_VERSION, SynthFaceAge, default_cache_dir
from .generate import generate_split, render_faces, split_layout
from .identities import (NUISANCE_KEYS, identity_uids, resolve,
                         sample_identities)
from .protocols import build_protocols
from .render import RENDER_VERSION

__all__ = [
    'SynthFaceAge', 'SYNTHFACE_VERSION', 'RENDER_VERSION', 'NUISANCE_KEYS',
    'default_cache_dir', 'render_faces', 'generate_split', 'split_layout',
    'identity_uids', 'sample_identities', 'resolve',
    'build_protocols'
]
