"""Face training images stored as one folder per identity.

``<data_root>/<identity>/<image>.jpg``: identities are labelled ``0 .. C-1``
in sorted folder-name order (after the optional filters), the layout of
torchvision's ``ImageFolder`` and of InsightFace's unpacked training sets.

A seeded share of the identities can be held out as a validation part
(``split='train'`` / ``'val'``), and :class:`ImageFolderVerification` turns
such a part into a verification protocol, so that loss weights and other
settings are tuned on held-out training identities, never on the test sets.
"""
import os
from typing import List, NamedTuple, Optional, Sequence, Tuple, Union

import numpy as np
from mmengine.dataset import BaseDataset

from kdzoo.datasets.bin_dataset import check_verification_pairs, decode_image
from kdzoo.datasets.bad_items import SkipBadItemsMixin
from kdzoo.datasets.dataset_args import LazyMetainfoMixin, build_pipeline
from kdzoo.datasets.fingerprint import files_fingerprint
from kdzoo.registry import DATASETS
from kdzoo.utils.checks import check_int, check_size
from kdzoo.utils.errors import ConfigError, DataError

__all__ = ['IMAGE_EXTENSIONS', 'SPLITS', 'FolderScan',
           'scan_identity_folders', 'split_identities', 'ImageFolderFaces',
           'ImageFolderVerification', 'identity_fold_pairs']

IMAGE_EXTENSIONS = ('.jpg', '.jpeg', '.png', '.bmp', '.pgm')
SPLITS = ('all', 'train', 'val')


class FolderScan(NamedTuple):
    """Kept identity folder names (index = label) and ``(path, label)`` of
    every kept image, grouped by identity, files in sorted order."""
    classes: List[str]
    samples: List[Tuple[str, int]]


def _check_split_args(owner: str, split: str, val_identities: int,
                      split_seed: int) -> Tuple[str, int, int]:
    """The checks of the split arguments that need no folder listing."""
    if split not in SPLITS:
        raise ConfigError(f"{owner}: split must be one of {list(SPLITS)}, "
                          f'got {split!r}')
    val_identities = check_int(owner, 'val_identities', val_identities, 0,
                               what='identities held out for validation; '
                               '0 holds out none')
    split_seed = check_int(owner, 'split_seed', split_seed, 0)
    if split != 'all' and val_identities == 0:
        raise ConfigError(
            f"{owner}: split={split!r} needs val_identities > 0 (the number "
            "of identities held out for validation); set val_identities, "
            "e.g. 50, or use split='all'")
    if val_identities == 1:
        raise ConfigError(
            f'{owner}: val_identities=1 holds out a single identity, which '
            'gives no different-identity pairs to validate on; hold out at '
            'least 2 (or 0 for none)')
    return split, val_identities, split_seed


def split_identities(classes: Sequence[str], val_identities: int,
                     split_seed: int = 0) -> List[str]:
    """The ``val_identities`` names of ``classes`` held out for validation:
    the first ones of ``numpy.random.default_rng(split_seed).permutation``
    over the sorted names, returned sorted. Depends only on the names and
    the seed, so every machine and every run picks the same identities."""
    names = sorted(classes)
    perm = np.random.default_rng(split_seed).permutation(len(names))
    return sorted(names[i] for i in perm[:val_identities])


