"""``python -m bench.gpu_check OUT_DIR [DEVICE]``: the GPU path of dsq, measured, with no Ray or database.

1. The throughput benchmark of ``dsq bench`` (in-process trials only) for the CIFAR-10 pair of
   BENCHMARKS.md (DnCNN 17x64 + ResNet-110), at the batch size a certify job would choose on the
   device: seconds per image at n0 + n = 100,100 follow from its samples/s, in FP32 and BF16.
2. A user's TorchScript classifier (``dsq.usermodels``) loaded onto the device, prepared, sized
   (``dsq.sizing`` on a model hooks cannot see into) and certified on one image; its counts must
   equal those of the same net run eagerly on the same device.

Writes ``gpu-check.json`` into OUT_DIR and prints what it measured. Run it from the checkout root (``-m`` puts
the current folder, which holds ``bench/`` and ``dsq/``, on the path) or where dsq is installed.
"""

from __future__ import annotations

import json
import sys
import tempfile
import time
from pathlib import Path

import torch

import bench
from bench.config import PAIRS, BenchConfig
from bench.trials import build_pair
from dsq import fastpath, sizing, smoothing, usermodels

SAMPLES_PER_IMAGE = 100 + 100_000  # n0 + n of a certify job's defaults (Cohen et al.'s CIFAR-10 runs): per image


def throughput(device: str) -> dict:
    cfg = BenchConfig(pair="cifar110", device=device, threads=torch.get_num_threads(), ray=False, memory=False)
    results = bench.run(cfg, log=print)
    for header, rows, title in bench.tables(results):
        print(title)
        for row in [header, *rows]:
            print("  " + " | ".join(map(str, row)))
    return results


def seconds_per_image(device: str) -> dict:
    """Wall time of CERTIFY on one image at n0 = 100, n = 100,000 for the CIFAR-10 pair, fp32 and bf16."""
    pair = PAIRS["cifar110"]
    x = torch.rand(pair.shape)
    found = {}
    for precision in ("fp32", "bf16"):
        model = fastpath.prepare_for_inference(torch.nn.Sequential(*build_pair(pair, 0)), device=device,
                                               precision=precision)
        probe = sizing.probe(model, x, device)
        batch = sizing.choose_batch(probe["bytes_per_sample"], probe["budget_bytes"], n=100_000, workers=1)
        run = lambda: smoothing.certify(model, x, sigma=0.25, n0=100, n=100_000, alpha=0.001,  # noqa: E731
                                        batch_size=batch, seed=0, device=device)
        run()  # warm-up: kernels chosen, memory pooled
        times = []
        for _ in range(3):
            started = time.perf_counter()
            run()
            times.append(time.perf_counter() - started)
        found[precision] = {"batch": batch, "seconds": min(times), "all_seconds": times,
                            "samples_per_s": SAMPLES_PER_IMAGE / min(times)}
        print(f"certify one image, n0 + n = {SAMPLES_PER_IMAGE:,}, {precision}, batch {batch}: "
              f"{min(times):.2f} s ({SAMPLES_PER_IMAGE / min(times):,.0f} samples/s)")
    return found


def torchscript_certifies(device: str) -> dict:
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Conv2d(3, 16, 3, padding=1), torch.nn.BatchNorm2d(16), torch.nn.ReLU(),
                              torch.nn.AdaptiveAvgPool2d(4), torch.nn.Flatten(), torch.nn.Linear(256, 10)).eval()
    x = torch.rand(3, 32, 32)
    with tempfile.TemporaryDirectory() as folder:
        path = str(Path(folder) / "net.pt")
        torch.jit.save(torch.jit.script(net), path)
        options = {"mean": [0.5, 0.5, 0.5], "std": [0.25, 0.25, 0.25]}
        scripted = usermodels.load(path, path, options, "classifier", device)
    from dsq.classifiers import NormalizeLayer

    eager = torch.nn.Sequential(NormalizeLayer(options["mean"], options["std"]), net)
    found = {}
    for name, model in (("torchscript", scripted), ("eager", eager)):
        prepared = fastpath.prepare_for_inference(model, device=device)
        probe = sizing.probe(prepared, x, device)
        batch = sizing.choose_batch(probe["bytes_per_sample"], probe["budget_bytes"], n=SAMPLES_PER_IMAGE, workers=1)
        started = time.perf_counter()
        cert = smoothing.certify(prepared, x, sigma=0.25, n0=100, n=100_000, alpha=0.001, batch_size=batch,
                                 seed=0, device=device)
        found[name] = {"seconds": time.perf_counter() - started, "batch": batch, "radius": cert.radius,
                       "counts": [int(c) for c in cert.counts_estimation], "bytes_per_sample":
                       probe["bytes_per_sample"]}
    found["same_counts"] = found["torchscript"]["counts"] == found["eager"]["counts"]
    return found


def main(out: str, device: str = "cuda") -> None:
    report = {"device": torch.cuda.get_device_name() if device == "cuda" else device, "torch": torch.__version__}
    report["torchscript"] = torchscript_certifies(device)
    print("torchscript:", json.dumps(report["torchscript"]))
    report["per_image"] = seconds_per_image(device)
    results = throughput(device)
    report["throughput"] = {key: value for key, value in results.items() if not isinstance(value, (dict, list))}
    report["bench"] = results
    Path(out).mkdir(parents=True, exist_ok=True)
    (Path(out) / "gpu-check.json").write_text(json.dumps(report, indent=1, default=str))
    print("written", Path(out) / "gpu-check.json")


if __name__ == "__main__":
    main(*sys.argv[1:])
