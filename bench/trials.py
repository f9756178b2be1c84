"""The timed loops and the child processes that run them (``python -m bench``).

dsq's side runs in a worker process set up as a sampler actor is (prepared model, the CPU
allocator tuned); the reference runs in a plain worker process, as the published script would.
The memory probe runs the loop at one n in a fresh interpreter and reports its own peak RSS.
"""

from __future__ import annotations

import json
import math
import os
import resource
import subprocess
import sys
import time
import traceback
from dataclasses import asdict
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from torch import nn

from dsq import fastpath, sampling
from bench.config import PAIRS, BenchConfig, Log, Pair
from dsq.classifiers import build_classifier
from dsq.denoisers import build_denoiser


# ----------------------------------------------------------------------------- models
def build_pair(pair: Pair, seed: int = 0) -> tuple[nn.Module, nn.Module]:
    """(denoiser, classifier) with random weights (and non-trivial BN statistics), in eval mode."""
    torch.manual_seed(seed)
    channels = pair.shape[0]
    options = {k: v for k, v in pair.denoiser.items() if k != "arch"}
    denoiser = build_denoiser(pair.denoiser["arch"], channels, **options)
    classifier = build_classifier(pair.classifier, num_classes=pair.num_classes, in_channels=channels,
                                  mean=[0.5] * channels, std=[0.25] * channels, **pair.classifier_kwargs)
    for module in (*denoiser.modules(), *classifier.modules()):
        if isinstance(module, nn.BatchNorm2d):
            module.running_mean.uniform_(-0.1, 0.1)
            module.running_var.uniform_(0.5, 1.5)
    return denoiser.eval(), classifier.eval()


def probe(pair: Pair) -> nn.Module:
    """A linear classifier on the pair's input: the loop's own memory, without f o D's compute."""
    torch.manual_seed(0)
    return nn.Sequential(nn.Flatten(), nn.Linear(math.prod(pair.shape), pair.num_classes)).eval()


# ----------------------------------------------------------------------------- the loops
def reference_sample_noise(model: nn.Module, x: torch.Tensor, num: int, batch_size: int, sigma: float,
                           num_classes: int) -> np.ndarray:
    """Cohen et al.'s ``_sample_noise``, re-implemented plainly: repeat x, add randn_like * sigma, vote."""
    counts = np.zeros(num_classes, dtype=np.int64)
    with torch.no_grad():
        while num > 0:
            size = min(batch_size, num)
            num -= size
            batch = x.repeat((size, 1, 1, 1))
            noise = torch.randn_like(batch) * sigma
            for label in model(batch + noise).argmax(1).cpu().numpy():
                counts[label] += 1
    return counts


