"""PartialFC shards in and out of whole-matrix checkpoints, one process.

A rank-r head of a W-rank run is built here by faking ``(rank, world)``
(no process group); the 2-process end-to-end run is in ``test_ddp.py``.
"""
import pytest
import torch
from types import SimpleNamespace

from kdzoo.engine.sharded_heads import (ShardedHeadCheckpointHook,
                                        full_state_dict, sharded_params)
from kdzoo.heads import PartialFC
from kdzoo.heads import partial_fc as pfc_module


def head_of_rank(monkeypatch, rank, world, num_classes=7, dim=4):
    monkeypatch.setattr(pfc_module, 'get_dist_info', lambda: (rank, world))
    return PartialFC(num_classes=num_classes, embedding_size=dim,
                     margin='cosface', m=0.35)


def test_rows_per_rank_match_arcface_torch_split(monkeypatch):
    heads = [head_of_rank(monkeypatch, r, 3, num_classes=8) for r in range(3)]
    assert heads[0].rows_per_rank() == [3, 3, 2]
    assert [(h.class_start, h.num_local) for h in heads] == \
        [(0, 3), (3, 3), (6, 2)]


def test_whole_matrix_loads_as_this_ranks_rows(monkeypatch):
    full = torch.arange(7 * 4, dtype=torch.float32).reshape(7, 4)
    head = head_of_rank(monkeypatch, 1, 2)  # classes 4..6
    head.load_state_dict({'weight': full})
    assert torch.equal(head.weight.detach(), full[4:7])
    # its own shard loads as it is
    head.load_state_dict({'weight': full[4:7] * 2})
    assert torch.equal(head.weight.detach(), full[4:7] * 2)


@pytest.mark.parametrize('shape', [(4, 4), (8, 4), (7, 5)])
def test_foreign_shape_is_a_size_mismatch_naming_both(monkeypatch, shape):
    head = head_of_rank(monkeypatch, 1, 2)  # shard (3, 4) of (7, 4)
    message = (r'weight: the checkpoint holds PartialFC centres of shape '
               r'\(%d, %d\).*needs \(7, 4\).*rank-1 shard \(3, 4\)' % shape)
    with pytest.raises(RuntimeError, match=message):  # torch: an error
        head.load_state_dict({'weight': torch.zeros(shape)})
    # mmengine's non-strict load (load_from): a warning, weights untouched
    from mmengine.runner import checkpoint
    before = head.weight.detach().clone()
    logged = []
    monkeypatch.setattr(checkpoint, 'print_log',
                        lambda msg, **kwargs: logged.append(msg))
    checkpoint.load_state_dict(head, {'weight': torch.zeros(shape)},
                               strict=False)
    assert torch.equal(head.weight.detach(), before)
    assert any('PartialFC centres of shape' in m for m in logged)


def test_single_process_has_no_sharded_params(monkeypatch):
    head = head_of_rank(monkeypatch, 0, 1)
    assert sharded_params(head) == []
    state = full_state_dict(head)  # no collective needed
    assert torch.equal(state['weight'], head.weight.detach())


