"""Previews (dsq.previews): the picture of an image's noisy samples beside their denoised versions, and f o D's
classes on them, from noise of their own."""

import io

import numpy as np
import pytest
import torch
from PIL import Image

from dsq import previews, sampling
from dsq.previews import GAP, SMALLEST


class Halves(torch.nn.Module):
    """A 'denoiser' that halves every pixel, and a classifier that says class 1 when the mean pixel is above 0.3."""

    def forward(self, x):
        return x / 2


def classifier(x):
    mean = x.flatten(1).mean(dim=1)
    return torch.stack([0.3 - mean, mean - 0.3], dim=1)


class Lambda(torch.nn.Module):
    def __init__(self, function):
        super().__init__()
        self.function = function

    def forward(self, x):
        return self.function(x)


def test_a_preview_shows_the_image_its_noisy_samples_and_their_denoised_versions():
    x = torch.full((1, 8, 8), 0.8)
    chain = torch.nn.Sequential(Halves(), Lambda(classifier))
    png, classes = previews.make(chain, chain[:-1], x, sigma=0.1, seed=3, image=5, count=4)
    picture = np.asarray(Image.open(io.BytesIO(png)).convert("RGB"))
    tile = SMALLEST  # 8x8 pixels, each shown as an 8x8 block
    assert picture.shape == (2 * tile + GAP, 5 * tile + 4 * GAP, 3)
    assert classes == [1, 1, 1, 1]  # D(x + δ) has mean ~0.4
    assert (picture[:tile, :tile] == round(0.8 * 255)).all()  # the clean image, top left
    assert (picture[tile:, :tile] == 255).all()  # no denoised version of the clean image: blank
    noisy = picture[:tile, tile + GAP:2 * tile + GAP, 0].astype(float)
    denoised = picture[tile + GAP:, tile + GAP:2 * tile + GAP, 0].astype(float)
    assert abs(noisy.mean() - 204) < 10 and np.abs(denoised - noisy / 2).max() <= 1  # D(x + δ) below x + δ
    again, _ = previews.make(chain, chain[:-1], x, sigma=0.1, seed=3, image=5, count=4)
    other, _ = previews.make(chain, chain[:-1], x, sigma=0.1, seed=3, image=6, count=4)
    assert again == png and other != png  # the same noise for the same job and image, other noise elsewhere


def test_without_a_denoiser_a_preview_has_one_row_and_large_images_shrink():
    x = torch.rand((3, 300, 200), generator=torch.Generator().manual_seed(0))
    png, classes = previews.make(Lambda(classifier), None, x, sigma=0.25, seed=0, image=0, count=2)
    picture = Image.open(io.BytesIO(png))
    assert picture.size == (3 * 85 + 2 * GAP, previews.LARGEST) and len(classes) == 2  # 300x200 -> 128x85


def test_preview_noise_is_none_of_the_certifications_streams():
    x = torch.zeros((1, 4, 4))
    drawn = previews.noisy_samples(x, sigma=1.0, seed=0, image=0, count=2)
    for phase in sampling.PHASES:
        generator = torch.Generator().manual_seed(sampling.stream_seed(0, 0, phase, 0))
        certified = torch.randn((2, 1, 4, 4), generator=generator)
        assert not torch.equal(certified[0], drawn[0]) and not torch.equal(certified[0], drawn[1])


def test_a_sample_with_non_finite_logits_has_class_minus_one():
    nan_when_dark = Lambda(lambda x: torch.where(x.mean() > 10, torch.zeros(len(x), 2), torch.full((len(x), 2),
                                                                                                       float("nan"))))
    _, classes = previews.make(nan_when_dark, None, torch.zeros((1, 4, 4)), sigma=0.1, seed=0, image=0, count=3)
    assert classes == [-1, -1, -1]


@pytest.mark.parametrize("count", [1, 4])
def test_the_denoised_row_has_a_tile_per_sample(count):
    chain = torch.nn.Sequential(Halves(), Lambda(classifier))
    png, classes = previews.make(chain, chain[:-1], torch.zeros((3, 32, 32)), sigma=0.5, seed=1, image=2,
                                 count=count)
    assert Image.open(io.BytesIO(png)).size == ((count + 1) * 64 + count * GAP, 2 * 64 + GAP)
    assert len(classes) == count
