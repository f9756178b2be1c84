"""Real local classifiers behind the emulators: PIL image -> [(label, confidence in [0, 1])]."""

from __future__ import annotations

import functools

import numpy as np
import torch
from PIL import Image

DIGIT_NAMES = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")


@functools.lru_cache(maxsize=1)
def _digits_model():
    """A logistic regression on the digits train split (8x8 grey, [0, 1]); deterministic, about a second."""
    from sklearn.linear_model import LogisticRegression

    from dsq import datasets

    train = datasets.get_dataset("digits", "train")
    x = np.stack([image.numpy().reshape(-1) for image, _ in train])
    y = np.array([label for _, label in train])
    return LogisticRegression(max_iter=2000, C=1.0).fit(x, y)


def digits_labeller():
    """Labels any image as a handwritten digit: grey, resized to 8x8, logistic regression."""
    model = _digits_model()

    def label(picture: Image.Image) -> list[tuple[str, float]]:
        small = picture.convert("L").resize((8, 8), Image.BILINEAR)
        pixels = np.asarray(small, dtype=np.float64).reshape(1, -1) / 255.0
        probabilities = model.predict_proba(pixels)[0]
        return [(DIGIT_NAMES[int(c)], float(p)) for c, p in zip(model.classes_, probabilities)]

    return label


def checkpoint_labeller(path: str, size: int | None = None):
    """Labels from any dsq classifier checkpoint (``class N``), the image resized to ``size`` (default: kept)."""
    from dsq import checkpoints

    model, metadata = checkpoints.load_checkpoint(path)
    channels = int(metadata.get("arch_kwargs", {}).get("in_channels", 3))
    model.eval()

    def label(picture: Image.Image) -> list[tuple[str, float]]:
        picture = picture.convert("L" if channels == 1 else "RGB")
        if size is not None:
            picture = picture.resize((size, size), Image.BILINEAR)
        pixels = np.asarray(picture, dtype=np.float32) / 255.0
        x = torch.from_numpy(pixels[None] if pixels.ndim == 2 else pixels.transpose(2, 0, 1).copy())
        with torch.inference_mode():
            probabilities = torch.softmax(model(x[None]), dim=1)[0]
        return [(f"class {i}", float(p)) for i, p in enumerate(probabilities)]

    return label
