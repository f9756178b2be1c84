"""Dataset registry: every dataset yields ``(image, label)`` with ``image`` a float tensor ``[C, H, W]`` in [0, 1].

Normalization is *not* applied here: it belongs to the classifier (a layer inside it), and
:class:`DatasetInfo` carries the ``mean``/``std`` that layer uses. Noise is added in [0, 1] pixel space.

Registered names
----------------
``digits``
    scikit-learn's ``load_digits()``: 1,797 real 8x8 handwritten digits, values 0..16 divided by 16,
    shape ``[1, 8, 8]``, 10 classes. Ships with scikit-learn, so it needs no root and no download.
    The train/test split is fixed and uses no random numbers: within each class (in dataset order)
    every fifth image, positions 0, 5, 10, ..., goes to ``test``, the rest to ``train`` (stratified
    80/20: 1,433 train / 364 test). Both splits keep the original dataset order.
    Mean/std are computed from the train split.
``cifar10``
    torchvision's CIFAR-10 reader over ``ROOT/cifar-10-batches-py/`` (the python pickled batches);
    never downloads. The six batch files and ``batches.meta`` must be present; they are not md5-checked
    (torchvision would hash 180 MB on every load, in every worker). ``train`` uses Cohen et al.'s
    augmentation (random crop with 4-pixel padding, horizontal flip); ``test`` is plain ``ToTensor``.
``imagenet``
    ``ImageFolder`` over ``ROOT/train`` and ``ROOT/val`` (the ``test`` split). Train: RandomResizedCrop(224)
    and a horizontal flip; test: Resize(256), CenterCrop(224).
``folder`` or ``folder:PATH``
    Any image folder in ImageFolder layout (one subfolder per class, ``CLASS/IMAGE``). Accepted forms:

    - ``folder:PATH`` with ``PATH/train/`` and ``PATH/test/`` (or ``PATH/val/``): each split is its subfolder.
    - ``folder:PATH`` with class folders directly under ``PATH``: the ``test`` split only (images to certify).
      Training on it is refused, as it would train on the very images it then certifies.
    - ``folder:train=TRAIN_DIR,test=TEST_DIR``: the split folders named explicitly (either may be left out,
      and that split is then refused). Naming the same folder twice trains on the test images, as written.
      Paths in this form cannot contain commas.

    ``folder`` alone takes ``PATH`` from ``root``. Both splits are deterministic: Resize(256), CenterCrop(224),
    or Resize(size), CenterCrop(size) with the ``size`` option. ImageNet's mean/std.

Roots: the ``root`` argument, else ``default_root(name, env)`` with ``env`` a mapping the caller passes
(e.g. ``os.environ``): ``$DSQ_DATA/<name>`` (``$DSQ_DATA/cifar10/cifar-10-batches-py/``,
``$DSQ_DATA/imagenet/{train,val}/``). Nothing reads the environment by itself.
"""

from __future__ import annotations

import functools
import os
import pickle
from dataclasses import dataclass
from typing import Mapping, Sized

import numpy as np
import torch
from torch.utils.data import Dataset, TensorDataset
from torchvision import transforms as T
from torchvision.datasets import CIFAR10, ImageFolder

from dsq.errors import DatasetMissing, InvalidArgument, UnknownName

SPLITS = ("train", "test")
DATA_ENV = "DSQ_DATA"
FOLDER_PREFIX = "folder:"

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
CIFAR10_MEAN = (0.4914, 0.4822, 0.4465)  # as in Cohen et al.'s code/datasets.py
CIFAR10_STD = (0.2023, 0.1994, 0.2010)
CIFAR10_FOLDER = "cifar-10-batches-py"
CIFAR10_FILES = tuple(f"data_batch_{i}" for i in range(1, 6)) + ("test_batch", "batches.meta")

DIGITS_TEST_EVERY = 5  # within each class, positions 0, 5, 10, ... are test images


@dataclass(frozen=True)
class DatasetInfo:
    """What a model needs to know about a dataset: classes, image shape, and normalization constants."""

    name: str
    num_classes: int
    channels: int
    height: int
    width: int
    mean: tuple[float, ...]
    std: tuple[float, ...]

    @property
    def shape(self) -> tuple[int, int, int]:
        """The image shape ``(C, H, W)``."""
        return (self.channels, self.height, self.width)


