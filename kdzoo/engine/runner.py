"""Runner glue: build an mmengine runner from a recipe, train, test, record."""
import contextlib
import copy
import datetime
import functools
import hashlib
import json
import logging
import os
import re
import time
from typing import Optional

import numpy as np
import torch
from mmengine.config import Config
from mmengine.dist import all_reduce, broadcast, is_main_process
from mmengine.model import is_model_wrapper
from mmengine.registry import MODEL_WRAPPERS
from mmengine.runner import EpochBasedTrainLoop, Runner

from kdzoo.utils import (ConfigError, KdzooError, atomic_write_json,
                         load_module_weights)
from kdzoo.utils.fileio import atomic_write_bytes
from kdzoo.utils.allocator import malloc_tuning
from kdzoo.utils.environment import (cpu_capability, cpu_description,
                                     software_versions)
from .checkpoint import (find_resume_checkpoint, load_runner_checkpoint,
                         runner_checkpoint_policy, trained_before)
from .visualization import default_visualizer, log_test_metrics
from .exact_resume import ResumableEpochBasedTrainLoop, RngStateHook
from .sharded_heads import (ShardedHeadCheckpointHook, gather_sharded_state,
                            sharded_params)
from .teacher_cache_hook import TeacherCacheHook
from .validate import validate_config


# mmengine 0.10.7 deprecation notices that users can do nothing about.
_BENIGN = ('"FileClient" will be deprecated',
           '"HardDiskBackend" is the alias of "LocalBackend"')


class _DropBenign(logging.Filter):
    def filter(self, record):
        return not any(b in record.getMessage() for b in _BENIGN)


def _names_key(key: str):
    """A runner build step whose mmengine error (e.g. ``ValueError: end
    should be larger than begin``) becomes a one-line ``ConfigError``
    naming the recipe key; kdzoo's own errors pass through."""
    def wrap(method):
        @functools.wraps(method)
        def build(self, *args, **kwargs):
            try:
                return method(self, *args, **kwargs)
            except KdzooError:
                raise
            except (ValueError, TypeError, KeyError, AssertionError) as e:
                raise ConfigError(
                    f'{key}: cannot be built: {type(e).__name__}: '
                    f'{str(e).strip().rstrip(".") or repr(e)}. Fix {key} in the recipe '
                    'or with --cfg-options (kdzoo -v ... shows the '
                    'traceback)') from e
        return build
    return wrap


