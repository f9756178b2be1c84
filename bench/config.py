"""What a benchmark run measures: the model pairs, the targets and the run's settings."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

from dsq.errors import InvalidArgument, UnknownName

Log = Callable[[str], None]
REFERENCE_BATCH_SIZE = 1000  # the published reference's default (certify.py --batch)


@dataclass(frozen=True)
class Pair:
    """A denoiser in front of a classifier, and the dataset a certify job of them reads."""

    label: str
    dataset: str
    shape: tuple[int, int, int]
    denoiser: dict
    classifier: str
    classifier_kwargs: dict = field(default_factory=dict)
    num_classes: int = 10
    samples: int = 200     # per in-process measurement: about a second, so a round is short
    ray_n: int = 1000      # estimation samples per image of the Ray jobs: seconds an image, so the timed window of
                           # images 2 .. N-1 is longer than MIN_TIMED_WINDOW_S


# cifar: the standard DnCNN (Zhang et al.) with a ResNet-20, cheap enough for a CPU; cifar110: the same DnCNN with
# Cohen et al.'s CIFAR-10 ResNet-110 (the GPU check's pair); digits: a small pair at 8x8, ~90x faster on a CPU, so
# its samples (a quarter second at ~22,000 samples/s: 10 batches of 550, its fixed batch before dsq.sizing chose
# one) and ray_n (about 2 s an image, 8 s over the timed images 2 .. 5 of 6) are scaled up to its speed.
PAIRS = {
    "cifar": Pair("DnCNN (17 layers, 64 ch) + cifar_resnet20, 3x32x32", "cifar10", (3, 32, 32),
                  {"arch": "dncnn", "depth": 17, "width": 64}, "cifar_resnet20"),
    "cifar110": Pair("DnCNN (17 layers, 64 ch) + cifar_resnet110, 3x32x32", "cifar10", (3, 32, 32),
                     {"arch": "dncnn", "depth": 17, "width": 64}, "cifar_resnet110"),
    "digits": Pair("DnCNN (8 layers, 32 ch) + small_cnn, 1x8x8 (the demo's pair)", "digits", (1, 8, 8),
                   {"arch": "dncnn", "depth": 8, "width": 32}, "small_cnn", {"width": 32},
                   samples=5500, ray_n=40_000),
}

MIN_TIMED_WINDOW_S = 5.0  # a Ray job's steady rate over less time than this is mostly noise

# (result key, threshold, "min" = value must be >= threshold, "max" = <=): the benchmark's goals, as BENCHMARKS.md
# states them: the loop within 10% of the forward pass, Ray within 15% of the same loop in-process, memory
# growing at most 10% from n = 10^4 to 10^6, and at least 1.5x the reference loop as published
TARGETS = (
    ("sampling_over_forward", 0.9, "min"),
    ("ray_over_in_process", 0.85, "min"),
    ("memory_large_over_small", 1.1, "max"),
    ("sampling_over_reference", 1.5, "min"),
)


@dataclass(frozen=True)
class BenchConfig:
    pair: str = "cifar"
    batch_size: int | None = None  # None: what a certify job would choose (dsq.sizing), see ``bench.with_batch_size``
    reference_batch_size: int = REFERENCE_BATCH_SIZE
    device: str = "cpu"
    threads: int = 2            # the 2 cores BENCHMARKS.md was measured on (`dsq bench` passes all cores)
    samples: int | None = None  # per timed in-process measurement (None: the pair's default)
    repeats: int = 7            # odd, so a median of per-round ratios is a measured round; ~7 s a trial in all
    sigma: float = 0.25         # the demo's smaller sigma; speed does not depend on it
    variants: bool = True       # where the speed comes from: forward of each preparation
    ray: bool = True
    workers: int = 2            # K for the Ray job with K workers: one single-threaded worker per core of 2
    ray_images: int = 6         # the steady rate is timed over images 2 .. N-1
    ray_n0: int = 100           # a certify job's default n0 (Cohen et al.'s)
    ray_n: int | None = None    # None: the pair's default
    memory: bool = True
    memory_model: str = "probe"  # "probe": a linear layer on the same input; "pair": f o D itself
    memory_small_n: int = 10_000      # two orders of magnitude apart: memory that grew with n would show
    memory_large_n: int = 1_000_000   # (10^6 is 10x a certify job's default n)
    batch_sweep: tuple[int, ...] = ()  # forward of plain and prepared f o D at each of these batch sizes
    seed: int = 0               # any fixed seed: every process builds the same weights and inputs

    def __post_init__(self):
        if self.pair not in PAIRS:
            raise UnknownName(f"unknown model pair {self.pair!r}; known: {', '.join(PAIRS)}")
        for name in ("samples", "ray_n"):
            if getattr(self, name) is None:
                object.__setattr__(self, name, getattr(PAIRS[self.pair], name))
        object.__setattr__(self, "batch_sweep", tuple(self.batch_sweep))
        if any(isinstance(b, bool) or not isinstance(b, int) or b < 1 for b in self.batch_sweep):
            raise InvalidArgument(f"batch sweep sizes must be integers >= 1, got {list(self.batch_sweep)}")
        if self.ray and self.ray_images < 3:
            raise InvalidArgument(f"ray images must be >= 3 (the steady rate is timed over images 2 .. N-1), "
                                  f"got {self.ray_images}")
        if self.memory_model not in ("probe", "pair"):
            raise InvalidArgument(f"memory model must be 'probe' or 'pair', got {self.memory_model!r}")
        for name in ("batch_size", "reference_batch_size", "threads", "samples", "repeats", "workers", "ray_images",
                     "ray_n0", "ray_n", "memory_small_n", "memory_large_n"):
            value = getattr(self, name)
            if name == "batch_size" and value is None:
                continue
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise InvalidArgument(f"{name.replace('_', ' ')} must be an integer >= 1, got {value!r}")
