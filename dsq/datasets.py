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
    and a horizontal flip; test: Resize(256), CenterCrop(224). With ``size`` N: RandomResizedCrop(N), and
    Resize(round(N * 256 / 224)), CenterCrop(N).
``folder`` or ``folder:PATH``
    Any image folder in ImageFolder layout (one subfolder per class, ``CLASS/IMAGE``). Accepted forms:

    - ``folder:PATH`` with ``PATH/train/`` and ``PATH/test/`` (or ``PATH/val/``): each split is its subfolder.
    - ``folder:PATH`` with class folders directly under ``PATH``: the ``test`` split only (images to certify).
      Training on it is refused, as it would train on the very images it then certifies.
    - ``folder:train=TRAIN_DIR,test=TEST_DIR``: the split folders named explicitly (either may be left out,
      and that split is then refused). Naming the same folder twice trains on the test images, as written.
      Paths in this form cannot contain commas.

    ``folder`` alone takes ``PATH`` from ``root``. Both splits are deterministic. Images keep their own size
    when all images of the split share one (a 32x32 folder stays 32x32); when they differ, ``size`` N is
    required: Resize(N) (shorter side), CenterCrop(N). Images are grayscale (1 channel) when every image
    of the split is grey (PIL modes 1, L, I;16, I, F), else RGB (3 channels). ImageNet's mean/std (their
    ITU-R 601-2 luma for grayscale). Sizes and modes come from the image headers, read once per folder
    in a process, and again when files are added to or removed from its class folders.

``size`` resizes folder and imagenet images only: digits (8x8) and cifar10 (32x32) have one size, and any
other ``size`` is refused for them.

