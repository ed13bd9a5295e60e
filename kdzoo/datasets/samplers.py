"""Identity-balanced (P identities x K images) sampling for pair-based KD."""
import math
from collections import OrderedDict
from typing import Iterator, List, Optional

import torch
from mmengine.dataset import BaseDataset
from mmengine.dist import get_dist_info, sync_random_seed
from torch.utils.data import Sampler

from kdzoo.registry import DATA_SAMPLERS
from kdzoo.utils import ConfigError, check_int


def dataset_labels(dataset) -> List[int]:
    """Identity label of every item, read once from ``get_data_info``.

    For an mmengine ``BaseDataset`` the stored annotation is read through
    ``BaseDataset.get_data_info`` (a subclass's override may decode the image,
    e.g. ``SynthFaceAge``; the label is in the stored annotation); any other
    dataset must provide ``get_data_info(i)['label']``.
    """
    if not hasattr(dataset, 'get_data_info'):
        raise ConfigError(
            'IdentityBalancedSampler: the dataset '
            f'{type(dataset).__name__} has no get_data_info(i); the sampler '
            'needs get_data_info(i)["label"] for every item')
    fast = isinstance(dataset, BaseDataset)
    labels = []
    for i in range(len(dataset)):
        info = BaseDataset.get_data_info(dataset, i) if fast else None
        if info is None or 'label' not in info:
            info = dataset.get_data_info(i)
        if 'label' not in info:
            raise ConfigError(
                'IdentityBalancedSampler: get_data_info(' f'{i}) of '
                f'{type(dataset).__name__} has no "label" (keys: '
                f'{sorted(info)}); the sampler groups items by identity label')
        labels.append(int(info['label']))
    return labels