# ---------------------------------------------------------------------------------------------- public API


def dataset_names() -> list[str]:
    """The registered names (``folder:PATH`` stands for any image folder)."""
    return ["cifar10", "digits", "folder:PATH", "imagenet"]


def get_dataset(
    name: str,
    split: str,
    *,
    root: str | None = None,
    env: Mapping[str, str] | None = None,
    size: int | None = None,
) -> Dataset:
    """The ``split`` (``"train"`` or ``"test"``) of dataset ``name``, yielding ``(image [C,H,W] in [0,1], int)``.

    ``root`` is where the files are (unused for ``digits``); without it, ``default_root(name, env)``.
    ``size`` is the crop size of a ``folder`` dataset (default 224 after a resize to 256).
    """
    kind, folder_path = _parse_name(name)
    _check_split(split)
    if kind == "digits":
        return _digits_dataset(split)
    root = folder_path or root or default_root(kind, env or {})
    if root is None:
        raise DatasetMissing(f"{kind} needs a data folder: pass a root or set {DATA_ENV} (holding {kind}/)")
    if kind == "cifar10":
        return _cifar10_dataset(root, split)
    if kind == "imagenet":
        return _image_folder(_imagenet_split_dir(root, split), _imagenet_transform(split), "ImageNet")
    return _image_folder(_folder_split_dir(root, split), _folder_transform(size), "image folder")


def dataset_info(
    name: str, root: str | None = None, *, env: Mapping[str, str] | None = None, size: int | None = None
) -> DatasetInfo:
    """Classes, image shape and normalization of ``name``; a ``folder`` dataset's classes are counted on disk."""
    kind, folder_path = _parse_name(name)
    if kind == "digits":
        mean, std = _digits_mean_std()
        return DatasetInfo("digits", 10, 1, 8, 8, (mean,), (std,))
    if kind == "cifar10":
        return DatasetInfo("cifar10", 10, 3, 32, 32, CIFAR10_MEAN, CIFAR10_STD)
    if kind == "imagenet":
        return DatasetInfo("imagenet", 1000, 3, 224, 224, IMAGENET_MEAN, IMAGENET_STD)
    root = folder_path or root or default_root(kind, env or {})
    if root is None:
        raise DatasetMissing("a folder dataset needs its path: use folder:PATH or pass a root")
    classes = _folder_classes(_folder_split_dir(root, "test"))
    side = _check_size(size) if size is not None else 224
    return DatasetInfo(name, len(classes), 3, side, side, IMAGENET_MEAN, IMAGENET_STD)


def default_root(name: str, env: Mapping[str, str]) -> str | None:
    """``$DSQ_DATA/<name>`` when ``env`` (a mapping the caller passes, e.g. ``os.environ``) sets ``DSQ_DATA``."""
    base = env.get(DATA_ENV)
    if not base:
        return None
    return os.path.join(os.path.expanduser(base), name)


def test_subset(dataset: Sized, *, skip: int = 1, max: int | None = None) -> list[int]:  # noqa: A002
    """Indices certified by the reference scripts: every ``skip``-th image (0, skip, 2*skip, ...), at most ``max``.

    ``max`` counts images (Cohen et al.'s ``--max`` compares with the index instead; ``max=None`` is all).
    """
    if isinstance(skip, bool) or not isinstance(skip, int) or skip < 1:
        raise InvalidArgument(f"skip must be an integer >= 1 (every skip-th image), got {skip!r}")
    if max is not None and (isinstance(max, bool) or not isinstance(max, int) or max < 1):
        raise InvalidArgument(f"max must be an integer >= 1 or None for all images, got {max!r}")
    indices = list(range(0, len(dataset), skip))
    return indices if max is None else indices[:max]


test_subset.__test__ = False  # a library function, not a pytest test


# ---------------------------------------------------------------------------------------------- names


