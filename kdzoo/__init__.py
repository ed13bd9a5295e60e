"""kdzoo: composable knowledge distillation for face recognition."""
from .version import __version__
from . import registry  # noqa: F401  (registries first)
from . import utils  # noqa: F401
from . import (backbones, connectors, datasets, distillers, engine,  # noqa
               evaluation, heads, losses, teachers)

__all__ = ['__version__']
