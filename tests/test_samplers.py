"""IdentityBalancedSampler: P x K blocks, epochs, determinism, ranks."""
from collections import Counter

import pytest
from mmengine.dataset import BaseDataset
from torch.utils.data import DataLoader

import kdzoo.datasets.samplers as samplers_module
from kdzoo.datasets.samplers import IdentityBalancedSampler
from kdzoo.registry import DATA_SAMPLERS
from kdzoo.utils import ConfigError


class FakeDataset:
    """Just ``__len__`` and ``get_data_info`` (labels given per item)."""

    def __init__(self, labels):
        self.labels = list(labels)

    def __len__(self):
        return len(self.labels)

    def get_data_info(self, idx):
        return dict(label=self.labels[idx], img=None)

    def __getitem__(self, idx):
        return idx


def counts_dataset(counts):
    """Identity ``i`` (label ``10 * i``, not contiguous) has counts[i] items;
    items are interleaved so indices are not grouped by identity."""
    labels = []
    left = list(counts)
    while any(left):
        for i, n in enumerate(left):
            if n:
                labels.append(10 * i)
                left[i] -= 1
    return FakeDataset(labels)


def blocks_of(indices, size):
    assert len(indices) % size == 0
    return [indices[i:i + size] for i in range(0, len(indices), size)]


def check_block(ds, block, p, k):
    labels = Counter(ds.labels[i] for i in block)
    assert len(labels) == p, labels
    assert set(labels.values()) == {k}, labels


