"""What a result was measured with: software versions and the machine."""
import platform
from typing import Optional

import torch

__all__ = ['software_versions', 'cpu_description', 'cpu_capability']


def software_versions() -> dict:
    """torch, mmengine, kdzoo, Python and CUDA (None on CPU builds)."""
    import mmengine

    from kdzoo.version import __version__
    return dict(torch=torch.__version__, mmengine=mmengine.__version__,
                kdzoo=__version__, python=platform.python_version(),
                cuda=torch.version.cuda)


def _cpuinfo_model_name(path: str = '/proc/cpuinfo') -> Optional[str]:
    """The first ``model name`` in ``path`` (Linux), or None."""
    try:
        with open(path, encoding='utf-8', errors='replace') as f:
            for line in f:
                key, sep, value = line.partition(':')
                if sep and key.strip() == 'model name' and value.strip():
                    return ' '.join(value.split())
    except OSError:
        pass
    return None


def cpu_description() -> str:
    """The CPU model name (``/proc/cpuinfo`` on Linux, e.g. ``AMD EPYC
    7B13``), else the processor or architecture name."""
    return (_cpuinfo_model_name() or platform.processor()
            or platform.machine())


def cpu_capability() -> Optional[str]:
    """The SIMD level torch's CPU kernels dispatch to (``AVX2``,
    ``AVX512``, ...; ``ATEN_CPU_CAPABILITY`` can lower it), or None where
    torch cannot tell."""
    try:
        return torch.backends.cpu.get_cpu_capability()
    except (AttributeError, RuntimeError):
        return None
