"""Sizing a certification for its hardware: how many sampler actors, threads each, and the batch size.

A ``CertifySpec`` may leave ``workers`` and ``batch_size`` to dsq (``None``). The runner resolves
them when the job starts. The batch size is part of the noise's identity (``dsq.sampling`` seeds
each batch), so once chosen it is written into the job's spec and a resumed job keeps it; the
number of workers does not change any count and is chosen anew for the cluster at hand.

Workers. On CPUs, one single-threaded actor per CPU of the cluster: K one-thread actors beat one
K-thread actor by 3–11% on an idle machine and by far more on shared cores (BENCHMARKS.md), for
8×8 and 32×32 models alike. Each actor process costs about ``specs.ACTOR_MEMORY``, which caps K. On GPUs,
one actor per GPU; asking for more workers than GPUs shares each GPU (fractional GPUs), which
pays for small models that leave a GPU idle between kernel launches.

Batch size. On a CPU, the measured choice: the largest batch whose biggest activation stays within
``CPU_ACTIVATION_BYTES`` (8 MiB). Forward throughput was flat from 25 to 200 samples per batch on
the 32×32 pair (256 KiB per sample) and from 128 to 1,024 on the 8×8 pair (8 KiB), and fell beyond:
−20% at 1,000 samples of 32×32, −16% at 4,096 samples of 8×8. 8 MiB lies inside both flat ranges.
On a GPU, the largest batch that fits: the measured memory per sample of a probe batch against a
share of the free memory. Either way no more than ``MAX_BATCH``, nor more than one worker's share of n, so that every
worker gets a shard. A sequential job (a target radius) decides at batch ends, so its batch is also at most
max_n / ``SEQUENTIAL_LOOKS``: an image that is clear after a few hundred samples stops there.
"""

from __future__ import annotations

import math

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves
from torch import nn

from dsq.fastpath import PreparedModel

SEQUENTIAL_LOOKS = 100          # a sequential job looks at its test at least this often within max_n, so an
                                # image can stop after 1% of it (clear-cut images need a few hundred samples)
CPU_ACTIVATION_BYTES = 8 << 20  # a batch's activations on a CPU: cache-sized (module docstring's measurement)
GPU_MEMORY_SHARE = 0.6          # of the memory free on the device when the actor starts
GPU_PROBE_BATCH = 64            # samples of the one forward pass that measures a sample's GPU memory
MIN_BATCH, MAX_BATCH = 8, 16_384


def choose_batch(bytes_per_sample: int, budget_bytes: int, *, n: int, workers: int) -> int:
    """The largest batch within the memory budget, between MIN_BATCH and MAX_BATCH, and at most ⌈n/workers⌉."""
    fits = max(MIN_BATCH, budget_bytes // max(1, bytes_per_sample))
    return int(min(fits, MAX_BATCH, math.ceil(n / workers)))


def sequential_batch(batch: int, max_n: int) -> int:
    """A sequential job's batch: the test looks at batch ends, so at most max_n / SEQUENTIAL_LOOKS (>= MIN_BATCH)."""
    return int(min(batch, max(MIN_BATCH, math.ceil(max_n / SEQUENTIAL_LOOKS))))


def probe(model: nn.Module, x: torch.Tensor, device: torch.device | str, share: float = 1.0) -> dict:
    """``bytes_per_sample`` and ``budget_bytes`` for a model prepared by ``dsq.fastpath`` on ``device``.

    On a CPU the fp32 network is probed (a bound from above when autocast is on).
    """
    net = model.net if torch.device(device).type == "cpu" and isinstance(model, PreparedModel) else model
    return {"bytes_per_sample": memory_per_sample(net, x, device), "budget_bytes": memory_budget(device, share)}


def memory_per_sample(model: nn.Module, x: torch.Tensor, device: torch.device | str) -> int:
    """Bytes one more sample costs: on a GPU the measured peak of a probe batch, on a CPU its largest activation."""
    device = torch.device(device)
    x = x.to(device)
    with torch.inference_mode():
        if device.type == "cuda":
            torch.cuda.synchronize(device)
            before = torch.cuda.memory_allocated(device)
            torch.cuda.reset_peak_memory_stats(device)
            model(x.expand(GPU_PROBE_BATCH, *x.shape).contiguous())
            torch.cuda.synchronize(device)
            return math.ceil((torch.cuda.max_memory_allocated(device) - before) / GPU_PROBE_BATCH)
        return largest_activation(model, x.unsqueeze(0))


def largest_activation(model: nn.Module, batch: torch.Tensor) -> int:
    """Bytes of the largest tensor any leaf module outputs for ``batch``, per sample.

    TorchScript takes no hooks: a model holding some is measured op by op instead (``_LargestOutput``).
    """
    sizes = [batch.numel() * batch.element_size()]
    if any(isinstance(m, torch.jit.ScriptModule) for m in model.modules()):
        with _LargestOutput() as largest:
            model(batch)
        return math.ceil(max(sizes[0], largest.bytes) / batch.shape[0])

    def record(module, inputs, output):
        if isinstance(output, torch.Tensor):
            sizes.append(output.numel() * output.element_size())

    leaves = [m for m in model.modules() if not any(True for _ in m.children())]
    handles = [leaf.register_forward_hook(record) for leaf in leaves]
    try:
        model(batch)
    finally:
        for handle in handles:
            handle.remove()
    return math.ceil(max(sizes) / batch.shape[0])


class _LargestOutput(TorchDispatchMode):
    """Records the largest tensor any operator outputs (it sees the ops TorchScript runs too)."""

    def __init__(self):
        super().__init__()
        self.bytes = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for value in tree_leaves(out):
            if isinstance(value, torch.Tensor):
                self.bytes = max(self.bytes, value.numel() * value.element_size())
        return out


def memory_budget(device: torch.device | str, share: float = 1.0) -> int:
    """Bytes a batch may take: CPU_ACTIVATION_BYTES on a CPU, ``share`` of GPU_MEMORY_SHARE of what is free on a GPU."""
    device = torch.device(device)
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return int(free * GPU_MEMORY_SHARE * share)
    return CPU_ACTIVATION_BYTES
