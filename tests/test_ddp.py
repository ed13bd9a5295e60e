"""Data-parallel training on 2 CPU processes (gloo) equals one process.

One training step of a ``FaceDistiller`` (tiny MobileFaceNet student, one
tiny frozen IResNet teacher from a random checkpoint) wrapped in
``mmengine.model.MMDistributedDataParallel`` with the arguments
``KdzooRunner.wrap_model`` uses on CPU (``device_ids=None,
broadcast_buffers=False, find_unused_parameters=False``), the global batch of
8 split 4 + 4 over 2 ranks, is compared with the same step of the unwrapped
model on the whole batch in this process (``train_step`` with an SGD
``OptimWrapper`` built by ``TrainableOptimWrapperConstructor``; gradients
are read by an optimizer step pre-hook, i.e. after DDP's all-reduce).

What is averaged how:

* DDP averages every replicated parameter's gradient over the ranks, so the
  gradient of a rank-local **batch-mean** loss (CosFace ``loss_cls``,
  angular KD) becomes that of the full-batch mean when the ranks hold equal
  batches; the logged values of such losses are rank-local means whose
  average over the ranks is the full-batch value.
* PartialFC ``loss_cls`` and EKD are computed on the all-gathered global
  batch: their value is the full-batch value on every rank; their gathers
  return ``W x`` (PartialFC) or the rank-sum (EKD) of the gradient to the
  local rows, which DDP's averaging brings back to exactly the full-batch
  gradient.
* PartialFC's centre shard is kept out of DDP (``ddp_ignore_params``): each
  rank's ``weight.grad`` is the full-batch gradient of its own rows.

BatchNorm: per-rank batch statistics differ from full-batch ones, so the
comparison runs with every BatchNorm layer in eval mode (fixed running
statistics; the rest of the model in train mode). SyncBatchNorm is no way
out here: torch's SyncBatchNorm rejects CPU tensors when a process group is
initialised.

EKD's own thresholds and gather (bare loss, 2 processes) are tested in
``test_losses_ekd.py``; here EKD runs inside the distiller under DDP.

The last test trains a tiny SynthFaceAge recipe end to end with ``torchrun
--nproc_per_node 2 ... --launcher pytorch`` on CPU (gloo).
"""
import datetime
import json
import os
import subprocess
import sys
from contextlib import nullcontext

import pytest
import torch
import torch.distributed as dist
from torch import nn

import kdzoo  # noqa: F401
from kdzoo.distillers import FaceDistiller
from kdzoo.engine import TrainableOptimWrapperConstructor
from kdzoo.registry import BACKBONES
from kdzoo.utils import ConfigError
from tiny_runs import (STUDENT_BACKBONE, TEACHER_BACKBONE, as_cli,
                       random_teacher, tiny_options)

ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), '..'))
KD_RECIPE = os.path.join(ROOT, 'recipes', 'kd', 'angular_kd_synthface_age.py')
WORLD = 2
NUM_CLASSES = 7  # odd: PartialFC shards of 4 and 3 centres
# cross-rank positives only: ranks hold [0, 5, 2, 6] and [0, 5, 3, 4]
LABELS = [0, 5, 2, 6, 0, 5, 3, 4]
CUTS = [0, 4, 8]

COSFACE = dict(type='CosFace', num_classes=NUM_CLASSES, embedding_size=64,
               s=32.0, m=0.35)
PARTIAL_FC = dict(type='PartialFC', num_classes=NUM_CLASSES,
                  embedding_size=64, s=32.0, margin='cosface', m=0.35,
                  sample_rate=1.0)
ANGULAR = dict(type='AngularDistillationLoss', p=2, loss_weight=16.0,
               inputs=dict(s_emb=dict(tap='student.embedding',
                                      connector='proj'),
                           t_emb='teacher_fr.embedding'))
EKD = dict(type='EKDLoss', tau=0.1, topk=10, fars=(0.5, 0.1),
           loss_weight=100.0,
           inputs=dict(s_emb='student.embedding', t_emb='teacher_fr.embedding',
                       labels='data.label'))