class KdzooRunner(Runner):
    """mmengine ``Runner`` with kdzoo's checkpoint policy and quiet console.

    - checkpoints load with ``weights_only=True`` and the allow-list of
      ``kdzoo.engine.checkpoint`` (works on torch >= 2.6);
    - under DDP, PartialFC's class-centre shards (and their optimizer
      state) are gathered into whole matrices in checkpoints and sliced
      back on load (``kdzoo.engine.sharded_heads``);
    - checkpoints carry the RNG states and an epoch-based run resumes
      exactly, even mid-epoch (``kdzoo.engine.exact_resume``);
    - the console shows warnings only (rich progress bars show progress);
      the work dir's log file keeps the full INFO log.
    """

    console_level = logging.WARNING

    def build_logger(self, log_level='INFO', log_file=None, **kwargs):
        logger = super().build_logger(log_level=log_level, log_file=log_file,
                                      **kwargs)
        for handler in logger.handlers:
            if type(handler) is logging.StreamHandler:
                handler.setLevel(max(handler.level, self.console_level))
                handler.addFilter(_DropBenign())
        return logger

    def register_hooks(self, default_hooks=None, custom_hooks=None):
        super().register_hooks(default_hooks, custom_hooks)
        for hook_type in (RngStateHook, ShardedHeadCheckpointHook):
            if not any(isinstance(h, hook_type) for h in self.hooks):
                self.register_hook(hook_type())

    def setup_env(self, env_cfg):
        # mmengine's pytorch launcher calls torch.cuda.set_device(LOCAL_RANK),
        # which fails on a machine without a GPU: start CPU processes here
        if (self.distributed and self.launcher == 'pytorch'
                and not torch.cuda.is_available()
                and not torch.distributed.is_initialized()):
            init_cpu_process_group(env_cfg.get('dist_cfg') or {})
        super().setup_env(env_cfg)

    def wrap_model(self, model_wrapper_cfg, model):
        # mmengine hands DDP device_ids=[LOCAL_RANK], which DDP rejects for
        # a CPU module; a CPU module is wrapped with device_ids=None
        if not self.distributed or torch.cuda.is_available() or \
                is_model_wrapper(model):
            return super().wrap_model(model_wrapper_cfg, model)
        if self.cfg.get('sync_bn'):
            raise ConfigError('sync_bn: SyncBatchNorm runs on GPUs only; '
                              'remove sync_bn to train on CPU processes')
        cfg = dict(model_wrapper_cfg or dict(
            broadcast_buffers=False,
            find_unused_parameters=self.cfg.get('find_unused_parameters',
                                                False)))
        cfg.setdefault('type', 'MMDistributedDataParallel')
        return MODEL_WRAPPERS.build(cfg, default_args=dict(module=model))

    @_names_key('train_cfg / train_dataloader')
    def build_train_loop(self, loop):
        # exact mid-epoch resume; otherwise the same as mmengine's loop
        if isinstance(loop, dict) and loop.get('type') in (
                'EpochBasedTrainLoop', EpochBasedTrainLoop):
            loop = dict(loop, type=ResumableEpochBasedTrainLoop)
        return super().build_train_loop(loop)

    # the other build steps mmengine runs from the recipe, each named by
    # the key it reads
    build_val_loop = _names_key('val_cfg / val_dataloader / val_evaluator')(
        Runner.build_val_loop)
    build_test_loop = _names_key(
        'test_cfg / test_dataloader / test_evaluator')(Runner.build_test_loop)
    build_optim_wrapper = _names_key('optim_wrapper')(
        Runner.build_optim_wrapper)
    build_param_scheduler = _names_key('param_scheduler')(
        Runner.build_param_scheduler)
    build_model = _names_key('model')(Runner.build_model)
    build_log_processor = _names_key('log_processor')(
        Runner.build_log_processor)

    @_names_key('visualizer')
    def build_visualizer(self, visualizer=None):
        # no visualizer in the recipe: JSON scalars, plus TensorBoard as the
        # recipe's `tensorboard` key says (kdzoo.engine.visualization)
        if visualizer is None:
            visualizer = default_visualizer(self.cfg.get('tensorboard',
                                                         'auto'))
        return super().build_visualizer(visualizer)

    def _init_model_weights(self):
        # mmengine broadcasts every state tensor from rank 0 after
        # init_weights; PartialFC shards differ per rank (and in size), so
        # they are left out of the broadcast
        model = self.model.module if is_model_wrapper(self.model) \
            else self.model
        if not hasattr(model, 'init_weights'):
            return
        model.init_weights()
        skip = {key for key, _, _ in sharded_params(model)}
        for key, value in model.state_dict().items():
            if key not in skip:
                broadcast(value)

    def save_checkpoint(self, out_dir, filename, file_client_args=None,
                        save_optimizer=True, **kwargs):
        # every rank takes part in gathering the PartialFC centre shards to
        # rank 0 (a collective) before mmengine's rank-0-only save
        self.gathered_shards = gather_sharded_state(
            self, with_optimizer=save_optimizer)
        try:
            super().save_checkpoint(out_dir, filename, file_client_args,
                                    save_optimizer=save_optimizer, **kwargs)
        finally:
            self.gathered_shards = None

    def resume(self, filename, resume_optimizer=True,
               resume_param_scheduler=True, map_location='default'):
        # a checkpoint with whole PartialFC matrices goes to the CPU first
        # and each rank keeps its rows, instead of all of it on every GPU
        if map_location == 'default' and sharded_params(self.model):
            map_location = 'cpu'
        return super().resume(filename, resume_optimizer,
                              resume_param_scheduler, map_location)

    def load_checkpoint(self, filename, map_location='cpu', strict=False,
                        revise_keys=[(r'^module.', '')]):
        with runner_checkpoint_policy():
            return super().load_checkpoint(filename, map_location, strict,
                                           revise_keys)


def init_cpu_process_group(dist_cfg: dict) -> None:
    """``torch.distributed`` for CPU processes started by ``torchrun``.

    ``dist_cfg`` is the recipe's ``env_cfg.dist_cfg`` (``backend`` and
    ``init_process_group`` arguments, ``timeout`` in seconds); rank, world
    size and address come from torchrun's environment variables. NCCL needs
    GPUs, so a CPU run must use ``backend='gloo'``.
    """
    kwargs = dict(dist_cfg)
    kwargs.pop('init_backend', None)
    backend = kwargs.pop('backend', 'nccl')
    if backend == 'nccl':
        raise ConfigError(
            "env_cfg.dist_cfg.backend='nccl' needs CUDA GPUs and none is "
            'available: train on CPU processes with --cfg-options '
            "env_cfg.dist_cfg.backend='gloo'")
    if kwargs.get('timeout') is not None:
        kwargs['timeout'] = datetime.timedelta(seconds=kwargs['timeout'])
    torch.distributed.init_process_group(backend=backend, **kwargs)


