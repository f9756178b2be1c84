"""Certification throughput benchmark: how close dsq's sampling comes to the hardware's limit.

For one model pair f o D (random weights: speed does not depend on them), one batch size (by
default the one a certify job would choose, ``dsq.sizing``) and one device, measured in the same run:

- ``forward``    raw forward throughput of the prepared f o D on a fixed batch (the practical limit)
- ``sampling``   dsq's Monte-Carlo loop (``dsq.sampling.sample_phase``, what ``smoothing.certify`` runs)
- ``reference``  a plain re-implementation of Cohen et al.'s ``Smooth._sample_noise`` (locuslab/smoothing
                 ``code/core.py``): NCHW, ``x.repeat`` + ``randn_like * sigma``, the unprepared model, at
                 the published default batch (``certify.py --batch 1000``); ``reference_same_batch`` is
                 the same loop at dsq's batch size, so the two parts of the gain can be told apart
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
import dataclasses
import json
import os
import platform
from dataclasses import asdict
from pathlib import Path

import numpy as np
import torch

from dsq import fastpath, sizing
from bench.config import PAIRS, TARGETS, BenchConfig, Log
from bench.trials import TrialProcess, batch_sweep, build_pair, in_process, peak_rss_in_subprocess

__all__ = ["PAIRS", "BenchConfig", "run", "ratios", "tables", "write_results"]


CERTIFY_N = 100_000  # a certify job's default n: the batch size is chosen for it


def with_batch_size(cfg: BenchConfig) -> BenchConfig:
    """``cfg`` with the batch size a certify job would choose for its pair on its device (``dsq.sizing``)."""
    if cfg.batch_size is not None:
        return cfg
    pair = PAIRS[cfg.pair]
    model = fastpath.prepare_for_inference(torch.nn.Sequential(*build_pair(pair, cfg.seed)), device=cfg.device)
    found = sizing.probe(model, torch.rand(pair.shape), cfg.device)
    return dataclasses.replace(cfg, batch_size=sizing.choose_batch(found["bytes_per_sample"], found["budget_bytes"],
                                                                   n=CERTIFY_N, workers=1))


def run(cfg: BenchConfig, log: Log = print, ray_jobs=None) -> dict:
    """Every measurement of ``cfg``; the dict written to bench-results.json.

    ``ray_jobs`` (``bench.jobs.ray_jobs``) times real jobs when ``cfg.ray`` asks for them.
    """
    cfg = with_batch_size(cfg)
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
        if cfg.ray and ray_jobs is not None:
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
              "sampling_over_reference": paired("sampling", "reference"),
              "sampling_over_reference_same_batch": paired("sampling", "reference_same_batch")}
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


def tables(results: dict) -> list[tuple[list[str], list[list[str]], str]]:
    """(header, rows, title) of each table to print: the summary, then the variants and the sweep if measured."""
    cfg = results["config"]
    out = [(["quantity", "value", "note", "verdict"], summary_rows(results),
            f"{results['pair']}, batch {cfg['batch_size']}, {cfg['threads']} threads, {cfg['device']}")]
    if results.get("variant_samples_per_s_by_name"):
        out.append((["forward / loop variant", "samples/s", "vs plain"], variant_rows(results),
                    "where the speed comes from"))
    if results.get("batch_sweep"):
        out.append((["batch size", "plain samples/s", "prepared samples/s", "gain"], sweep_rows(results),
                    "forward by batch size"))
    return out


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
    ratio_names = [name for name in results if name in targets or name.startswith("ray_workers_")
                   or name == "sampling_over_reference_same_batch"]
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