Channels: ``channels`` (1 or 3) converts any dataset's images to what a model takes: 1 -> 3 repeats the
grey channel, 3 -> 1 is the ITU-R 601-2 luma (PIL's ``convert("L")``). :func:`channel_note` says so in
one line, for the job's log. ``None`` keeps the dataset's own channels.

Roots: the ``root`` argument, else ``default_root(name, env)`` with ``env`` a mapping the caller passes
(e.g. ``os.environ``): ``$DSQ_DATA/<name>`` (``$DSQ_DATA/cifar10/cifar-10-batches-py/``,
``$DSQ_DATA/imagenet/{train,val}/``). Nothing reads the environment by itself.
"""

from __future__ import annotations

import functools
import importlib.util
import os
import pickle
from pathlib import Path
from dataclasses import dataclass
from typing import Mapping, Sized

import numpy as np
import torch  # torchvision (readers and transforms) is imported by the datasets that need it:
# importing it loads its whole model zoo, a second or two that a digits job need not pay
from torch.utils.data import Dataset, TensorDataset
from PIL import Image

from dsq import checks
from dsq.errors import DatasetMissing, InvalidArgument, UnknownName, UnreadableImage

SPLITS = ("train", "test")
DATA_ENV = "DSQ_DATA"
FOLDER_PREFIX = "folder:"

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
CIFAR10_MEAN = (0.4914, 0.4822, 0.4465)  # as in Cohen et al.'s code/datasets.py
CIFAR10_STD = (0.2023, 0.1994, 0.2010)
CIFAR10_FOLDER = "cifar-10-batches-py"
CIFAR10_FILES = tuple(f"data_batch_{i}" for i in range(1, 6)) + ("test_batch", "batches.meta")

LUMA = (0.299, 0.587, 0.114)  # ITU-R 601-2, the weights of PIL's convert("L")
GREY_MODES = ("1", "L", "I;16", "I", "F")  # PIL modes read as one grey channel (as load_image_file)
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
    channels: int | None = None,
    classes: tuple[str, ...] | None = None,
) -> Dataset:
    """The ``split`` (``"train"`` or ``"test"``) of dataset ``name``, yielding ``(image [C,H,W] in [0,1], int)``.

    ``root`` is where the files are (unused for ``digits``); without it, ``default_root(name, env)``.
    ``size`` resizes and center-crops folder and imagenet images to ``size`` x ``size`` (default: a folder's
    own size, imagenet's 224); ``channels`` (1 or 3) converts the images (default: their own channels).
    ``classes`` orders a folder's classes (label i is ``classes[i]``; default: sorted by name): they must be its
    class folders exactly.
    """
    kind, folder_path = _parse_name(name)
    _check_split(split)
    side = None if size is None else _check_size(size)
    _check_channels(channels)
    if kind == "digits":
        _fixed_size(kind, side, 8)
        return _digits_dataset(split, channels)
    root = folder_path or root or default_root(kind, env or {})
    if root is None:
        raise DatasetMissing(f"{kind} needs a data folder: pass a root or set {DATA_ENV} (holding {kind}/)")
    if kind == "cifar10":
        _fixed_size(kind, side, 32)
        return _cifar10_dataset(root, split, channels)
    if kind == "imagenet":
        return _image_folder(_imagenet_split_dir(root, split), _imagenet_transform(split, side), "ImageNet",
                             channels or 3)
    folder = _folder_split_dir(root, split)
    if side is None or channels is None:
        images = _folder_images(folder)
        if side is None:
            _native_size(folder, images)  # refuses images of different sizes
        channels = channels or images.channels
    return _image_folder(folder, _folder_transform(side), "image folder", channels, classes)


def folder_classes(name: str, split: str = "test", *, root: str | None = None,
                   env: Mapping[str, str] | None = None) -> list[str]:
    """The class folders of a ``folder`` dataset's ``split``, sorted by name (its default class order)."""
    _, folder_path = _parse_name(name)
    _check_split(split)
    return _folder_classes(_folder_split_dir(_folder_root(folder_path, root, env), split))


def dataset_info(
    name: str,
    root: str | None = None,
    *,
    env: Mapping[str, str] | None = None,
    size: int | None = None,
    channels: int | None = None,
) -> DatasetInfo:
    """Classes, image shape and normalization of ``name`` with ``size`` and ``channels`` as in :func:`get_dataset`.

    A ``folder`` dataset's classes, image size and channels are those of its test split, read on disk.
    """
    kind, folder_path = _parse_name(name)
    side = None if size is None else _check_size(size)
    _check_channels(channels)
    if kind == "digits":
        _fixed_size(kind, side, 8)
        mean, std = _digits_mean_std()
        return _info("digits", 10, channels or 1, (8, 8), (mean,), (std,))
    if kind == "cifar10":
        _fixed_size(kind, side, 32)
        return _info("cifar10", 10, channels or 3, (32, 32), CIFAR10_MEAN, CIFAR10_STD)
    if kind == "imagenet":
        return _info("imagenet", 1000, channels or 3, (side or 224,) * 2, IMAGENET_MEAN, IMAGENET_STD)
    folder = _folder_split_dir(_folder_root(folder_path, root, env), "test")
    classes = _folder_classes(folder)
    images = _folder_images(folder)
    width, height = (side, side) if side else _native_size(folder, images)
    return _info(name, len(classes), channels or images.channels, (height, width), IMAGENET_MEAN, IMAGENET_STD)


def image_channels(name: str, split: str = "test", *, root: str | None = None,
                   env: Mapping[str, str] | None = None) -> int:
    """The channels ``split``'s images have before any conversion: 1 (grayscale) or 3 (RGB)."""
    kind, folder_path = _parse_name(name)
    _check_split(split)
    if kind in ("digits", "cifar10", "imagenet"):
        return 1 if kind == "digits" else 3
    return _folder_images(_folder_split_dir(_folder_root(folder_path, root, env), split)).channels


def channel_note(name: str, own: int, channels: int | None) -> str | None:
    """One line saying how images with ``own`` channels are converted for a model taking ``channels``; None if not."""
    if channels is None or channels == own:
        return None
    if channels == 3:
        return f"the images of {name} are grayscale (1 channel): the model takes 3, so the grey channel is repeated"
    return (f"the images of {name} have 3 channels (RGB): the model takes 1, so they are converted to grayscale "
            f"(ITU-R 601-2 luma, as PIL's convert('L'))")


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
    checks.positive_int("skip", skip)
    if max is not None:
        checks.positive_int("max", max)
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


def _folder_root(folder_path: str | None, root: str | None, env: Mapping[str, str] | None) -> str:
    found = folder_path or root or default_root("folder", env or {})
    if found is None:
        raise DatasetMissing("a folder dataset needs its path: use folder:PATH or pass a root")
    return found


def _check_split(split: str) -> None:
    if split not in SPLITS:
        raise InvalidArgument(f"unknown split {split!r}: expected 'train' or 'test'")


def _check_size(size: int) -> int:
    return checks.positive_int("size (pixels)", size)


def _fixed_size(kind: str, side: int | None, own: int) -> None:
    """digits and cifar10 have one image size: a ``size`` other than it is refused."""
    if side is not None and side != own:
        raise InvalidArgument(f"{kind} images are always {own}x{own}: --size {side} applies to folder and "
                              f"imagenet datasets only")


def _check_channels(channels: int | None) -> None:
    if channels is not None and (isinstance(channels, bool) or channels not in (1, 3)):
        raise InvalidArgument(f"images can be given 1 (grayscale) or 3 (RGB) channels, not {channels!r}")


def _info(name: str, classes: int, channels: int, shape: tuple[int, int], mean, std) -> DatasetInfo:
    """A DatasetInfo with ``mean``/``std`` for ``channels``: repeated for 1 -> 3, their luma for 3 -> 1."""
    if channels != len(mean):
        if channels == 3:
            mean, std = mean * 3, std * 3
        else:
            mean, std = (_luma(mean),), (_luma(std),)
    return DatasetInfo(name, classes, channels, shape[0], shape[1], tuple(mean), tuple(std))


def _luma(rgb) -> float:
    return sum(weight * value for weight, value in zip(LUMA, rgb))


# ---------------------------------------------------------------------------------------------- digits


class DigitsDataset(TensorDataset):
    """A TensorDataset of ``images [N,1,8,8]`` and ``labels [N]`` that yields labels as ``int``."""

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        image, label = super().__getitem__(index)
        return image, int(label)


@functools.lru_cache(maxsize=1)
def _digits_arrays() -> tuple[np.ndarray, np.ndarray]:
    """All 1,797 digits as ``(images float32 [N,1,8,8] in [0,1], labels int64 [N])``; read once per process.

    They are scikit-learn's ``load_digits()``, read from the file scikit-learn ships (64 pixel values 0-16 and the
    label per row) without importing scikit-learn, whose import takes longer than torch's.
    """
    found = importlib.util.find_spec("sklearn")
    shipped = Path(found.origin).parent / "datasets" / "data" / "digits.csv.gz" if found and found.origin else None
    if shipped is not None and shipped.is_file():
        rows = np.loadtxt(shipped, delimiter=",")
        pixels, labels = rows[:, :-1], rows[:, -1]
    else:  # another layout of scikit-learn: its own loader
        from sklearn.datasets import load_digits

        digits = load_digits()
        pixels, labels = digits.data, digits.target
    return (pixels / 16.0).astype(np.float32).reshape(-1, 1, 8, 8), labels.astype(np.int64)


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


def _digits_dataset(split: str, channels: int | None = None) -> DigitsDataset:
    images, labels = _digits_arrays()
    index = digits_split_indices(split)
    chosen = torch.tensor(images[index])
    return DigitsDataset(chosen.repeat(1, 3, 1, 1) if channels == 3 else chosen, torch.tensor(labels[index]))


@functools.lru_cache(maxsize=1)
def _digits_mean_std() -> tuple[float, float]:
    """Pixel mean and std of the digits train split (float64, population std), about 0.3054 and 0.3763."""
    images, _ = _digits_arrays()
    train = images[digits_split_indices("train")].astype(np.float64)
    return float(train.mean()), float(train.std())


# ---------------------------------------------------------------------------------------------- cifar10


def _cifar10_files(root: str, train: bool, transform) -> Dataset:
    """torchvision's CIFAR-10 reader with files checked for presence, not md5 (a md5 of None skips the hash)."""
    from torchvision.datasets import CIFAR10

    class CIFAR10Files(CIFAR10):
        train_list = [[f, None] for f, _ in CIFAR10.train_list]
        test_list = [[f, None] for f, _ in CIFAR10.test_list]
        meta = {**CIFAR10.meta, "md5": None}

    return CIFAR10Files(root, train=train, transform=transform, download=False)


def _cifar10_dataset(root: str, split: str, channels: int | None = None) -> Dataset:
    """CIFAR-10 from ``root/cifar-10-batches-py``; missing or unreadable files raise DatasetMissing."""
    folder = os.path.join(root, CIFAR10_FOLDER)
    missing = [f for f in CIFAR10_FILES if not os.path.isfile(os.path.join(folder, f))]
    if missing:
        raise DatasetMissing(
            f"CIFAR-10 not found under {root}: expected {CIFAR10_FOLDER}/ with {', '.join(CIFAR10_FILES)} "
            f"(missing: {', '.join(missing)}); download cifar-10-python.tar.gz and extract it there"
        )
    try:
        from torchvision import transforms as T

        transform = _cifar10_transform(split)
        if channels == 1:
            transform = T.Compose([T.Grayscale(1), transform])  # PIL's convert("L")
        return _cifar10_files(root, split == "train", transform)
    except (pickle.UnpicklingError, OSError, EOFError, ValueError, KeyError, IndexError, RuntimeError) as e:
        raise DatasetMissing(f"CIFAR-10 under {folder} is unreadable ({type(e).__name__}: {e})") from e


def _cifar10_transform(split: str):
    from torchvision import transforms as T

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


def _imagenet_transform(split: str, side: int | None = None):
    from torchvision import transforms as T

    side = side or 224
    if split == "train":
        return T.Compose([T.RandomResizedCrop(side), T.RandomHorizontalFlip(), T.ToTensor()])
    return T.Compose([T.Resize(round(side * 256 / 224)), T.CenterCrop(side), T.ToTensor()])


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


def _folder_transform(side: int | None):
    """The images as they are (``side`` None: they share one size, checked by the caller), else resized and cropped."""
    from torchvision import transforms as T

    if side is None:
        return T.ToTensor()
    return T.Compose([T.Resize(side), T.CenterCrop(side), T.ToTensor()])


def _folder_classes(folder: str) -> list[str]:
    classes = sorted(e.name for e in os.scandir(folder) if e.is_dir())
    if not classes:
        raise DatasetMissing(f"no class subfolders in {folder}: expected ImageFolder layout (FOLDER/CLASS/IMAGE)")
    return classes


class InputImages(Dataset):
    """Image files given one by one (``--input``), in their order: ``(image, None)``, no label.

    Each is read when asked for (``load_image_file``), resized and center-cropped to ``size`` when given, and
    converted to ``channels`` (1 or 3) when given, as the registered datasets convert theirs.
    """

    def __init__(self, paths: tuple[str, ...], size: int | None = None, channels: int | None = None):
        _check_channels(channels)
        self.paths, self.size, self.channels = tuple(paths), size, channels

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, None]:
        x = load_image_file(self.paths[index], self.size)
        if self.channels == 3 and x.shape[0] == 1:
            x = x.repeat(3, 1, 1)
        elif self.channels == 1 and x.shape[0] == 3:
            x = torch.tensordot(torch.tensor(LUMA), x, dims=1)[None]
        return x, None


def load_image_file(path: str, size: int | None = None) -> torch.Tensor:
    """An image file as [C, H, W] in [0, 1] (grey stays 1 channel, anything else RGB).

    UnreadableImage names the file when it is missing, not an image, or a float image with a non-finite pixel.
    """
    from PIL import UnidentifiedImageError

    if not os.path.isfile(path):
        raise UnreadableImage(f"{path}: file not found")
    try:
        with Image.open(path) as picture:
            picture.load()
            picture = eight_bit(check_finite(picture, path), path)
            picture = picture.convert("L") if picture.mode in GREY_MODES else picture.convert("RGB")
    except InvalidArgument as error:  # a float image with NaN or inf pixels: this image is refused
        raise UnreadableImage(str(error)) from None
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError) as error:
        raise UnreadableImage(f"{path}: not a readable image ({checks.first_line(error)})") from None
    if size is not None:
        picture = _resize_center_crop(picture, size)
    pixels = np.asarray(picture, dtype=np.float32) / 255.0
    pixels = pixels[None] if pixels.ndim == 2 else np.transpose(pixels, (2, 0, 1))
    return torch.from_numpy(np.ascontiguousarray(pixels))