def model_cfg(teacher_path, head, losses):
    cfg = dict(student=dict(backbone=dict(STUDENT_BACKBONE), head=head),
               teachers=dict(teacher_fr=dict(
                   type='CheckpointTeacher', checkpoint=teacher_path,
                   backbone=dict(TEACHER_BACKBONE))),
               distill_losses=losses)
    if any('connector' in str(v['inputs']) for v in losses.values()):
        cfg['connectors'] = dict(proj=dict(type='LinearProjector',
                                           out_features=128))
    return cfg


def build(cfg, state):
    """The distiller with ``state`` loaded; PartialFC gets its own rows."""
    model = FaceDistiller(**cfg)
    head = model.student.head
    state = dict(state)
    if hasattr(head, 'class_start'):  # PartialFC: this rank's shard
        full = state['student.head.weight']
        state['student.head.weight'] = full[
            head.class_start:head.class_start + head.num_local].clone()
    model.load_state_dict(state, strict=True)
    model.train()
    for m in model.modules():  # fixed statistics (see the module docstring)
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            m.eval()
    return model


def train_step(model, batch, clip=None):
    """One mmengine training step; returns (log_vars, {name: gradient})
    (gradients as the optimizer sees them: averaged, clipped to ``clip``)."""
    module = getattr(model, 'module', model)
    wrapper = dict(type='OptimWrapper', optimizer=dict(type='SGD', lr=0.1))
    if clip is not None:
        wrapper['clip_grad'] = dict(max_norm=clip)
    optim = TrainableOptimWrapperConstructor(wrapper)(module)
    names = {id(p): n for n, p in module.named_parameters()}
    grads = {}

    def snapshot(optimizer, args, kwargs):
        for group in optimizer.param_groups:
            for p in group['params']:
                if p.grad is not None:
                    grads[names[id(p)]] = p.grad.detach().clone()

    optim.optimizer.register_step_pre_hook(snapshot)
    log_vars = model.train_step(batch, optim)
    log_vars = {k: float(torch.as_tensor(v).detach())
                for k, v in log_vars.items()}
    if clip is not None:  # the norm the clipping used
        log_vars['grad_norm'] = float(optim.message_hub.get_scalar(
            'train/grad_norm').current())
    return log_vars, grads


def make_batch(lo=0, hi=len(LABELS)):
    g = torch.Generator().manual_seed(3)
    n = len(LABELS)
    inputs = torch.randint(0, 256, (n, 3, 32, 32), generator=g,
                           dtype=torch.uint8)
    samples = dict(label=torch.tensor(LABELS), age=torch.full((n,), 30),
                   index=torch.arange(n))
    return dict(inputs=inputs[lo:hi],
                data_samples={k: v[lo:hi] for k, v in samples.items()})


def _worker(rank, world, init_file, spec_path, out_dir):
    from mmengine.model import MMDistributedDataParallel
    torch.set_num_threads(1)
    dist.init_process_group('gloo', init_method=f'file://{init_file}',
                            rank=rank, world_size=world,
                            timeout=datetime.timedelta(seconds=60))
    try:
        spec = torch.load(spec_path)
        results = {}
        for name, case in spec.items():
            model = build(case['cfg'], case['state'])
            ddp = MMDistributedDataParallel(
                module=model, device_ids=None, broadcast_buffers=False,
                find_unused_parameters=False)
            log_vars, grads = train_step(
                ddp, make_batch(CUTS[rank], CUTS[rank + 1]),
                clip=CLIP.get(name))
            head = model.student.head
            results[name] = dict(
                log_vars=log_vars, grads=grads,
                buffers={k: v.clone() for k, v in model.named_buffers()
                         if k.startswith('distill_losses.')},
                shard=(getattr(head, 'class_start', 0),
                       getattr(head, 'num_local', NUM_CLASSES)))
        torch.save(results, os.path.join(out_dir, f'rank{rank}.pt'))
    finally:
        dist.destroy_process_group()


