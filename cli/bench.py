"""``dsq bench``: certification throughput against the forward-pass limit, the reference loop and Ray."""

from __future__ import annotations

import os
from typing import List

import typer

from cli import common

PAIRS = ("cifar", "cifar110", "digits")  # bench.PAIRS, without importing torch for --help
CHAOS_KINDS = ("worker", "sampler", "node", "postgres")  # bench.chaos.KINDS, likewise


def register(app: typer.Typer) -> None:
    app.command()(bench)


def bench(pair: str = typer.Option("cifar", help=f"Model pair: {', '.join(PAIRS)}."),
          batch_size: int = typer.Option(0, help="Samples per forward pass (0: what a certify job would choose)."),
          reference_batch_size: int = typer.Option(1000, help="The reference loop's batch (its published default)."),
          device: str = typer.Option("cpu", help="cpu or cuda."),
          threads: int = typer.Option(0, help="Total CPU threads (in-process and Ray); 0: all cores."),
          repeats: int = typer.Option(7, help="Interleaved rounds of the in-process measurements."),
          samples: int = typer.Option(0, help="Samples per in-process measurement (0: the pair's default)."),
          workers: int = typer.Option(2, help="K, the workers of the second Ray job (the first has 1)."),
          ray_images: int = typer.Option(6, help="Images per Ray job (>= 3; timed over images 2 .. N-1)."),
          ray_n: int = typer.Option(0, help="Estimation samples per image in the Ray jobs (0: the pair's default)."),
          memory_model: str = typer.Option("probe", help="probe (a linear layer on the same input) or pair."),
          variants: bool = typer.Option(True, help="Also time each preparation step on its own."),
          ray: bool = typer.Option(True, help="Run the Ray jobs (a local Ray, temp SQLite)."),
          memory: bool = typer.Option(True, help="Measure peak RSS at n = 10^4 and 10^6 in fresh processes."),
          batch_sweep: str = typer.Option("", help="Also time plain and prepared forward at these batch sizes, "
                                          "e.g. 25,50,100,200,500."),
          out: str = typer.Option("bench-results.json", help="Where to write the results."),
          cli: bool = typer.Option(False, "--cli", help="Only the CLI's answer time: `dsq jobs`, cancel, resume "
                                   "and submit against `python -c 'import torch'`, interleaved."),
          queue: int = typer.Option(0, help="Only the queue overhead: drain this many tiny certify jobs "
                                    "with one warm worker."),
          sequential: bool = typer.Option(False, "--sequential", help="Only sequential against fixed-n "
                                          "certification on the digits demo's models (BENCHMARKS.md)."),
          sequential_api: bool = typer.Option(False, "--sequential-api", help="Only the billed queries per image "
                                              "of sequential certify-api jobs on the embedded emulator."),
          sequential_images: int = typer.Option(200, help="--sequential(-api): test digits per method and sigma."),
          sequential_home: str = typer.Option("", help="--sequential: train the models here, or reuse those "
                                              "trained here before (default: a temporary folder)."),
          sequential_method: List[str] = typer.Option([], help="--sequential: only this method of the digits "
                                                      "preset (repeatable; default: STAB+MSE white-box, Cohen et al. "
                                                      "and diffusion (one-shot))."),
          diffusion: bool = typer.Option(False, "--diffusion", help="Only the sampling speed of a diffusion pair "
                                         "beside a DnCNN pair of about the same size (--pair digits or cifar)."),
          dashboard: bool = typer.Option(False, "--dashboard", help="Only the dashboard's page render times (first "
                                         "view, p50, p95; the 500 ms target) on an experiment of 5 methods x 4 "
                                         "sigmas x --dashboard-images results, on SQLite and PostgreSQL."),
          dashboard_images: int = typer.Option(10_000, help="--dashboard: images per job."),
          postgres: str = typer.Option("", help="--dashboard: a PostgreSQL database URL to fill (default: a "
                                       "throw-away server from the pgserver wheel)."),
          chaos: int = typer.Option(0, help="Only chaos: this many runs of a small experiment while workers, "
                                    "sampler actors, a Ray node or PostgreSQL are killed at random times; each must "
                                    "match an undisturbed run. Exit 1 if one does not."),
          chaos_faults: str = typer.Option(",".join(CHAOS_KINDS), help="--chaos: the kinds of fault to make."),
          chaos_per_run: int = typer.Option(2, help="--chaos: at most this many faults a run (1 to it, drawn)."),
          chaos_images: int = typer.Option(6, help="--chaos: images per certify job (two jobs a run)."),
          chaos_seed: int = typer.Option(0, help="--chaos: the seed of the faults' kinds and times.")):
    """Benchmark certification throughput of one model pair; print a table and write JSON.

    Random weights (speed does not depend on them). The Ray jobs run on a local Ray started here,
    on a temporary SQLite database; the machine should otherwise be idle for meaningful numbers.
    """
    options = dict(locals())
    if chaos:
        return chaos_runs(chaos, tuple(k.strip() for k in chaos_faults.split(",") if k.strip()), chaos_per_run,
                          chaos_images, chaos_seed)
    with common.StopSignals() as signals:  # SIGINT or SIGTERM: one line, exit 128 + its number, no Ray stack dump
        try:
            _bench(**options)
        except common.Stopped as stopped:
            common.say(f"benchmark stopped ({stopped})", err=True)
            raise common.signal_exit(signals.number) from None