def _timed(run: Callable[[], object], samples: int, device: torch.device) -> float:
    """Samples per second of one call of ``run`` (which processes ``samples`` samples)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    started = time.perf_counter()
    run()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return samples / (time.perf_counter() - started)


# A trial processes the number of samples it is given and returns samples/s.
Trial = Callable[[int], float]


def forward_trial(model: nn.Module, batch: torch.Tensor) -> Trial:
    def trial(samples: int) -> float:
        calls = max(1, math.ceil(samples / len(batch)))

        def run():
            with torch.inference_mode():
                for _ in range(calls):
                    model(batch)
        return _timed(run, calls * len(batch), batch.device)
    return trial


def sampling_trial(model: nn.Module, x: torch.Tensor, cfg: BenchConfig) -> Trial:
    def trial(samples: int) -> float:
        samples = math.ceil(samples / cfg.batch_size) * cfg.batch_size  # whole batches, as forward times them
        return _timed(lambda: sampling.sample_phase(
            model, x, sigma=cfg.sigma, num=samples, batch_size=cfg.batch_size, seed=cfg.seed, image=0,
            phase=sampling.ESTIMATION, device=x.device), samples, x.device)
    return trial


def reference_trial(model: nn.Module, x: torch.Tensor, cfg: BenchConfig, num_classes: int,
                    batch_size: int) -> Trial:
    def trial(samples: int) -> float:
        samples = math.ceil(samples / batch_size) * batch_size  # whole batches: the batch size is what is timed
        return _timed(lambda: reference_sample_noise(model, x, samples, batch_size, cfg.sigma, num_classes),
                      samples, x.device)
    return trial


def interleaved(trials: dict[str, Trial], cfg: BenchConfig, log: Log) -> dict[str, list[float]]:
    """One warm-up batch per trial, then ``repeats`` rounds of every trial in turn; samples/s per round."""
    for trial in trials.values():
        trial(cfg.batch_size)
    rates: dict[str, list[float]] = {name: [] for name in trials}
    for round_ in range(cfg.repeats):
        for name, trial in trials.items():
            rates[name].append(trial(cfg.samples))
        log(f"  round {round_ + 1}/{cfg.repeats}: " + ", ".join(f"{n} {r[-1]:.0f}/s" for n, r in rates.items()))
    return rates


def in_process(cfg: BenchConfig, pair: Pair, workers: dict, log: Log) -> dict:
    """Forward, sampling and reference throughput (and preparation variants), interleaved."""
    trials = {name: workers["dsq"].trial(name) for name in ("forward", "sampling")}
    trials["reference"] = workers["reference"].trial("reference")
    trials["reference_same_batch"] = workers["reference"].trial("reference_same_batch")
    if cfg.variants:
        trials.update({name: workers["dsq"].trial(name) for name in workers["dsq"].names
                       if name.startswith(("forward ", "sampling, ", "reference loop, "))})
    log(f"in-process: {pair.label}, batch {cfg.batch_size}, {cfg.threads} threads, {cfg.device}")
    rates = interleaved(trials, cfg, log)
    best = {name: max(values) for name, values in rates.items()}
    out = {f"{name}_samples_per_s": best.pop(name)
           for name in ("forward", "sampling", "reference", "reference_same_batch")}
    return {**out, "variant_samples_per_s_by_name": best, "prepared": workers["dsq"].info,
            "in_process_rates": rates}


def batch_sweep(cfg: BenchConfig, worker: "TrialProcess", log: Log) -> dict:
    """Forward samples/s of the plain and the prepared f o D at each batch size of ``cfg.batch_sweep``."""
    log(f"batch sweep: {', '.join(map(str, cfg.batch_sweep))}")
    rates = interleaved({name: worker.trial(name) for name in worker.names if name.startswith("sweep ")}, cfg, log)
    return {str(size): {kind: max(rates[f"sweep {kind} {size}"]) for kind in ("plain", "prepared")}
            for size in cfg.batch_sweep}


def build_trials(cfg: BenchConfig, role: str) -> tuple[dict[str, Trial], dict]:
    """The trials one worker process runs: ``dsq`` (as a sampler actor runs) or ``reference``."""
    pair = PAIRS[cfg.pair]
    device = torch.device(cfg.device)
    model = nn.Sequential(*build_pair(pair, cfg.seed)).to(device).eval()
    x = torch.rand(pair.shape, generator=torch.Generator().manual_seed(cfg.seed)).to(device)
    if role == "reference":
        return {"reference": reference_trial(model, x, cfg, pair.num_classes, cfg.reference_batch_size),
                "reference_same_batch": reference_trial(model, x, cfg, pair.num_classes, cfg.batch_size)}, {}
    tuned = device.type == "cpu" and fastpath.tune_cpu_allocator()
    prepared = fastpath.prepare_for_inference(model, device=device)
    batch = (x + cfg.sigma * torch.randn(cfg.batch_size, *pair.shape, device=device)).contiguous()
    trials = {"forward": forward_trial(prepared, batch), "sampling": sampling_trial(prepared, x, cfg)}
    if cfg.variants:
        trials.update(variant_trials(model, batch, x, cfg))
        trials["reference loop, this process"] = reference_trial(model, x, cfg, pair.num_classes, cfg.batch_size)
    for size in cfg.batch_sweep:  # a trial runs at least one batch
        sized = torch.rand(size, *pair.shape, generator=torch.Generator().manual_seed(size)).to(device)
        trials[f"sweep plain {size}"] = forward_trial(model, sized)
        trials[f"sweep prepared {size}"] = forward_trial(prepared, sized)
    return trials, {**prepared.describe(), "allocator_tuned": tuned}


def variant_trials(model: nn.Module, batch: torch.Tensor, x: torch.Tensor, cfg: BenchConfig) -> dict:
    """Forward of each preparation step on its own, and dsq's loop with the unprepared model."""
    device = batch.device
    prepare = lambda **kw: fastpath.prepare_for_inference(model, device=device, **kw)  # noqa: E731
    variants = {"plain NCHW": model,
                "channels-last": prepare(fold_bn=False, channels_last=True),
                "BN folded": prepare(channels_last=False),
                "folded + channels-last": prepare(channels_last=True),
                "folded + channels-last + bf16": prepare(channels_last=True, precision="bf16")}
    trials = {f"forward {name}": forward_trial(m, batch) for name, m in variants.items()}
    trials["sampling, unprepared model"] = sampling_trial(model, x, cfg)
    return trials


