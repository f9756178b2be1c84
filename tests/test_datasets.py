"""Tests of dsq.datasets: the digits split, CIFAR-10 and image folders from tiny real files, test_subset."""

import os
import pickle

import numpy as np
import pytest
import torch
from PIL import Image

from dsq import datasets
from dsq.datasets import dataset_info, default_root, get_dataset, test_subset
from dsq.errors import DatasetMissing, InvalidArgument, UnknownName

CIFAR_LABELS = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]


# ---------------------------------------------------------------------------------------------- digits


def test_digits_sizes_shape_range_and_labels():
    train, test = get_dataset("digits", "train"), get_dataset("digits", "test")
    assert (len(train), len(test)) == (1433, 364)
    image, label = test[0]
    assert image.shape == (1, 8, 8) and image.dtype == torch.float32
    assert isinstance(label, int)
    for split in (train, test):
        images, labels = split.tensors
        assert images.min() >= 0.0 and images.max() <= 1.0
        assert images.max() == 1.0  # 16/16 occurs
        assert sorted(labels.unique().tolist()) == list(range(10))
    counts = np.bincount(test.tensors[1].numpy(), minlength=10)
    assert counts.min() >= 35 and counts.max() <= 37  # stratified: about 20% of each class


def test_digits_split_is_fixed_and_disjoint():
    train_idx = datasets.digits_split_indices("train")
    test_idx = datasets.digits_split_indices("test")
    assert not set(train_idx) & set(test_idx)
    assert sorted(train_idx + test_idx) == list(range(1797))
    assert test_idx == sorted(test_idx) and train_idx == sorted(train_idx)
    # pinned: a change of the split would silently change every stored result
    assert test_idx[:12] == [0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 35, 39]
    assert sum(i * (k + 1) for k, i in enumerate(test_idx)) == 79170694
    again = get_dataset("digits", "test")
    assert torch.equal(again.tensors[0], get_dataset("digits", "test").tensors[0])


def test_digits_info_uses_train_statistics():
    info = dataset_info("digits")
    assert (info.num_classes, info.shape) == (10, (1, 8, 8))
    images = get_dataset("digits", "train").tensors[0].double()
    assert info.mean[0] == pytest.approx(images.mean().item(), abs=1e-6)
    assert info.std[0] == pytest.approx(images.std(unbiased=False).item(), abs=1e-6)


def test_unknown_name_and_bad_split():
    with pytest.raises(UnknownName, match="cifar10"):
        get_dataset("mnist", "test")
    with pytest.raises(InvalidArgument, match="'train' or 'test'"):
        get_dataset("digits", "validation")
    with pytest.raises(UnknownName):
        dataset_info("mnist")


# ---------------------------------------------------------------------------------------------- cifar10


def _write_cifar(root, per_batch=3):
    """The python-pickle CIFAR-10 layout torchvision reads, with ``per_batch`` random images per batch."""
    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    batches = {}
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        data = rng.integers(0, 256, size=(per_batch, 3 * 32 * 32), dtype=np.uint8)
        labels = [int(x) for x in rng.integers(0, 10, size=per_batch)]
        batches[name] = (data, labels)
        with open(folder / name, "wb") as f:
            pickle.dump({"batch_label": name, "data": data, "labels": labels}, f)
    with open(folder / "batches.meta", "wb") as f:
        pickle.dump({"label_names": CIFAR_LABELS, "num_cases_per_batch": per_batch}, f)
    return batches


def test_cifar10_loads_from_pickled_batches(tmp_path):
    batches = _write_cifar(tmp_path)
    test = get_dataset("cifar10", "test", root=str(tmp_path))
    assert len(test) == 3
    image, label = test[1]
    data, labels = batches["test_batch"]
    assert image.shape == (3, 32, 32) and label == labels[1]
    expected = torch.tensor(data[1].reshape(3, 32, 32), dtype=torch.float32) / 255
    assert torch.allclose(image, expected)
    train = get_dataset("cifar10", "train", root=str(tmp_path))
    assert len(train) == 15
    x, _ = train[0]
    assert x.shape == (3, 32, 32) and 0.0 <= x.min() and x.max() <= 1.0