def _bench(*, pair, batch_size, reference_batch_size, device, threads, repeats, samples, workers, ray_images, ray_n,
           memory_model, variants, ray, memory, batch_sweep, out, cli, queue, sequential, sequential_api,
           sequential_images, sequential_home, sequential_method, diffusion, dashboard, dashboard_images, postgres,
           **_chaos) -> None:
    import bench as benchmark
    from dsq.report import tables

    if cli:
        return cli_answer_time(repeats)
    if dashboard:
        return dashboard_times(dashboard_images, repeats, postgres or None,
                               "dashboard-bench.json" if out == "bench-results.json" else out)
    if queue:
        return queue_overhead(queue, threads)
    if sequential_api:
        return sequential_api_queries(sequential_images)
    if diffusion:
        return diffusion_speed(pair, repeats)
    if sequential:
        return sequential_comparison(sequential_images, sequential_home or None,
                                     "sequential-bench.json" if out == "bench-results.json" else out,
                                     tuple(sequential_method))
    with common.boundary():
        cfg = benchmark.BenchConfig(
            pair=pair, batch_size=batch_size or None, reference_batch_size=reference_batch_size, device=device,
            threads=threads or os.cpu_count() or 1,
            repeats=repeats, samples=samples or None, workers=workers, ray_images=ray_images, ray_n=ray_n or None,
            memory_model=memory_model, variants=variants, ray=ray, memory=memory,
            batch_sweep=parse_sizes(batch_sweep))
        from bench.jobs import ray_jobs

        results = benchmark.run(cfg, log=lambda line: common.errors.print(line, markup=False, highlight=False),
                                ray_jobs=ray_jobs)
    benchmark.write_results(results, out)
    for header, rows, title in benchmark.tables(results):
        common.console.print(tables.render_table(header, rows, title=title))
    common.console.print(f"results written to {out}")


def chaos_runs(runs: int, kinds: tuple[str, ...], per_run: int, images: int, seed: int) -> None:
    """``dsq bench --chaos N``: a line per run and a summary; exit 1 if a run failed its checks. SIGINT or SIGTERM
    stops everything the benchmark started and exits 128 + the signal's number."""
    from bench import chaos as chaotic

    with common.StopSignals() as signals:
        try:
            with common.boundary():
                chaotic.check_options(runs, kinds, per_run, images)
                outcomes = chaotic.run(runs, kinds=kinds, per_run=per_run, images=images, seed=seed, log=common.say)
        except common.Stopped as stopped:
            common.say(f"chaos benchmark stopped ({stopped}); everything it started is stopped", err=True)
            raise common.signal_exit(signals.number) from None
    common.say(chaotic.summary(outcomes))
    if not all(outcome.passed for outcome in outcomes):
        raise typer.Exit(common.EXIT_FAILED)