def _resize_center_crop(picture: Image.Image, size: int) -> Image.Image:
    width, height = picture.size
    ratio = size / min(width, height)
    picture = picture.resize((max(size, round(width * ratio)), max(size, round(height * ratio))), Image.BILINEAR)
    left, top = (picture.width - size) // 2, (picture.height - size) // 2
    return picture.crop((left, top, left + size, top + size))


def _open_image(path: str, mode: str) -> Image.Image:
    """ImageFolder's loader, to ``mode`` ("L" or "RGB") instead of always RGB; non-finite pixels refused."""
    with open(path, "rb") as handle:
        return eight_bit(check_finite(Image.open(handle), path), path).convert(mode)


def _float_in_unit_range(picture: Image.Image, path: str) -> Image.Image:
    """A float image (PIL mode F, e.g. a float TIFF) holds values in [0, 1], as dsq's images do: as 8-bit grey.

    PIL's own conversion reads F values on a 0..255 scale, so a float image in [0, 1] would be read as black; values
    outside [0, 1] are refused rather than guessed at.
    """
    pixels = np.asarray(picture, dtype=np.float64)
    if pixels.size and (pixels.min() < 0.0 or pixels.max() > 1.0):
        raise InvalidArgument(f"{path}: a float image with values from {pixels.min():g} to {pixels.max():g}; dsq reads "
                              f"float images in [0, 1] (save 8- or 16-bit integer images for other ranges)")
    return Image.fromarray(np.round(pixels * 255).astype(np.uint8), "L")


