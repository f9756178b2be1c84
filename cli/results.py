"""``dsq results|compare``: certified accuracy tables, per-image rows and curves (no torch, no Ray)."""

from __future__ import annotations

from typing import List, Optional

import typer

from cli import common
from dsq import views
from dsq.db import repo
from dsq.db.session import session_scope
from dsq.errors import InvalidArgument
from dsq.report import accuracy, exports, intervals, plots, tables

FORMATS = ("table", "csv", "json", "tsv", "markdown", "latex")
TABLE_FORMATS = ("table", "markdown", "latex")
RADII_HELP = "Comma-separated radii (L2, [0,1] pixel units)."
CI_HELP = ("Add to each cell the two-sided Clopper-Pearson interval of the certified accuracy over the images: "
           "62.0 [52.1, 71.2] (clean).")
CI_ALPHA_HELP = f"The interval's alpha: a (1 - alpha) interval (implies --ci). Default: {intervals.DEFAULT_ALPHA}."
PLOT_HELP = "Write the curves to this file: .png, .pdf or .svg (the format)."
TITLE_HELP = "The plot's title."


def register(app: typer.Typer) -> None:
    app.command()(results)
    app.command()(compare)


def results(ctx: typer.Context, job: Optional[int] = typer.Argument(None, help="Job id."),
            radii: Optional[str] = typer.Option(None, help=RADII_HELP + f" Default: {accuracy.DEFAULT_RADII}."),
            format: str = typer.Option("table", "--format", help="table, markdown or latex (certified "
                                        "accuracy); csv or json (every stored column per image); tsv (Cohen et "
                                        "al.'s log)."),
            alpha: Optional[float] = typer.Option(None, help="certify-api: re-certify offline from the stored "
                                                  "answers at this alpha (no query is sent)."),
            experiment: Optional[str] = typer.Option(None, help="The paper's table of an experiment: per method, "
                                                     "the envelope across sigma."),
            by_sigma: bool = typer.Option(False, help="--experiment: also one table per sigma."),
            ci: bool = typer.Option(False, "--ci", help=CI_HELP),
            ci_alpha: Optional[float] = typer.Option(None, "--ci-alpha", help=CI_ALPHA_HELP),
            plot: Optional[str] = typer.Option(None, help="--experiment: " + PLOT_HELP),
            title: Optional[str] = typer.Option(None, help=TITLE_HELP)):
    """Certified accuracy of one job (table) or its per-image results (csv, json, tsv); or of an experiment."""
    with common.boundary():
        if format not in FORMATS:
            raise InvalidArgument(f"--format must be one of {', '.join(FORMATS)}, got {format!r}")
        if (job is None) == (experiment is None):
            raise InvalidArgument("give a job id or --experiment NAME (one of them)")
        if plot is not None and experiment is None:
            raise InvalidArgument("--plot draws an experiment (--experiment NAME); for jobs: dsq compare JOB... --plot")
        interval = _interval(ci, ci_alpha)
        if interval is not None and format not in TABLE_FORMATS:
            raise InvalidArgument(f"--ci applies to the tables ({', '.join(TABLE_FORMATS)}), not to --format {format}")
        _check_plot(plot, title)
        radius_list = accuracy.parse_radii(radii or ",".join(map(str, accuracy.DEFAULT_RADII)))
        engine = common.database(common.settings(ctx))
        if experiment is not None:
            return _experiment(engine, experiment, radius_list, by_sigma, plot, title, interval)
        with session_scope(engine) as session:
            [(label, rows)] = views.labelled_results(session, [job])
            sequential = views.sequential_costs(session, job)
            partial = views.partial_note(session, job, len(rows))
            spend = views.api_spend_line(session, job)
            exported = exports.export_rows(repo.results_for_job(session, job))
            if alpha is not None:
                from dsq.apis import results as api_results

                exported = api_results.recertify(session, job, alpha)
                rows = accuracy.as_results(exported)
        if sequential and radii is not None:
            raise InvalidArgument(f"job {job} is sequential: it answers only at radius {sequential[0]:g}, "
                                  f"so --radii does not apply")
        if partial:
            common.say(partial, err=True)
        if spend:
            common.say(spend, err=True)
        if format not in TABLE_FORMATS:
            fields = exports.EXPORT_FIELDS if alpha is None else ()
            text = {"csv": lambda: exports.to_csv(exported, fields), "json": lambda: exports.to_json(exported, fields),
                    "tsv": lambda: exports.to_tsv(rows)}[format]()
            typer.echo(text, nl=not text.endswith("\n"))
            return
        if sequential:
            common.console.print(views.sequential_summary(label, rows, *sequential, ci=interval))
            common.say(tables.sequential_note(sequential[0]))
            return
        table = tables.compare_table([(label, rows)], radius_list, ci=interval)
        title = (f"{label}: {tables.accuracy_title(interval)}, {len(rows)} images"
                 + (" (partial)" if partial else ""))
        show_table(tables.compare_header(radius_list), table, title, format)