CASES = dict(
    cosface_angular=(COSFACE, dict(loss_ang=ANGULAR)),
    partial_fc_angular=(PARTIAL_FC, dict(loss_ang=ANGULAR)),
    partial_fc_clipped=(PARTIAL_FC, {}),  # CosFace loss only
    ekd_alone=(None, dict(loss_ekd=EKD)),  # no head: EKD's gradient only
)
# gradient-norm clipping small enough to act (the total norm is ~1e1)
CLIP = dict(partial_fc_clipped=0.05)


@pytest.fixture(scope='module')
def runs(tmp_path_factory):
    """Per case: the single-process reference step on the whole batch
    (PartialFC's reference is a CosFace head on the same centres) and the
    two ranks' results of the DDP step."""
    import torch.multiprocessing as mp
    tmp = tmp_path_factory.mktemp('ddp')
    teacher = random_teacher(tmp / 'teacher.pth')
    spec, reference = {}, {}
    for name, (head, losses) in CASES.items():
        torch.manual_seed(0)
        ref_cfg = model_cfg(teacher, head and COSFACE, losses)
        state = FaceDistiller(**ref_cfg).state_dict()
        spec[name] = dict(cfg=model_cfg(teacher, head, losses), state=state)
        ref = build(ref_cfg, state)
        log_vars, grads = train_step(ref, make_batch(), clip=CLIP.get(name))
        reference[name] = dict(
            log_vars=log_vars, grads=grads,
            buffers={k: v.clone() for k, v in ref.named_buffers()
                     if k.startswith('distill_losses.')},
            state=state, cfg=spec[name]['cfg'])
    spec_path = str(tmp / 'spec.pt')
    torch.save(spec, spec_path)
    mp.spawn(_worker, args=(WORLD, str(tmp / 'init'), spec_path, str(tmp)),
             nprocs=WORLD, join=True)
    ranks = [torch.load(tmp / f'rank{r}.pt') for r in range(WORLD)]
    return {name: (reference[name], [r[name] for r in ranks])
            for name in CASES}


def assert_grads_match(ref_grads, rank_grads, shard=None):
    """Every trainable parameter's gradient equals the full-batch one;
    ``shard=(start, n)``: the head weight holds rows ``start:start+n``."""
    assert set(rank_grads) == set(ref_grads)
    for name, want in ref_grads.items():
        if shard is not None and name == 'student.head.weight':
            want = want[shard[0]:shard[0] + shard[1]]
        assert want.abs().max() > 0, name  # a live comparison
        # float32 error of a whole forward and backward pass (~20 layers;
        # a weight gradient sums over batch x positions, thousands of
        # terms) on 4-image batches in two processes vs one 8-image batch,
        # DDP's all-reduce in between: entries differ by up to 2.5e-6 x
        # the tensor's largest one (~20 eps32; AVX2 and
        # ATEN_CPU_CAPABILITY=default alike). atol = 5e-5 x max (~400
        # eps32) leaves 20x for other kernels; a missing rank's share or an
        # unaveraged gradient is off by ~1x, a swapped row by ~1x.
        torch.testing.assert_close(rank_grads[name], want, rtol=1e-5,
                                   atol=5e-5 * float(want.abs().max()),
                                   msg=lambda m: f'{name}: {m}')


def test_cosface_angular_kd_matches_single_process(runs):
    ref, ranks = runs['cosface_angular']
    for key in ('loss_cls', 'loss_ang', 'loss'):
        # rank-local batch means; their average is the full-batch mean
        local = [r['log_vars'][key] for r in ranks]
        assert sum(local) / WORLD == pytest.approx(ref['log_vars'][key],
                                                   rel=1e-5)
    assert ranks[0]['log_vars']['loss_cls'] != pytest.approx(
        ranks[1]['log_vars']['loss_cls'], rel=1e-3)  # halves do differ
    assert 'student.head.weight' in ref['grads']
    assert 'connectors.proj.fc.weight' in ref['grads']
    for r in ranks:
        assert_grads_match(ref['grads'], r['grads'])


