"""PartialFC: model-parallel class centres with sampled negatives.

An et al., "Partial FC: Training 10 Million Identities on a Single Machine",
ICCVW 2021, arXiv 2010.05222, and "Killing Two Birds with One Stone:
Efficient and Robust Training of Face Recognition CNNs by Partial FC", CVPR
2022, arXiv 2203.15565. Written from the papers' description following the
structure of insightface ``recognition/arcface_torch/partial_fc_v2.py``
(``PartialFC_V2``, its ``AllGather`` and ``DistCrossEntropy``).
"""
import math
from typing import Dict, List, Optional

import torch
import torch.distributed as dist

from kdzoo.registry import HEADS
from kdzoo.utils import ConfigError, check_int, check_number, no_autocast
from kdzoo.utils.dist import (all_gather_with_grad, gather_batch_sizes,
                              gather_rows, get_dist_info)
from .arcface import arc_margin
from .base import BaseMarginHead

MARGINS = ('arcface', 'cosface')


def _all_reduce(tensor: torch.Tensor, op: str, world_size: int
                ) -> torch.Tensor:
    """In-place all-reduce (``op``: ``'sum'`` or ``'max'``) across ranks;
    a no-op for a single process."""
    if world_size > 1:
        dist.all_reduce(tensor, op=dist.ReduceOp.MAX if op == 'max'
                        else dist.ReduceOp.SUM)
    return tensor


class _DistCrossEntropy(torch.autograd.Function):
    """Softmax cross-entropy over class columns split across ranks.

    ``logits`` ``(B, n_local)`` are this rank's columns for the global batch;
    ``target`` ``(B,)`` is the local column of each row's label or -1 where
    another rank owns it. Forward: row max (all-reduce MAX), sum of
    exponentials (all-reduce SUM), target logit from its owner (all-reduce
    SUM); the loss is ``mean_i(log Σ_j e^{z_ij} − z_{i,y_i})`` over the
    global batch, identical on every rank. Backward is local: the gradient
    of that loss with respect to this rank's columns,
    ``(softmax − one_hot) / B``.
    """

    @staticmethod
    def forward(ctx, logits, target, world_size):
        with torch.no_grad():
            row_max = _all_reduce(logits.max(dim=1).values, 'max',
                                  world_size)
            exp = (logits - row_max.unsqueeze(1)).exp()
            sum_exp = _all_reduce(exp.sum(dim=1), 'sum', world_size)
            owned = target >= 0
            index = target.clamp_min(0).unsqueeze(1)
            target_logit = torch.where(
                owned, logits.gather(1, index).squeeze(1),
                logits.new_zeros(()))
            _all_reduce(target_logit, 'sum', world_size)
            per_row = sum_exp.log() + row_max - target_logit
            count = max(per_row.shape[0], 1)
            loss = per_row.sum() / count
            prob = exp / sum_exp.unsqueeze(1)
        ctx.save_for_backward(prob, target)
        ctx.count = count
        return loss

    @staticmethod
    def backward(ctx, grad_loss):
        prob, target = ctx.saved_tensors
        grad = prob.clone()
        rows = (target >= 0).nonzero(as_tuple=True)[0]
        grad[rows, target[rows]] -= 1.0
        grad *= grad_loss / ctx.count
        return grad, None, None