def test_cifar10_root_from_env_mapping(tmp_path):
    _write_cifar(tmp_path / "cifar10")
    env = {"DSQ_DATA": str(tmp_path)}
    assert default_root("cifar10", env) == str(tmp_path / "cifar10")
    assert default_root("cifar10", {}) is None
    assert len(get_dataset("cifar10", "test", env=env)) == 3


def test_cifar10_missing_folder_and_files(tmp_path):
    with pytest.raises(DatasetMissing, match="CIFAR-10 not found under .*cifar-10-batches-py"):
        get_dataset("cifar10", "test", root=str(tmp_path))
    _write_cifar(tmp_path)
    os.remove(tmp_path / "cifar-10-batches-py" / "data_batch_3")
    with pytest.raises(DatasetMissing, match="missing: data_batch_3"):
        get_dataset("cifar10", "test", root=str(tmp_path))
    with pytest.raises(DatasetMissing, match="DSQ_DATA"):
        get_dataset("cifar10", "test")


def test_cifar10_unreadable_batch(tmp_path):
    _write_cifar(tmp_path)
    (tmp_path / "cifar-10-batches-py" / "test_batch").write_bytes(b"not a pickle")
    with pytest.raises(DatasetMissing, match="unreadable"):
        get_dataset("cifar10", "test", root=str(tmp_path))


def test_cifar10_info():
    info = dataset_info("cifar10")
    assert info.shape == (3, 32, 32) and info.num_classes == 10
    assert info.mean == (0.4914, 0.4822, 0.4465) and info.std == (0.2023, 0.1994, 0.2010)


# ---------------------------------------------------------------------------------------------- image folders


def _write_image_folder(folder, classes=("cat", "dog"), per_class=2, size=(300, 280)):
    rng = np.random.default_rng(1)
    for name in classes:
        (folder / name).mkdir(parents=True)
        for k in range(per_class):
            pixels = rng.integers(0, 256, size=(size[1], size[0], 3), dtype=np.uint8)
            Image.fromarray(pixels).save(folder / name / f"{k}.png")


def test_imagenet_from_tiny_image_folder(tmp_path):
    _write_image_folder(tmp_path / "train")
    _write_image_folder(tmp_path / "val", per_class=1)
    test = get_dataset("imagenet", "test", root=str(tmp_path))
    assert len(test) == 2
    image, label = test[1]
    assert image.shape == (3, 224, 224) and label == 1
    assert 0.0 <= image.min() and image.max() <= 1.0
    train = get_dataset("imagenet", "train", root=str(tmp_path))
    assert len(train) == 4 and train[0][0].shape == (3, 224, 224)
    assert dataset_info("imagenet").num_classes == 1000


def test_imagenet_with_size(tmp_path):
    _write_image_folder(tmp_path / "train", per_class=1)
    _write_image_folder(tmp_path / "val", per_class=1)
    assert get_dataset("imagenet", "test", root=str(tmp_path), size=64)[0][0].shape == (3, 64, 64)
    assert get_dataset("imagenet", "train", root=str(tmp_path), size=64)[0][0].shape == (3, 64, 64)
    assert dataset_info("imagenet", size=64).shape == (3, 64, 64)
    assert dataset_info("imagenet").shape == (3, 224, 224)


def test_imagenet_missing(tmp_path):
    with pytest.raises(DatasetMissing, match="ImageNet not found"):
        get_dataset("imagenet", "test", root=str(tmp_path))