def test_partial_fc_sample_rate_1_matches_full_softmax(runs):
    ref, ranks = runs['partial_fc_angular']
    # uneven shards: rank 0 holds classes 0-3, rank 1 classes 4-6
    assert [r['shard'] for r in ranks] == [(0, 4), (4, 3)]
    for r in ranks:
        # global-batch cross-entropy: the full-batch value on every rank
        assert r['log_vars']['loss_cls'] == pytest.approx(
            ref['log_vars']['loss_cls'], rel=1e-5)
        assert_grads_match(ref['grads'], r['grads'], shard=r['shard'])
    local = [r['log_vars']['loss_ang'] for r in ranks]
    assert sum(local) / WORLD == pytest.approx(ref['log_vars']['loss_ang'],
                                               rel=1e-5)
    # the shards stitched together are the whole centre gradient. Both
    # sides are float32 sums of the same terms in another order (logits of
    # the all-gathered batch against 4 + 3 centres in two processes vs 7 in
    # one, embeddings of 4-image vs 8-image batches, whatever kernels the
    # CPU dispatches to), so an entry may be off by ~eps32 x (terms summed)
    # x (their size). The longest reduction is the cosine's 64-feature dot
    # product (the batch sum has 8 terms), and the terms are bounded by the
    # largest entry (~40 here): atol = 64 * eps32 * max|grad| ~ 3e-4, ~30x
    # the 1e-5 seen. An entry's own relative error is no guide (an entry
    # near zero is a cancelled sum of large terms). A real fault is far
    # larger: one shard scaled by 1.0001, or two rows swapped, fails.
    want = ref['grads']['student.head.weight']
    atol = 64 * torch.finfo(torch.float32).eps * float(want.abs().max())
    torch.testing.assert_close(
        torch.cat([r['grads']['student.head.weight'] for r in ranks]), want,
        rtol=0, atol=atol)


def test_partial_fc_clipping_uses_the_norm_over_all_shards(runs):
    """Clipped by the norm of the whole model (each rank's shard counted
    once): every rank's gradients equal the clipped single-process ones,
    so the replicas stay identical."""
    ref, ranks = runs['partial_fc_clipped']
    norm = ref['log_vars']['grad_norm']
    assert norm > 100 * CLIP['partial_fc_clipped']  # the clipping acts
    for r in ranks:
        # one rank's own norm would miss the other shard: off by >= 3e-6.
        # Float error: the norm's relative error is a weighted mean of its
        # entries' (dominated by the largest, off by ~1 eps32), ~1e-7 seen
        # (1.7e-7 on AVX2, 8e-8 with ATEN_CPU_CAPABILITY=default); rel=1e-6
        # is ~8 eps32, below the fault it is there to catch.
        assert r['log_vars']['grad_norm'] == pytest.approx(norm, rel=1e-6)
        assert_grads_match(ref['grads'], r['grads'], shard=r['shard'])


def test_partial_fc_single_process_equals_cosface(runs):
    """W = 1: PartialFC(sample_rate=1) is CosFace on the same centres."""
    ref, _ = runs['partial_fc_angular']
    model = build(ref['cfg'], ref['state'])
    assert model.student.head.world_size == 1
    log_vars, grads = train_step(model, make_batch())
    assert log_vars['loss_cls'] == pytest.approx(ref['log_vars']['loss_cls'],
                                                 rel=1e-5)
    assert_grads_match(ref['grads'], grads)