def test_hook_writes_whole_tensors_and_slices_optimizer_state(monkeypatch):
    """before_save_checkpoint puts the gathered tensors in place of rank
    0's; after_load_checkpoint gives a rank-1 optimizer its own rows."""
    head = head_of_rank(monkeypatch, 1, 2)
    other = torch.nn.Linear(2, 2)
    model = torch.nn.ModuleDict(dict(other=other, head=head))
    from mmengine.optim import OptimWrapper
    optim = OptimWrapper(torch.optim.SGD(
        list(other.parameters()) + [head.weight], lr=0.1, momentum=0.9))
    assert [k for k, _, _ in sharded_params(model)] == ['head.weight']
    full_w = torch.randn(7, 4)
    full_m = torch.randn(7, 4)
    runner = SimpleNamespace(model=model, optim_wrapper=optim,
                             gathered_shards={'head.weight': dict(
                                 weight=full_w, index=2,
                                 optim=dict(momentum_buffer=full_m))})
    hook = ShardedHeadCheckpointHook()
    checkpoint = dict(
        state_dict={'head.weight': torch.zeros(3, 4)},
        optimizer=dict(state={2: dict(momentum_buffer=torch.zeros(3, 4))},
                       param_groups=[]))
    hook.before_save_checkpoint(runner, checkpoint)
    assert checkpoint['state_dict']['head.weight'] is full_w
    assert checkpoint['optimizer']['state'][2]['momentum_buffer'] is full_m
    # loading it back on rank 1
    hook.after_load_checkpoint(runner, checkpoint)
    torch.testing.assert_close(
        checkpoint['optimizer']['state'][2]['momentum_buffer'], full_m[4:7])
    head.load_state_dict({'weight': checkpoint['state_dict']['head.weight']})
    torch.testing.assert_close(head.weight.detach(), full_w[4:7])


@pytest.mark.parametrize('dim', [3, 2**18])  # 2**18: chunks of 4 rows
def test_shards_are_rows_of_one_matrix_whatever_the_world_size(monkeypatch,
                                                               dim):
    """Ranks are seeded alike; their shards still differ (distinct classes)
    and stitch into the matrix a single process draws from the same seed."""
    def build(rank, world):
        torch.manual_seed(5)
        return head_of_rank(monkeypatch, rank, world, num_classes=9, dim=dim)
    whole = build(0, 1).weight.detach()
    for world in (2, 4):
        shards = [build(r, world).weight.detach() for r in range(world)]
        assert torch.equal(torch.cat(shards), whole)
    assert not torch.equal(whole[:4], whole[4:8])
    assert whole.std().item() == pytest.approx(0.01, rel=0.5)


def test_building_a_shard_keeps_the_ranks_rngs_in_step(monkeypatch):
    """Shards differ in size; the global RNG must still advance alike on
    every rank (a later module's init would otherwise differ per rank)."""
    after = []
    for rank in range(2):
        torch.manual_seed(3)
        head_of_rank(monkeypatch, rank, 2, num_classes=21, dim=64)
        after.append(torch.randint(0, 2**30, (4, )))
    assert torch.equal(after[0], after[1])


def test_ema_and_per_rank_clipping_wrappers_are_refused(monkeypatch):
    from mmengine.hooks import EMAHook
    from mmengine.optim import OptimWrapper

    from kdzoo.engine.numerics import GuardedOptimWrapper
    from kdzoo.engine.sharded_heads import check_sharded_training
    from kdzoo.utils import ConfigError
    head = head_of_rank(monkeypatch, 0, 2)
    model = torch.nn.ModuleDict(dict(head=head))
    sgd = torch.optim.SGD([head.weight], lr=0.1)

    def runner(hooks=(), wrapper=None):
        return SimpleNamespace(model=model, hooks=list(hooks),
                               optim_wrapper=wrapper)
    check_sharded_training(runner(wrapper=GuardedOptimWrapper(
        sgd, clip_grad=dict(max_norm=5.0))))  # kdzoo's wrapper: fine
    check_sharded_training(runner(wrapper=OptimWrapper(sgd)))  # no clip
    with pytest.raises(ConfigError, match='EMAHook.*head.weight'):
        check_sharded_training(runner([EMAHook()], OptimWrapper(sgd)))
    with pytest.raises(ConfigError, match="optim_wrapper.type: OptimWrapper "
                       "clips with each rank's own gradient norm"):
        check_sharded_training(runner(wrapper=OptimWrapper(
            sgd, clip_grad=dict(max_norm=5.0))))
    # one process: nothing sharded, nothing refused
    single = torch.nn.ModuleDict(dict(head=head_of_rank(monkeypatch, 0, 1)))
    check_sharded_training(SimpleNamespace(
        model=single, hooks=[EMAHook()], optim_wrapper=None))
