"""What a result was measured with: software versions and the machine."""
import platform

import torch

__all__ = ['software_versions', 'cpu_description']


def software_versions() -> dict:
    """torch, mmengine, kdzoo, Python and CUDA (None on CPU builds)."""
    import mmengine

    from kdzoo.version import __version__
    return dict(torch=torch.__version__, mmengine=mmengine.__version__,
                kdzoo=__version__, python=platform.python_version(),
                cuda=torch.version.cuda)


def cpu_description() -> str:
    """The processor (or architecture) name."""
    return platform.processor() or platform.machine()
