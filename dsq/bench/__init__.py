"""Certification throughput benchmark: how close dsq's sampling comes to the hardware's limit.

For one model pair f o D (random weights: speed does not depend on them), one batch size and one
device, measured in the same run:

- ``forward``    raw forward throughput of the prepared f o D on a fixed batch (the practical limit)
- ``sampling``   dsq's Monte-Carlo loop (``dsq.sampling.sample_phase``, what ``smoothing.certify`` runs)
- ``reference``  a plain re-implementation of Cohen et al.'s ``Smooth._sample_noise`` (locuslab/smoothing
                 ``code/core.py``): NCHW, ``x.repeat`` + ``randn_like * sigma``, the unprepared model
- ``ray``        certification jobs through the real job system (temp SQLite, local Ray) with 1 worker
                 of T threads and K workers of T/K threads, timed from the first finished image to
                 the second-to-last (so actor start-up is excluded; the rate with start-up is
                 reported too)
- ``memory``     peak RSS (VmHWM, else ru_maxrss) of a fresh process running the loop at n = 10^4 and
                 n = 10^6 with the same batch size; by default the model is a linear probe on the same
                 input, since 10^6 samples of f o D take an hour on a small CPU and the loop's memory
                 is the question

dsq's side runs in a worker process set up as a sampler actor is (prepared model, the CPU allocator
tuned by ``fastpath.tune_cpu_allocator``); the reference runs in a plain worker process, as the
published script would. Only one of them works at a time, and their trials are interleaved
(a, b, c, a, b, c, ...): throughputs are the best of the rounds, and the in-process ratios are the
median over rounds of the ratio measured back to back, so load that comes and goes on a shared
machine hits both sides of a ratio alike. A Ray job cannot be interleaved, so dsq's loop is
re-measured right before and after each job and the job is compared with that (and, for
information, with the best in-process figure). Ratios are checked against ``TARGETS``.
``batch_sweep`` optionally times plain and prepared forward per batch size.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import pickle
import platform
import resource
import subprocess
import sys
import tempfile
import time
import traceback
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from torch import nn

from dsq import checkpoints, fastpath, sampling
from dsq.classifiers import build_classifier
from dsq.denoisers import build_denoiser
from dsq.errors import InvalidArgument, UnknownName

Log = Callable[[str], None]


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
    batch_size: int = 100  # measured (2-core Xeon): 100-200 fastest at 2 threads; 1000 is ~20% slower
    samples: int = 200     # per in-process measurement: about a second, so a round is short
    ray_n: int = 1000      # estimation samples per image of the Ray jobs


PAIRS = {
    "cifar": Pair("DnCNN (17 layers, 64 ch) + cifar_resnet20, 3x32x32", "cifar10", (3, 32, 32),
                  {"arch": "dncnn", "depth": 17, "width": 64}, "cifar_resnet20"),
    "cifar110": Pair("DnCNN (17 layers, 64 ch) + cifar_resnet110, 3x32x32", "cifar10", (3, 32, 32),
                     {"arch": "dncnn", "depth": 17, "width": 64}, "cifar_resnet110"),
    "digits": Pair("DnCNN (8 layers, 32 ch) + small_cnn, 1x8x8 (the demo's pair)", "digits", (1, 8, 8),
                   {"arch": "dncnn", "depth": 8, "width": 32}, "small_cnn", {"width": 32},
                   batch_size=550, samples=5500, ray_n=40_000),
}

MIN_TIMED_WINDOW_S = 5.0  # a Ray job's steady rate over less time than this is mostly noise

# (result key, threshold, "min" = value must be >= threshold, "max" = <=)
TARGETS = (
    ("sampling_over_forward", 0.9, "min"),
    ("ray_over_in_process", 0.85, "min"),
    ("memory_large_over_small", 1.1, "max"),
    ("sampling_over_reference", 1.5, "min"),
)


@dataclass(frozen=True)
class BenchConfig:
    pair: str = "cifar"
    batch_size: int | None = None  # None: the pair's measured default
    device: str = "cpu"
    threads: int = 2
    samples: int | None = None  # per timed in-process measurement (None: the pair's default)
    repeats: int = 7
    sigma: float = 0.25
    variants: bool = True       # where the speed comes from: forward of each preparation
    ray: bool = True
    workers: int = 2            # K for the Ray job with K workers
    ray_images: int = 6         # the steady rate is timed over images 2 .. N-1
    ray_n0: int = 100
    ray_n: int | None = None    # None: the pair's default
    memory: bool = True
    memory_model: str = "probe"  # "probe": a linear layer on the same input; "pair": f o D itself
    memory_small_n: int = 10_000
    memory_large_n: int = 1_000_000
    batch_sweep: tuple[int, ...] = ()  # forward of plain and prepared f o D at each of these batch sizes
    seed: int = 0

    def __post_init__(self):
        if self.pair not in PAIRS:
            raise UnknownName(f"unknown model pair {self.pair!r}; known: {', '.join(PAIRS)}")
        for name in ("batch_size", "samples", "ray_n"):
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
        for name in ("batch_size", "threads", "samples", "repeats", "workers", "ray_images", "ray_n0", "ray_n",
                     "memory_small_n", "memory_large_n"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise InvalidArgument(f"{name.replace('_', ' ')} must be an integer >= 1, got {value!r}")


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
        return _timed(lambda: sampling.sample_phase(
            model, x, sigma=cfg.sigma, num=samples, batch_size=cfg.batch_size, seed=cfg.seed, image=0,
            phase=sampling.ESTIMATION, device=x.device), samples, x.device)
    return trial


def reference_trial(model: nn.Module, x: torch.Tensor, cfg: BenchConfig, num_classes: int) -> Trial:
    def trial(samples: int) -> float:
        return _timed(lambda: reference_sample_noise(model, x, samples, cfg.batch_size, cfg.sigma, num_classes),
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
    if cfg.variants:
        trials.update({name: workers["dsq"].trial(name) for name in workers["dsq"].names
                       if name.startswith(("forward ", "sampling, ", "reference loop, "))})
    log(f"in-process: {pair.label}, batch {cfg.batch_size}, {cfg.threads} threads, {cfg.device}")
    rates = interleaved(trials, cfg, log)
    best = {name: max(values) for name, values in rates.items()}
    out = {f"{name}_samples_per_s": best.pop(name) for name in ("forward", "sampling", "reference")}
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
        return {"reference": reference_trial(model, x, cfg, pair.num_classes)}, {}
    tuned = device.type == "cpu" and fastpath.tune_cpu_allocator()
    prepared = fastpath.prepare_for_inference(model, device=device)
    batch = (x + cfg.sigma * torch.randn(cfg.batch_size, *pair.shape, device=device)).contiguous()
    trials = {"forward": forward_trial(prepared, batch), "sampling": sampling_trial(prepared, x, cfg)}
    if cfg.variants:
        trials.update(variant_trials(model, batch, x, cfg))
        trials["reference loop, this process"] = reference_trial(model, x, cfg, pair.num_classes)
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
    """A child interpreter (``python -m dsq.bench worker``) that builds its trials once and runs them on request.

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
    """``python -m dsq.bench ARGS`` with this checkout first on the path."""
    root = str(Path(__file__).resolve().parents[1])
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [root, os.environ.get("PYTHONPATH")]))}
    return subprocess.Popen([sys.executable, "-m", "dsq.bench", *args], text=True, env=env, **popen)


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


