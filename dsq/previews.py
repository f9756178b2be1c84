"""Previews: a few noisy samples of one image beside their denoised versions, as one small PNG for its page.

A sampler actor makes them (``preview``) for the first images of a certify job (its spec's ``previews``) and for
a ``preview`` job (``dsq preview JOB IMAGE``); the dashboard shows the stored PNG and never runs a model.

Sample ``i`` of image ``j`` draws its noise from a CPU generator seeded by ``preview_seed(seed, j, i)``, a stream
no certification draws from (``dsq.sampling.stream_seed`` names the phases it samples), so a preview never changes
a count, and the same job shows the same samples on any device. The noisy samples are x + δ as f o D sees them
(shown clipped to [0, 1]); the denoised ones D(x + δ) as the classifier gets them (after any resize).

The PNG: the clean image, then the noisy samples, on the top row; the denoised samples below them (a job without
a denoiser has no second row). A tile is scaled up to at least ``SMALLEST`` pixels a side (nearest neighbour:
8x8 digits stay readable) and down to at most ``LARGEST``.
"""

from __future__ import annotations

import hashlib
import io

import numpy as np
import torch

SAMPLES = 4  # noisy samples a preview shows
DEFAULT_IMAGES = 4  # a certify job's previews: its first images
SMALLEST, LARGEST = 64, 128  # a tile's longer side, in pixels
GAP = 2  # white pixels between tiles


def preview_seed(seed: int, image: int, sample: int) -> int:
    """A 63-bit seed of one preview sample, apart from every certification stream."""
    key = f"dsq/{int(seed)}/{int(image)}/preview/{int(sample)}".encode()
    return int.from_bytes(hashlib.blake2b(key, digest_size=8).digest(), "little") >> 1


def noisy_samples(x: torch.Tensor, *, sigma: float, seed: int, image: int, count: int) -> torch.Tensor:
    """``count`` samples x + δ, δ ~ N(0, σ²I), drawn on the CPU from the preview streams."""
    generator = torch.Generator(device="cpu")
    noise = torch.empty((count, *x.shape), dtype=torch.float32)
    for sample in range(count):
        generator.manual_seed(preview_seed(seed, image, sample))
        noise[sample] = torch.randn(x.shape, generator=generator, dtype=torch.float32)
    return noise.mul_(sigma).add_(x.detach().float().cpu())


def make(model, denoise, x: torch.Tensor, *, sigma: float, seed: int, image: int,
         count: int = SAMPLES) -> tuple[bytes, list[int]]:
    """``(png, classes)``: the preview of image ``x`` and f o D's class on each sample (-1 where a logit is not
    finite). ``model`` is f o D as the job certifies with it; ``denoise`` its denoiser (with any resize) or None."""
    from dsq import sampling

    device = sampling.model_device(model)
    noisy = noisy_samples(x, sigma=sigma, seed=seed, image=image, count=count)
    with torch.inference_mode():
        logits = model(noisy.to(device)).float()
        finite = torch.isfinite(logits).all(dim=1)
        classes = torch.where(finite, logits.argmax(dim=1), torch.full_like(finite, -1, dtype=torch.long))
        rows = [[x.detach().float().cpu(), *noisy]]
        if denoise is not None:
            with sampling.eval_mode(denoise):
                rows.append([None, *denoise(noisy.to(device)).float().cpu()])
    return grid_png(rows), [int(c) for c in classes.cpu()]


def grid_png(rows: list[list[torch.Tensor | None]]) -> bytes:
    """Rows of [C, H, W] images (values clipped to [0, 1]; None leaves a blank) as one RGB PNG on white."""
    tiles = [[None if t is None else _tile(t) for t in row] for row in rows]
    height = max(t.shape[0] for row in tiles for t in row if t is not None)
    width = max(t.shape[1] for row in tiles for t in row if t is not None)
    columns = max(len(row) for row in tiles)
    canvas = np.full((len(tiles) * (height + GAP) - GAP, columns * (width + GAP) - GAP, 3), 255, dtype=np.uint8)
    for r, row in enumerate(tiles):
        for c, tile in enumerate(row):
            if tile is not None:
                top, left = r * (height + GAP), c * (width + GAP)
                canvas[top:top + tile.shape[0], left:left + tile.shape[1]] = tile
    from PIL import Image

    buffer = io.BytesIO()
    Image.fromarray(canvas, "RGB").save(buffer, format="PNG", optimize=True)
    return buffer.getvalue()


def _tile(x: torch.Tensor) -> np.ndarray:
    """An image [C, H, W] as H' x W' x 3 bytes, its longer side scaled into [SMALLEST, LARGEST]."""
    from PIL import Image

    pixels = torch.nan_to_num(x.float(), nan=0.0).clamp(0, 1).mul(255).round().to(torch.uint8).numpy()
    pixels = np.transpose(pixels, (1, 2, 0))
    pixels = np.repeat(pixels, 3, axis=2) if pixels.shape[2] == 1 else pixels[:, :, :3]
    side = max(pixels.shape[:2])
    if side < SMALLEST:
        factor = SMALLEST // side + (SMALLEST % side > 0)
        return pixels.repeat(factor, axis=0).repeat(factor, axis=1)
    if side > LARGEST:
        picture = Image.fromarray(np.ascontiguousarray(pixels), "RGB")
        picture.thumbnail((LARGEST, LARGEST), Image.Resampling.LANCZOS)
        return np.asarray(picture)
    return pixels
