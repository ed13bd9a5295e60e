"""Distributed helpers on top of ``mmengine.dist``: rank and world size,
an all-gather of rows whose ranks may hold different batch sizes, with
or without a gradient back to each rank's own rows, and the end of a
process group."""
import contextlib
from typing import Iterator, List

import torch
import torch.distributed as dist
from mmengine.dist import get_dist_info

__all__ = ['get_dist_info', 'world_size', 'gather_batch_sizes',
           'gather_rows', 'all_gather_with_grad', 'process_group_closed']


def world_size() -> int:
    """The number of processes, 1 without ``torch.distributed``."""
    return get_dist_info()[1]


@contextlib.contextmanager
def process_group_closed() -> Iterator[None]:
    """Destroy the default process group when the block ends, if one is
    up by then.

    A process that exits with a gloo group still alive can abort while the
    interpreter shuts down (``terminate called without an active
    exception``: gloo's worker threads outlive Python), which torchrun
    reports as a failed rank although training finished. After a block
    that ran through, the ranks first meet at a barrier so that none
    tears the group down while another still talks to it; after an error
    the group is destroyed without waiting for ranks that may never come.
    """
    try:
        yield
    except BaseException:
        _destroy()
        raise
    if dist.is_available() and dist.is_initialized():
        dist.barrier()
    _destroy()


def _destroy() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def gather_batch_sizes(n: int, device: torch.device) -> List[int]:
    """Every rank's batch size (dim 0), in rank order."""
    if world_size() == 1:
        return [n]
    size = torch.tensor([n], dtype=torch.long, device=device)
    sizes = [torch.zeros_like(size) for _ in range(world_size())]
    dist.all_gather(sizes, size)
    return [int(s) for s in sizes]


def gather_rows(x: torch.Tensor, sizes: List[int]) -> torch.Tensor:
    """Every rank's ``x`` concatenated along dim 0 in rank order, no
    autograd; ``sizes`` from :func:`gather_batch_sizes`. Rows are padded to
    the largest batch for ``all_gather`` and trimmed."""
    if len(sizes) == 1:
        return x
    padded = x.new_zeros((max(sizes),) + tuple(x.shape[1:]))
    padded[:x.shape[0]] = x
    parts = [torch.empty_like(padded) for _ in sizes]
    dist.all_gather(parts, padded.contiguous())
    return torch.cat([p[:n] for p, n in zip(parts, sizes)])


class _GatherRowsWithGrad(torch.autograd.Function):
    """Forward: :func:`gather_rows`. Backward: the gradient of the gathered
    rows summed over the ranks (an all-reduce, so gloo works too), this
    rank's slice of it, times ``grad_scale``."""

    @staticmethod
    def forward(ctx, x, sizes, rank, grad_scale):
        ctx.sizes, ctx.rank, ctx.grad_scale = sizes, rank, grad_scale
        return gather_rows(x, sizes)

    @staticmethod
    def backward(ctx, grad):
        grad = grad.contiguous().clone()
        dist.all_reduce(grad, op=dist.ReduceOp.SUM)
        start = sum(ctx.sizes[:ctx.rank])
        local = grad[start:start + ctx.sizes[ctx.rank]]
        if ctx.grad_scale != 1:
            local = local * ctx.grad_scale
        return local, None, None, None


def all_gather_with_grad(x: torch.Tensor, sizes: List[int] = None,
                         grad_scale: float = 1.0) -> torch.Tensor:
    """Every rank's ``x`` concatenated (dim 0); the gradient flows back to
    this rank's rows, summed over ranks and times ``grad_scale``.

    With a loss every rank computes identically on the gathered batch, the
    default (``grad_scale=1``) and DDP's averaging of parameter gradients
    give the single-process gradient of that loss on the whole batch. With
    a loss split across ranks whose sum is the global loss (a sharded
    head), ``grad_scale=world size`` undoes DDP's averaging. Returns ``x``
    without ``torch.distributed`` or with one process."""
    rank, world = get_dist_info()
    if world <= 1:
        return x
    if sizes is None:
        sizes = gather_batch_sizes(x.shape[0], x.device)
    return _GatherRowsWithGrad.apply(x, sizes, rank, grad_scale)