def scan_identity_folders(root: str,
                          extensions: Sequence[str] = IMAGE_EXTENSIONS,
                          max_identities: Optional[int] = None,
                          min_images_per_identity: int = 1,
                          max_images_per_identity: Optional[int] = None,
                          owner: str = 'ImageFolderFaces',
                          split: str = 'all', val_identities: int = 0,
                          split_seed: int = 0) -> FolderScan:
    """List ``root/<identity>/<image>`` files, deterministically subsampled:
    identities with fewer than ``min_images_per_identity`` images are
    dropped, then the first ``max_identities`` (sorted names) are kept, each
    with its first ``max_images_per_identity`` files (sorted names).
    Hidden files and folders (``.name``) are ignored.

    Then, with ``val_identities`` > 0, that many of the kept identities are
    held out (:func:`split_identities` with ``split_seed``): ``split='val'``
    keeps them, ``'train'`` keeps the others, ``'all'`` keeps every
    identity. Labels are ``0 .. C-1`` in sorted folder order within the
    part kept."""
    split, val_identities, split_seed = _check_split_args(
        owner, split, val_identities, split_seed)
    max_identities = check_int(owner, 'max_identities', max_identities,
                               allow_none=True)
    min_images = check_int(owner, 'min_images_per_identity',
                           min_images_per_identity, allow_none=True) or 1
    max_images = check_int(owner, 'max_images_per_identity',
                           max_images_per_identity, allow_none=True)
    if isinstance(extensions, str):  # 'jpg' would become '.j', '.p', '.g'
        raise ConfigError(f'{owner}: extensions must be a list of file '
                          f"endings, e.g. ['.jpg'], got {extensions!r}")
    exts = tuple(e.lower() if e.startswith('.') else '.' + e.lower()
                 for e in extensions)
    if not os.path.isdir(root):
        raise DataError(f'{root}: image folder not found (expected one '
                        'sub-folder of images per identity)')
    folders = sorted(e.name for e in os.scandir(root)
                     if e.is_dir() and not e.name.startswith('.'))
    if not folders:
        raise DataError(f'{root}: no identity folders; images must be laid '
                        'out as <root>/<identity>/<image>.jpg')
    per_identity = []
    for name in folders:
        files = sorted(e.name for e in os.scandir(os.path.join(root, name))
                       if e.is_file() and not e.name.startswith('.')
                       and e.name.lower().endswith(exts))
        per_identity.append((name, files))
    if not any(files for _, files in per_identity):
        raise DataError(f'{root}: no images ({", ".join(exts)}) in its '
                        f'{len(folders)} identity folders')
    kept = [(n, f) for n, f in per_identity if len(f) >= min_images]
    if not kept:
        raise ConfigError(f'{owner}: no identity in {root} has '
                          f'min_images_per_identity={min_images} images; '
                          'lower it')
    kept = kept[:max_identities]
    if val_identities:
        if val_identities >= len(kept):
            raise ConfigError(
                f'{owner}: val_identities={val_identities} must be smaller '
                f'than the {len(kept)} identities kept in {root} (after '
                'min_images_per_identity / max_identities), so that at '
                'least one is left for training; lower val_identities')
        held_out = set(split_identities([n for n, _ in kept],
                                        val_identities, split_seed))
        if split != 'all':
            kept = [(n, f) for n, f in kept
                    if (n in held_out) == (split == 'val')]
    classes, samples = [], []
    for label, (name, files) in enumerate(kept):
        classes.append(name)
        samples += [(os.path.join(root, name, f), label)
                    for f in files[:max_images]]
    return FolderScan(classes, samples)


