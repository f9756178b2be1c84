"""A classifier for tests whose jobs must outlast a signal or a fault: a fixed random linear map of the pixels that
sleeps a while on each batch. Its jobs take wall-clock time but almost no CPU, so they last as long on a busy machine
as on an idle one and leave the cores to the processes under test. Named in a job as ``tests.slownet:build``
(the options ``tests.conftest.slow()`` gives); only its being a deterministic classifier matters to those tests."""

import time
from pathlib import Path

import torch
from torch import nn


class SlowLinear(nn.Module):
    def __init__(self, seconds: float, classes: int, pixels: int, seed: int, hold: str | None):
        super().__init__()
        generator = torch.Generator().manual_seed(seed)
        self.weight = nn.Parameter(torch.randn(classes, pixels, generator=generator), requires_grad=False)
        self.seconds, self.hold = seconds, Path(hold) if hold else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        time.sleep(self.seconds)
        # a job's batches wait while the test holds them; submit's check of one image does not
        while self.hold is not None and len(x) > 1 and self.hold.exists():
            time.sleep(0.05)
        return x.flatten(1) @ self.weight.T


def build(seconds: float = 0.02, classes: int = 10, pixels: int = 64, seed: int = 0,
          hold: str | None = None) -> nn.Module:
    """``seconds`` of sleep per batch, and a batch of several images waits while the file ``hold`` exists (submit
    checks the classifier on one image: that passes); ``pixels`` = 64 for digits."""
    return SlowLinear(seconds, classes, pixels, seed, hold)