# ----------------------------------------------------------------------------- Ray jobs
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


def _save_pair(pair: Pair, seed: int, folder: Path) -> tuple[str, str]:
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


def ray_jobs(cfg: BenchConfig, pair: Pair, control: Trial, log: Log) -> dict:
    """Certify jobs with 1 worker and with K workers on a local Ray of ``threads`` CPUs.

    ``control`` (the in-process loop, same threads) runs twice just before and twice just after
    each job, so a job is also compared with the in-process speed under the same machine load.
    """
    import ray

    from workers import resources

    started_ray = not ray.is_initialized()
    resources.connect(None, num_cpus=cfg.threads)
    try:
        with tempfile.TemporaryDirectory(prefix="dsq-bench-") as tmp:
            out = {}
            for workers in sorted({1, cfg.workers}):
                before = [control(cfg.samples) for _ in range(2)]
                job = _one_job(cfg, pair, Path(tmp), workers, log)
                job["in_process_control_samples_per_s"] = float(np.mean(before + [control(cfg.samples)
                                                                                 for _ in range(2)]))
                out[f"workers_{workers}"] = job
            return out
    finally:
        if started_ray:
            ray.shutdown()


def _one_job(cfg: BenchConfig, pair: Pair, tmp: Path, workers: int, log: Log) -> dict:
    from dsq import jobs, specs
    from dsq.db.session import open_database, session_scope
    from dsq.settings import Settings
    from workers import runner

    home = tmp / f"home-{workers}"
    settings = Settings(database_url=f"sqlite:///{home / 'bench.db'}", home=home, data_root=str(tmp / "data"))
    home.mkdir(parents=True)
    if pair.dataset == "cifar10":
        write_synthetic_cifar10(tmp / "data" / "cifar10", cfg.ray_images, cfg.seed)
    classifier, denoiser = _save_pair(pair, cfg.seed, home)
    spec = specs.CertifySpec(dataset=pair.dataset, classifier=classifier, denoiser=denoiser, sigma=cfg.sigma,
                             n0=cfg.ray_n0, n=cfg.ray_n, batch_size=cfg.batch_size, max_images=cfg.ray_images,
                             seed=cfg.seed, workers=workers,
                             data_root=str(tmp / "data" / "cifar10") if pair.dataset == "cifar10" else None)
    engine = open_database(settings.database_url)
    with session_scope(engine) as session:
        job_id = jobs.submit(session, spec, settings).id
    engine.dispose()
    finished: list[float] = []
    started = time.perf_counter()
    status = runner.run_job(settings, job_id, on_progress=lambda done, total: finished.append(time.perf_counter()))
    wall = time.perf_counter() - started
    per_image = cfg.ray_n0 + cfg.ray_n
    steady = steady_rate(finished, per_image)
    window = finished[-2] - finished[0] if len(finished) >= 3 else 0.0
    result = {"status": status, "workers": workers, "threads_per_worker": max(1, cfg.threads // workers),
              "images": len(finished), "samples_per_image": per_image, "wall_s": wall,
              "first_image_s": finished[0] - started if finished else float("nan"),
              "samples_per_s": steady, "timed_window_s": window,
              "samples_per_s_with_startup": len(finished) * per_image / wall}
    log(f"  ray job, {workers} worker(s): {status}, {steady:.0f} samples/s after the first image "
        f"({result['samples_per_s_with_startup']:.0f}/s with start-up, {wall:.0f} s)")
    if window < MIN_TIMED_WINDOW_S:
        log(f"  warning: only {window:.1f} s between the first and the second-to-last image; "
            f"use more images (--ray-images) or samples (--ray-n) for a meaningful rate")
    return result


def steady_rate(finished: list[float], per_image: int) -> float:
    """Samples/s between the first and the second-to-last finished image.

    Right after an image finishes, the next ones may already be partly sampled (several shards
    are in flight); that state is alike after any image but the last, which drains the pipeline,
    so timing from image 1 to image N-1 neither counts start-up nor in-flight work twice.
    """
    if len(finished) < 3:
        return float("nan")
    return (len(finished) - 2) * per_image / (finished[-2] - finished[0])


# ----------------------------------------------------------------------------- the whole run
def run(cfg: BenchConfig, log: Log = print) -> dict:
    """Every measurement of ``cfg``; the dict written to bench-results.json."""
    pair = PAIRS[cfg.pair]
    results = {"config": asdict(cfg), "pair": pair.label, "machine": machine(), "load_before": os.getloadavg()}
    log("starting the benchmark's worker processes")
    with contextlib.ExitStack() as stack:
        workers = {}
        for role in ("dsq", "reference"):
            workers[role] = TrialProcess(cfg, role)
            stack.callback(workers[role].close)
        results.update(in_process(cfg, pair, workers, log))
        if cfg.batch_sweep:
            results["batch_sweep"] = batch_sweep(cfg, workers["dsq"], log)
        if cfg.ray:
            log(f"ray: {cfg.ray_images} images x {cfg.ray_n0 + cfg.ray_n} samples per job")
            results["ray_jobs"] = ray_jobs(cfg, pair, workers["dsq"].trial("sampling"), log)
            results["ray_samples_per_s"] = max(job["samples_per_s"] for job in results["ray_jobs"].values())
    if cfg.memory:
        log(f"memory: fresh processes at n={cfg.memory_small_n} and n={cfg.memory_large_n} ({cfg.memory_model})")
        small, large = (peak_rss_in_subprocess(cfg, n) for n in (cfg.memory_small_n, cfg.memory_large_n))
        results.update(peak_rss_mb_small_n=small["peak_rss_mb"], peak_rss_mb_large_n=large["peak_rss_mb"],
                       memory_runs=[small, large])
    results["load_after"] = os.getloadavg()
    results.update(ratios(results))
    return results


def ratios(results: dict) -> dict:
    """The target ratios and a PASS/FAIL verdict for each that could be measured."""
    def share(a, b):
        return results[a] / results[b] if a in results and b in results else None

    def paired(a, b):
        """Median over rounds of a/b measured back to back: robust to load that comes and goes."""
        rates = results.get("in_process_rates", {})
        if a not in rates or b not in rates:
            return share(f"{a}_samples_per_s", f"{b}_samples_per_s")
        return float(np.median([x / y for x, y in zip(rates[a], rates[b])]))

    jobs = results.get("ray_jobs", {})
    values = {"sampling_over_forward": paired("sampling", "forward"),
              "ray_over_in_process": max((job["samples_per_s"] / job["in_process_control_samples_per_s"]
                                          for job in jobs.values()), default=None),
              "memory_large_over_small": share("peak_rss_mb_large_n", "peak_rss_mb_small_n"),
              "sampling_over_reference": paired("sampling", "reference")}
    for name, job in jobs.items():
        values[f"ray_{name}_over_in_process"] = job["samples_per_s"] / job["in_process_control_samples_per_s"]
        values[f"ray_{name}_over_best_in_process"] = job["samples_per_s"] / results["sampling_samples_per_s"]
    verdicts = {}
    for name, threshold, kind in TARGETS:
        if values[name] is not None:
            ok = values[name] >= threshold if kind == "min" else values[name] <= threshold
            verdicts[name] = "PASS" if ok else "FAIL"
    return {**{k: v for k, v in values.items() if v is not None}, "verdicts": verdicts}


def machine() -> dict:
    gpu = torch.cuda.get_device_name() if torch.cuda.is_available() else None
    return {"cpu": _cpu_name(), "cores": os.cpu_count(), "gpu": gpu, "torch": torch.__version__,
            "python": platform.python_version()}


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def summary_rows(results: dict) -> list[list[str]]:
    """(quantity, value, note, verdict) rows for a table: throughputs, memory, then ratios."""
    rows = [[name.replace("_samples_per_s", ""), f"{value:,.0f} samples/s", "", ""]
            for name, value in results.items() if name.endswith("_samples_per_s") and isinstance(value, float)]
    for name, job in results.get("ray_jobs", {}).items():
        rows.append([f"ray job, {job['workers']} worker(s) x {job['threads_per_worker']} thread(s)",
                     f"{job['samples_per_s']:,.0f} samples/s",
                     f"{job['samples_per_s_with_startup']:,.0f}/s with start-up; "
                     f"in-process next to it {job['in_process_control_samples_per_s']:,.0f}/s", ""])
    for key in ("peak_rss_mb_small_n", "peak_rss_mb_large_n"):
        if key in results:
            rows.append([key, f"{results[key]:,.0f} MB", "", ""])
    targets = {name: (threshold, kind) for name, threshold, kind in TARGETS}
    ratio_names = [name for name in results if name in targets or name.startswith("ray_workers_")]
    for name in ratio_names:
        threshold, kind = targets.get(name, (None, None))
        goal = f"target {'>=' if kind == 'min' else '<='} {threshold}" if threshold else ""
        rows.append([name, f"{results[name]:.3f}", goal, results["verdicts"].get(name, "")])
    return rows


def variant_rows(results: dict) -> list[list[str]]:
    """(variant, samples/s, speed-up over the plain NCHW forward) rows."""
    variants = results.get("variant_samples_per_s_by_name", {})
    plain = variants.get("forward plain NCHW")
    return [[name, f"{rate:,.0f}", f"{rate / plain:.2f}x" if plain else ""] for name, rate in variants.items()]


def sweep_rows(results: dict) -> list[list[str]]:
    """(batch size, plain, prepared, prepared/plain) rows."""
    return [[size, f"{rates['plain']:,.0f}", f"{rates['prepared']:,.0f}", f"{rates['prepared'] / rates['plain']:.2f}x"]
            for size, rates in results.get("batch_sweep", {}).items()]


def write_results(results: dict, path: str | os.PathLike) -> None:
    Path(path).write_text(json.dumps(results, indent=2, default=float) + "\n")


if __name__ == "__main__" and len(sys.argv) == 3 and sys.argv[1] in ("memory", "worker"):
    {"memory": _memory_main, "worker": _worker_main}[sys.argv[1]](json.loads(sys.argv[2]))