@DATASETS.register_module()
class ImageFolderFaces(LazyMetainfoMixin, SkipBadItemsMixin, BaseDataset):
    """Face training set in one folder per identity (``<data_root>/<id>/
    <image>``), labels ``0 .. C-1`` in sorted folder order.

    Items: ``img`` (RGB uint8, decoded lazily), ``label``, ``age`` -1;
    ``metainfo``: ``classes`` (folder names, index = label), ``num_classes``
    (both of the part kept, see ``split``).

    Args:
        data_root: the folder of identity folders.
        image_size: int or (h, w); resize images not of this size.
        extensions: image file name endings, case-insensitive.
        max_identities, min_images_per_identity, max_images_per_identity:
            deterministic subsampling, see :func:`scan_identity_folders`.
        val_identities: identities held out for validation (default 0:
            none), chosen after the subsampling above by a seeded
            permutation of the kept folder names (:func:`split_identities`);
            0 or 2 .. (kept identities - 1).
        split: ``'all'`` (default): every kept identity, ``val_identities``
            only checked (so a shared config can switch ``split`` alone);
            ``'train'``: all but the held-out identities; ``'val'``: only
            them. ``'train'`` and ``'val'`` need ``val_identities`` > 0 and
            are disjoint; labels are renumbered ``0 .. C-1`` within the part.
        split_seed: seed of the held-out choice (default 0); give the train
            and val datasets the same one.
        pipeline: transforms, default ``[dict(type='PackFaceInputs')]``.
        on_bad_item, max_bad_items: ``'raise'`` (default) stops on an
            unreadable item; ``'skip'`` counts it and serves another (see
            :mod:`kdzoo.datasets.bad_items`).
    """

    def __init__(self, data_root: str,
                 image_size: Union[int, Sequence[int], None] = None,
                 extensions: Sequence[str] = IMAGE_EXTENSIONS,
                 max_identities: Optional[int] = None,
                 min_images_per_identity: int = 1,
                 max_images_per_identity: Optional[int] = None,
                 val_identities: int = 0, split: str = 'all',
                 split_seed: int = 0,
                 pipeline: Optional[list] = None, **kwargs):
        owner = type(self).__name__
        if not data_root:
            raise ConfigError(f'{owner}: data_root (the folder of '
                              'identity folders) is required')
        self.image_size = check_size(owner, image_size,
                                     name='image_size', allow_none=True)
        # checked here too, so that a lazy_init dataset fails at once
        self.split, self.val_identities, self.split_seed = \
            _check_split_args(owner, split, val_identities, split_seed)
        # a plain string is refused by scan_identity_folders, not split
        self.extensions = extensions if isinstance(extensions, str) \
            else tuple(extensions)
        self.subsample = dict(
            max_identities=max_identities,
            min_images_per_identity=min_images_per_identity,
            max_images_per_identity=max_images_per_identity)
        super().__init__(ann_file='', data_root=data_root,
                         pipeline=build_pipeline(pipeline), **kwargs)

    def load_data_list(self) -> List[dict]:
        scan = scan_identity_folders(
            self.data_root, self.extensions, owner=type(self).__name__,
            split=self.split, val_identities=self.val_identities,
            split_seed=self.split_seed, **self.subsample)
        self._metainfo.update(classes=list(scan.classes),
                              num_classes=len(scan.classes))
        return [dict(img_path=p, label=lab, age=-1)
                for p, lab in scan.samples]

    def content_fingerprint(self) -> str:
        """Identity of the images without decoding them (teacher cache key;
        ``kdzoo.datasets.fingerprint``)."""
        return files_fingerprint(
            type(self).__name__, dict(image_size=self.image_size),
            ((info['img_path'], info['label']) for info in (
                BaseDataset.get_data_info(self, i) for i in range(len(self)))))

    def get_data_info(self, idx: int) -> dict:
        info = super().get_data_info(idx)
        path = info['img_path']
        try:
            with open(path, 'rb') as f:
                data = f.read()
        except OSError as e:
            raise DataError(f'{path}: cannot be read ({e.strerror})') \
                from None
        info['img'] = decode_image(data, path, info['sample_idx'],
                                   self.image_size)
        return info


