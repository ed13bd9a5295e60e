"""How ``kdzoo compare`` executes a suite's runs: one after another in this
process (``--jobs 1``), or up to N at a time in worker processes
(``--jobs N``), each run starting once the runs it reads (a teacher's
checkpoint) have finished.

Threads: each worker gets ``--threads`` torch/OpenMP threads (default: this
process's torch threads divided by N, at least 1), so N runs share the
cores instead of oversubscribing them. CPU float results depend on the
thread count (reductions split differently), so a run's digits equal the
sequential run's when the thread count is the same:
``--jobs 2`` on 2 cores gives the table of ``--jobs 1 --threads 1``
(tested); ``--jobs 1`` at 2 threads differs in the digits, within the
intervals. The thread count is not part of the run hash: a finished run is
reused whichever count trained it.

A worker is ``python -m kdzoo.commands.compare_jobs TASK.pkl``: it loads the
recipe with the run's planned options (its run hash is the plan's), trains
or tests it, writes ``results.json`` and exits; its console output goes to
``<run dir>/compare_job.log``. When a run fails, no further run starts, the
running ones finish (they stay reusable), and the error names the run and
its log.

``--executor submitit`` submits the same worker, one job per run, through
submitit (Slurm; ``--executor-options cluster=local`` runs the jobs on this
machine, as the tests do); see docs/compare.md.
"""
import os
import pickle
import subprocess
import sys
import time
from typing import List, Optional, Tuple

import torch

from kdzoo.utils import ConfigError, KdzooError, atomic_write_json
from kdzoo.engine.runner import test_recipe, train_recipe

__all__ = ['check_jobs', 'run_tasks', 'run_task']

TASK_FILE = 'compare_job.pkl'
LOG_FILE = 'compare_job.log'


