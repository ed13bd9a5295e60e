"""kdzoo's registries: mmengine child registries with scope ``kdzoo``.

``MODELS`` is a child of mmengine's root ``MODELS``. ``BACKBONES``, ``HEADS``,
``TEACHERS``, ``LOSSES`` and ``CONNECTORS`` are children of ``MODELS`` that
keep their own listing (for ``kdzoo list``) and also register every class into
``MODELS``, so ``MODELS.build(dict(type='IResNet'))`` and
``LOSSES.build(dict(type='KDLoss'))`` both work. Register a plugin from your
own module with ``@LOSSES.register_module()`` and load it in a recipe with
``custom_imports = dict(imports=['my_module'])``.
"""
from mmengine.registry import DATA_SAMPLERS as MMENGINE_DATA_SAMPLERS
from mmengine.registry import DATASETS as MMENGINE_DATASETS
from mmengine.registry import HOOKS as MMENGINE_HOOKS
from mmengine.registry import LOOPS as MMENGINE_LOOPS
from mmengine.registry import METRICS as MMENGINE_METRICS
from mmengine.registry import MODELS as MMENGINE_MODELS
from mmengine.registry import \
    OPTIM_WRAPPER_CONSTRUCTORS as MMENGINE_OPTIM_WRAPPER_CONSTRUCTORS
from mmengine.registry import TRANSFORMS as MMENGINE_TRANSFORMS
from mmengine.registry import Registry


class CategoryRegistry(Registry):
    """A child of ``MODELS`` listing one kind of model component.

    Registering into it also registers into the parent ``MODELS`` under the
    same name, so configs built by the runner (scope ``kdzoo``) find it.
    """

    def _register_module(self, module, module_name=None, force=False):
        super()._register_module(module, module_name, force)
        self.parent._register_module(module, module_name, force)


MODELS = Registry('model', parent=MMENGINE_MODELS, scope='kdzoo',
                  locations=['kdzoo'])
BACKBONES = CategoryRegistry('backbone', parent=MODELS,
                             scope='kdzoo_backbones',
                             locations=['kdzoo.backbones'])
HEADS = CategoryRegistry('head', parent=MODELS, scope='kdzoo_heads',
                         locations=['kdzoo.heads'])
TEACHERS = CategoryRegistry('teacher', parent=MODELS, scope='kdzoo_teachers',
                            locations=['kdzoo.teachers'])
LOSSES = CategoryRegistry('loss', parent=MODELS, scope='kdzoo_losses',
                          locations=['kdzoo.losses'])
CONNECTORS = CategoryRegistry('connector', parent=MODELS,
                              scope='kdzoo_connectors',
                              locations=['kdzoo.connectors'])

DATASETS = Registry('dataset', parent=MMENGINE_DATASETS, scope='kdzoo',
                    locations=['kdzoo.datasets'])
DATA_SAMPLERS = Registry('data sampler', parent=MMENGINE_DATA_SAMPLERS,
                         scope='kdzoo', locations=['kdzoo.datasets'])
TRANSFORMS = Registry('transform', parent=MMENGINE_TRANSFORMS, scope='kdzoo',
                      locations=['kdzoo.datasets'])
METRICS = Registry('metric', parent=MMENGINE_METRICS, scope='kdzoo',
                   locations=['kdzoo.evaluation'])
HOOKS = Registry('hook', parent=MMENGINE_HOOKS, scope='kdzoo',
                 locations=['kdzoo.engine'])
LOOPS = Registry('loop', parent=MMENGINE_LOOPS, scope='kdzoo',
                 locations=['kdzoo.engine'])
OPTIM_WRAPPER_CONSTRUCTORS = Registry(
    'optimizer wrapper constructor',
    parent=MMENGINE_OPTIM_WRAPPER_CONSTRUCTORS, scope='kdzoo',
    locations=['kdzoo.engine'])

# Children for the remaining mmengine registries, so every lookup the runner
# makes in scope ``kdzoo`` finds a kdzoo registry (and falls back to
# mmengine's own entries through the parent).
import mmengine.registry as _mm_registry  # noqa: E402

_PASSTHROUGH = {}
for _name in ('RUNNERS', 'RUNNER_CONSTRUCTORS', 'STRATEGIES',
              'MODEL_WRAPPERS', 'WEIGHT_INITIALIZERS', 'OPTIMIZERS',
              'OPTIM_WRAPPERS', 'PARAM_SCHEDULERS', 'EVALUATOR', 'TASK_UTILS',
              'VISUALIZERS', 'VISBACKENDS', 'LOG_PROCESSORS', 'INFERENCERS',
              'FUNCTIONS'):
    _parent = getattr(_mm_registry, _name)
    _PASSTHROUGH[_name] = Registry(_parent.name, parent=_parent,
                                   scope='kdzoo')
OPTIMIZERS = _PASSTHROUGH['OPTIMIZERS']
PARAM_SCHEDULERS = _PASSTHROUGH['PARAM_SCHEDULERS']
OPTIM_WRAPPERS = _PASSTHROUGH['OPTIM_WRAPPERS']

# What ``kdzoo list`` shows, by the plural name a user types.
LISTABLE = {
    'backbones': BACKBONES,
    'heads': HEADS,
    'teachers': TEACHERS,
    'losses': LOSSES,
    'connectors': CONNECTORS,
    'datasets': DATASETS,
    'samplers': DATA_SAMPLERS,
    'transforms': TRANSFORMS,
    'metrics': METRICS,
    'hooks': HOOKS,
}

__all__ = [
    'MODELS', 'BACKBONES', 'HEADS', 'TEACHERS', 'LOSSES', 'CONNECTORS',
    'DATASETS', 'DATA_SAMPLERS', 'TRANSFORMS', 'METRICS', 'HOOKS', 'LOOPS',
    'OPTIM_WRAPPER_CONSTRUCTORS', 'OPTIM_WRAPPERS', 'OPTIMIZERS',
    'PARAM_SCHEDULERS',
    'LISTABLE', 'CategoryRegistry'
]
