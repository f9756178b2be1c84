"""Choosing sampler actors and batch size for the hardware (dsq.sizing)."""

import pytest
import torch
from torch import nn

from dsq import sizing, specs
from workers import resources

GIB = 1 << 30


@pytest.mark.parametrize("cluster, expected", [
    ({"CPU": 2.0, "memory": 20 * GIB}, 2),
    ({"CPU": 16.0, "memory": 12 * GIB}, 8),        # memory caps: 1.5 GiB per actor
    ({"CPU": 16.0}, 16),                           # memory unknown: one per CPU
    ({"CPU": 1.0, "memory": GIB}, 1),              # never fewer than one
    ({"CPU": 32.0, "GPU": 4.0, "memory": 100 * GIB}, 4),  # one per GPU, not per CPU
])
def test_default_workers(cluster, expected):
    assert specs.default_workers(cluster) == expected


@pytest.mark.parametrize("per_sample, budget, n, workers, expected", [
    (256 << 10, 8 << 20, 100_000, 1, 32),          # DnCNN-64 at 32x32 on a CPU
    (8 << 10, 8 << 20, 100_000, 2, 1024),          # DnCNN-32 at 8x8 on a CPU
    (8 << 10, 8 << 20, 1000, 2, 500),              # no more than one worker's share of n
    (64 << 20, 8 << 20, 100_000, 1, sizing.MIN_BATCH),  # huge samples: never below MIN_BATCH
    (1 << 20, 60 * GIB, 100_000, 1, sizing.MAX_BATCH),  # a large GPU: capped
    (8 << 10, 8 << 20, 5, 8, 1),
])
def test_choose_batch(per_sample, budget, n, workers, expected):
    assert sizing.choose_batch(per_sample, budget, n=n, workers=workers) == expected


def test_largest_activation_is_the_widest_layer_per_sample():
    net = nn.Sequential(nn.Conv2d(3, 64, 3, padding=1), nn.ReLU(), nn.Conv2d(64, 3, 3, padding=1),
                        nn.Flatten(), nn.Linear(3 * 32 * 32, 10))
    x = torch.rand(3, 32, 32)
    assert sizing.memory_per_sample(net, x, "cpu") == 64 * 32 * 32 * 4
    assert sizing.largest_activation(net, torch.rand(5, 3, 32, 32)) == 64 * 32 * 32 * 4
    assert not any(m._forward_hooks for m in net.modules())  # the probe leaves no hooks behind


def test_cpu_budget_is_the_measured_constant():
    assert sizing.memory_budget("cpu") == sizing.CPU_ACTIVATION_BYTES == 8 << 20


@pytest.mark.parametrize("workers, cluster, options, threads", [
    (2, {"CPU": 2.0}, {"num_cpus": 0.5}, 1),                        # the default on 2 CPUs: 2 actors x 1 thread
    (1, {"CPU": 2.0}, {"num_cpus": 0.5}, 2),                        # one actor takes every thread
    (16, {"CPU": 16.0}, {"num_cpus": 0.5}, 1),
    (2, {"CPU": 16.0, "GPU": 2.0}, {"num_gpus": 1.0, "num_cpus": 0}, 1),
    (4, {"CPU": 16.0, "GPU": 2.0}, {"num_gpus": 0.5, "num_cpus": 0}, 1),  # two actors share each GPU
    (3, {"CPU": 16.0, "GPU": 1.0}, {"num_gpus": 0.3333, "num_cpus": 0}, 1),
])
def test_actor_options(workers, cluster, options, threads):
    assert resources.actor_options(workers, cluster) == (options, threads)