def _parse_name(name: str) -> tuple[str, str | None]:
    """``(kind, folder path or None)`` for a registered name; UnknownName otherwise."""
    if not isinstance(name, str):
        raise UnknownName(f"dataset name must be a string, got {name!r}; known: {', '.join(dataset_names())}")
    if name.startswith(FOLDER_PREFIX):
        path = name[len(FOLDER_PREFIX):]
        if not path:
            raise InvalidArgument("folder:PATH needs a path after 'folder:'")
        return "folder", path
    if name in ("digits", "cifar10", "imagenet", "folder"):
        return name, None
    raise UnknownName(f"unknown dataset {name!r}; known: {', '.join(dataset_names())}")


def _check_split(split: str) -> None:
    if split not in SPLITS:
        raise InvalidArgument(f"unknown split {split!r}: expected 'train' or 'test'")


def _check_size(size: int) -> int:
    if isinstance(size, bool) or not isinstance(size, int) or size < 1:
        raise InvalidArgument(f"size must be a positive integer (pixels), got {size!r}")
    return size


# ---------------------------------------------------------------------------------------------- digits


class DigitsDataset(TensorDataset):
    """A TensorDataset of ``images [N,1,8,8]`` and ``labels [N]`` that yields labels as ``int``."""

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        image, label = super().__getitem__(index)
        return image, int(label)


@functools.lru_cache(maxsize=1)
def _digits_arrays() -> tuple[np.ndarray, np.ndarray]:
    """All 1,797 digits as ``(images float32 [N,1,8,8] in [0,1], labels int64 [N])``; read once per process."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    images = (digits.images / 16.0).astype(np.float32).reshape(-1, 1, 8, 8)
    return images, digits.target.astype(np.int64)


def digits_split_indices(split: str) -> list[int]:
    """Indices into ``load_digits()`` of ``split``: per class, positions 0, 5, 10, ... are test (no RNG)."""
    _check_split(split)
    _, labels = _digits_arrays()
    test: list[int] = []
    for label in np.unique(labels):
        members = np.flatnonzero(labels == label)
        test.extend(int(i) for i in members[::DIGITS_TEST_EVERY])
    test_set = set(test)
    if split == "test":
        return sorted(test_set)
    return [i for i in range(len(labels)) if i not in test_set]


def _digits_dataset(split: str) -> DigitsDataset:
    images, labels = _digits_arrays()
    index = digits_split_indices(split)
    return DigitsDataset(torch.tensor(images[index]), torch.tensor(labels[index]))


@functools.lru_cache(maxsize=1)
def _digits_mean_std() -> tuple[float, float]:
    """Pixel mean and std of the digits train split (float64, population std), about 0.3054 and 0.3763."""
    images, _ = _digits_arrays()
    train = images[digits_split_indices("train")].astype(np.float64)
    return float(train.mean()), float(train.std())


# ---------------------------------------------------------------------------------------------- cifar10


class CIFAR10Files(CIFAR10):
    """torchvision's CIFAR-10 reader with files checked for presence, not md5 (a md5 of None skips the hash)."""

    train_list = [[f, None] for f, _ in CIFAR10.train_list]
    test_list = [[f, None] for f, _ in CIFAR10.test_list]
    meta = {**CIFAR10.meta, "md5": None}


def _cifar10_dataset(root: str, split: str) -> Dataset:
    """CIFAR-10 from ``root/cifar-10-batches-py``; missing or unreadable files raise DatasetMissing."""
    folder = os.path.join(root, CIFAR10_FOLDER)
    missing = [f for f in CIFAR10_FILES if not os.path.isfile(os.path.join(folder, f))]
    if missing:
        raise DatasetMissing(
            f"CIFAR-10 not found under {root}: expected {CIFAR10_FOLDER}/ with {', '.join(CIFAR10_FILES)} "
            f"(missing: {', '.join(missing)}); download cifar-10-python.tar.gz and extract it there"
        )
    try:
        return CIFAR10Files(root, train=split == "train", transform=_cifar10_transform(split), download=False)
    except (pickle.UnpicklingError, OSError, EOFError, ValueError, KeyError, IndexError, RuntimeError) as e:
        raise DatasetMissing(f"CIFAR-10 under {folder} is unreadable ({type(e).__name__}: {e})") from e


def _cifar10_transform(split: str):
    if split == "train":
        return T.Compose([T.RandomCrop(32, padding=4), T.RandomHorizontalFlip(), T.ToTensor()])
    return T.ToTensor()


