"""The Monte-Carlo loop: (model, x, sigma, samples, batch size, seed) -> class counts.

This is the only place in dsq that runs a model on noisy copies of an image.

Identity of the randomness. The samples of one image and one phase are cut
into batches of ``batch_size``; batch ``b`` draws its noise from a fresh
``torch.Generator`` seeded by ``stream_seed(seed, image, phase, b)``. Nothing
depends on global RNG state, so any grouping of batches into shards, on any
number of workers and in any order, gives the same counts, and summing the
shards' counts reproduces the single-process plan exactly.

Noise is added in [0, 1] pixel space (x + delta, delta ~ N(0, sigma^2 I)); the
model (denoiser and classifier, normalization inside) sees the noisy image.

A sample whose logits are not all finite (NaN or +-inf anywhere in its row)
votes for no class: argmax would silently pick a class for it. It is still a
sample drawn, so a count vector may sum to less than the samples of its shard;
the caller passes the number drawn to ``smoothing.certify_counts`` (``n``).
"""

from __future__ import annotations

import contextlib
import hashlib
import math
from dataclasses import dataclass
from typing import Iterator

import numpy as np
import torch
from torch import nn

from dsq import checks
from dsq.errors import InvalidArgument

SELECTION, ESTIMATION, PREDICTION = "selection", "estimation", "prediction"
PHASES = (SELECTION, ESTIMATION, PREDICTION)


def stream_seed(seed: int, image: int, phase: str, batch: int) -> int:
    """A 63-bit seed derived from the identity of one batch of samples."""
    if phase not in PHASES:
        raise InvalidArgument(f"unknown sampling phase {phase!r}; expected one of {PHASES}")
    key = f"dsq/{int(seed)}/{int(image)}/{phase}/{int(batch)}".encode()
    return int.from_bytes(hashlib.blake2b(key, digest_size=8).digest(), "little") >> 1


@dataclass(frozen=True)
class Shard:
    """Samples ``[start, start + count)`` of one phase; ``start`` is batch-aligned."""

    phase: str
    index: int
    start: int
    count: int


def plan_shards(num: int, batch_size: int, shards: int, phase: str) -> list[Shard]:
    """Split ``num`` samples into at most ``shards`` contiguous runs of whole batches."""
    _check_positive(num=num, batch_size=batch_size, shards=shards)
    batches = math.ceil(num / batch_size)
    per_shard = math.ceil(batches / min(shards, batches))
    plan = []
    for index, first in enumerate(range(0, batches, per_shard)):
        start = first * batch_size
        count = min(per_shard * batch_size, num - start)
        plan.append(Shard(phase, index, start, count))
    return plan


def model_device(model: nn.Module) -> torch.device:
    """The device of the model's first parameter or buffer (the CPU if it has none)."""
    for tensor in list(model.parameters()) + list(model.buffers()):
        return tensor.device
    return torch.device("cpu")


@contextlib.contextmanager
def eval_mode(model: nn.Module) -> Iterator[nn.Module]:
    """Put the model in eval mode for the block, then restore its previous mode."""
    was_training = model.training
    model.eval()
    try:
        yield model
    finally:
        model.train(was_training)


def sample_counts(
    model: nn.Module,
    x: torch.Tensor,
    *,
    sigma: float,
    start: int,
    count: int,
    batch_size: int,
    seed: int,
    image: int,
    phase: str,
    device: torch.device | str | None = None,
) -> np.ndarray:
    """Count the model's top-1 votes on samples ``[start, start+count)`` of one phase.

    Returns an int64 vector of length K (the number of logits); samples with a
    non-finite logit vote for no class, so it sums to at most ``count``. Memory
    does not depend on ``count``: batches stream through, counts accumulate on the
    device (no host sync per batch).
    """
    _check_positive(count=count, batch_size=batch_size)
    if start % batch_size:
        raise InvalidArgument(f"shard start {start} is not a multiple of batch size {batch_size}")
    device = torch.device(device) if device is not None else model_device(model)
    x = x.to(device)
    generator = torch.Generator(device=device)
    counts = None
    with eval_mode(model), torch.inference_mode():
        for batch_start in range(start, start + count, batch_size):
            size = min(batch_size, start + count - batch_start)
            generator.manual_seed(stream_seed(seed, image, phase, batch_start // batch_size))
            noisy = torch.randn((size, *x.shape), generator=generator, device=device, dtype=x.dtype)
            noisy.mul_(sigma).add_(x)
            votes = top_class_votes(model(noisy))
            counts = votes if counts is None else counts + votes
    return counts.cpu().numpy().astype(np.int64)


def top_class_votes(logits: torch.Tensor) -> torch.Tensor:
    """Votes per class of a batch of logits [B, K]; a row with any non-finite value votes for none.

    Such rows go to an extra bin K that is dropped (a mask would cost a device sync).
    """
    classes = logits.shape[1]
    top = torch.where(torch.isfinite(logits).all(dim=1), logits.argmax(dim=1), classes)
    return torch.bincount(top, minlength=classes + 1)[:classes]


def sample_phase(model, x, *, sigma, num, batch_size, seed, image, phase, device=None) -> np.ndarray:
    """All ``num`` samples of one phase in this process (the unsharded plan)."""
    return sample_counts(model, x, sigma=sigma, start=0, count=num, batch_size=batch_size,
                         seed=seed, image=image, phase=phase, device=device)


def _check_positive(**values: int) -> None:
    for name, value in values.items():
        if not isinstance(value, (int, np.integer)) or isinstance(value, bool) or value < 1:
            raise InvalidArgument(f"{name} must be a positive integer, got {value!r}")


def check_image(model, x, device=None) -> int:
    """Check that ``x`` is one finite [C, H, W] image the model accepts; return K (number of classes)."""
    if not isinstance(x, torch.Tensor) or x.dim() != 3:
        shape = tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__
        raise InvalidArgument(f"expected one image of shape [C, H, W], got {shape}")
    non_finite = int((~torch.isfinite(x)).sum()) if x.is_floating_point() else 0
    if non_finite:
        raise InvalidArgument(f"{non_finite} of {x.numel()} pixels are not finite (NaN or inf); "
                              f"the image must be finite, in [0, 1]")
    device = torch.device(device) if device is not None else model_device(model)
    with eval_mode(model), torch.inference_mode():
        try:
            logits = model(x.to(device)[None])
        except (RuntimeError, ValueError, AssertionError, IndexError, TypeError) as error:  # shapes it cannot take
            raise InvalidArgument(f"the model cannot take an image of shape {tuple(x.shape)}: "
                                  f"{checks.first_line(error)}") from None
    if logits.dim() != 2 or logits.shape[0] != 1:
        raise InvalidArgument(f"the model must return logits [B, K], got shape {tuple(logits.shape)}")
    return int(logits.shape[1])


def input_channels(model) -> int | None:
    """The channels of the images ``model`` takes, from its first NormalizeLayer or Conv2d; None if it has neither.

    Modules are seen in the order they were registered, so for f o D (``Sequential(D, f)``) it is D's.
    TorchScript modules are recognised by the class they were scripted from.
    """
    for module in model.modules():
        name = getattr(module, "original_name", type(module).__name__)
        if name == "NormalizeLayer":
            return int(module.means.numel())
        if name == "Conv2d":
            return int(module.weight.shape[1]) * int(module.groups)
    return None