def eight_bit(picture: Image.Image, path: str) -> Image.Image:
    """A 16-bit grey image (PIL modes I;16..., and I, as which older Pillows open 16-bit PNGs) as 8-bit grey, each
    value scaled by 255/65535; a float image in [0, 1] as 8-bit grey; any other image as it is.

    PIL's own conversion clips such values at 255 instead of scaling them, so a 16-bit scan would be read as white
    nearly everywhere and certified as an image nobody gave. A mode-I image with values outside 0..65535 is refused.
    """
    if picture.mode == "F":
        return _float_in_unit_range(picture, path)
    if not (picture.mode.startswith("I;16") or picture.mode == "I"):
        return picture
    pixels = np.asarray(picture).astype(np.int64)
    if pixels.size and (pixels.min() < 0 or pixels.max() > 65535):
        raise InvalidArgument(f"{path}: a {picture.mode} image with values from {pixels.min()} to {pixels.max()}; "
                              f"dsq reads integer images of 8 or 16 bits (0 to 65535)")
    return Image.fromarray(np.round(pixels * (255 / 65535)).astype(np.uint8), "L")


def check_finite(picture: Image.Image, path: str) -> Image.Image:
    """``picture`` unless it is a float image (PIL mode F, e.g. a float TIFF) with a NaN or inf pixel.

    Converting such an image would read NaN as 0 and inf as 255, and the job would certify an image nobody gave
    it; the Python API refuses non-finite pixels, and so does loading.
    """
    if picture.mode == "F":
        pixels = np.asarray(picture)
        bad = int((~np.isfinite(pixels)).sum())
        if bad:
            raise InvalidArgument(f"{path}: {bad} of {pixels.size} pixels are not finite (NaN or inf); "
                                  f"the image must be finite")
    return picture


