"""Small shared helpers: error types, argument checks, atomic file writes."""
from .errors import (CheckpointError, ConfigError, DataError, KdzooError,
                     closest, did_you_mean, json_option)
from .checks import (check_class_labels, check_int, check_number,
                     check_size, is_finite_number, is_int, no_autocast)
from .checkpoint import (extract_state_dict, load_into, load_module_weights,
                         load_weights_file)
from .fileio import (atomic_torch_save, atomic_write_bytes, atomic_write_json,
                     atomic_write_text)

__all__ = [
    'KdzooError', 'ConfigError', 'DataError', 'CheckpointError', 'closest',
    'did_you_mean', 'json_option', 'atomic_write_bytes', 'atomic_write_text',
    'atomic_write_json', 'atomic_torch_save', 'load_weights_file',
    'extract_state_dict', 'load_into', 'load_module_weights',
    'check_number', 'check_int', 'check_size', 'check_class_labels',
    'is_finite_number', 'is_int', 'no_autocast'
]
