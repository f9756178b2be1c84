"""``dsq demo``: the embedded end-to-end job on real handwritten digits."""

from __future__ import annotations

import dataclasses
import time

import typer

from cli import common
from dsq import demo as plan
from dsq import jobs
from dsq.db.session import session_scope
from dsq.errors import DsqError


def register(app: typer.Typer) -> None:
    app.command()(demo)


def demo(ctx: typer.Context,
         plot: str = typer.Option("dsq-demo-curves.png", help="Where to write the certification curves."),
         max_images: int = typer.Option(0, help="Certify at most this many test digits (0: all 364)."),
         n: int = typer.Option(1000, help="Estimation samples per image."),
         quick: bool = typer.Option(False, "--quick", help="One epoch per model: checks the pipeline, not the numbers.")):
    """Train f, denoisers and Cohen's classifiers on digits, certify them all, compare."""
    config = common.settings(ctx)
    started = time.monotonic()
    with common.boundary():
        cfg = plan.DemoConfig(n=n, max_images=max_images or None)
        if quick:
            cfg = dataclasses.replace(cfg, classifier_epochs=1, denoiser_epochs=1, stab_epochs=1)
        engine = common.database(config)

        def execute(spec) -> int:
            with session_scope(engine) as session:
                job_id = jobs.submit(session, spec, config).id
            if common.run_local(config, job_id, f"job {job_id}: {spec.name}") != "succeeded":
                raise DsqError(f"demo step {spec.name!r} (job {job_id}) did not succeed; see dsq logs {job_id}")
            return job_id

        rows = plan.run(execute, cfg)
        with session_scope(engine) as session:
            tables = {s: jobs.labelled_results(session, [j for _, j in r]) for s, r in rows.items()}
    _print(tables, plot)
    common.console.print(f"demo finished in {time.monotonic() - started:.0f} s; "
                         f"query it again with: dsq compare {' '.join(str(j) for r in rows.values() for _, j in r)}")


def _print(tables, plot: str) -> None:
    """A table per sigma, then per method the envelope (best job per radius) across sigma, then the curves."""
    from dsq import report

    by_method: dict[str, list] = {}
    for sigma, labelled in tables.items():
        named = [(label.rsplit(" s=", 1)[0], rows) for label, rows in labelled]
        common.console.print(jobs.comparison(named, plan.RADII, title=f"sigma = {sigma}: certified accuracy % (clean)"))
        for (method, rows), (label, _) in zip(named, labelled):
            by_method.setdefault(method, []).append((label, rows))
    envelope = [report.envelope_row(runs, plan.RADII, label=method) for method, runs in by_method.items()]
    common.console.print(report.render_table(report.compare_header(plan.RADII, "method"), envelope,
                                             title="envelope across sigma: best certified accuracy % (clean)"))
    everything = [run for runs in by_method.values() for run in runs]
    report.plot_curves(everything, plot, title="dsq demo: digits, certified accuracy vs L2 radius")
    common.console.print(f"curves written to {plot}")