def _image_folder(folder: str, transform, what: str, channels: int = 3, classes: tuple[str, ...] | None = None):
    """``ImageFolder(folder)``, images opened with ``channels`` channels, classes in the order ``classes`` (default:
    sorted); an empty or class-less folder raises DatasetMissing."""
    from torchvision.datasets import ImageFolder

    order = _class_order(folder, classes)
    loader = functools.partial(_open_image, mode="L" if channels == 1 else "RGB")
    try:
        dataset = ImageFolder(folder, transform=transform, loader=loader)
        if order != dataset.classes:  # relabelled in place: the dataset stays a plain (picklable) ImageFolder
            label = {dataset.class_to_idx[name]: new for new, name in enumerate(order)}
            dataset.samples = dataset.imgs = [(path, label[old]) for path, old in dataset.samples]
            dataset.targets = [new for _, new in dataset.samples]
            dataset.classes, dataset.class_to_idx = order, {name: new for new, name in enumerate(order)}
        return dataset
    except (FileNotFoundError, OSError) as e:
        raise DatasetMissing(f"{what} under {folder} has no readable images ({e})") from e


def _class_order(folder: str, classes: tuple[str, ...] | None) -> list[str]:
    """``classes`` if they name the class folders of ``folder`` exactly (as a set), else InvalidArgument; None: the
    folders sorted."""
    found = _folder_classes(folder)
    if classes is None or sorted(classes) == found:
        return list(found) if classes is None else list(classes)
    extra, missing = sorted(set(classes) - set(found)), sorted(set(found) - set(classes))
    why = "; ".join([f"{', '.join(extra)} {'is' if len(extra) == 1 else 'are'} not one of them"] * bool(extra)
                    + [f"{', '.join(missing)} {'is' if len(missing) == 1 else 'are'} missing"] * bool(missing))
    raise InvalidArgument(f"--classes {','.join(classes)} does not name the classes of {folder} "
                          f"({', '.join(found)}) exactly: {why}")