def test_folder_dataset_with_size_and_splits(tmp_path):
    _write_image_folder(tmp_path / "pets", classes=("a", "b", "c"), per_class=1)
    data = get_dataset(f"folder:{tmp_path / 'pets'}", "test", size=32)
    assert len(data) == 3 and data[2][0].shape == (3, 32, 32) and data[2][1] == 2
    assert get_dataset("folder", "test", root=str(tmp_path / "pets"))[0][0].shape == (3, 280, 300)  # its own size
    info = dataset_info(f"folder:{tmp_path / 'pets'}", size=32)
    assert (info.num_classes, info.shape) == (3, (3, 32, 32))
    _write_image_folder(tmp_path / "split" / "val", per_class=1)
    _write_image_folder(tmp_path / "split" / "train", per_class=3)
    assert len(get_dataset("folder", "test", root=str(tmp_path / "split"))) == 2
    assert len(get_dataset("folder", "train", root=str(tmp_path / "split"))) == 6


def test_a_folder_without_train_subfolder_is_not_trained_on(tmp_path):
    """Its images are the ones certified: training on them too would report accuracy on the training set."""
    _write_image_folder(tmp_path / "pets", per_class=2)
    for name, root in ((f"folder:{tmp_path / 'pets'}", None), ("folder", str(tmp_path / "pets"))):
        with pytest.raises(DatasetMissing, match=r"no train/ subfolder.*folder:train=TRAIN_DIR,test=TEST_DIR") as e:
            get_dataset(name, "train", root=root)
        assert "\n" not in str(e.value) and str(tmp_path / "pets") in str(e.value)
        assert len(get_dataset(name, "test", root=root)) == 4  # still certifiable


def test_a_folder_with_only_train_has_no_test_split(tmp_path):
    _write_image_folder(tmp_path / "data" / "train", per_class=2)
    assert len(get_dataset(f"folder:{tmp_path / 'data'}", "train")) == 4
    with pytest.raises(DatasetMissing, match=r"has train/ but no test/ or val/"):
        get_dataset(f"folder:{tmp_path / 'data'}", "test")  # not its class folder 'train' as one class


def test_folder_splits_named_explicitly(tmp_path):
    _write_image_folder(tmp_path / "mine", per_class=3)
    _write_image_folder(tmp_path / "held-out", per_class=1)
    name = f"folder:train={tmp_path / 'mine'},test={tmp_path / 'held-out'}"
    assert len(get_dataset(name, "train")) == 6 and len(get_dataset(name, "test")) == 2
    assert dataset_info(name).num_classes == 2
    same = f"folder:train={tmp_path / 'mine'},test={tmp_path / 'mine'}"  # on purpose, in so many words
    assert len(get_dataset(same, "train")) == len(get_dataset(same, "test")) == 6
    with pytest.raises(DatasetMissing, match=r"no train folder in folder:test="):
        get_dataset(f"folder:test={tmp_path / 'held-out'}", "train")
    with pytest.raises(DatasetMissing, match=r"train folder .*nope not found"):
        get_dataset(f"folder:train={tmp_path / 'nope'},test={tmp_path / 'mine'}", "train")
    for bad in (f"train={tmp_path},val={tmp_path}", f"train={tmp_path},train={tmp_path}", "train="):
        with pytest.raises(InvalidArgument, match="folder split"):
            get_dataset(f"folder:{bad}", "test")


def test_folder_dataset_errors(tmp_path):
    with pytest.raises(DatasetMissing, match="not found"):
        get_dataset(f"folder:{tmp_path / 'nope'}", "test")
    (tmp_path / "empty").mkdir()
    with pytest.raises(DatasetMissing, match="no class subfolders"):
        get_dataset(f"folder:{tmp_path / 'empty'}", "test")
    (tmp_path / "empty" / "cls").mkdir()
    with pytest.raises(DatasetMissing, match="no readable images"):
        get_dataset(f"folder:{tmp_path / 'empty'}", "test")
    with pytest.raises(InvalidArgument, match="size"):
        get_dataset(f"folder:{tmp_path}", "test", size=0)