def load_recipe(path: str, cfg_options: Optional[dict] = None,
                work_dir: Optional[str] = None) -> Config:
    """Read a recipe, apply ``--cfg-options``, set the work dir, validate."""
    if not os.path.isfile(path):
        from kdzoo.utils import ConfigError
        raise ConfigError(f'recipe not found: {path!r}')
    # custom_imports are imported by validate_config (after cfg_options),
    # which turns a missing module into a one-line ConfigError
    cfg = Config.fromfile(path, import_custom_modules=False)
    if cfg_options:
        epochs = (cfg.get('train_cfg') or {}).get('max_epochs')
        # a copy: mmengine pops `_delete_` from the dicts it merges, which
        # would change the caller's options for the next recipe
        cfg.merge_from_dict(copy.deepcopy(cfg_options))
        _sync_schedule(cfg, epochs)
    if work_dir:
        cfg.work_dir = work_dir
    elif not cfg.get('work_dir'):
        cfg.work_dir = os.path.join(
            'work_dirs', os.path.splitext(os.path.basename(path))[0])
    cfg.setdefault('default_scope', 'kdzoo')
    _add_teacher_cache_hook(cfg)
    validate_config(cfg, source=path)
    return cfg


def _add_teacher_cache_hook(cfg: Config) -> None:
    """A recipe with ``model.teacher_cache`` gets ``TeacherCacheHook``."""
    if not (cfg.get('model') or {}).get('teacher_cache'):
        return
    hooks = list(cfg.get('custom_hooks') or [])
    names = ('TeacherCacheHook', 'kdzoo.TeacherCacheHook', TeacherCacheHook)
    if not any(isinstance(h, TeacherCacheHook) or (
            isinstance(h, dict) and h.get('type') in names) for h in hooks):
        hooks.append(dict(type='TeacherCacheHook'))
        cfg.custom_hooks = hooks


def _sync_schedule(cfg: Config, old_epochs) -> None:
    """When ``train_cfg.max_epochs`` is overridden, move scheduler ends that
    were tied to the old value, so the LR schedule still spans the run."""
    new_epochs = (cfg.get('train_cfg') or {}).get('max_epochs')
    if old_epochs is None or new_epochs == old_epochs:
        return
    schedulers = cfg.get('param_scheduler') or []
    is_list = isinstance(schedulers, list)
    kept = []
    for sched in schedulers if is_list else [schedulers]:
        if sched.get('by_epoch', True) and sched.get('end') == old_epochs:
            sched['end'] = new_epochs
            if sched.get('T_max') == old_epochs - sched.get('begin', 0):
                sched['T_max'] = new_epochs - sched.get('begin', 0)
            if new_epochs <= sched.get('begin', 0):
                # the run now ends before this phase begins (e.g. the cosine
                # phase after a 1-epoch warm-up with max_epochs=1): drop it
                # rather than hand mmengine an empty [begin, end) window
                continue
        kept.append(sched)
    if is_list:
        cfg.param_scheduler = kept
    elif not kept:
        cfg.param_scheduler = []


# keys that say where a run is written, how it is launched and where its
# logs go: they change neither the weights nor the metrics, so they stay
# out of a run's content hash (switching TensorBoard on retrains nothing)
HASH_IGNORED_KEYS = ('work_dir', 'resume', 'load_from', 'launcher',
                     'tensorboard')


def config_hash(cfg: Config, ignored=HASH_IGNORED_KEYS,
                placeholders: Optional[dict] = None) -> str:
    """SHA-256 of the resolved config without the ``ignored`` top-level
    keys (by default where the run is written and where it logs).
    ``placeholders`` maps a folder to the name that stands for it in the
    hashed text (a path below that folder hashes as ``{name}/...``), so
    the hash does not depend on where those folders are."""
    data = cfg.to_dict()
    for key in ignored:
        data.pop(key, None)
    text = json.dumps(data, sort_keys=True, default=str)
    # longest folder first (a/b/c before a/b)
    for folder, name in sorted((placeholders or {}).items(),
                               key=lambda item: -len(item[0])):
        quoted = re.escape(json.dumps(folder)[1:-1])
        # followed by a separator or the string's end: a/b, not a/bc
        text = re.sub(quoted + r'(?=[/\\"])', '{' + name + '}', text)
    return hashlib.sha256(text.encode()).hexdigest()


