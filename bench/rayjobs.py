"""What the timed Ray jobs of the benchmark (``bench/jobs.py``) need and leave: data, models, rates."""

from __future__ import annotations

import pickle
from pathlib import Path

import numpy as np

from dsq import checkpoints
from bench.config import Pair
from bench.trials import build_pair


def write_synthetic_cifar10(root: Path, images: int, seed: int = 0) -> None:
    """Random images in CIFAR-10's python-pickle layout (the reader needs every batch file)."""
    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    for name, count in [(f"data_batch_{i}", 1) for i in range(1, 6)] + [("test_batch", images)]:
        batch = {"data": rng.integers(0, 256, (count, 3072), dtype=np.uint8),
                 "labels": [int(v) for v in rng.integers(0, 10, count)]}
        (folder / name).write_bytes(pickle.dumps(batch))
    (folder / "batches.meta").write_bytes(pickle.dumps({"label_names": [f"class{i}" for i in range(10)]}))


def save_pair(pair: Pair, seed: int, folder: Path) -> tuple[str, str]:
    denoiser, classifier = build_pair(pair, seed)
    channels = pair.shape[0]
    paths = folder / "classifier.pt", folder / "denoiser.pt"
    checkpoints.save_checkpoint(paths[0], kind="classifier", arch=pair.classifier,
                                arch_kwargs={"num_classes": pair.num_classes, "in_channels": channels,
                                             **pair.classifier_kwargs},
                                model=classifier, normalization=None, training_spec={}, metrics={})
    checkpoints.save_checkpoint(paths[1], kind="denoiser", arch=pair.denoiser["arch"],
                                arch_kwargs={"in_channels": channels,
                                             **{k: v for k, v in pair.denoiser.items() if k != "arch"}},
                                model=denoiser, normalization=None, training_spec={}, metrics={})
    return str(paths[0]), str(paths[1])


def steady_rate(finished: list[float], per_image: int) -> float:
    """Samples/s between the first and the second-to-last finished image.

    Right after an image finishes, the next ones may already be partly sampled (several shards
    are in flight); that state is alike after any image but the last, which drains the pipeline,
    so timing from image 1 to image N-1 neither counts start-up nor in-flight work twice.
    """
    if len(finished) < 3:
        return float("nan")
    return (len(finished) - 2) * per_image / (finished[-2] - finished[0])