@dataclass(frozen=True)
class FolderImages:
    """What the image headers of a folder say: its distinct sizes and its channels."""

    sizes: tuple[tuple[int, int], ...]  # the first two distinct (width, height), in file order
    channels: int  # 1 when every image is grey, else 3


def _folder_images(folder: str) -> FolderImages:
    """The sizes and channels of the images in ``folder``; read again when files come or go in a class folder."""
    stamp = tuple(os.stat(os.path.join(folder, name)).st_mtime_ns for name in ["", *_folder_classes(folder)])
    return _scan_headers(os.path.abspath(folder), stamp)


@functools.lru_cache(maxsize=64)
def _scan_headers(folder: str, stamp: tuple[int, ...]) -> FolderImages:
    """Sizes and modes from each image's header (``Image.open`` decodes no pixels).

    It stops once it has seen two sizes and a colour image: nothing later can change the answer.
    """
    sizes: list[tuple[int, int]] = []
    grey = True
    for path, _ in _image_folder(folder, None, "image folder").samples:
        try:
            with Image.open(path) as picture:
                size, mode = picture.size, picture.mode
        except (OSError, ValueError, SyntaxError) as error:  # UnidentifiedImageError is an OSError
            reason = checks.first_line(error)
            raise DatasetMissing(f"{path} in image folder {folder} is not a readable image ({reason})") from None
        if size not in sizes and len(sizes) < 2:
            sizes.append(size)
        grey = grey and mode in GREY_MODES
        if len(sizes) > 1 and not grey:
            break
    return FolderImages(tuple(sizes), 1 if grey else 3)


def _native_size(folder: str, images: FolderImages) -> tuple[int, int]:
    """The one size ``(width, height)`` the folder's images share; InvalidArgument when they differ."""
    if len(images.sizes) > 1:
        (w1, h1), (w2, h2) = images.sizes[:2]
        raise InvalidArgument(f"the images in {folder} differ in size ({w1}x{h1} and {w2}x{h2}): pass --size N "
                              f"to resize them (shorter side to N) and center-crop them to NxN")
    return images.sizes[0]