def show_table(header, rows, title: str, format: str) -> None:
    """A table on the terminal, or as Markdown or LaTeX to paste into a paper."""
    if format == "markdown":
        typer.echo(exports.to_markdown(header, rows), nl=False)
    elif format == "latex":
        typer.echo(exports.to_latex(header, rows, caption=title), nl=False)
    else:
        common.console.print(tables.render_table(header, rows, title=title))


def _interval(ci: bool, ci_alpha: float | None) -> float | None:
    """The alpha of the tables' confidence intervals, None without --ci."""
    if ci_alpha is not None:
        return intervals.check_alpha(ci_alpha)
    return intervals.DEFAULT_ALPHA if ci else None


def _check_plot(plot: str | None, title: str | None) -> None:
    """Refuse a plot that cannot be written (its format, its folder) before any work; --title needs --plot."""
    if title is not None and plot is None:
        raise InvalidArgument("--title names the plot: give --plot FILE too")
    if plot is not None:
        plots.plot_format(plot)


def _experiment(engine, name: str, radii, by_sigma: bool, plot: str | None, title: str | None,
                ci: float | None) -> None:
    with session_scope(engine) as session:
        runs = views.experiment_runs(session, name)
    for table in views.experiment_tables(runs, radii, by_sigma=by_sigma, ci=ci):
        common.console.print(table)
    if plot:
        curves = [plots.Curve(label, rows, method, sigma) for method, found in runs.items()
                  for sigma, label, rows in found]
        plots.plot_curves(curves, plot, title=title or f"{name}: certified accuracy vs L2 radius")
        common.say(f"curves written to {plot}")


def compare(ctx: typer.Context, job_ids: List[int] = typer.Argument(..., help="Job ids."),
            radii: str = typer.Option(",".join(map(str, accuracy.DEFAULT_RADII)), help=RADII_HELP),
            envelope: bool = typer.Option(False, help="Add a row per method with several jobs (a method: a job's "
                                          "name without its sigma, MSE s=0.25 -> MSE): their best per radius."),
            plot: Optional[str] = typer.Option(None, help=PLOT_HELP),
            title: Optional[str] = typer.Option(None, help=TITLE_HELP),
            ci: bool = typer.Option(False, "--ci", help=CI_HELP),
            ci_alpha: Optional[float] = typer.Option(None, "--ci-alpha", help=CI_ALPHA_HELP),
            format: str = typer.Option("table", "--format", help="table, markdown or latex.")):
    """Certified accuracy per radius, one row per job, clean accuracy in parentheses."""
    with common.boundary():
        if format not in TABLE_FORMATS:
            raise InvalidArgument(f"--format must be one of {', '.join(TABLE_FORMATS)}, got {format!r}")
        interval = _interval(ci, ci_alpha)
        _check_plot(plot, title)
        radius_list = accuracy.parse_radii(radii)
        engine = common.database(common.settings(ctx))
        with session_scope(engine) as session:
            runs = views.compared_runs(session, job_ids)
        warning = views.image_warning(runs)
        if warning:
            common.say(warning, err=True)
        header, rows = views.comparison_rows(runs, radius_list, envelope=envelope, ci=interval,
                                             images=format == "table")
        show_table(header, rows, tables.accuracy_title(interval), format)
        if plot:
            curves = [plots.Curve(run.label, run.rows, run.method, run.sigma) for run in runs]
            plots.plot_curves(curves, plot, title=title or "certified accuracy", envelope=envelope)
            common.say(f"curves written to {plot}")