def _kfold_sizes(n: int, num_folds: int) -> np.ndarray:
    """Pairs per fold of :func:`kdzoo.evaluation.verification.kfold_indices`
    (contiguous; the first ``n % num_folds`` folds one more)."""
    sizes = np.full(num_folds, n // num_folds, dtype=np.int64)
    sizes[:n % num_folds] += 1
    return sizes


def _fold_quotas(num_pairs: int, num_folds: int, pos_avail: np.ndarray,
                 neg_avail: np.ndarray) -> Optional[Tuple[np.ndarray,
                                                          np.ndarray]]:
    """Positive and negative pairs per fold: ``num_pairs`` of each in all,
    fold f holding exactly the ``f``-th fold size of the metric's
    contiguous k-fold split of ``2 * num_pairs`` pairs, each fold as close
    to half positive as its available pairs allow; None when impossible."""
    sizes = _kfold_sizes(2 * num_pairs, num_folds)
    lo = np.maximum(0, sizes - neg_avail)
    hi = np.minimum(pos_avail, sizes)
    if (lo > hi).any() or lo.sum() > num_pairs or hi.sum() < num_pairs:
        return None
    pos = np.clip(sizes // 2, lo, hi)
    while pos.sum() != num_pairs:  # one pair at a time, most off first
        more = pos.sum() < num_pairs
        room = pos < hi if more else pos > lo
        off = (pos - sizes / 2) * (1 if more else -1)
        f = int(np.argmin(np.where(room, off, np.inf)))
        pos[f] += 1 if more else -1
    return pos, sizes - pos


def _sample_ranked(rng, counts: np.ndarray, first: np.ndarray, k: int,
                   members: np.ndarray) -> np.ndarray:
    """``k`` distinct pairs ``(members[u], members[v])``, uniformly, where
    image ``u`` pairs with ``v = first[u] .. first[u] + counts[u] - 1``."""
    if k == 0:
        return np.zeros((0, 2), np.int64)
    start = np.concatenate([[0], np.cumsum(counts)])
    ranks = np.sort(rng.choice(int(start[-1]), size=k, replace=False))
    u = np.searchsorted(start, ranks, side='right') - 1
    v = first[u] + (ranks - start[u])
    return np.stack([members[u], members[v]], axis=1).astype(np.int64)


def identity_fold_pairs(labels, num_pairs: int, num_folds: int = 10,
                        seed: int = 0, owner: str = 'ImageFolderVerification'
                        ) -> Tuple[np.ndarray, np.ndarray, np.ndarray]:
    """A balanced pair list over images with identity ``labels`` (N,),
    folded by identity for the k-fold accuracy.

    Identities are shuffled (``default_rng(seed)``) and dealt round-robin to
    ``num_folds`` folds; a positive pair is two images of one identity, a
    negative two images of two identities of the same fold, so no identity
    appears in two folds. Pairs are drawn uniformly without repeats (dataset
    indices ``i < j``), ``num_pairs`` positive and as many negative ones;
    when fewer distinct positive pairs exist (or the fold sizes below do
    not allow them all) as many as possible are taken, with as many
    negatives. Folds are stored one after another, each exactly as large as
    the metric's contiguous split (:func:`~kdzoo.evaluation.verification.
    kfold_indices`) makes it, positives then negatives, each sorted.

    Returns ``(pairs (P, 2) int64, issame (P,) bool, fold (P,) int64)``.
    """
    labels = np.asarray(labels, dtype=np.int64)
    rng = np.random.default_rng(seed)
    ids = np.unique(labels)
    if len(ids) < 2 * num_folds:
        raise ConfigError(
            f'{owner}: {len(ids)} identities for num_folds={num_folds}; '
            f'each fold needs two identities of its own (negative pairs '
            f'stay within a fold), so at least {2 * num_folds}: raise '
            'val_identities or lower num_folds')
    perm = ids[rng.permutation(len(ids))]
    folds = [np.sort(perm[f::num_folds]) for f in range(num_folds)]
    ranked, pos_avail, neg_avail = [], [], []
    for members in folds:
        # the fold's images in dataset order, grouped by identity
        idx = np.flatnonzero(np.isin(labels, members))
        idx = idx[np.argsort(labels[idx], kind='stable')]
        lab = labels[idx]
        end = np.searchsorted(lab, lab, side='right')  # identity group end
        pos = (end - np.arange(len(idx)) - 1, np.arange(len(idx)) + 1)
        neg = (len(idx) - end, end)
        ranked.append((idx, pos, neg))
        pos_avail.append(int(pos[0].sum()))
        neg_avail.append(int(neg[0].sum()))
    pos_avail, neg_avail = np.array(pos_avail), np.array(neg_avail)
    if pos_avail.sum() == 0:
        raise ConfigError(
            f'{owner}: no identity has two images, so there is no positive '
            'pair; set min_images_per_identity=2 (or more)')
    total = min(num_pairs, int(pos_avail.sum()))
    quotas = None
    while quotas is None and 2 * total >= num_folds:
        quotas = _fold_quotas(total, num_folds, pos_avail, neg_avail)
        total -= quotas is None
    if quotas is None:
        raise ConfigError(
            f'{owner}: too few positive pairs ({int(pos_avail.sum())}) to '
            f'fill num_folds={num_folds} folds; use more identities or '
            'images per identity, or lower num_folds')
    pairs, issame, fold = [], [], []
    for f, ((idx, pos, neg), n_pos, n_neg) in enumerate(zip(ranked,
                                                            *quotas)):
        for (counts, first), k, same in ((pos, n_pos, True),
                                         (neg, n_neg, False)):
            drawn = _sample_ranked(rng, counts, first, int(k), idx)
            pairs.append(np.sort(drawn, axis=1))
            issame.append(np.full(len(drawn), same))
            fold.append(np.full(len(drawn), f, dtype=np.int64))
    return (np.concatenate(pairs).astype(np.int64), np.concatenate(issame),
            np.concatenate(fold))


@DATASETS.register_module()
class ImageFolderVerification(ImageFolderFaces):
    """The images of an identity folder (typically a held-out part,
    ``split='val'``) as a verification protocol, for validating on
    training identities instead of the test sets.

    ``metainfo['verification'][protocol]`` holds, for
    :class:`~kdzoo.evaluation.FaceVerificationMetric`:

    * ``labels`` (each image's identity) and ``image_ids`` (every image
      distinct): TAR@FAR, ROC AUC and the identity-bootstrap intervals are
      scored over all pairs of the images;
    * ``pairs``, ``issame`` and ``num_folds``: a balanced pair list for the
      k-fold accuracy, ``num_pairs`` positive and as many negative pairs,
      folded by identity (see :func:`identity_fold_pairs`; fewer when the
      images hold fewer distinct positive pairs: then all that the fold
      sizes allow, with as many negatives).

    Items keep their true ``label``; ``metainfo`` also has ``classes`` and
    ``num_classes`` as :class:`ImageFolderFaces`.

    Args:
        protocol: protocol name (default ``'val'``: keys ``val/accuracy``,
            ``val/TAR@FAR=1e-3`` ...).
        num_pairs: positive pairs of the pair list (default 3000), and as
            many negative ones.
        num_folds: folds of the k-fold accuracy (default 10); each needs two
            identities of its own, so at least ``2 * num_folds`` identities.
        pair_seed: seed of the fold assignment and pair sampling (default 0).
        data_root, image_size, extensions, max_identities,
        min_images_per_identity, max_images_per_identity, val_identities,
        split, split_seed, pipeline: as :class:`ImageFolderFaces`; e.g.
            ``val_identities=200, split='val'`` here and ``split='train'``
            (same ``val_identities`` and ``split_seed``) for training.

    ``indices`` and ``on_bad_item='skip'`` are refused: either would leave
    images of the pair list out.
    """

    def __init__(self, data_root: str, protocol: str = 'val',
                 num_pairs: int = 3000, num_folds: int = 10,
                 pair_seed: int = 0, **kwargs):
        owner = type(self).__name__
        if not isinstance(protocol, str) or not protocol:
            raise ConfigError(f'{owner}: protocol must be a non-empty name, '
                              f'got {protocol!r}')
        self.protocol = protocol
        self.num_pairs = check_int(owner, 'num_pairs', num_pairs, 1,
                                   what='positive pairs of the pair list')
        self.num_folds = check_int(owner, 'num_folds', num_folds, 1)
        self.pair_seed = check_int(owner, 'pair_seed', pair_seed, 0)
        if kwargs.get('indices') is not None:
            raise ConfigError(f'{owner}: `indices` is not supported (the '
                              'pairs refer to positions in the whole part); '
                              'use max_identities / max_images_per_identity')
        if kwargs.get('on_bad_item', 'raise') != 'raise':
            raise ConfigError(f"{owner}: on_bad_item must be 'raise' for a "
                              'verification set (a skipped image would '
                              f'leave its pairs unscored), got '
                              f"{kwargs['on_bad_item']!r}")
        super().__init__(data_root, **kwargs)

    def load_data_list(self) -> List[dict]:
        data = super().load_data_list()
        labels = np.array([d['label'] for d in data], dtype=np.int64)
        pairs, issame, _ = identity_fold_pairs(
            labels, self.num_pairs, self.num_folds, self.pair_seed,
            owner=type(self).__name__)
        self._metainfo['verification'] = {self.protocol: dict(
            pairs=pairs, issame=issame, num_folds=self.num_folds,
            labels=labels, image_ids=np.arange(len(data), dtype=np.int64),
            identity_names=list(self._metainfo['classes']))}
        return data

    def check_verification(self) -> None:
        """As :meth:`InsightFaceBinDataset.check_verification`: a
        ``DataError`` when the pair list lacks positive or negative pairs
        (never for a list built here; kept for code that checks every
        verification set before embedding)."""
        for name, proto in self.metainfo['verification'].items():
            check_verification_pairs(f'{self.data_root} ({name})',
                                     proto['issame'])