def _bad_items(runner) -> int:
    """Training items skipped as unreadable (``on_bad_item='skip'``),
    summed over the ranks (a collective under DDP: every rank calls it)."""
    loader = getattr(runner, '_train_dataloader', None)
    built = loader is not None and not isinstance(loader, dict)
    count = torch.tensor(
        int(getattr(loader.dataset, 'bad_item_count', 0)) if built else 0)
    all_reduce(count, op='sum')  # no-op in one process
    return int(count)


def _count_params(module) -> int:
    return sum(p.numel() for p in module.parameters())


def _environment() -> dict:
    """The machine and software a result was measured with (float
    results depend on the CPU's kernels and the thread count too)."""
    model, capability = cpu_description(), cpu_capability()
    if torch.cuda.is_available():
        device = torch.cuda.get_device_name(0)
    else:  # e.g. 'cpu (AMD EPYC 7B13, 2 cores, AVX512)'
        parts = [model, f'{os.cpu_count()} cores']
        if capability:
            parts.append(capability)
        device = f"cpu ({', '.join(parts)})"
    return dict(device=device, cpu_model=model, cpu_capability=capability,
                num_threads=torch.get_num_threads(),
                malloc_tuning=malloc_tuning(), **software_versions())


@contextlib.contextmanager
def _no_trace_of_a_failed_build(cfg: Config, runners: list):
    """A recipe that fails before its first iteration (a runner build step,
    a hook's ``before_run``) leaves nothing behind: the work dir when this
    call made it, else what this call added to it. ``runners`` holds the
    runner once built; a run that trained (or resumed) keeps its files."""
    from mmengine.logging import MMLogger
    from mmengine.visualization import Visualizer
    work_dir = os.path.abspath(cfg.work_dir)
    existed = os.path.isdir(work_dir)
    before = set(os.listdir(work_dir)) if existed else set()
    managers = {kind: set(kind._instance_dict)
                for kind in (MMLogger, Visualizer)}
    try:
        yield
    except KdzooError:
        if runners and runners[0].iter > 0:
            raise
        # mmengine keeps the run's logger and visualizer by experiment name
        # (the start time, to the second): a retry within the same second
        # would get them back, writing into the dirs removed below
        for kind, names in managers.items():
            for name in set(kind._instance_dict) - names:
                instance = kind._instance_dict.pop(name)
                for handler in getattr(instance, 'handlers', [])[:]:
                    if isinstance(handler, logging.FileHandler):
                        handler.close()
                        instance.removeHandler(handler)
        import shutil
        if not existed:
            shutil.rmtree(work_dir, ignore_errors=True)
        elif is_main_process():
            for name in set(os.listdir(work_dir)) - before:
                path = os.path.join(work_dir, name)
                if os.path.isdir(path):
                    shutil.rmtree(path, ignore_errors=True)
                else:
                    os.remove(path)
        raise


def train_recipe(cfg: Config, resume: bool = False,
                 run_test: bool = True,
                 resume_from: Optional[str] = None) -> dict:
    """Train (and test) the recipe; write ``results.json`` in the work dir.

    ``resume``: continue from ``resume_from``, by default the newest
    complete checkpoint in the work dir, if any. The record then says so
    (``resumed``: checkpoint, epoch, iteration, and the training time
    logged before it), and its ``train_time_s`` adds that logged time to
    this call's."""
    before = None
    if resume:
        ckpt = resume_from or find_resume_checkpoint(cfg.work_dir)
        cfg.resume = ckpt is not None
        cfg.load_from = ckpt
        # read where the record is written (one writer under torchrun)
        before = trained_before(ckpt) if ckpt and is_main_process() \
            else None
    t0 = time.time()
    runners = []
    with _no_trace_of_a_failed_build(cfg, runners):
        runners.append(KdzooRunner.from_cfg(cfg))
        runners[0].train()
    runner = runners[0]
    train_time = time.time() - t0 + ((before or {}).get('train_time_s') or 0)
    metrics, test_time, outputs = {}, 0.0, None
    if run_test and cfg.get('test_dataloader'):
        t1 = time.time()
        metrics = runner.test()
        test_time = time.time() - t1
        outputs = _test_outputs(runner)
    return write_results(runner, cfg, metrics, train_time, test_time,
                         outputs=outputs, resumed=before)


