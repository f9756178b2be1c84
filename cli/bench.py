"""``dsq bench``: certification throughput against the forward-pass limit, the reference loop and Ray."""

from __future__ import annotations

import os

import typer

from cli import common

PAIRS = ("cifar", "cifar110", "digits")  # dsq.bench.PAIRS, without importing torch for --help


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
          queue: int = typer.Option(0, help="Only the queue overhead: drain this many tiny certify jobs "
                                    "with one warm worker."),
          sequential: bool = typer.Option(False, "--sequential", help="Only sequential against fixed-n "
                                          "certification on the digits demo's models (BENCHMARKS.md)."),
          sequential_api: bool = typer.Option(False, "--sequential-api", help="Only the billed queries per image "
                                              "of sequential certify-api jobs on the embedded emulator."),
          sequential_images: int = typer.Option(200, help="--sequential(-api): test digits per method and sigma."),
          sequential_home: str = typer.Option("", help="--sequential: train the models here, or reuse those "
                                              "trained here before (default: a temporary folder).")):
    """Benchmark certification throughput of one model pair; print a table and write JSON.

    Random weights (speed does not depend on them). The Ray jobs run on a local Ray started here,
    on a temporary SQLite database; the machine should otherwise be idle for meaningful numbers.
    """
    from dsq import bench as benchmark
    from dsq import report

    if queue:
        return queue_overhead(queue, threads)
    if sequential_api:
        return sequential_api_queries(sequential_images)
    if sequential:
        return sequential_comparison(sequential_images, sequential_home or None,
                                     "sequential-bench.json" if out == "bench-results.json" else out)
    with common.boundary():
        cfg = benchmark.BenchConfig(
            pair=pair, batch_size=batch_size or None, reference_batch_size=reference_batch_size, device=device,
            threads=threads or os.cpu_count() or 1,
            repeats=repeats, samples=samples or None, workers=workers, ray_images=ray_images, ray_n=ray_n or None,
            memory_model=memory_model, variants=variants, ray=ray, memory=memory,
            batch_sweep=parse_sizes(batch_sweep))
        from workers.bench_jobs import ray_jobs

        results = benchmark.run(cfg, log=lambda line: common.errors.print(line, markup=False, highlight=False),
                                ray_jobs=ray_jobs)
    benchmark.write_results(results, out)
    for header, rows, title in benchmark.tables(results):
        common.console.print(report.render_table(header, rows, title=title))
    common.console.print(f"results written to {out}")


def parse_sizes(text: str) -> tuple[int, ...]:
    from dsq.errors import InvalidArgument

    try:
        return tuple(int(part) for part in text.split(",") if part.strip())
    except ValueError:
        raise InvalidArgument(f"--batch-sweep must be comma-separated integers, got {text!r}") from None


def queue_overhead(count: int, threads: int) -> None:
    from dsq import report
    from workers import queue_bench

    found = queue_bench.measure(count, threads=threads or None,
                                log=lambda line: common.errors.print(line, markup=False, highlight=False))
    header = ["sampler actors", "jobs ok", "wall s", "sampling s", "overhead s/job", "first job s", "jobs/s"]
    rows = [[variant, f"{f['succeeded']}/{f['jobs']}", f"{f['wall_s']:.1f}", f"{f['sampling_s']:.1f}",
             f"{f['overhead_per_job_s']:.2f}", f"{f['first_job_s']:.1f}", f"{f['jobs_per_s']:.2f}"]
            for variant, f in found.items()]
    common.console.print(report.render_table(header, rows, title="queue overhead (one warm worker, one job at a time)"))
