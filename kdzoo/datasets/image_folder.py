"""Face training images stored as one folder per identity.

``<data_root>/<identity>/<image>.jpg``: identities are labelled ``0 .. C-1``
in sorted folder-name order (after the optional filters), the layout of
torchvision's ``ImageFolder`` and of InsightFace's unpacked training sets.
"""
import os
from typing import List, NamedTuple, Optional, Sequence, Tuple, Union

from mmengine.dataset import BaseDataset

from kdzoo.datasets.bin_dataset import decode_image
from kdzoo.datasets.bad_items import SkipBadItemsMixin
from kdzoo.datasets.dataset_args import LazyMetainfoMixin, build_pipeline
from kdzoo.datasets.fingerprint import files_fingerprint
from kdzoo.registry import DATASETS
from kdzoo.utils.checks import check_int, check_size
from kdzoo.utils.errors import ConfigError, DataError

__all__ = ['IMAGE_EXTENSIONS', 'FolderScan', 'scan_identity_folders',
           'ImageFolderFaces']

IMAGE_EXTENSIONS = ('.jpg', '.jpeg', '.png', '.bmp', '.pgm')


class FolderScan(NamedTuple):
    """Kept identity folder names (index = label) and ``(path, label)`` of
    every kept image, grouped by identity, files in sorted order."""
    classes: List[str]
    samples: List[Tuple[str, int]]


def scan_identity_folders(root: str,
                          extensions: Sequence[str] = IMAGE_EXTENSIONS,
                          max_identities: Optional[int] = None,
                          min_images_per_identity: int = 1,
                          max_images_per_identity: Optional[int] = None,
                          owner: str = 'ImageFolderFaces') -> FolderScan:
    """List ``root/<identity>/<image>`` files, deterministically subsampled:
    identities with fewer than ``min_images_per_identity`` images are
    dropped, then the first ``max_identities`` (sorted names) are kept, each
    with its first ``max_images_per_identity`` files (sorted names).
    Hidden files and folders (``.name``) are ignored."""
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
    ``metainfo``: ``classes`` (folder names, index = label), ``num_classes``.

    Args:
        data_root: the folder of identity folders.
        image_size: int or (h, w); resize images not of this size.
        extensions: image file name endings, case-insensitive.
        max_identities, min_images_per_identity, max_images_per_identity:
            deterministic subsampling, see :func:`scan_identity_folders`.
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
                 pipeline: Optional[list] = None, **kwargs):
        if not data_root:
            raise ConfigError('ImageFolderFaces: data_root (the folder of '
                              'identity folders) is required')
        self.image_size = check_size('ImageFolderFaces', image_size,
                                     name='image_size', allow_none=True)
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
        scan = scan_identity_folders(self.data_root, self.extensions,
                                     **self.subsample)
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