def diffusion_speed(pair: str, rounds: int) -> None:
    """Samples/s of a diffusion pair and a DnCNN pair, interleaved; the ratio per round."""
    from bench import diffusion
    from dsq.errors import InvalidArgument

    with common.boundary():
        if pair not in diffusion.PAIRS:
            raise InvalidArgument(f"--diffusion compares the pairs {', '.join(diffusion.PAIRS)}, not {pair!r}")
    found = diffusion.measure(pair, rounds, log=_log)
    for name, rate in found["samples_per_s"].items():
        common.say(f"{name}: {found['parameters'][name]:,} denoiser parameters, {rate:,.0f} samples/s (median)")
    common.say(f"diffusion / DnCNN: {found['ratio_median']:.2f} (median of {rounds} interleaved rounds, "
               f"{found['threads']} threads)")


def parse_sizes(text: str) -> tuple[int, ...]:
    from dsq.errors import InvalidArgument

    try:
        return tuple(int(part) for part in text.split(",") if part.strip())
    except ValueError:
        raise InvalidArgument(f"--batch-sweep must be comma-separated integers, got {text!r}") from None


def queue_overhead(count: int, threads: int) -> None:
    from bench import queue_overhead as overhead
    from dsq.report import tables

    found = overhead.measure(count, threads=threads or None,
                             log=lambda line: common.errors.print(line, markup=False, highlight=False))
    header = ["sampler actors", "jobs ok", "wall s", "sampling s", "overhead s/job", "first job s", "jobs/s"]
    rows = [[variant, f"{f['succeeded']}/{f['jobs']}", f"{f['wall_s']:.1f}", f"{f['sampling_s']:.1f}",
             f"{f['overhead_per_job_s']:.2f}", f"{f['first_job_s']:.1f}", f"{f['jobs_per_s']:.2f}"]
            for variant, f in found.items()]
    common.console.print(tables.render_table(header, rows, title="queue overhead (one warm worker, one job at a time)"))


def cli_answer_time(repeats: int) -> None:
    """Wall time of steering and submitting commands against importing torch, interleaved, side by side.

    ``dsq jobs``, ``cancel`` and ``resume`` read or write the database only (no torch, no Ray); ``submit``
    checks a digits job (data, models, sigma) with the worker's autostart off, so it measures the submit alone:
    a training, a certification of a model still to train (``job:1``), and one of a trained classifier and
    denoiser given as files (their checkpoints loaded and checked against the data).
    """
    import os
    import statistics
    import subprocess
    import sys
    import tempfile
    import time
    from pathlib import Path

    from bench.config import PAIRS
    from bench.rayjobs import save_pair
    from dsq.report import tables

    torch_only = "python -c 'import torch'"
    with tempfile.TemporaryDirectory(prefix="dsq-cli-bench-") as home:
        env = {**os.environ, "DSQ_HOME": home, "DSQ_WORKER_AUTOSTART": "0"}
        dsq = [sys.executable, "-m", "cli", "--db", f"sqlite:///{home}/dsq.db"]
        train = ["submit", "train", "--dataset", "digits", "--target", "classifier", "--arch", "small_cnn",
                 "--objective", "standard", "--sigma", "0", "--epochs", "1"]
        subprocess.run(dsq + train, capture_output=True, check=True, env=env)  # the schema, and job 1
        classifier, denoiser = save_pair(PAIRS["digits"], 0, Path(home))
        commands = {"dsq jobs": dsq + ["jobs"], "dsq cancel": dsq + ["cancel", "1"],
                    "dsq resume": dsq + ["resume", "1"],
                    "dsq submit train": dsq + train,
                    "dsq submit certify": dsq + ["submit", "certify", "--dataset", "digits", "--classifier", "job:1",
                                                 "--sigma", "0.25", "--n", "1000"],
                    "dsq submit certify (trained)": dsq + ["submit", "certify", "--dataset", "digits",
                                                           "--classifier", classifier, "--denoiser", denoiser,
                                                           "--sigma", "0.25", "--n", "1000"],
                    torch_only: [sys.executable, "-c", "import torch"]}
        times = {name: [] for name in commands}
        for _ in range(repeats):
            for name, command in commands.items():
                started = time.perf_counter()
                subprocess.run(command, capture_output=True, check=True, env=env)
                times[name].append(time.perf_counter() - started)
    medians = {name: statistics.median(found) for name, found in times.items()}
    rows = [[name, f"{medians[name]:.2f}", f"{min(found):.2f}", f"{max(found):.2f}",
             f"{medians[name] / medians[torch_only]:.2f}"] for name, found in times.items()]
    common.console.print(tables.render_table(["command", "median s", "min s", "max s", "/ import torch"], rows,
                                             title=f"CLI answer time ({repeats} interleaved runs each)"))