def _write_pictures(folder, sizes, mode="RGB", start=0):
    """One PNG per (class, (width, height)) pair of ``sizes``, random pixels in ``mode``."""
    rng = np.random.default_rng(start)
    for k, (name, (width, height)) in enumerate(sizes, start):
        (folder / name).mkdir(parents=True, exist_ok=True)
        shape = (height, width) if mode == "L" else (height, width, 3)
        Image.fromarray(rng.integers(0, 256, size=shape, dtype=np.uint8), mode).save(folder / name / f"{k}.png")


def test_folder_images_keep_their_own_size(tmp_path):
    """A folder of 32x32 images stays 32x32, pixel for pixel: no resize to 224 behind the user's back."""
    _write_pictures(tmp_path / "small", [("a", (32, 32)), ("a", (32, 32)), ("b", (32, 32))])
    data = get_dataset(f"folder:{tmp_path / 'small'}", "test")
    image, label = data[2]
    assert image.shape == (3, 32, 32) and label == 1
    pixels = np.asarray(Image.open(tmp_path / "small" / "b" / "2.png"), dtype=np.float32) / 255
    assert torch.equal(image, torch.from_numpy(pixels).permute(2, 0, 1))
    info = dataset_info(f"folder:{tmp_path / 'small'}")
    assert (info.num_classes, info.shape) == (2, (3, 32, 32))
    _write_pictures(tmp_path / "wide", [("a", (40, 24))])  # not square: (C, H, W) = (3, 24, 40)
    assert get_dataset(f"folder:{tmp_path / 'wide'}", "test")[0][0].shape == (3, 24, 40)
    assert dataset_info(f"folder:{tmp_path / 'wide'}").shape == (3, 24, 40)


def test_folder_images_of_different_sizes_need_a_size(tmp_path):
    _write_pictures(tmp_path / "mixed", [("a", (32, 32)), ("a", (32, 32)), ("b", (40, 24))])
    name = f"folder:{tmp_path / 'mixed'}"
    for call in (lambda: get_dataset(name, "test"), lambda: dataset_info(name)):
        with pytest.raises(InvalidArgument, match=r"differ in size \(32x32 and 40x24\): pass --size N") as e:
            call()
        assert "\n" not in str(e.value) and str(tmp_path / "mixed") in str(e.value)
    data = get_dataset(name, "test", size=16)
    assert [data[i][0].shape for i in range(3)] == [(3, 16, 16)] * 3
    assert dataset_info(name, size=16).shape == (3, 16, 16)


def test_a_folder_is_scanned_again_when_its_files_change(tmp_path):
    _write_pictures(tmp_path / "grows", [("a", (32, 32))])
    name = f"folder:{tmp_path / 'grows'}"
    assert dataset_info(name).shape == (3, 32, 32)
    _write_pictures(tmp_path / "grows", [("b", (20, 20))], start=1)  # a new class folder: a new scan
    with pytest.raises(InvalidArgument, match="32x32 and 20x20"):
        dataset_info(name)


def test_an_unreadable_image_is_named(tmp_path):
    _write_pictures(tmp_path / "broken", [("a", (8, 8))])
    (tmp_path / "broken" / "a" / "1.png").write_bytes(b"not a png")
    with pytest.raises(DatasetMissing, match=r"1\.png in image folder .* is not a readable image"):
        get_dataset(f"folder:{tmp_path / 'broken'}", "test")


def test_size_of_fixed_size_datasets(tmp_path):
    assert get_dataset("digits", "test", size=8)[0][0].shape == (1, 8, 8)
    with pytest.raises(InvalidArgument, match=r"digits images are always 8x8: --size 16 applies to folder and "
                                              r"imagenet datasets only"):
        get_dataset("digits", "test", size=16)
    with pytest.raises(InvalidArgument, match="cifar10 images are always 32x32"):
        dataset_info("cifar10", size=224)
    _write_cifar(tmp_path)
    with pytest.raises(InvalidArgument, match="cifar10 images are always 32x32"):
        get_dataset("cifar10", "test", root=str(tmp_path), size=64)
    assert get_dataset("cifar10", "test", root=str(tmp_path), size=32)[0][0].shape == (3, 32, 32)


