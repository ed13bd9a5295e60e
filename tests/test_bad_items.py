"""Skip-and-count for unreadable training items."""
import os

import numpy as np
import pytest
import torch
from PIL import Image

from kdzoo.registry import DATASETS
from kdzoo.utils.errors import ConfigError, DataError


def _folder(root, identities=3, per_identity=4, size=8):
    rng = np.random.default_rng(0)
    for i in range(identities):
        os.makedirs(root / f'id{i}')
        for j in range(per_identity):
            img = rng.integers(0, 256, (size, size, 3), dtype=np.uint8)
            Image.fromarray(img).save(root / f'id{i}' / f'{j}.png')
    return root


def _corrupt(path):
    with open(path, 'wb') as f:
        f.write(b'\x89PNG broken')


def _build(root, **kw):
    return DATASETS.build(dict(type='ImageFolderFaces', data_root=str(root),
                               **kw))


def _replace_with(ds, index):
    """mmengine draws the replacement of a skipped item at random (numpy's
    global RNG); pin it to a known good item so counts are exact."""
    ds._rand_another = lambda: index
    return ds


def test_default_raises_naming_the_file(tmp_path):
    root = _folder(tmp_path / 'faces')
    _corrupt(root / 'id1' / '2.png')
    ds = _build(root)  # sorted order: id1/2.png is item 6
    with pytest.raises(DataError, match=r'id1/2\.png: image 6 cannot be '
                       'decoded'):
        ds[6]


def test_skip_serves_another_item_and_counts(tmp_path):
    root = _folder(tmp_path / 'faces')
    _corrupt(root / 'id1' / '2.png')  # sorted order: item 6
    _corrupt(root / 'id2' / '0.png')  # item 8
    ds = _replace_with(_build(root, on_bad_item='skip'), 0)
    served = [ds[i]['data_samples']['index'] for i in range(len(ds))]
    # the two bad items were replaced by item 0, the others served as is
    assert served == [0, 1, 2, 3, 4, 5, 0, 7, 0, 9, 10, 11]
    assert ds.bad_item_count == 2
    # every good item is served as itself
    good = [i for i in range(12) if i not in (6, 8)]
    for i in good:
        assert ds[i]['data_samples']['index'] == i
    assert ds.bad_item_count == 2
    ds[6]
    assert ds.bad_item_count == 3  # counted each time it is met


def test_skip_limit_and_test_mode(tmp_path):
    root = _folder(tmp_path / 'faces')
    _corrupt(root / 'id0' / '1.png')
    _corrupt(root / 'id0' / '3.png')
    ds = _replace_with(_build(root, on_bad_item='skip', max_bad_items=1), 0)
    assert ds[1]['data_samples']['index'] == 0
    with pytest.raises(DataError, match='more than max_bad_items=1'):
        ds[3]
    # a test set never skips: pairs would shift
    ds = _build(root, on_bad_item='skip', test_mode=True)
    with pytest.raises(DataError, match='cannot be decoded'):
        ds[1]


def test_bad_policy_arguments(tmp_path):
    root = _folder(tmp_path / 'faces')
    with pytest.raises(ConfigError, match="on_bad_item must be one of"):
        _build(root, on_bad_item='ignore')
    with pytest.raises(ConfigError, match='max_bad_items'):
        _build(root, on_bad_item='skip', max_bad_items=-1)


def test_workers_count_into_the_shared_counter(tmp_path):
    root = _folder(tmp_path / 'faces')
    _corrupt(root / 'id1' / '2.png')
    _corrupt(root / 'id2' / '3.png')
    ds = _replace_with(_build(root, on_bad_item='skip'), 0)
    loader = torch.utils.data.DataLoader(
        ds, batch_size=4, num_workers=2,
        multiprocessing_context='fork',
        collate_fn=lambda b: b)
    served = sorted(item['data_samples']['index']
                    for batch in loader for item in batch)
    assert served == [0, 0, 0, 1, 2, 3, 4, 5, 7, 8, 9, 10]
    assert ds.bad_item_count == 2  # counted in the workers, seen here


def test_record_file_corruption_is_skipped(tmp_path):
    from kdzoo.datasets.pack import pack_image_folder
    root = _folder(tmp_path / 'faces')
    rec, idx = str(tmp_path / 'train.rec'), str(tmp_path / 'train.idx')
    pack_image_folder(str(root), rec, idx)
    ds = DATASETS.build(dict(type='RecordIODataset', path_imgrec=rec,
                             path_imgidx=idx))
    # wipe the first image's JPEG markers (its record from the index)
    key, offset = open(idx).read().split('\n')[1].split('\t')
    with open(rec, 'r+b') as f:
        data = f.read()
        start = data.index(b'\xff\xd8', int(offset))
        f.seek(start)
        f.write(b'\x00' * 64)
    fresh = DATASETS.build(dict(type='RecordIODataset', path_imgrec=rec,
                                path_imgidx=idx))
    with pytest.raises(DataError, match=f'record {key} at offset {offset}'):
        fresh[0]
    skipping = _replace_with(DATASETS.build(dict(
        type='RecordIODataset', path_imgrec=rec, path_imgidx=idx,
        on_bad_item='skip')), 5)
    replaced = skipping[0]
    assert replaced['data_samples']['index'] == 5
    assert torch.equal(replaced['inputs'], ds[5]['inputs'])
    assert skipping.bad_item_count == 1


def _count_worker(rank, world, init_file, out_dir):
    import torch.distributed as dist
    from types import SimpleNamespace

    from kdzoo.engine.runner import _bad_items
    dist.init_process_group('gloo', init_method=f'file://{init_file}',
                            rank=rank, world_size=world)
    try:
        loader = SimpleNamespace(
            dataset=SimpleNamespace(bad_item_count=[2, 5][rank]))
        count = _bad_items(SimpleNamespace(_train_dataloader=loader))
        with open(os.path.join(out_dir, f'count{rank}'), 'w') as f:
            f.write(str(count))
    finally:
        dist.destroy_process_group()


def test_results_count_bad_items_of_every_rank(tmp_path):
    """results.json's bad_items_skipped is the sum over the ranks (2 gloo
    processes that skipped 2 and 5 items both report 7)."""
    import torch.multiprocessing as mp
    from types import SimpleNamespace

    from kdzoo.engine.runner import _bad_items
    one = SimpleNamespace(dataset=SimpleNamespace(bad_item_count=3))
    assert _bad_items(SimpleNamespace(_train_dataloader=one)) == 3
    assert _bad_items(SimpleNamespace(_train_dataloader=dict())) == 0
    mp.spawn(_count_worker, args=(2, str(tmp_path / 'init'), str(tmp_path)),
             nprocs=2, join=True)
    assert [(tmp_path / f'count{r}').read_text() for r in (0, 1)] == \
        ['7', '7']
