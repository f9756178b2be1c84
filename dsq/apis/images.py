"""The images of a certify-api job, and the denoiser in front of the API: loaded and checked."""

from __future__ import annotations

import torch
from sqlalchemy.orm import Session

from dsq import checks, datasets, references, uploads
from dsq.apis import base
from dsq.errors import InvalidArgument, UnreadableImage
from dsq.settings import Settings


class ImageSource:
    """The images a job certifies: dataset items or input files, by image index."""

    def __init__(self, spec, settings: Settings):
        self.spec, data = spec, uploads.data_spec(settings, spec)  # read from the store's copies, said as given
        self.files = data.inputs
        if spec.dataset:
            self.dataset = datasets.get_dataset(data.dataset, spec.split, root=settings.data_root_of(data),
                                                size=spec.size, classes=spec.classes)
            self.indices = datasets.test_subset(self.dataset, skip=spec.skip, max=spec.max_images)
        else:
            indices = list(range(0, len(spec.inputs), spec.skip))
            self.indices = indices[:spec.max_images] if spec.max_images else indices

    def image(self, index: int) -> torch.Tensor:
        """Image ``index`` as [C, H, W] in [0, 1]; UnreadableImage for a bad input file."""
        if self.spec.dataset:
            return self.dataset[index][0]
        return base.load_image(self.files[index], self.spec.size)

    def describe(self, index: int) -> dict:
        if self.spec.dataset:
            label = int(self.dataset[index][1])
            return {"dataset": self.spec.dataset, "split": self.spec.split, "dataset_label": label}
        return {"input": self.spec.inputs[index]}


def load_denoiser(session: Session, spec, settings: Settings) -> torch.nn.Module | None:
    """The denoiser in front of the API (a diffusion model's at the job's σ), or None."""
    if not spec.denoiser:
        return None
    return references.load(session, spec.denoiser, settings, "denoiser", sigma=spec.sigma,
                           uploads=spec.uploads).eval()


def check_denoiser(denoiser: torch.nn.Module, source: ImageSource) -> None:
    for index in source.indices:
        try:
            x = source.image(index)
        except UnreadableImage:
            continue
        if hasattr(denoiser, "check_images"):  # a diffusion model takes the channels and size it was trained at
            where = source.spec.dataset or source.spec.inputs[index]
            denoiser.check_images(x.shape[0], x.shape[1], x.shape[2], where)
        with torch.inference_mode():
            try:
                out = denoiser(x[None])
            except RuntimeError as error:
                raise InvalidArgument(f"the denoiser cannot take an image of shape {tuple(x.shape)}: "
                                      f"{checks.first_line(error)}") from None
        if out.shape != x[None].shape:
            raise InvalidArgument(f"the denoiser maps {tuple(x.shape)} to {tuple(out.shape[1:])}; "
                                  "it must keep the shape")
        return
