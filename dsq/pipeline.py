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
    if spec.inputs:  # each file keeps its own channels until converted; no note for a list of files
        return datasets.InputImages(spec.inputs, spec.size, channels), None
    own = datasets.image_channels(spec.dataset, spec.split, root=root)
    dataset = datasets.get_dataset(spec.dataset, spec.split, root=root, size=spec.size, channels=channels,
                                   classes=spec.classes)
    return dataset, datasets.channel_note(spec.dataset, own, channels)


def images(spec, root: str | None):
    """The job's images as they are stored (a dataset split, or its input files), before any conversion."""
    if spec.inputs:
        return datasets.InputImages(spec.inputs, spec.size)
    return datasets.get_dataset(spec.dataset, spec.split, root=root, size=spec.size, classes=spec.classes)


def where(spec) -> str:
    """The job's images in a message: its dataset, or its input files."""
    return spec.dataset or f"the input files ({len(spec.inputs)})"


class ResizeTo(torch.nn.Module):
    """Resizes images to ``size`` x ``size`` (bicubic, antialiased, kept in [0, 1]) when they have another size:
    what a denoiser returns at the dataset's resolution, for a classifier that takes another one."""

    def __init__(self, size: int):
        super().__init__()
        self.size = int(size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if tuple(x.shape[-2:]) == (self.size, self.size):
            return x
        resized = torch.nn.functional.interpolate(x, size=(self.size, self.size), mode="bicubic", antialias=True,
                                                  align_corners=False)
        return resized.clamp(0.0, 1.0)


def input_size(classifier: torch.nn.Module) -> int | None:
    """The one image size a classifier takes, when it says so (an ``image_size`` attribute, as torchvision's
    vision transformers have); None for a classifier of any size."""
    for module in classifier.modules():
        size = getattr(module, "image_size", None)
        if isinstance(size, int) and not isinstance(size, bool) and size > 0:
            return size
    return None


def chain(classifier: torch.nn.Module, denoiser: torch.nn.Module | None = None) -> torch.nn.Module:
    """f o D as one module: D, then a resize to the classifier's input size if it declares one, then f."""
    if denoiser is None:
        return classifier
    size = input_size(classifier)
    return torch.nn.Sequential(denoiser, *([ResizeTo(size)] if size else []), classifier)


def notes(model: torch.nn.Module, x: torch.Tensor | None = None) -> list[str]:
    """What the job's log says of f o D (on images like ``x``): a diffusion denoiser's timestep, a resize."""
    from dsq import diffusion

    lines = []
    for module in model.modules():
        if isinstance(module, diffusion.OneShotDenoiser):
            lines.append(module.describe())
        if isinstance(module, ResizeTo) and x is not None and tuple(x.shape[-2:]) != (module.size, module.size):
            lines.append(f"the denoised {x.shape[-1]}x{x.shape[-2]} images are resized to {module.size}x"
                         f"{module.size} for the classifier (bicubic, antialiased)")
    return lines


def takes_images(models: list[torch.nn.Module], x: torch.Tensor, spec) -> int:
    """``sampling.check_image`` of f o D (``models``: f, then D if any), its refusal naming the channels and size
    of the dataset's images."""
    resizable = spec.size is None and (bool(spec.inputs) or spec.dataset.startswith("folder")
                                       or spec.dataset == "imagenet")
    hint = "; --size N resizes them" if resizable else ""
    for model in models[1:]:
        if hasattr(model, "check_images"):  # a diffusion model takes the channels and size it was trained at
            try:
                model.check_images(x.shape[0], x.shape[1], x.shape[2], where(spec))
            except InvalidArgument as error:
                raise InvalidArgument(f"{error}{hint}") from None
    try:
        return sampling.check_image(chain(*models), x)
    except InvalidArgument as error:
        raise InvalidArgument(f"{error} (the images of {where(spec)} are {x.shape[0]}-channel, "
                              f"{x.shape[2]}x{x.shape[1]}{hint})") from None


def image_plan(spec, dataset) -> list[int]:
    """The dataset indices a certify job covers, in order (every skip-th, at most max)."""
    return datasets.test_subset(dataset, skip=spec.skip, max=spec.max_images)


def load(classifier: str | dict, denoiser: str | dict | None, device, settings: Settings | None = None,
         sigma: float | None = None):
    """f o D (or f alone), in eval mode on ``device``, from checkpoint paths or ``references.source``s; a diffusion
    model denoises at ``sigma`` (or at the σ its source carries)."""
    def one(model, role):
        found = references.file_source(model) if isinstance(model, str) else model
        if role == "denoiser" and sigma is not None:
            found = {"sigma": sigma, **found}
        return references.load_source(settings, found, role, device)

    classifier = one(classifier, "classifier")
    return chain(classifier, one(denoiser, "denoiser") if denoiser is not None else None).eval()


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