def test_ekd_in_distiller_matches_single_process(runs):
    """A student trained by EKD alone (no head, so nothing masks EKD's
    gradient)."""
    ref, ranks = runs['ekd_alone']
    # no positive pair on either rank alone: only the gathered batch has them
    assert ref['log_vars']['loss_ekd'] > 0
    for r in ranks:
        assert r['log_vars']['loss_ekd'] == pytest.approx(
            ref['log_vars']['loss_ekd'], rel=1e-5)
        for key, want in ref['buffers'].items():  # EMA thresholds
            assert want.abs().sum() > 0, key
            torch.testing.assert_close(r['buffers'][key], want)
        assert_grads_match(ref['grads'], r['grads'])


# ------------------------------------------------------------ runner path
def test_cpu_process_group_refuses_nccl():
    from kdzoo.engine.runner import init_cpu_process_group
    with pytest.raises(ConfigError, match=r"env_cfg\.dist_cfg\.backend="
                       r"'nccl' needs CUDA.*backend='gloo'"):
        init_cpu_process_group(dict(backend='nccl', timeout=60))
    assert not dist.is_initialized()


@pytest.mark.parametrize('fails', [False, True])
def test_process_group_closed_destroys_the_group(tmp_path, fails):
    """A gloo group left alive at exit can abort the process while Python
    shuts down; ``kdzoo train`` ends inside process_group_closed, which
    destroys the group whether the block ran through or raised."""
    from kdzoo.utils.dist import process_group_closed
    dist.init_process_group('gloo', init_method=f'file://{tmp_path / "pg"}',
                            rank=0, world_size=1)
    try:
        with pytest.raises(RuntimeError) if fails else nullcontext():
            with process_group_closed():
                dist.all_reduce(torch.ones(1))
                if fails:
                    raise RuntimeError('a failed run')
        assert not dist.is_initialized()
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


STUDENT_RECIPE = os.path.join(ROOT, 'recipes', 'students',
                              'mbf_synthface_age.py')


def _torchrun(tmp_path, recipe, work, options, extra=()):
    """``kdzoo train`` on WORLD CPU processes (gloo) under torchrun
    (--standalone: a rendezvous on a free local port)."""
    env = dict(os.environ, OMP_NUM_THREADS='1',
               PYTHONPATH=os.pathsep.join(
                   [ROOT] + [p for p in [os.environ.get('PYTHONPATH')] if p]))
    cmd = [sys.executable, '-m', 'torch.distributed.run', '--standalone',
           '--nproc_per_node', str(WORLD), '-m', 'kdzoo.cli', 'train',
           recipe, '--work-dir', str(work), '--launcher', 'pytorch',
           *extra, '--cfg-options'] + as_cli(options)
    done = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True,
                          text=True, timeout=240)
    assert done.returncode == 0, done.stderr[-3000:]


@pytest.mark.skipif(torch.cuda.is_available(),
                    reason='tests the CPU (gloo) path; with CUDA mmengine '
                    'puts each rank on its own GPU')
def test_torchrun_two_cpu_processes_train_end_to_end(tmp_path, cache_dir):
    work = tmp_path / 'work'
    teacher = random_teacher(tmp_path / 'teacher.pth')
    options = tiny_options(cache_dir, **{
        'model.teachers.teacher_fr.checkpoint': teacher,
        'env_cfg.dist_cfg.backend': 'gloo'})
    _torchrun(tmp_path, KD_RECIPE, work, options)
    with open(work / 'results.json') as f:
        record = json.load(f)
    assert record['teachers'] == ['teacher_fr']
    # evaluated once, on rank 0: all-pairs TAR with its interval
    assert 'cross_age/TAR@FAR=1e-2' in record['metrics']
    assert 'cross_age/TAR@FAR=1e-2_ci95' in record['metrics']
    assert (work / 'bootstrap.npz').is_file()
    # backbone.pth (written by rank 0) is the trained student backbone of
    # the last checkpoint, in the layout of a plain MobileFaceNet
    state = torch.load(work / 'backbone.pth', weights_only=True)
    assert state.keys() == BACKBONES.build(STUDENT_BACKBONE).state_dict(
    ).keys()
    with open(work / 'last_checkpoint') as f:
        ckpt = torch.load(f.read().strip(), map_location='cpu',
                          weights_only=False)
    prefix = 'student.backbone.'
    for key, value in state.items():
        torch.testing.assert_close(value, ckpt['state_dict'][prefix + key])