def test_batch_composition_and_epoch_covers_identities():
    counts = [1, 2, 3, 4, 5, 6, 7, 2, 9, 4]  # 10 identities
    ds = counts_dataset(counts)
    sampler = IdentityBalancedSampler(ds, num_identities=4,
                                      images_per_identity=3, seed=0,
                                      epoch_length='identities')
    indices = list(sampler)
    assert len(indices) == len(sampler) == 3 * 4 * 3  # ceil(10/4) blocks
    blocks = blocks_of(indices, 12)
    seen = set()
    for block in blocks:
        check_block(ds, block, 4, 3)
        seen |= {ds.labels[i] for i in block}
    assert seen == set(ds.labels)  # every identity once (plus wrap-around)
    # an identity with >= K images gives K distinct ones
    for block in blocks:
        by_label = {}
        for i in block:
            by_label.setdefault(ds.labels[i], []).append(i)
        for label, idx in by_label.items():
            if counts[label // 10] >= 3:
                assert len(set(idx)) == 3
            else:  # fewer: all of its images, then repeats
                assert set(idx) == {j for j, lab in enumerate(ds.labels)
                                    if lab == label}
    assert sampler.batch_size == 12


def test_dataloader_batches_are_balanced():
    ds = counts_dataset([4] * 8)
    sampler = IdentityBalancedSampler(ds, num_identities=2,
                                      images_per_identity=2, seed=3)
    loader = DataLoader(ds, batch_size=sampler.batch_size, sampler=sampler)
    batches = [b.tolist() for b in loader]
    assert len(batches) == 8  # as many batches as a plain sampler gives
    for batch in batches:
        check_block(ds, batch, 2, 2)


def test_deterministic_and_set_epoch_changes_order():
    ds = counts_dataset([3, 5, 2, 6, 4, 4, 3, 7])
    a = IdentityBalancedSampler(ds, 2, 2, seed=7)
    b = IdentityBalancedSampler(ds, 2, 2, seed=7)
    assert list(a) == list(b)
    assert list(a) == list(a)  # re-iterating the same epoch
    first = list(a)
    a.set_epoch(1)
    b.set_epoch(1)
    assert list(a) != first
    assert list(a) == list(b)
    c = IdentityBalancedSampler(ds, 2, 2, seed=8)
    assert list(c) != first


def test_no_shuffle_is_label_order():
    ds = counts_dataset([1, 3, 2, 4])
    sampler = IdentityBalancedSampler(ds, 2, 2, shuffle=False, seed=0)
    indices = list(sampler)
    assert [ds.labels[i] for i in indices] == [0, 0, 10, 10, 20, 20, 30, 30]
    sampler.set_epoch(5)
    assert list(sampler) == indices


def test_seed_none_uses_sync_random_seed(monkeypatch):
    monkeypatch.setattr(samplers_module, 'sync_random_seed', lambda: 1234)
    sampler = IdentityBalancedSampler(counts_dataset([2] * 4), 2, 2)
    assert sampler.seed == 1234


def _rank_sampler(monkeypatch, ds, rank, world, **kwargs):
    monkeypatch.setattr(samplers_module, 'get_dist_info',
                        lambda: (rank, world))
    return IdentityBalancedSampler(ds, **kwargs)


def test_two_ranks_get_disjoint_blocks_of_equal_length(monkeypatch):
    ds = counts_dataset([3] * 16)  # 16 ids, P=4 -> 4 blocks, 2 per rank
    per_rank = []
    for rank in range(2):
        sampler = _rank_sampler(monkeypatch, ds, rank, 2, num_identities=4,
                                images_per_identity=2, seed=1,
                                epoch_length='identities')
        indices = list(sampler)
        assert len(indices) == len(sampler) == 2 * 8
        for block in blocks_of(indices, 8):
            check_block(ds, block, 4, 2)
        per_rank.append({ds.labels[i] for i in indices})
    assert per_rank[0].isdisjoint(per_rank[1])
    assert per_rank[0] | per_rank[1] == set(ds.labels)


def test_two_ranks_round_up_pads_to_equal_length(monkeypatch):
    ds = counts_dataset([2] * 10)  # P=4: 3 blocks -> padded to 4
    lengths, union = [], set()
    for rank in range(2):
        sampler = _rank_sampler(monkeypatch, ds, rank, 2, num_identities=4,
                                images_per_identity=2, seed=0,
                                epoch_length='identities')
        indices = list(sampler)
        lengths.append(len(indices))
        assert len(indices) == len(sampler)
        for block in blocks_of(indices, 8):
            check_block(ds, block, 4, 2)
        union |= {ds.labels[i] for i in indices}
    assert lengths == [16, 16]
    assert union == set(ds.labels)


def test_round_up_false_adds_nothing(monkeypatch):
    ds = counts_dataset([2] * 10)
    single = _rank_sampler(monkeypatch, ds, 0, 1, num_identities=4,
                           images_per_identity=2, seed=0, round_up=False,
                           epoch_length='identities')
    indices = list(single)
    assert len(indices) == len(single) == 10 * 2  # last block: 2 identities
    assert Counter(ds.labels[i] for i in indices) == Counter(
        {10 * i: 2 for i in range(10)})
    lengths = []
    for rank in range(2):  # blocks 0, 2 | 1 -> 8 + 4 ids | 4 ids
        sampler = _rank_sampler(monkeypatch, ds, rank, 2, num_identities=4,
                                images_per_identity=2, seed=0,
                                round_up=False, epoch_length='identities')
        lengths.append(len(sampler))
        assert len(list(sampler)) == len(sampler)
    assert lengths == [12, 8]


def test_dataset_epoch_length_matches_plain_sampler_steps(monkeypatch):
    ds = counts_dataset([16] * 10)  # 160 items, P*K = 8 -> 20 blocks
    sampler = IdentityBalancedSampler(ds, num_identities=4,
                                      images_per_identity=2, seed=0)
    indices = list(sampler)
    assert len(indices) == len(sampler) == 160
    blocks = blocks_of(indices, 8)
    for block in blocks:  # never the same identity twice in a block
        check_block(ds, block, 4, 2)
    per_label = Counter(ds.labels[i] for i in indices)
    # passes of 10 // 4 = 2 full blocks each: every identity is drawn in
    # (almost) every pass, so the counts stay close to uniform
    assert max(per_label.values()) - min(per_label.values()) <= 2 * 2 * 2
    # two ranks: equal lengths, 10 blocks each, disjoint positions
    lengths = []
    for rank in range(2):
        s = _rank_sampler(monkeypatch, ds, rank, 2, num_identities=4,
                          images_per_identity=2, seed=0)
        lengths.append(len(list(s)))
    assert lengths == [80, 80]
    with pytest.raises(ConfigError, match='epoch_length'):
        IdentityBalancedSampler(ds, 4, 2, seed=0, epoch_length='images')


def test_validation():
    ds = counts_dataset([2, 2, 2])
    with pytest.raises(ConfigError, match='IdentityBalancedSampler: '
                                          'num_identities=4.*only 3'):
        IdentityBalancedSampler(ds, num_identities=4, seed=0)
    for kwargs, arg in ((dict(num_identities=0), 'num_identities'),
                        (dict(num_identities=True), 'num_identities'),
                        (dict(images_per_identity=2.0),
                         'images_per_identity')):
        with pytest.raises(ConfigError, match=arg):
            IdentityBalancedSampler(ds, seed=0, **kwargs)
    with pytest.raises(ConfigError, match='get_data_info'):
        IdentityBalancedSampler(list(range(4)), 1, 1, seed=0)

    class NoLabel(FakeDataset):
        def get_data_info(self, idx):
            return dict(img=None)

    with pytest.raises(ConfigError, match='"label"'):
        IdentityBalancedSampler(NoLabel([0, 1]), 1, 1, seed=0)


class TinyBaseDataset(BaseDataset):
    """A lazily initialised mmengine dataset whose get_data_info is costly
    (decodes an image, like SynthFaceAge); the sampler reads the stored
    annotation instead."""

    def __init__(self, labels, **kwargs):
        self._labels = labels
        super().__init__(lazy_init=True, **kwargs)

    def load_data_list(self):
        return [dict(label=lab, img_index=i)
                for i, lab in enumerate(self._labels)]

    def get_data_info(self, idx):
        raise AssertionError('sampler should not decode images')


def test_mmengine_base_dataset_and_registry():
    ds = TinyBaseDataset([0, 1, 2, 0, 1, 2, 3, 3])
    sampler = DATA_SAMPLERS.build(dict(type='IdentityBalancedSampler',
                                       dataset=ds, num_identities=2,
                                       images_per_identity=2, seed=0))
    assert isinstance(sampler, IdentityBalancedSampler)
    indices = list(sampler)
    assert len(indices) == 8
    for block in blocks_of(indices, 4):
        labels = Counter(ds._labels[i] for i in block)
        assert len(labels) == 2 and set(labels.values()) == {2}
