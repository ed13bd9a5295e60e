"""Skip-and-count for unreadable training items (corrupt JPEG, bad record).

By default a bad item stops training with a ``DataError`` naming the file
and item. With ``on_bad_item='skip'`` a training dataset logs it, counts it
and serves another item instead (mmengine's ``BaseDataset`` refetch), up to
``max_bad_items`` (per process); the count, summed over the DDP ranks,
is reported in ``results.json`` (``bad_items_skipped``). Test sets never
skip: a missing image would shift every verification pair.

The count lives in shared memory, so items skipped inside DataLoader worker
processes are counted too (workers forked from the trainer, mmengine's
default on Linux; with the ``spawn`` start method workers count only their
own).
"""
import multiprocessing
from typing import Optional

from mmengine.logging import print_log

from kdzoo.utils.errors import ConfigError, DataError

__all__ = ['SkipBadItemsMixin', 'BAD_ITEM_POLICIES']

BAD_ITEM_POLICIES = ('raise', 'skip')
_LOGGED = 10  # bad items logged one by one; later ones are only counted


class SkipBadItemsMixin:
    """Mix into an mmengine ``BaseDataset`` whose ``get_data_info`` raises
    ``DataError`` for an unreadable item (before ``BaseDataset``).

    Args (keyword, taken before the dataset's own):
        on_bad_item: ``'raise'`` (default) or ``'skip'``.
        max_bad_items: with ``'skip'``, stop with a ``DataError`` once more
            than this many items were bad (``None``: no limit).
    """

    def __init__(self, *args, on_bad_item: str = 'raise',
                 max_bad_items: Optional[int] = None, **kwargs):
        owner = type(self).__name__
        if on_bad_item not in BAD_ITEM_POLICIES:
            raise ConfigError(f'{owner}: on_bad_item must be one of '
                              f'{BAD_ITEM_POLICIES}, got {on_bad_item!r}')
        if max_bad_items is not None and (
                isinstance(max_bad_items, bool)
                or not isinstance(max_bad_items, int) or max_bad_items < 0):
            raise ConfigError(f'{owner}: max_bad_items must be an integer '
                              f'>= 0 or None, got {max_bad_items!r}')
        self.on_bad_item = on_bad_item
        self.max_bad_items = max_bad_items
        self._bad_count = multiprocessing.Value('l', 0)
        super().__init__(*args, **kwargs)

    @property
    def bad_item_count(self) -> int:
        """Items skipped so far (0 when none, or with ``'raise'``)."""
        counter = getattr(self, '_bad_count', None)
        return int(counter.value) if counter is not None else 0

    def prepare_data(self, idx):
        if self.on_bad_item == 'raise' or self.test_mode:
            return super().prepare_data(idx)
        try:
            return super().prepare_data(idx)
        except DataError as e:
            with self._bad_count.get_lock():
                self._bad_count.value += 1
                count = self._bad_count.value
            if self.max_bad_items is not None and count > self.max_bad_items:
                raise DataError(
                    f'{e} -- more than max_bad_items={self.max_bad_items} '
                    f'bad training items; fix the data or raise the '
                    'limit') from None
            if count <= _LOGGED:
                print_log(f'skipping bad training item {idx} ({count} so '
                          f'far): {e}', logger='current', level=30)
            return None  # BaseDataset serves another item

    def __getstate__(self):
        # forked workers inherit the shared counter; a pickled copy (spawned
        # workers) cannot carry it and counts on its own
        state = self.__dict__.copy()
        state['_bad_count'] = None
        return state

    def __setstate__(self, state):
        self.__dict__.update(state)
        self._bad_count = multiprocessing.Value('l', 0)