def _load(path):
    return torch.load(path, map_location='cpu', weights_only=False)


def _momentum_of(ckpt, key):
    """The optimizer state of the parameter ``key`` of a runner checkpoint
    (its index: the position among the trainable parameters, which is the
    order the optimizer constructor adds them in)."""
    names = [k for k in ckpt['state_dict'] if k.startswith('student.')
             and not k.endswith(('running_mean', 'running_var',
                                 'num_batches_tracked'))]
    return ckpt['optimizer']['state'][names.index(key)]['momentum_buffer']


@pytest.mark.skipif(torch.cuda.is_available(),
                    reason='tests the CPU (gloo) path')
def test_torchrun_partial_fc_checkpoint_holds_all_centres_and_resumes(
        tmp_path, cache_dir):
    """21 classes over 2 ranks (shards of 11 and 10): checkpoints and
    head.pth hold all 21 centres with their momentum, and a run resumed
    from epoch 1 on 2 processes ends bit-identical to the uninterrupted
    one (rank 1 got its own rows and momentum back)."""
    classes = 21
    options = tiny_options(cache_dir, epochs=2, test=False, **{
        'train_dataloader.dataset.num_identities': classes,
        'model.student.head.num_classes': classes,
        'model.student.head.type': 'PartialFC',
        'model.student.head.margin': 'cosface',
        'env_cfg.dist_cfg.backend': 'gloo'})
    full = tmp_path / 'full'
    _torchrun(tmp_path, STUDENT_RECIPE, full, options)
    first, last = _load(full / 'epoch_1.pth'), _load(full / 'epoch_2.pth')
    key = 'student.head.weight'
    for ckpt in (first, last):
        assert ckpt['state_dict'][key].shape == (classes, 64)
        assert _momentum_of(ckpt, key).shape == (classes, 64)
        assert _momentum_of(ckpt, key)[11:].abs().min() > 0  # rank 1 rows
    moved = (last['state_dict'][key] - first['state_dict'][key]).abs()
    assert moved[:11].amax(1).min() > 0 and moved[11:].amax(1).min() > 0
    head = torch.load(full / 'head.pth', weights_only=True)
    torch.testing.assert_close(head['weight'], last['state_dict'][key],
                               rtol=0, atol=0)
    # "killed" after epoch 1: a work dir holding only that checkpoint
    resumed = tmp_path / 'resumed'
    resumed.mkdir()
    (resumed / 'epoch_1.pth').write_bytes((full / 'epoch_1.pth').read_bytes())
    _torchrun(tmp_path, STUDENT_RECIPE, resumed, options, extra=['--resume'])
    again = _load(resumed / 'epoch_2.pth')
    for name, want in last['state_dict'].items():
        torch.testing.assert_close(again['state_dict'][name], want, rtol=0,
                                   atol=0, msg=lambda m: f'{name}: {m}')
    torch.testing.assert_close(_momentum_of(again, key),
                               _momentum_of(last, key), rtol=0, atol=0)
    # the same epoch-1 checkpoint resumes in one process (world size 1)
    from kdzoo.cli import main
    single = tmp_path / 'single'
    single.mkdir()
    (single / 'epoch_1.pth').write_bytes((full / 'epoch_1.pth').read_bytes())
    one = {k: v for k, v in options.items() if k != 'env_cfg.dist_cfg.backend'}
    assert main(['train', STUDENT_RECIPE, '--work-dir', str(single),
                 '--resume', '--cfg-options'] + as_cli(one)) == 0
    alone = _load(single / 'epoch_2.pth')
    assert alone['meta']['epoch'] == 2
    assert alone['state_dict'][key].shape == (classes, 64)
    assert _momentum_of(alone, key).shape == (classes, 64)
