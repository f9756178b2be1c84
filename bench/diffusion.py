"""``dsq bench --diffusion``: the sampling speed of a diffusion pair beside a DnCNN pair of about the same size.

Both pairs put a denoiser of ~150 k parameters in front of the same classifier, with random weights: a DnCNN
(6 layers, 64 channels) and the one-shot step of a diffusers UNet (one level of 32 channels, no attention). Each
is prepared as a sampler actor prepares f o D (``fastpath``) and timed through dsq's sampling loop, the two
interleaved round by round in this process so that a busy machine slows both alike; the ratio of each round is
reported with its median.
"""

from __future__ import annotations

import statistics
import time

import torch
from torch import nn

from dsq import diffusion, fastpath, sampling
from dsq.classifiers import build_classifier
from dsq.denoisers import build_denoiser

# pair: (image shape, classifier and its kwargs, DnCNN kwargs, UNet kwargs, samples per timed round)
PAIRS = {
    "digits": ((1, 8, 8), ("small_cnn", {"width": 32}), {"depth": 6, "width": 64},
               {"block_out_channels": (32,), "layers_per_block": 1, "add_attention": False}, 4000),
    "cifar": ((3, 32, 32), ("cifar_resnet20", {}), {"depth": 17, "width": 64},
              {"block_out_channels": (64, 64), "layers_per_block": 1, "add_attention": False}, 200),
}


def build(pair: str, sigma: float = 0.25) -> dict[str, nn.Module]:
    """The two prepared pairs, by name."""
    shape, (arch, kwargs), dncnn, unet, _ = PAIRS[pair]
    torch.manual_seed(0)
    classifier = build_classifier(arch, num_classes=10, in_channels=shape[0], mean=[0.5] * shape[0],
                                  std=[0.25] * shape[0], **kwargs).eval()
    denoisers = {
        "DnCNN": build_denoiser("dncnn", shape[0], **dncnn),
        "diffusion (one-shot)": diffusion.OneShotDenoiser(
            diffusion.build_unet(shape[0], sample_size=shape[1], **unet),
            diffusion.schedule_alphas(diffusion.STANDARD_SCHEDULE), sigma),
    }
    return {name: fastpath.prepare_for_inference(nn.Sequential(denoiser, classifier).eval(), device="cpu")
            for name, denoiser in denoisers.items()}


def parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.net[0].parameters())


def measure(pair: str = "digits", rounds: int = 5, batch_size: int = 500, log=print) -> dict:
    """Samples/s of each pair per round (interleaved), and the diffusion / DnCNN ratio per round."""
    fastpath.tune_cpu_allocator()
    shape, *_, samples = PAIRS[pair]
    models = build(pair)
    x = torch.rand(shape)

    def rate(model) -> float:
        started = time.perf_counter()
        sampling.sample_counts(model, x, sigma=0.25, start=0, count=samples, batch_size=min(batch_size, samples),
                               seed=0, image=0, phase="estimation")
        return samples / (time.perf_counter() - started)

    for model in models.values():  # warm-up: first calls allocate
        rate(model)
    rates = {name: [] for name in models}
    for round_ in range(rounds):
        for name, model in models.items():
            rates[name].append(rate(model))
        log(f"round {round_ + 1}: " + ", ".join(f"{name} {values[-1]:,.0f} samples/s" for name, values in rates.items()))
    ratios = [d / c for d, c in zip(rates["diffusion (one-shot)"], rates["DnCNN"])]
    return {"pair": pair, "threads": torch.get_num_threads(), "batch_size": batch_size,
            "parameters": {name: parameters(model) for name, model in models.items()},
            "samples_per_s": {name: statistics.median(values) for name, values in rates.items()},
            "ratio_median": statistics.median(ratios), "ratios": ratios}