def test_grayscale_folder_has_one_channel(tmp_path):
    _write_pictures(tmp_path / "grey", [("a", (16, 16)), ("b", (16, 16))], mode="L")
    name = f"folder:{tmp_path / 'grey'}"
    image = get_dataset(name, "test")[1][0]
    pixels = np.asarray(Image.open(tmp_path / "grey" / "b" / "1.png"), dtype=np.float32) / 255
    assert image.shape == (1, 16, 16) and torch.equal(image[0], torch.from_numpy(pixels))
    info = dataset_info(name)
    assert info.shape == (1, 16, 16) and len(info.mean) == len(info.std) == 1
    assert info.mean[0] == pytest.approx(0.299 * 0.485 + 0.587 * 0.456 + 0.114 * 0.406)
    assert datasets.image_channels(name) == 1
    # converted for a model that takes RGB: the grey channel three times
    rgb = get_dataset(name, "test", channels=3)[1][0]
    assert rgb.shape == (3, 16, 16) and all(torch.equal(rgb[c], image[0]) for c in range(3))
    assert dataset_info(name, channels=3).shape == (3, 16, 16) and dataset_info(name, channels=3).mean == \
        datasets.IMAGENET_MEAN
    # one colour image makes the whole folder RGB
    _write_pictures(tmp_path / "grey", [("c", (16, 16))], start=2)
    assert get_dataset(name, "test")[0][0].shape == (3, 16, 16) and datasets.image_channels(name) == 3


def test_rgb_images_converted_to_one_channel_as_pil_does(tmp_path):
    _write_pictures(tmp_path / "rgb", [("a", (12, 10))])
    grey = get_dataset(f"folder:{tmp_path / 'rgb'}", "test", channels=1)[0][0]
    expected = np.asarray(Image.open(tmp_path / "rgb" / "a" / "0.png").convert("L"), dtype=np.float32) / 255
    assert grey.shape == (1, 10, 12) and torch.equal(grey[0], torch.from_numpy(expected))
    _write_cifar(tmp_path / "cifar")
    assert get_dataset("cifar10", "test", root=str(tmp_path / "cifar"), channels=1)[0][0].shape == (1, 32, 32)
    assert dataset_info("cifar10", channels=1).mean == pytest.approx((0.299 * 0.4914 + 0.587 * 0.4822
                                                                      + 0.114 * 0.4465,))
    digits = get_dataset("digits", "test", channels=3)[0][0]
    assert digits.shape == (3, 8, 8) and torch.equal(digits[2], get_dataset("digits", "test")[0][0][0])
    with pytest.raises(InvalidArgument, match="1 \\(grayscale\\) or 3 \\(RGB\\) channels, not 4"):
        get_dataset("digits", "test", channels=4)


def test_channel_note_says_what_is_converted():
    assert datasets.channel_note("digits", 1, None) is None and datasets.channel_note("digits", 1, 1) is None
    assert "grayscale (1 channel): the model takes 3, so the grey channel is repeated" in \
        datasets.channel_note("folder:x", 1, 3)
    assert "converted to grayscale (ITU-R 601-2 luma" in datasets.channel_note("folder:x", 3, 1)


# ---------------------------------------------------------------------------------------------- test_subset


def test_test_subset_every_skip_at_most_max():
    data = list(range(10))
    assert test_subset(data) == list(range(10))
    assert test_subset(data, skip=3) == [0, 3, 6, 9]
    assert test_subset(data, skip=3, max=2) == [0, 3]
    assert test_subset(data, skip=20) == [0]
    assert test_subset(get_dataset("digits", "test"), skip=100) == [0, 100, 200, 300]


@pytest.mark.parametrize("kwargs", [{"skip": 0}, {"skip": -1}, {"max": 0}, {"skip": 1.5}, {"max": -1}])
def test_test_subset_rejects_bad_arguments(kwargs):
    with pytest.raises(InvalidArgument):
        test_subset(range(5), **kwargs)
