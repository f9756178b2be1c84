"""``dsq demo``: the digits preset submitted as one experiment and drained by a worker in this process."""

from __future__ import annotations

import signal
import time

import typer

from cli import common
from dsq.errors import DsqError


def register(app: typer.Typer) -> None:
    app.command()(demo)


def demo(ctx: typer.Context,
         plot: str = typer.Option("dsq-demo-curves.png", help="Where to write the certification curves."),
         max_images: int = typer.Option(0, help="Certify at most this many test digits (0: all 364)."),
         n: int = typer.Option(1000, help="Estimation samples per image."),
         quick: bool = typer.Option(False, "--quick", help="One epoch per model: checks the pipeline, not the numbers.")):
    """Train f, denoisers and Cohen's classifiers on digits, certify them all, compare (jobs run side by side)."""
    from cli import results
    from dsq import demo as preset, experiments
    from dsq.db.session import session_scope
    from dsq.report import plots
    from workers import resources, worker

    config = common.settings(ctx)
    started = time.monotonic()
    runner = queued = None

    def stop(signal_name: str) -> None:
        if runner is None:  # before its worker runs, a signal ends the demo where it is
            raise common.Stopped(signal.Signals[signal_name])
        runner.stop(signal_name)

    try:
        with common.StopSignals(stop) as signals:
            with common.boundary():
                plots.plot_format(plot)  # a plot that cannot be written is refused now, not after the demo
                plan = preset.plan(n=n, max_images=max_images or None, quick=quick)
                common.check_cluster(config)  # before anything is written
                engine = common.database(config)
                name = f"{plan.name}-demo-{time.strftime('%Y%m%d-%H%M%S')}"
                with session_scope(engine) as session:
                    ids = experiments.submit(session, plan, config, experiment=name)
                queued = name
                common.say(f"experiment {name}: jobs {min(ids.values())}-{max(ids.values())} queued")
                resources.connect(config.ray_address)
                signals.install()  # again: Ray's start put its own SIGTERM handler in place
                runner = worker.QueueWorker(config, drain=True, only=set(ids.values()),
                                            log=lambda line: common.say(f"{time.monotonic() - started:5.0f} s  {line}"))
            summary = runner.run()
    except common.Stopped as stopped:
        then = f"; `dsq worker --drain` runs experiment {queued}" if queued else ""
        common.say(f"demo stopped ({stopped}) before its jobs ran{then}", err=True)
        raise common.signal_exit(stopped.number) from None
    if signals.number is not None:
        common.say(f"demo stopped ({summary.reason}); handed back: jobs {summary.handed_back or 'none'}. "
                   f"`dsq worker --drain` finishes it; then `dsq results --experiment {name}`", err=True)
        raise common.signal_exit(signals.number)
    with common.boundary():
        failed = {job_id: status for job_id, status in summary.ran.items() if status != "succeeded"}
        if failed:
            raise DsqError(f"demo jobs did not succeed: {failed}; see dsq logs JOB")
        # the tables of `dsq results --experiment NAME --by-sigma`, printed by the same code
        jobs = results.print_experiment(engine, name, None, by_sigma=True,
                                        notes=[preset.QUICK_NOTE] if quick else [], rows=True)
        plots.plot_curves([(job.label, job.rows) for job in jobs], plot,
                          title="dsq demo: digits, certified accuracy vs L2 radius")
    common.console.print(f"curves written to {plot}")
    common.console.print(f"demo finished in {time.monotonic() - started:.0f} s; "
                         f"query it again with: dsq results --experiment {name} --by-sigma")
