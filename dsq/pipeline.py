"""f o D and its images: load the chain, check it takes a dataset's images, convert their channels.

What a certify job's check (``dsq.kinds.certify``), its loop and its sampler actors (the Ray side), and a train
job's data (``train_data``) share: one place that knows how a denoiser, a classifier and a dataset fit.
"""

from __future__ import annotations

import torch

from dsq import datasets, references, sampling
from dsq.errors import InvalidArgument
from dsq.settings import Settings


def model_channels(classifier: torch.nn.Module, denoiser: torch.nn.Module | None = None) -> int | None:
    """The channels of the images f o D takes (D's, else f's); None when the models do not say."""
    taken = sampling.input_channels(classifier)
    if denoiser is None:
        return taken
    denoised = sampling.input_channels(denoiser)
    if denoised is not None and taken is not None and denoised != taken:
        raise InvalidArgument(f"the denoiser takes and returns {denoised}-channel images but the classifier takes "
                              f"{taken}-channel images: they cannot be chained")
    return taken if denoised is None else denoised


def job_dataset(spec, root: str | None, channels: int | None):
    """``(dataset, note)``: the job's images with the ``channels`` f o D takes, and a line saying any conversion."""
    if channels not in (None, 1, 3):
        raise InvalidArgument(f"the model takes {channels}-channel images; dsq converts images to 1 (grayscale) or "
                              f"3 (RGB) channels only")
    own = datasets.image_channels(spec.dataset, spec.split, root=root)
    dataset = datasets.get_dataset(spec.dataset, spec.split, root=root, size=spec.size, channels=channels,
                                   classes=spec.classes)
    return dataset, datasets.channel_note(spec.dataset, own, channels)


def takes_images(models: list[torch.nn.Module], x: torch.Tensor, spec) -> int:
    """``sampling.check_image`` of f o D (``models``: f, then D if any), its refusal naming the channels and size
    of the dataset's images."""
    try:
        return sampling.check_image(torch.nn.Sequential(*reversed(models)), x)
    except InvalidArgument as error:
        resizable = spec.size is None and (spec.dataset.startswith("folder") or spec.dataset == "imagenet")
        raise InvalidArgument(f"{error} (the images of {spec.dataset} are {x.shape[0]}-channel, "
                              f"{x.shape[2]}x{x.shape[1]}{'; --size N resizes them' if resizable else ''})") from None


def image_plan(spec, dataset) -> list[int]:
    """The dataset indices a certify job covers, in order (every skip-th, at most max)."""
    return datasets.test_subset(dataset, skip=spec.skip, max=spec.max_images)


def load(classifier: str | dict, denoiser: str | dict | None, device, settings: Settings | None = None):
    """f o D (or f alone), in eval mode on ``device``, from checkpoint paths or ``references.source``s."""
    def one(model, role):
        found = references.file_source(model) if isinstance(model, str) else model
        return references.load_source(settings, found, role, device)

    classifier = one(classifier, "classifier")
    if denoiser is None:
        return classifier.eval()
    return torch.nn.Sequential(one(denoiser, "denoiser"), classifier).eval()


def train_data(spec, root: str | None, models: list):
    """``(info, train set, test set, notes)`` of a train job, its images converted to the channels its models take.

    Without models that say (a classifier trained from scratch), the test images' own channels. ``notes`` say
    what is converted; train images of another size than the test images are refused.
    """
    taken = sorted({c for c in map(sampling.input_channels, models) if c is not None})
    if len(taken) > 1:
        raise InvalidArgument(f"the models of this job take images of different channels ({taken[0]} and "
                              f"{taken[1]}): they cannot be trained on the same images")
    info = datasets.dataset_info(spec.dataset, root=root, size=spec.size, channels=taken[0] if taken else None)
    sets = {split: datasets.get_dataset(spec.dataset, split, root=root, size=spec.size, channels=info.channels,
                                        classes=spec.classes)
            for split in ("train", "test")}
    shape = tuple(sets["train"][0][0].shape)
    if shape != info.shape:
        raise InvalidArgument(f"the train images of {spec.dataset} are {shape[2]}x{shape[1]} but its test images "
                              f"{info.width}x{info.height}: pass --size N to resize both to NxN")
    notes = [datasets.channel_note(f"{spec.dataset} ({split})",
                                   datasets.image_channels(spec.dataset, split, root=root), info.channels)
             for split in sets]
    return info, sets["train"], sets["test"], [note for note in notes if note]