def check_jobs(jobs, threads) -> Tuple[int, Optional[int]]:
    """``(jobs, threads per run)``; threads default to this process's torch
    threads divided by ``jobs`` when ``jobs`` > 1 (None: unchanged)."""
    for option, value in (('--jobs', jobs), ('--threads', threads)):
        if value is None and option == '--threads':
            continue
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ConfigError(f'{option} must be an integer >= 1, got '
                              f'{value!r}')
    if threads is None and jobs > 1:
        threads = max(1, torch.get_num_threads() // jobs)
    return jobs, threads


def run_task(task: dict) -> dict:
    """Train (or, without training data, test) one planned run in this
    process and write its ``results.json``; returns the record."""
    cfg = task['cfg']
    if cfg.get('train_dataloader'):
        resume_from = task.get('resume')
        if not resume_from:
            created = _stamp_start(task['run_dir'], task['run_hash'])
        try:
            record = train_recipe(cfg, resume=True,
                                  resume_from=resume_from) \
                if resume_from else train_recipe(cfg)
        except BaseException:
            if not resume_from:
                _unstamp_start(task['run_dir'], created)
            raise
    else:
        record = test_recipe(cfg)
    record['run_hash'] = task['run_hash']
    record['recipe'] = task['recipe_label']
    record['role'] = task['role']
    atomic_write_json(os.path.join(task['run_dir'], 'results.json'), record)
    return record


def _stamp_start(run_dir: str, run_hash: str) -> bool:
    """Write the run's ``compare_run.json`` (its run hash and start time:
    what ``--resume`` checks a stopped run's checkpoints against); True
    when this made ``run_dir``."""
    from .compare import RUN_MARKER
    created = not os.path.isdir(run_dir)
    os.makedirs(run_dir, exist_ok=True)
    atomic_write_json(os.path.join(run_dir, RUN_MARKER),
                      dict(run_hash=run_hash, started=time.time()))
    return created


def _unstamp_start(run_dir: str, created: bool) -> None:
    """A run that failed before writing a checkpoint leaves no stamp (and
    no run dir when its start made it)."""
    from kdzoo.engine.checkpoint import checkpoint_files
    from .compare import RUN_MARKER
    if checkpoint_files(run_dir):
        return
    try:
        os.remove(os.path.join(run_dir, RUN_MARKER))
        if created and not os.listdir(run_dir):
            os.rmdir(run_dir)
    except OSError:
        pass


def run_tasks(tasks: List[dict], jobs: int, threads: Optional[int],
              executor: str = 'local',
              executor_options: Optional[dict] = None,
              work_dir: str = '.') -> None:
    """Run every task (setting its ``record``), at most ``jobs`` at once:
    here, one after another (``jobs=1``, local), in local worker processes
    or as submitit jobs (``executor='submitit'``)."""
    if not tasks:
        return
    if executor not in EXECUTORS:
        raise ConfigError(f'--executor must be one of {EXECUTORS}, got '
                          f'{executor!r}')
    if jobs == 1 and executor == 'local':
        previous = torch.get_num_threads()
        if threads:
            torch.set_num_threads(threads)
        try:
            for task in tasks:
                task['record'] = run_task(task)
        finally:
            torch.set_num_threads(previous)
        return
    threads = threads or max(1, torch.get_num_threads() // jobs)
    if executor == 'submitit':
        submit = _submitit_launcher(dict(executor_options or {}), threads,
                                    work_dir)
    else:
        submit = _LocalProcess
    _run_parallel(tasks, jobs, threads, submit)


EXECUTORS = ('local', 'submitit')


def _write_task(task: dict, threads: int) -> str:
    os.makedirs(task['run_dir'], exist_ok=True)
    path = os.path.join(task['run_dir'], TASK_FILE)
    keep = {k: task[k] for k in ('recipe', 'options', 'run_dir', 'run_hash',
                                 'role', 'recipe_label', 'tag', 'resume')}
    keep['name'], keep['threads'] = task['key'][0], threads
    with open(path, 'wb') as f:
        pickle.dump(keep, f)
    return path


class _LocalProcess:
    """A worker process on this machine."""

    def __init__(self, task: dict, threads: int):
        path = _write_task(task, threads)
        env = dict(os.environ, OMP_NUM_THREADS=str(threads),
                   MKL_NUM_THREADS=str(threads))
        with open(os.path.join(task['run_dir'], LOG_FILE), 'w') as log:
            self.proc = subprocess.Popen(
                [sys.executable, '-m', 'kdzoo.commands.compare_jobs', path],
                stdout=log, stderr=subprocess.STDOUT, env=env)

    def poll(self) -> Optional[int]:
        return self.proc.poll()


def _submitit_launcher(options: dict, threads: int, work_dir: str):
    """A launcher submitting each task as one submitit job (Slurm, or
    submitit's local/debug clusters): ``options`` go to
    ``AutoExecutor(cluster=...)`` and ``update_parameters`` (e.g.
    ``slurm_partition``, ``timeout_min``, ``gpus_per_node``); jobs get
    ``cpus_per_task=threads`` unless the options say otherwise."""
    try:
        import submitit
    except ImportError:
        raise ConfigError("--executor submitit needs the submitit package: "
                          "pip install submitit") from None
    folder = options.pop('folder', os.path.join(work_dir, '.submitit'))
    executor = submitit.AutoExecutor(folder=folder,
                                     cluster=options.pop('cluster', None))
    options.setdefault('cpus_per_task', threads)
    try:
        executor.update_parameters(**options)
    except (ValueError, TypeError, NameError) as e:
        raise ConfigError(f'--executor-options: submitit refuses them: '
                          f'{" ".join(str(e).split())}') from None

    class Job:
        def __init__(self, task: dict, threads: int):
            path = _write_task(task, threads)
            self.log = os.path.join(task['run_dir'], LOG_FILE)
            open(self.log, 'w').close()
            self.job = executor.submit(logged_worker, path, self.log)

        def poll(self) -> Optional[int]:
            if not self.job.done():
                return None
            try:
                return int(self.job.result())
            except Exception as e:  # noqa: BLE001 -- the job's own failure
                last = (str(e).strip().splitlines() or [''])[-1]
                with open(self.log, 'a') as f:
                    f.write(f'submitit job {self.job.job_id} failed: '
                            f'{last}\n')
                return 1
    return Job


def _last_line(path: str) -> str:
    try:
        with open(path, errors='replace') as f:
            lines = [line.strip() for line in f if line.strip()]
    except OSError:
        return ''
    return lines[-1] if lines else ''


def _run_parallel(tasks: List[dict], jobs: int, threads: int,
                  submit) -> None:
    pending = list(tasks)
    planned = {t['key'] for t in tasks}
    done, running, failed = set(), {}, []
    while pending or running:
        if not failed:
            for task in list(pending):
                if len(running) >= jobs:
                    break
                if all(d in done or d not in planned for d in task['deps']):
                    pending.remove(task)
                    running[submit(task, threads)] = (task, time.time())
                    print(f'[{task["tag"]}] started ({threads} threads; log '
                          f'{os.path.join(task["run_dir"], LOG_FILE)})',
                          flush=True)
            if pending and not running:  # cannot happen for a planned suite
                raise ConfigError('compare: runs wait on runs that never '
                                  'start: ' + ', '.join(t['tag']
                                                        for t in pending))
        elif not running:
            break
        time.sleep(0.2)
        for handle, (task, t0) in list(running.items()):
            code = handle.poll()
            if code is None:
                continue
            del running[handle]
            log = os.path.join(task['run_dir'], LOG_FILE)
            if code == 0:
                from .compare import _finished
                task['record'] = _finished(task['run_dir'], task['run_hash'])
                if task['record'] is not None:
                    done.add(task['key'])
                    os.remove(os.path.join(task['run_dir'], TASK_FILE))
                    print(f'[{task["tag"]}] finished in '
                          f'{time.time() - t0:.0f} s', flush=True)
                    continue
            failed.append((task, code, log))
    if failed:
        task, code, log = failed[0]
        more = f' ({len(failed) - 1} more failed)' if len(failed) > 1 else ''
        raise KdzooError(f'run {task["tag"]!r} failed (exit {code}): '
                         f'{_last_line(log)}; full log: {log}{more}')


def _worker(task_file: str) -> int:
    """A worker process: one planned run, then exit (0: results.json
    written; 2: a kdzoo error, one line on stderr)."""
    from kdzoo.utils.allocator import tune_allocator
    tune_allocator()
    with open(task_file, 'rb') as f:
        task = pickle.load(f)
    torch.set_num_threads(task['threads'])
    import kdzoo  # noqa: F401  (registers everything)
    from kdzoo.engine.runner import load_recipe
    try:
        cfg = load_recipe(task['recipe'], task['options'], task['run_dir'])
        cfg.experiment_name = task['name']
        task['cfg'] = cfg
        run_task(task)
    except KdzooError as e:
        print(f'kdzoo compare: run {task["tag"]!r}: error: {e}',
              file=sys.stderr)
        return 2
    return 0


def logged_worker(task_file: str, log: str) -> int:
    """:func:`_worker` with its console output (file descriptors 1 and 2)
    in ``log``: what a submitit job runs."""
    sys.stdout.flush()
    sys.stderr.flush()
    with open(log, 'a') as f:
        os.dup2(f.fileno(), 1)
        os.dup2(f.fileno(), 2)
    return _worker(task_file)


if __name__ == '__main__':
    sys.exit(_worker(sys.argv[1]))