@DATA_SAMPLERS.register_module()
class IdentityBalancedSampler(Sampler):
    """Yields P identities x K images per block of ``P*K`` indices.

    Every consecutive block of ``num_identities * images_per_identity``
    indices holds ``num_identities`` (P) distinct identities with
    ``images_per_identity`` (K) images each, so every batch contains
    positive pairs (EKD, DDL, triplet distillation need them). Set the
    DataLoader's ``batch_size`` to exactly ``P*K`` (per GPU), e.g.::

        train_dataloader = dict(
            batch_size=32,  # = 8 x 4
            sampler=dict(type='IdentityBalancedSampler', num_identities=8,
                         images_per_identity=4), ...)

    Epoch length (``epoch_length``): ``'dataset'`` (default) gives as many
    P×K blocks as a plain sampler gives batches, ``len(dataset) // (P*K)``,
    so a balanced recipe trains the same number of steps per epoch as its
    baseline: identities are shuffled (seed + epoch) and cut into full
    blocks of P, pass after pass, each pass a new permutation.
    ``'identities'`` visits every identity once: ``ceil(#ids / P)`` blocks. Within an identity
    K images are drawn without replacement; an identity with fewer than K
    images contributes all of its images plus random repeats (sampling with
    replacement). With ``shuffle=False`` identities come in label order and
    each gives its first K images (cycled if fewer).

    Distributed (rank and world size from ``mmengine.dist.get_dist_info``):
    every rank builds the same block list and takes blocks ``rank,
    rank + W, ...`` (a block-level split, so ranks get disjoint blocks).
    ``round_up=True`` completes the last block and pads the block list to a
    multiple of the world size with identities from the start of the
    shuffled order, so every rank has the same length and every block is
    full (a few identities repeat, as ``DefaultSampler``'s round-up). With
    ``round_up=False`` nothing is added: the last block may hold fewer than
    P identities and ranks may differ by one block (do not use under DDP).

    Args:
        dataset: needs ``__len__`` and ``get_data_info(i)['label']``.
        num_identities: P, identities per batch (TFace EKD: 8).
        images_per_identity: K, images per identity (TFace EKD: 4).
        shuffle: shuffle identities and images every epoch.
        seed: base seed; ``None`` draws one shared by all ranks
            (``mmengine.dist.sync_random_seed``).
        round_up: see above.
        epoch_length: ``'dataset'`` or ``'identities'``, see above.
    """

    def __init__(self, dataset, num_identities: int = 8,
                 images_per_identity: int = 4, shuffle: bool = True,
                 seed: Optional[int] = None, round_up: bool = True,
                 epoch_length: str = 'dataset') -> None:
        owner = 'IdentityBalancedSampler'
        self.num_identities = check_int(owner, 'num_identities',
                                        num_identities)
        self.images_per_identity = check_int(owner, 'images_per_identity',
                                             images_per_identity)
        rank, world_size = get_dist_info()
        self.rank, self.world_size = rank, world_size
        self.dataset = dataset
        self.shuffle = bool(shuffle)
        self.seed = sync_random_seed() if seed is None else int(seed)
        self.round_up = bool(round_up)
        if epoch_length not in ('dataset', 'identities'):
            raise ConfigError(
                "IdentityBalancedSampler: epoch_length must be 'dataset' or "
                f"'identities', got {epoch_length!r}")
        self.epoch_length = epoch_length
        self.epoch = 0

        groups = OrderedDict()
        for idx, label in enumerate(dataset_labels(dataset)):
            groups.setdefault(label, []).append(idx)
        self.identities = sorted(groups)
        self.index_groups = [groups[label] for label in self.identities]
        num_ids = len(self.identities)
        if num_ids < self.num_identities:
            raise ConfigError(
                f'IdentityBalancedSampler: num_identities='
                f'{self.num_identities} but the dataset '
                f'{type(dataset).__name__} has only {num_ids} identities; '
                f'use num_identities <= {num_ids}')

        if epoch_length == 'dataset':
            blocks = max(1, len(dataset) // self.batch_size)
            self.num_blocks = (math.ceil(blocks / world_size) * world_size
                               if self.round_up else blocks)
            rank_blocks = len(range(rank, self.num_blocks, world_size))
            self.num_samples = rank_blocks * self.batch_size
            return
        blocks = math.ceil(num_ids / self.num_identities)
        if self.round_up:
            self.num_blocks = math.ceil(blocks / world_size) * world_size
            rank_blocks = self.num_blocks // world_size
            self.num_samples = (rank_blocks * self.num_identities
                                * self.images_per_identity)
        else:
            self.num_blocks = blocks
            ids_left = num_ids - rank * self.num_identities
            count = 0
            while ids_left > 0:  # this rank's blocks rank, rank + W, ...
                count += min(ids_left, self.num_identities)
                ids_left -= world_size * self.num_identities
            self.num_samples = count * self.images_per_identity

    @property
    def batch_size(self) -> int:
        """The DataLoader batch size this sampler is laid out for (P*K)."""
        return self.num_identities * self.images_per_identity

    def _images(self, group: List[int], g) -> List[int]:
        k = self.images_per_identity
        if not self.shuffle:
            return [group[i % len(group)] for i in range(k)]
        order = torch.randperm(len(group), generator=g).tolist()
        chosen = [group[i] for i in order[:k]]
        if len(chosen) < k:
            extra = torch.randint(len(group), (k - len(chosen),),
                                  generator=g).tolist()
            chosen += [group[i] for i in extra]
            chosen = [chosen[i] for i in torch.randperm(k, generator=g)]
        return chosen

    def __iter__(self) -> Iterator[int]:
        g = torch.Generator()
        g.manual_seed(self.seed + self.epoch)
        num_ids = len(self.identities)
        p = self.num_identities
        if self.epoch_length == 'dataset':
            blocks = []
            while len(blocks) < self.num_blocks:  # one permutation per pass
                order = (torch.randperm(num_ids, generator=g).tolist()
                         if self.shuffle else list(range(num_ids)))
                blocks += [order[b * p:(b + 1) * p]
                           for b in range(num_ids // p)]
            blocks = blocks[:self.num_blocks]
        else:
            if self.shuffle:
                order = torch.randperm(num_ids, generator=g).tolist()
            else:
                order = list(range(num_ids))
            if self.round_up:  # wrap around: full blocks, a multiple of W
                need = self.num_blocks * self.num_identities
                order = (order * math.ceil(need / num_ids))[:need]
            blocks = [order[b * p:(b + 1) * p]
                      for b in range(self.num_blocks)]
        indices = []
        for block in blocks[self.rank::self.world_size]:
            for ident in block:
                indices.extend(self._images(self.index_groups[ident], g))
        return iter(indices)

    def __len__(self) -> int:
        """The number of indices this rank yields per epoch."""
        return self.num_samples

    def set_epoch(self, epoch: int) -> None:
        """Reshuffle for ``epoch`` (the runner calls it every epoch)."""
        self.epoch = epoch