@HEADS.register_module()
class PartialFC(BaseMarginHead):
    """PartialFC head: class centres sharded over ranks, sampled negatives.

    An et al., ICCVW 2021, arXiv 2010.05222 (Partial FC) and CVPR 2022,
    arXiv 2203.15565 (PFC); follows arcface_torch ``partial_fc_v2.py``.

    * **Sharding.** With ``W`` ranks (``torch.distributed`` initialised when
      the head is built; otherwise ``W = 1``), rank ``r`` holds the
      contiguous classes ``[class_start, class_start + num_local)``,
      ``num_local = C // W + (r < C % W)`` as arcface_torch. ``weight`` is
      a ``Parameter`` of shape ``(num_local, embedding_size)``, initialised
      as this rank's rows of one ``N(0, init_std²)`` ``(C, D)`` matrix
      (the same centres whatever the world size; ``KdzooRunner`` keeps
      the shards out of mmengine's rank-0 weight broadcast).
    * **Training** (:meth:`loss`): embeddings and labels are all-gathered
      (the embeddings through an autograd-aware gather, batch sizes may
      differ between ranks); cosines of the global batch against this
      rank's (sampled) centres; the margin (``'arcface'``: the
      differentiable ``s·cos(θ_y + m)`` with fallback of
      :class:`~kdzoo.heads.ArcFace`; ``'cosface'``: ``s·(cos θ_y − m)``) on
      the target columns this rank owns; distributed softmax cross-entropy
      (all-reduced row max, sum of exponentials and target logit).
      ``loss_cls`` is the mean over the **global** batch and has the same
      value on every rank.
    * **Gradients.** ``weight.grad`` on each rank is the gradient of that
      loss for its own shard. The gradient returned to a rank's local
      embeddings is ``W ×`` the gradient of the loss (arcface_torch's
      "magic number"): DistributedDataParallel averages the backbone
      gradients over the ranks, which brings it back to exactly the
      gradient of the global loss. Single process: ``W = 1``, the ordinary
      margin softmax.
    * **Sampling** (``sample_rate < 1``): per step and per rank, every
      centre whose class occurs in the global batch is kept, plus random
      other centres, so ``max(#positives, max(1, int(sample_rate ·
      num_local)))`` centres take part; labels are remapped with
      ``searchsorted``. The other centres get a zero gradient this step.
      The sorted local indices of the last sampled centres are kept in
      ``last_index`` (``None`` without sampling), e.g. to compute teacher
      logits on the same subset.
    * **Without labels**, ``forward(emb)`` returns the margin-free logits
      ``s·cos θ`` of the *local* batch against the *local* shard,
      ``(B, num_local)`` (the full ``(B, C)`` only with ``W = 1``);
      ``forward(emb, labels)`` likewise, with the margin on the columns
      this rank owns. Neither communicates. Evaluation uses embeddings.
    * **Checkpoints** hold the whole ``(C, D)`` centre matrix: under DDP
      ``KdzooRunner.save_checkpoint`` gathers every rank's rows (and their
      optimizer state) before rank 0 writes, and ``head.pth`` is gathered
      the same way (``kdzoo.engine.sharded_heads``). Loading a ``(C, D)``
      ``weight`` keeps this rank's rows, so a run resumes on any world
      size; a ``(num_local, D)`` shard loads only where it fits exactly
      (``state_dict()`` of one rank is its shard); any other shape is a
      size mismatch naming both shapes (an error when loading strictly, a
      warning with mmengine's non-strict ``load_from``).
    * **DDP.** The shards differ between ranks, so DistributedDataParallel
      must not average their gradients: ``ddp_ignore_params`` lists the
      parameter names (relative to the head) that the wrapper has to
      register with ``torch.nn.parallel.DistributedDataParallel.
      _set_params_and_buffers_to_ignore_for_model(model, [full names])``
      before wrapping the model.

    Args:
        num_classes: number of identities ``C``, at least the world size.
        embedding_size, s, eps, init_std: see :class:`BaseMarginHead`.
        margin: ``'arcface'`` (default) or ``'cosface'``.
        m: the margin (0.5, ArcFace's default; arcface_torch's CosFace
            configs use 0.4). ``'arcface'``: radians, ``0 <= m < π``.
        sample_rate: fraction of the local centres sampled per step, in
            ``(0, 1]`` (1.0: no sampling, plain model parallelism).

    Attributes:
        rank, world_size, num_local, class_start: the sharding.
    """

    ddp_ignore_params = ('weight',)
    # parameters split by rows (classes) over the ranks
    row_sharded_params = ('weight',)

    def __init__(self, num_classes: int, embedding_size: int, s: float = 64.0,
                 margin: str = 'arcface', m: float = 0.5,
                 sample_rate: float = 1.0, eps: float = 1e-7,
                 init_std: float = 0.01):
        name = type(self).__name__
        num_classes = check_int(name, 'num_classes', num_classes)
        rank, world_size = get_dist_info()
        if num_classes < world_size:
            raise ConfigError(f'{name}: num_classes must be >= the world size '
                              f'({world_size}) so that every rank holds at '
                              f'least one class centre, got {num_classes!r}')
        num_local = num_classes // world_size + int(
            rank < num_classes % world_size)
        class_start = num_classes // world_size * rank + min(
            rank, num_classes % world_size)
        # one seed for the whole centre matrix, taken before anything else
        # draws from the global RNG (see _init_shard)
        seed = int(torch.randint(0, 2**62, (1, )))
        rng_after_seed = torch.get_rng_state()
        # the base head allocates only this rank's shard (its init draws a
        # rank-dependent amount: undone below, so ranks' RNGs stay in step)
        super().__init__(num_local, embedding_size, s=s, m=m, eps=eps,
                         init_std=init_std)
        torch.set_rng_state(rng_after_seed)
        self.num_classes = num_classes
        self.rank, self.world_size = rank, world_size
        self.num_local, self.class_start = num_local, class_start
        if margin not in MARGINS:
            raise ConfigError(f'{name}: margin must be one of {MARGINS}, got '
                              f'{margin!r}')
        self.margin = margin
        if margin == 'arcface' and self.m >= math.pi:
            raise ConfigError(f'{name}: m is an angle in radians for '
                              f"margin='arcface' and must be in [0, pi), got "
                              f'{m!r}')
        self.sample_rate = check_number(name, 'sample_rate', sample_rate,
                                        low=0, high=1, low_open=True)
        self.num_sample = max(1, int(self.sample_rate * num_local))
        self.last_index = None
        self._init_shard(seed, init_std)

    @torch.no_grad()
    def _init_shard(self, seed: int, init_std: float) -> None:
        """This rank's rows of one ``N(0, init_std²)`` ``(C, D)`` matrix.

        Ranks are seeded alike, so drawing the shard directly would give
        every rank the same centres for different classes. One seed is
        taken from the global RNG (same on every rank) and the whole matrix
        is drawn chunk by chunk from it, keeping only this rank's rows: the
        centres are distinct and do not depend on the world size (with
        ``randomness.diff_rank_seed=True`` each rank takes its rows of its
        own matrix: still distinct). Drawing C×D normals costs seconds at a
        million classes, once.
        """
        gen = torch.Generator().manual_seed(seed)
        dim, start, stop = (self.embedding_size, self.class_start,
                            self.class_start + self.num_local)
        chunk = max(1, 2**20 // dim)
        for lo in range(0, stop, chunk):
            # chunks fixed by C (randn's stream depends on the draw size)
            rows = torch.randn(min(chunk, self.num_classes - lo), dim,
                               generator=gen)
            first, end = max(start, lo), min(stop, lo + rows.shape[0])
            if first < end:
                self.weight[first - start:end - start] = \
                    rows[first - lo:end - lo] * init_std

    # ------------------------------------------------------------ helpers
    def _check_world(self) -> None:
        rank, world_size = get_dist_info()
        if (rank, world_size) != (self.rank, self.world_size):
            raise RuntimeError(
                f'PartialFC was built for rank {self.rank} of '
                f'{self.world_size} but runs on rank {rank} of {world_size}: '
                'build the head after torch.distributed is initialised')

    def _local_target(self, labels: torch.Tensor) -> torch.Tensor:
        """Local column of each global label, -1 where another rank owns it."""
        local = labels - self.class_start
        owned = (local >= 0) & (local < self.num_local)
        return torch.where(owned, local, torch.full_like(local, -1))

    def _apply_margin(self, cos: torch.Tensor,
                      target: torch.Tensor) -> torch.Tensor:
        """``cos`` with the margin on ``target`` columns (rows with -1
        unchanged)."""
        owned = target >= 0
        index = target.clamp_min(0)
        cos_y = self.target_cosine(cos, index)
        if self.margin == 'arcface':
            _, new = arc_margin(cos_y, self.m)
        else:
            new = cos_y - self.m
        return self.replace_target(cos, index, torch.where(owned, new, cos_y))

    def margin_cosine(self, cos, labels):
        return self._apply_margin(cos, self._local_target(labels))

    @torch.no_grad()
    def sample(self, target: torch.Tensor) -> torch.Tensor:
        """Sorted local indices of the centres used this step.

        ``target``: local columns of the global batch's labels (-1: not
        owned). Keeps every positive plus random negatives, up to
        ``num_sample`` in all.
        """
        positive = torch.unique(target[target >= 0], sorted=True)
        if self.num_sample <= positive.numel():
            return positive
        score = torch.rand(self.num_local, device=target.device)
        score[positive] = 2.0
        return score.topk(self.num_sample).indices.sort().values

    # ------------------------------------------------------------ shards
    def rows_per_rank(self) -> List[int]:
        """``num_local`` of every rank, in rank order."""
        c, w = self.num_classes, self.world_size
        return [c // w + int(r < c % w) for r in range(w)]

    def gather_rows(self, shard: torch.Tensor,
                    dst: int = 0) -> Optional[torch.Tensor]:
        """The ``(C, ...)`` whole of a row-sharded tensor (``weight`` or
        its optimizer state) on rank ``dst``, ``None`` on the others (only
        one rank holds the whole matrix); a collective: every rank must
        call it."""
        self._check_world()
        if self.world_size == 1:
            return shard
        counts = self.rows_per_rank()
        padded = shard.new_zeros((max(counts), ) + tuple(shard.shape[1:]))
        padded[:shard.shape[0]] = shard.detach()
        parts = [torch.empty_like(padded) for _ in counts] \
            if self.rank == dst else None
        dist.gather(padded, parts, dst=dst)
        if parts is None:
            return None
        return torch.cat([p[:n] for p, n in zip(parts, counts)])

    def local_rows(self, full: torch.Tensor) -> torch.Tensor:
        """This rank's rows of a ``(C, ...)`` tensor."""
        return full[self.class_start:self.class_start + self.num_local]

    def _load_from_state_dict(self, state_dict, prefix, local_metadata,
                              strict, missing_keys, unexpected_keys,
                              error_msgs):
        key = prefix + 'weight'
        value = state_dict.get(key)
        if isinstance(value, torch.Tensor) and \
                tuple(value.shape) != tuple(self.weight.shape):
            if value.dim() == 2 and value.shape[1] == self.embedding_size \
                    and value.shape[0] == self.num_classes:
                state_dict[key] = self.local_rows(value)
            else:
                # reported like any size mismatch: an error with strict
                # loading, a warning otherwise (mmengine's load_from)
                state_dict = {k: v for k, v in state_dict.items()
                              if k != key}
                error_msgs.append(
                    f'{key}: the checkpoint holds PartialFC centres of shape '
                    f'{tuple(value.shape)}, but this head needs '
                    f'({self.num_classes}, {self.embedding_size}) (all '
                    f'classes) or its rank-{self.rank} shard '
                    f'{tuple(self.weight.shape)}; set num_classes/'
                    'embedding_size to match the checkpoint (a shard saved '
                    'by one rank of another world size cannot be restored)')
        super()._load_from_state_dict(state_dict, prefix, local_metadata,
                                      strict, missing_keys, unexpected_keys,
                                      error_msgs)

    # ------------------------------------------------------------ training
    def loss(self, emb: torch.Tensor,
             labels: torch.Tensor) -> Dict[str, torch.Tensor]:
        """``dict(loss_cls=...)``: distributed margin softmax CE over the
        global batch (see the class docstring)."""
        self.check_embedding(emb)
        labels = self.check_labels(labels, emb)
        self._check_world()
        dtype = self._compute_dtype(emb)
        with no_autocast(emb.device.type):
            emb = emb.to(dtype)
            if self.world_size > 1:
                # every rank's loss is its shard's part of the global loss:
                # the embeddings' gradient comes back summed over the ranks,
                # times the world size against DDP's averaging (as
                # arcface_torch's AllGather)
                sizes = gather_batch_sizes(emb.shape[0], emb.device)
                emb = all_gather_with_grad(emb, sizes,
                                           grad_scale=self.world_size)
                labels = gather_rows(labels, sizes)
            target = self._local_target(labels)
            weight = self.weight.to(device=emb.device, dtype=dtype)
            if self.num_sample < self.num_local:
                index = self.sample(target)
                self.last_index = index
                weight = weight[index]
                owned = target >= 0
                remapped = torch.searchsorted(index, target.clamp_min(0))
                target = torch.where(owned, remapped, target)
            else:
                self.last_index = None
            emb_n = torch.nn.functional.normalize(emb, dim=1)
            weight_n = torch.nn.functional.normalize(weight, dim=1)
            cos = emb_n.matmul(weight_n.t()).clamp(-1.0 + self.eps,
                                                   1.0 - self.eps)
            logits = self.s * self._apply_margin(cos, target)
            loss = _DistCrossEntropy.apply(logits, target, self.world_size)
        return dict(loss_cls=loss)

    def extra_repr(self) -> str:
        return (super().extra_repr() + f", margin='{self.margin}', "
                f'sample_rate={self.sample_rate}, rank={self.rank}, '
                f'world_size={self.world_size}, num_local={self.num_local}, '
                f'class_start={self.class_start}')
