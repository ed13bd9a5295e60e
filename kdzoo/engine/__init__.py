"""Runner glue, hooks, checkpoint policy and optimizer construction."""
from .checkpoint import (AtomicLocalBackend, RUNNER_CHECKPOINT_ALLOWLIST,
                         find_resume_checkpoint, runner_checkpoint_policy)
from .exact_resume import ResumableEpochBasedTrainLoop, RngStateHook
from .hooks import ExportStudentHook, RichProgressHook
from .numerics import (GuardedAmpOptimWrapper, GuardedOptimWrapper,
                       NonFiniteLossCheckMixin, NonFiniteLossError)
from .sharded_heads import ShardedHeadCheckpointHook
from .optimizer import TrainableOptimWrapperConstructor
from .teacher_cache_hook import TeacherCacheHook
from .runner import (KdzooRunner, config_hash, load_recipe, test_recipe,
                     train_recipe)
from .validate import validate_config

__all__ = [
    'AtomicLocalBackend', 'RUNNER_CHECKPOINT_ALLOWLIST',
    'find_resume_checkpoint', 'runner_checkpoint_policy', 'RichProgressHook',
    'ExportStudentHook', 'TeacherCacheHook', 'RngStateHook',
    'ResumableEpochBasedTrainLoop', 'ShardedHeadCheckpointHook',
    'TrainableOptimWrapperConstructor', 'KdzooRunner',
    'config_hash', 'load_recipe', 'train_recipe', 'test_recipe',
    'validate_config', 'GuardedOptimWrapper', 'GuardedAmpOptimWrapper',
    'NonFiniteLossCheckMixin', 'NonFiniteLossError'
]
