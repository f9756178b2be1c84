"""The base classifier f of an API certification, and its vote counts.

f(x + delta) = top_label(API(encode(clamp(D(clip(x + delta))))))

- clip      x + delta clipped to [0, 1]  (delta ~ N(0, sigma^2 I), added in [0, 1] pixel space)
- D         the denoiser, or the identity (the "no denoiser" baseline)
- clamp     D's output clamped to [0, 1]
- encode    8-bit PNG of round(x * 255), optionally upscaled by an integer factor (nearest neighbour);
            the encoding is part of f and is recorded with every result (``ENCODING``)
- API       one query; the answer is a list of (label, confidence)
- top_label the most confident label; ties go to the lexicographically smallest label; an empty
            answer is its own class ``"<none>"``

Non-finite numbers: a denoiser output with a NaN or inf pixel fails its image (``NonFiniteOutput``,
raised by ``phase_queries`` before anything is encoded), and ``encode_png`` refuses non-finite pixels.
Clamping would hide them (inf clamps to 1; NaN stays NaN and becomes arbitrary bytes) and the query would
then be a vote for whatever the API answers to an image the denoiser never produced. Failing the image is
sound (no certificate at all) and keeps queries and labels one to one; a denoiser that returns NaN is broken.

Randomness has an identity: sample ``i`` of phase ``p`` of image ``j`` draws its noise from a generator
seeded by ``stream_seed(seed, j, p, i)``, so a query that is retried, resumed or repeated re-sends the
same bytes; it is never a new draw. The clean query (x itself, no noise and no denoiser) gives the
API's own label, against which the certified label is judged.

Sequential certification at a target radius sends the estimation queries in batches, in sample order,
and stops when the test of ``dsq.sequential`` decides. The labels become counts and a certificate in
``dsq.apis.labels``.
"""

from __future__ import annotations

import hashlib
import io
from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image

from dsq import datasets, sampling
from dsq.apis.labels import CLEAN, ESTIMATION, SELECTION
from dsq.errors import InvalidArgument, NonFiniteOutput

# Noisy copies denoised per forward pass: 50 images of 224x224 keep the denoiser's activations to a few
# hundred MB on a CPU, and queries go out while the next batch is denoised.
DENOISE_BATCH = 50


@dataclass(frozen=True)
class Query:
    """One query to send: which sample it is, its encoded bytes and their sha256."""

    phase: str
    sample: int
    image: bytes
    sha256: str


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def encode_png(x: torch.Tensor, scale: int = 1) -> bytes:
    """An image [C, H, W] in [0, 1] (C = 1 or 3) as 8-bit PNG bytes of round(x * 255).

    Finite values outside [0, 1] are clamped; NaN or inf is refused (InvalidArgument).
    """
    if not bool(torch.isfinite(x).all()):
        raise InvalidArgument(f"cannot encode an image whose pixels are not finite "
                              f"({int((~torch.isfinite(x)).sum())} NaN or inf)")
    pixels = torch.round(x.detach().clamp(0, 1) * 255).to(torch.uint8).cpu().numpy()
    pixels = np.ascontiguousarray(np.transpose(pixels, (1, 2, 0)))
    if scale > 1:
        pixels = pixels.repeat(scale, axis=0).repeat(scale, axis=1)
    picture = Image.fromarray(pixels[:, :, 0], "L") if pixels.shape[2] == 1 else Image.fromarray(pixels, "RGB")
    buffer = io.BytesIO()
    picture.save(buffer, format="PNG", compress_level=6, optimize=False)
    return buffer.getvalue()


def noisy_copies(x: torch.Tensor, *, sigma: float, seed: int, image: int, phase: str,
                 start: int, count: int) -> torch.Tensor:
    """Samples ``[start, start + count)`` of one phase: clip(x + delta) with identity-seeded delta."""
    generator = torch.Generator(device="cpu")
    copies = torch.empty((count, *x.shape), dtype=torch.float32)
    for offset in range(count):
        generator.manual_seed(sampling.stream_seed(seed, image, phase, start + offset))
        copies[offset] = torch.randn(x.shape, generator=generator, dtype=torch.float32)
    return (copies.mul_(sigma).add_(x.float().cpu())).clamp_(0, 1)


def phase_queries(x: torch.Tensor, denoiser: torch.nn.Module | None, *, sigma: float, seed: int, image: int,
                  phase: str, num: int, scale: int = 1, first: int = 0) -> list[Query]:
    """The ``num`` encoded queries of one phase from sample ``first`` on (the denoiser runs in eval mode,
    in batches of DENOISE_BATCH samples counted from 0, so a sample is always denoised with the same others).

    Raises NonFiniteOutput if the denoiser returns NaN or inf on any sample (the image fails).
    """
    if first % DENOISE_BATCH:
        raise InvalidArgument(f"queries start at a multiple of {DENOISE_BATCH}, got {first}")
    queries = []
    for start in range(first, first + num, DENOISE_BATCH):
        count = min(DENOISE_BATCH, first + num - start)
        batch = noisy_copies(x, sigma=sigma, seed=seed, image=image, phase=phase, start=start, count=count)
        if denoiser is not None:
            with sampling.eval_mode(denoiser), torch.inference_mode():
                batch = denoiser(batch.to(sampling.model_device(denoiser))).cpu()
            _check_finite(batch, phase=phase, start=start, image=image)
        for offset, sample in enumerate(batch.clamp(0, 1)):
            data = encode_png(sample, scale)
            queries.append(Query(phase, start + offset, data, sha256(data)))
    return queries


def _check_finite(batch: torch.Tensor, *, phase: str, start: int, image: int) -> None:
    """Raise NonFiniteOutput naming the first sample of ``batch`` with a NaN or inf pixel."""
    finite = torch.isfinite(batch).flatten(1).all(dim=1)
    if not bool(finite.all()):
        sample = start + int((~finite).nonzero()[0])
        raise NonFiniteOutput(f"the denoiser returned NaN or inf on {phase} sample {sample} of image {image} "
                              f"({int((~finite).sum())} of {len(batch)} samples in its batch); "
                              f"the image cannot be certified with this denoiser")


def image_queries(x: torch.Tensor, denoiser: torch.nn.Module | None, *, sigma: float, seed: int, image: int,
                  n0: int, n: int, scale: int = 1) -> list[Query]:
    """The clean query, then n0 selection and n estimation queries of one image."""
    clean = encode_png(x, scale)
    common = dict(sigma=sigma, seed=seed, image=image, scale=scale)
    return ([Query(CLEAN, 0, clean, sha256(clean))]
            + phase_queries(x, denoiser, phase=SELECTION, num=n0, **common)
            + phase_queries(x, denoiser, phase=ESTIMATION, num=n, **common))


def load_image(path: str, size: int | None = None) -> torch.Tensor:
    """An image file as [C, H, W] in [0, 1] (grey stays 1 channel, anything else RGB); UnreadableImage if not."""
    return datasets.load_image_file(path, size)
