"""``python -m bench.gpu_diffusion OUT_DIR [DEVICE [compile]]``: Carlini et al.'s CIFAR-10 pair on a GPU, at
random weights.

The pair of ``experiments/cifar10-diffusion.toml`` as a certify job builds it (``dsq.pipeline.chain``): a one-shot
diffusion denoiser, the 32x32 images resized (bicubic) to 224x224, then a ViT-B/16 (torchvision's ``vit_b_16``,
10 classes). The paper's DDPM is improved-diffusion's CIFAR-10 model, whose code is not on PyPI; in its place a
diffusers UNet of its shape: 128 channels at 32x32 and 256 below, 3 residual blocks a level, attention at 16x16
and 8x8, 6 output channels (it learns its variance). Both are prepared as a sampler prepares f o D
(``dsq.fastpath``), batched as a certify job batches on the device (``dsq.sizing``), and timed through
``dsq.smoothing.certify`` in FP32 and BF16 (with ``compile`` after DEVICE: compiled, BF16 only). No Ray and no
database. Writes ``gpu-diffusion.json`` into OUT_DIR.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import torch
import torchvision

from dsq import diffusion, fastpath, pipeline, sizing, smoothing
from dsq.classifiers import NormalizeLayer

SIGMA = 0.5
N0, N = 100, 100_000  # the paper's CIFAR-10 runs
TIMED_N = 10_000  # each is timed on this many samples an image and scaled; BF16 (not compiled) also on N0 + N


def improved_diffusion_like_unet() -> torch.nn.Module:
    diffusers = diffusion._quiet_diffusers()
    unet = diffusers.UNet2DModel(
        sample_size=32, in_channels=3, out_channels=6, block_out_channels=(128, 256, 256, 256), layers_per_block=3,
        down_block_types=("DownBlock2D", "AttnDownBlock2D", "AttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "AttnUpBlock2D", "AttnUpBlock2D", "UpBlock2D"),
        attention_head_dim=64, norm_num_groups=32, dropout=0.0)
    return diffusion.EpsModel(unet)


def pair() -> tuple[torch.nn.Module, dict]:
    torch.manual_seed(0)
    eps_model = improved_diffusion_like_unet()
    denoiser = diffusion.OneShotDenoiser(eps_model, diffusion.schedule_alphas(diffusion.STANDARD_SCHEDULE), SIGMA,
                                         channels=3, sample_size=32)
    classifier = torch.nn.Sequential(NormalizeLayer([0.5] * 3, [0.5] * 3),
                                     torchvision.models.vit_b_16(weights=None, num_classes=10))
    model = pipeline.chain(classifier, denoiser)
    count = lambda net: sum(p.numel() for p in net.parameters())  # noqa: E731
    return model, {"unet_parameters": count(eps_model), "vit_parameters": count(classifier),
                   "timestep": denoiser.timestep, "notes": pipeline.notes(model, torch.rand(1, 3, 32, 32))}


def certify_seconds(model, x, n: int, batch: int, device: str) -> tuple[float, object]:
    torch.cuda.synchronize() if device == "cuda" else None
    started = time.perf_counter()
    cert = smoothing.certify(model, x, sigma=SIGMA, n0=N0, n=n, alpha=0.001, batch_size=batch, seed=0, device=device)
    return time.perf_counter() - started, cert


def main(out: str, device: str = "cuda", *options: str) -> None:
    """``options``: ``compile`` prepares the pair with ``torch.compile`` (``--compile``), in BF16 only."""
    compiled = "compile" in options
    model, about = pair()
    report = {"device": torch.cuda.get_device_name() if device == "cuda" else device, "torch": torch.__version__,
              "sigma": SIGMA, "compile": compiled, **about}
    print(json.dumps(report))
    x = torch.rand(3, 32, 32)
    for precision in ("bf16",) if compiled else ("bf16", "fp32"):
        prepared = fastpath.prepare_for_inference(model, device=device, precision=precision, compile=compiled)
        probe = sizing.probe(prepared, x, device)
        batch = sizing.choose_batch(probe["bytes_per_sample"], probe["budget_bytes"], n=N, workers=1)
        certify_seconds(prepared, x, TIMED_N, batch, device)  # warm-up of the same shapes: kernels chosen (and
        # compiled), memory pooled
        seconds, _ = certify_seconds(prepared, x, TIMED_N, batch, device)
        rate = (N0 + TIMED_N) / seconds
        found = {"batch": batch, "bytes_per_sample": probe["bytes_per_sample"], "samples_per_s": rate,
                 "seconds_per_image_from_rate": (N0 + N) / rate}
        if precision == "bf16" and not compiled:  # its last, smaller batch would be compiled inside the timing
            whole, cert = certify_seconds(prepared, x, N, batch, device)
            found |= {"seconds_per_image": whole, "radius": cert.radius}
        report[precision] = found
        print(precision, json.dumps(found), flush=True)
    Path(out).mkdir(parents=True, exist_ok=True)
    (Path(out) / "gpu-diffusion.json").write_text(json.dumps(report, indent=1, default=str))


if __name__ == "__main__":
    main(*sys.argv[1:])