# ---------------------------------------------------------------------------------------------- image folders


def _imagenet_split_dir(root: str, split: str) -> str:
    folder = os.path.join(root, "train" if split == "train" else "val")
    if not os.path.isdir(folder):
        raise DatasetMissing(
            f"ImageNet not found under {root}: expected train/ and val/ with one subfolder per class "
            f"(missing {folder})"
        )
    return folder


def _imagenet_transform(split: str):
    if split == "train":
        return T.Compose([T.RandomResizedCrop(224), T.RandomHorizontalFlip(), T.ToTensor()])
    return T.Compose([T.Resize(256), T.CenterCrop(224), T.ToTensor()])


FOLDER_SPLITS = {"train": ("train",), "test": ("test", "val")}  # subfolder names of each split, first found wins


def _folder_split_dir(root: str, split: str) -> str:
    """The folder of ``split`` in a ``folder`` dataset's root (the forms in the module docstring).

    Raises DatasetMissing rather than fall back on another split's images: a folder without ``train/``
    has no training images, so that training never sees the images it is then certified on.
    """
    explicit = _explicit_splits(root)
    if explicit is not None:
        return _named_split_dir(explicit, split, root)
    if not os.path.isdir(root):
        raise DatasetMissing(f"image folder {root} not found: expected a folder with one subfolder per class")
    present = {sub for subs in FOLDER_SPLITS.values() for sub in subs if os.path.isdir(os.path.join(root, sub))}
    for sub in FOLDER_SPLITS[split]:
        if sub in present:
            return os.path.join(root, sub)
    if split == "train":
        raise DatasetMissing(
            f"image folder {root} has no train/ subfolder, so no images to train on (its images are the test "
            f"split): use folder:PATH with PATH/train/ and PATH/test/, or folder:train=TRAIN_DIR,test=TEST_DIR")
    if present:
        raise DatasetMissing(f"image folder {root} has {'/, '.join(sorted(present))}/ but no test/ or val/ "
                             f"subfolder for the test split: add one, or use folder:train=TRAIN_DIR,test=TEST_DIR")
    return root


def _explicit_splits(text: str) -> dict[str, str] | None:
    """``{"train": DIR, "test": DIR}`` from ``train=DIR,test=DIR``; None when ``text`` is a plain path."""
    if not text.startswith(tuple(f"{split}=" for split in SPLITS)):
        return None
    splits: dict[str, str] = {}
    for part in text.split(","):
        split, equals, folder = part.partition("=")
        if split not in SPLITS or not equals or not folder:
            raise InvalidArgument(f"folder split {part!r} in {text!r}: expected train=TRAIN_DIR,test=TEST_DIR")
        if split in splits:
            raise InvalidArgument(f"folder split {split!r} is named twice in {text!r}")
        splits[split] = folder
    return splits


def _named_split_dir(splits: dict[str, str], split: str, text: str) -> str:
    if split not in splits:
        raise DatasetMissing(f"no {split} folder in folder:{text}: add {split}={split.upper()}_DIR")
    folder = splits[split]
    if not os.path.isdir(folder):
        raise DatasetMissing(f"{split} folder {folder} not found: expected a folder with one subfolder per class")
    return folder


def _folder_transform(size: int | None):
    if size is None:
        return T.Compose([T.Resize(256), T.CenterCrop(224), T.ToTensor()])
    side = _check_size(size)
    return T.Compose([T.Resize(side), T.CenterCrop(side), T.ToTensor()])


def _folder_classes(folder: str) -> list[str]:
    classes = sorted(e.name for e in os.scandir(folder) if e.is_dir())
    if not classes:
        raise DatasetMissing(f"no class subfolders in {folder}: expected ImageFolder layout (FOLDER/CLASS/IMAGE)")
    return classes


def _image_folder(folder: str, transform, what: str) -> Dataset:
    """``ImageFolder(folder)``; an empty or class-less folder raises DatasetMissing."""
    _folder_classes(folder)
    try:
        return ImageFolder(folder, transform=transform)
    except (FileNotFoundError, OSError) as e:
        raise DatasetMissing(f"{what} under {folder} has no readable images ({e})") from e