class TrialProcess:
    """A child interpreter (``python -m bench worker``) that builds its trials once and runs them on request.

    The dsq side runs in a process set up as a sampler actor is (``fastpath.tune_cpu_allocator``);
    the reference runs in a plain process, as Cohen et al.'s script would. Only one of them works
    at a time, so they can be interleaved like trials of one process. Requests and answers are
    JSON lines on the child's stdin and stdout.
    """

    def __init__(self, cfg: BenchConfig, role: str):
        self.process = _python_module(["worker", json.dumps({**asdict(cfg), "role": role})],
                                      stdin=subprocess.PIPE, stdout=subprocess.PIPE)
        self.names, self.info = self._receive()

    def trial(self, name: str) -> Trial:
        def run(samples: int) -> float:
            self.process.stdin.write(json.dumps([name, samples]) + "\n")
            self.process.stdin.flush()
            return self._receive()
        return run

    def close(self) -> None:
        if self.process.poll() is None:
            self.process.stdin.close()
            try:
                self.process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.process.kill()

    def _receive(self):
        line = self.process.stdout.readline()
        if not line:
            raise RuntimeError(f"benchmark worker exited with status {self.process.wait()}")
        kind, value = json.loads(line)
        if kind == "error":
            raise RuntimeError(f"benchmark worker failed:\n{value}")
        return value


def _worker_main(fields: dict) -> None:
    answer = sys.stdout
    sys.stdout = sys.stderr  # stray prints must not corrupt the answers
    try:
        role = fields.pop("role")
        cfg = BenchConfig(**fields)
        torch.set_num_threads(cfg.threads)
        trials, info = build_trials(cfg, role)
        print(json.dumps(["ok", [list(trials), info]]), file=answer, flush=True)
        for line in sys.stdin:
            name, samples = json.loads(line)
            print(json.dumps(["ok", trials[name](samples)]), file=answer, flush=True)
    except Exception:  # noqa: BLE001 - reported to the parent, which raises
        print(json.dumps(["error", traceback.format_exc()]), file=answer, flush=True)


def _python_module(args: list[str], **popen) -> subprocess.Popen:
    """``python -m bench ARGS`` with this checkout (the folder that holds ``bench/``, ``dsq/`` and ``workers/``) first
    on the path, so the child imports the same code as this process wherever it was started from."""
    root = str(Path(__file__).resolve().parents[1])
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [root, os.environ.get("PYTHONPATH")]))}
    return subprocess.Popen([sys.executable, "-m", "bench", *args], text=True, env=env, **popen)


# ----------------------------------------------------------------------------- memory
def peak_rss_in_subprocess(cfg: BenchConfig, n: int) -> dict:
    """Run the loop at ``n`` samples in a fresh interpreter; its own peak RSS (see ``peak_rss_mb``) in MB."""
    child = _python_module(["memory", json.dumps({**asdict(cfg), "n": n})], stdout=subprocess.PIPE,
                           stderr=subprocess.PIPE)
    out, err = child.communicate()
    if child.returncode != 0:
        raise RuntimeError(f"memory probe at n={n} failed: {err.strip().splitlines()[-1:]}")
    return json.loads(out.strip().splitlines()[-1])


def _memory_main(args: dict) -> None:
    cfg = BenchConfig(**{k: v for k, v in args.items() if k != "n"})
    # Memory does not depend on threads; one thread keeps n = 10^6 quick even on a busy machine.
    torch.set_num_threads(1)
    pair = PAIRS[cfg.pair]
    device = torch.device(cfg.device)
    if device.type == "cpu":
        fastpath.tune_cpu_allocator()  # as in a sampler actor
    model = probe(pair) if cfg.memory_model == "probe" else nn.Sequential(*build_pair(pair, cfg.seed))
    prepared = fastpath.prepare_for_inference(model.to(device), device=device)
    x = torch.rand(pair.shape).to(device)
    before = {"peak_rss_before_loop_mb": peak_rss_mb(), "rss_before_loop_mb": _status_mb("VmRSS")}
    started = time.perf_counter()
    counts = sampling.sample_phase(prepared, x, sigma=cfg.sigma, num=args["n"], batch_size=cfg.batch_size,
                                   seed=cfg.seed, image=0, phase=sampling.ESTIMATION, device=device)
    seconds = time.perf_counter() - started
    print(json.dumps({"n": args["n"], "peak_rss_mb": peak_rss_mb(), **before,
                      "ru_maxrss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
                      "seconds": seconds, "samples": int(counts.sum())}))


def peak_rss_mb() -> float:
    """This process's peak resident set size in MB.

    ``ru_maxrss`` of a child also counts the parent's size at fork (Linux records the forked
    address space's high-water mark at exec), so a big benchmark process would mask the child's
    own peak. Where ``/proc`` has it, ``VmHWM`` (the high-water mark of this address space
    only) is used instead; ``ru_maxrss`` is reported next to it.
    """
    return _status_mb("VmHWM") or resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _status_mb(field_name: str) -> float | None:
    """A ``/proc/self/status`` memory field in MB (Linux), or None."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field_name + ":"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return None


CHILD_MAINS = {"memory": _memory_main, "worker": _worker_main}  # python -m bench NAME JSON
