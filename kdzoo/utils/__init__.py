"""Small shared helpers: error types and atomic file writes."""
from .errors import (CheckpointError, ConfigError, DataError, KdzooError,
                     closest, did_you_mean, json_option)
from .checkpoint import (extract_state_dict, load_into, load_module_weights,
                         load_weights_file)
from .fileio import (atomic_torch_save, atomic_write_bytes, atomic_write_json,
                     atomic_write_text)

__all__ = [
    'KdzooError', 'ConfigError', 'DataError', 'CheckpointError', 'closest',
    'did_you_mean', 'json_option', 'atomic_write_bytes', 'atomic_write_text',
    'atomic_write_json', 'atomic_torch_save', 'load_weights_file',
    'extract_state_dict', 'load_into', 'load_module_weights'
]