def test_recipe(cfg: Config, checkpoint: Optional[str] = None) -> dict:
    """Evaluate the recipe's student, optionally from ``checkpoint``.

    ``checkpoint`` is a runner checkpoint (``epoch_N.pth``) or a bare
    backbone state dict (``backbone.pth``, insightface layout).
    """
    runner = KdzooRunner.from_cfg(cfg)
    if checkpoint:
        model = runner.model.module if hasattr(runner.model, 'module') \
            else runner.model
        if _is_runner_checkpoint(checkpoint):
            runner.load_checkpoint(checkpoint)
        else:
            load_module_weights(model.student.backbone, checkpoint,
                                what='student backbone checkpoint')
    t0 = time.time()
    metrics = runner.test()
    return write_results(runner, cfg, metrics, 0.0, time.time() - t0,
                         filename='test_results.json',
                         outputs=_test_outputs(runner))


def _test_outputs(runner) -> dict:
    """What the test metrics kept aside, not being scalars (so not in the
    metric dict mmengine logs): ``curves`` (TAR vs FAR per protocol),
    ``intervals`` (``{<key>_ci95: [low, high]}``), ``samples`` (bootstrap
    replicates per key) and ``bootstrap`` (unit, count, replicates, seed
    per protocol)."""
    out = dict(curves={}, intervals={}, samples={}, bootstrap={})
    for metric in getattr(runner.test_evaluator, 'metrics', ()):
        for key, attr in (('curves', 'curves'), ('intervals', 'intervals'),
                          ('samples', 'bootstrap_samples'),
                          ('bootstrap', 'bootstrap_info')):
            out[key].update(getattr(metric, attr, None) or {})
    return out


# Bumped when the evaluation changes what a results.json holds (2: all-pairs
# TAR@FAR, honest FAR range, identity-bootstrap intervals and replicates);
# kdzoo compare evaluates reused runs of an older version again.
EVAL_VERSION = 2


def bootstrap_file(results_file: str) -> str:
    """Where the bootstrap replicates of a results file live:
    ``results.json`` -> ``bootstrap.npz``, ``X_results.json`` ->
    ``X_bootstrap.npz``."""
    head, name = os.path.split(results_file)
    return os.path.join(head, name.replace('results.json', 'bootstrap.npz'))


def _is_runner_checkpoint(path: str) -> bool:
    from kdzoo.utils import load_weights_file
    try:
        obj = load_runner_checkpoint(path)
    except Exception:  # noqa: BLE001 - let the weights loader explain
        load_weights_file(path, 'checkpoint')
        raise
    return isinstance(obj, dict) and 'state_dict' in obj and 'meta' in obj


def write_results(runner, cfg, metrics, train_time, test_time,
                  filename: str = 'results.json',
                  outputs: Optional[dict] = None,
                  resumed: Optional[dict] = None) -> dict:
    """Write the run's record (``results.json``): metrics with their 95 %
    intervals (``<key>_ci95``), curves, timing and the environment; the
    bootstrap replicates go to ``bootstrap.npz`` beside it (what paired
    comparisons between runs need)."""
    model = runner.model.module if hasattr(runner.model, 'module') \
        else runner.model
    train_cfg = cfg.get('train_cfg') or {}
    loader = cfg.get('train_dataloader') or {}
    record = dict(
        name=cfg.get('experiment_name') or os.path.basename(cfg.work_dir),
        config_hash=config_hash(cfg),
        metrics={k: float(v) for k, v in (metrics or {}).items()},
        student_params=_count_params(model.student.backbone),
        teachers=list(getattr(model, 'teachers', {}).keys()),
        seed=(cfg.get('randomness') or {}).get('seed'),
        epochs=train_cfg.get('max_epochs'),
        batch_size=loader.get('batch_size'),
        train_time_s=round(train_time, 2),
        test_time_s=round(test_time, 2),
        nonfinite_skipped=int(runner.message_hub.get_info(
            'nonfinite_skipped', 0) or 0),
        bad_items_skipped=_bad_items(runner),
        work_dir=cfg.work_dir,
        **_environment())
    if resumed:
        record['resumed'] = resumed
    samples = {}
    if outputs is not None:  # None: not tested (run_test=False)
        record['eval_version'] = EVAL_VERSION
        record['metrics'].update(outputs.get('intervals') or {})
        record['curves'] = outputs.get('curves') or {}
        if outputs.get('bootstrap'):
            record['bootstrap'] = outputs['bootstrap']
        samples = outputs.get('samples') or {}
    if is_main_process():  # one writer under torchrun
        path = os.path.join(cfg.work_dir, filename)
        if samples:
            import io
            buf = io.BytesIO()
            np.savez_compressed(buf, **{k: np.asarray(v, np.float32)
                                        for k, v in samples.items()})
            atomic_write_bytes(bootstrap_file(path), buf.getvalue())
        atomic_write_json(path, record)
        if outputs is not None:
            log_test_metrics(runner, record['metrics'])
    return record