def _log(line: str) -> None:
    common.errors.print(line, markup=False, highlight=False)


def sequential_comparison(images: int, home: str | None, out: str, methods: tuple[str, ...] = ()) -> None:
    """Sequential at r against fixed n = 10,000 and 1,000 on the digits demo's models; table, targets, JSON."""
    import json

    from bench import sequential as rules
    from bench import sequential_jobs
    from dsq.report import tables

    with common.boundary():
        found = sequential_jobs.measure(images, home, log=_log, methods=methods or sequential_jobs.METHODS)
    common.console.print(tables.render_table(rules.HEADER, rules.table(found["rows"]), title=(
        f"sequential (max_n {found['max_n']:,}, a look every {found['batch']} samples) against fixed n, "
        f"{images} test digits, alpha {found['alpha']:g}")))
    missed = [row for row in found["rows"] if not all(rules.meets(row).values())]
    common.say(f"targets (within {rules.TARGETS['accuracy_points']:g} points of fixed n = {found['max_n']:,}, "
               f">= {rules.TARGETS['median_speedup']:g}x fewer samples at the median, >= "
               f"{rules.TARGETS['mean_speedup']:g}x on average): met in {len(found['rows']) - len(missed)} of "
               f"{len(found['rows'])} rows; training {found['training_s']:.0f} s, sampling {found['sampling_s']:.0f} s")
    with open(out, "w") as handle:
        json.dump(found, handle, indent=1)
    common.say(f"results written to {out}")


def sequential_api_queries(images: int) -> None:
    """Billed queries per image of sequential certify-api jobs on the embedded emulator, against n0 + n + 1."""
    from bench import sequential_jobs
    from dsq.report import tables

    rows = sequential_jobs.api_measure(images, n0=20, max_n=1000, sigma=0.25, multiples=(0.25, 0.5, 1.0, 1.5),
                                       log=_log)
    header = ["r / sigma", "certified %", "mean queries", "median queries", "fixed n0 + n + 1", "fewer (mean)"]
    table = [[f"{row['radius_over_sigma']:g}", f"{100 * row['certified']:.1f}", f"{row['mean_queries']:,.0f}",
              f"{row['median_queries']:,.0f}", f"{row['fixed_queries']:,}",
              f"{row['fixed_queries'] / row['mean_queries']:.1f}x"] for row in rows]
    common.console.print(tables.render_table(header, table, title=(
        f"certify-api, sequential at r (embedded emulator, sigma 0.25, n0 20, max_n 1,000, {images} digits)")))


def dashboard_times(images: int, repeats: int, postgres: str | None, out: str) -> None:
    """``dsq bench --dashboard``: each page's first, p50 and p95 render time, per database; JSON to ``out``."""
    import json

    from bench import dashboard
    from dsq.report import tables

    from dsq.errors import InvalidArgument

    with common.boundary():
        if images < 1 or repeats < 1:
            raise InvalidArgument("--dashboard-images and --repeats must be >= 1")
        found = dashboard.run(images, repeats, postgres)
    rows = [[f"{database}: {page}", *(f"{t[key]:,.0f}" for key in ("first_ms", "first_cpu_ms", "p50_ms", "p95_ms")),
             f"{t['bytes']:,}", "yes" if page in dashboard.TARGET_PAGES else "no"]
            for database, run in found.items() for page, t in run["pages"].items()]
    header = ["page", "first (cold) ms", "its CPU ms", "p50 ms", "p95 ms", "bytes", "in target"]
    common.console.print(tables.render_table(header, rows, title=f"dashboard, {images * 20:,} results, {repeats} "
                                                                 f"requests"))
    for database, run in found.items():
        common.say(f"{database}: " + (f"target met: every page in the target under {run['target_ms']} ms, first "
                                      f"view and p95" if run["met"] else
                                      f"target NOT met (first view or p95 over {run['target_ms']} ms): "
                                      + ", ".join(run["missed"]))
                   + f" (load average {run['load_before']:.1f} before, {run['load_after']:.1f} after)")
    with open(out, "w") as handle:
        json.dump(found, handle, indent=1)
    common.say(f"written to {out}")
