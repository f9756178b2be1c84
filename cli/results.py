"""``dsq results|compare``: certified accuracy tables, per-image rows and curves (no torch, no Ray)."""

from __future__ import annotations

import json
from typing import List, Optional, Sequence

import typer

from cli import common
from dsq import views
from dsq.db import repo
from dsq.db.session import session_scope
from dsq.errors import InvalidArgument
from dsq.report import accuracy, exports, intervals, plots, summary, tables

FORMATS = ("table", "csv", "json", "tsv", "markdown", "latex")
TABLE_FORMATS = ("table", "markdown", "latex")
SUMMARY_FORMATS = TABLE_FORMATS + ("csv", "json")
RADII_HELP = "Comma-separated radii (L2, [0,1] pixel units)."
CI_HELP = ("Add to each cell the two-sided Clopper-Pearson interval of the certified accuracy over the images: "
           "62.0 [52.1, 71.2] (clean).")
CI_ALPHA_HELP = f"The interval's alpha: a (1 - alpha) interval (implies --ci). Default: {intervals.DEFAULT_ALPHA}."
DEFAULT_RADII_HELP = ("Default: the experiment file's radii, else from 0 to the largest radius the jobs' sigma, n and "
                      "alpha can certify.")
BY_CLASS_HELP = "Also a row per class (by true label) under each job."
PLOT_HELP = "Write the curves to this file: .png, .pdf or .svg (the format)."
TITLE_HELP = "The plot's title."
LINF_HELP = ("Radii in L∞: the L2 radius R / sqrt(d) (d = the image's pixel values), the L∞ ball an L2 certificate "
             "implies; --radii are then L∞ radii.")


def register(app: typer.Typer) -> None:
    app.command()(results)
    app.command()(compare)


def results(ctx: typer.Context, job: Optional[int] = typer.Argument(None, help="Job id."),
            radii: Optional[str] = typer.Option(None, help=RADII_HELP + " " + DEFAULT_RADII_HELP),
            format: str = typer.Option("table", "--format", help="table, markdown or latex (certified "
                                        "accuracy, ACR, abstain rate); csv or json (every stored column per image, "
                                        "or the table with --summary or --by-class); tsv (Cohen et al.'s log)."),
            alpha: Optional[float] = typer.Option(None, help="certify-api: re-certify offline from the stored "
                                                  "answers at this alpha (no query is sent)."),
            experiment: Optional[str] = typer.Option(None, help="The paper's table of an experiment: per method, "
                                                     "the envelope across sigma (ACR, abstain rate; --by-class, "
                                                     "--ci; csv and json: every table's rows, with their table)."),
            by_sigma: bool = typer.Option(False, help="--experiment: also one table per sigma, first."),
            by_class: bool = typer.Option(False, "--by-class", help=BY_CLASS_HELP),
            summary_: bool = typer.Option(False, "--summary", help="--format csv|json: the table's numbers instead "
                                          "of the per-image rows."),
            ci: bool = typer.Option(False, "--ci", help=CI_HELP),
            ci_alpha: Optional[float] = typer.Option(None, "--ci-alpha", help=CI_ALPHA_HELP),
            plot: Optional[str] = typer.Option(None, help="--experiment: " + PLOT_HELP),
            title: Optional[str] = typer.Option(None, help=TITLE_HELP),
            linf: bool = typer.Option(False, "--linf", help=LINF_HELP)):
    """Certified accuracy of one job (table) or its per-image results (csv, json, tsv); or of an experiment."""
    with common.boundary():
        if format not in FORMATS:
            raise InvalidArgument(f"--format must be one of {', '.join(FORMATS)}, got {format!r}")
        if (job is None) == (experiment is None):
            raise InvalidArgument("give a job id or --experiment NAME (one of them)")
        if plot is not None and experiment is None:
            raise InvalidArgument("--plot draws an experiment (--experiment NAME); for jobs: dsq compare JOB... --plot")
        if (summary_ or by_class) and format not in SUMMARY_FORMATS:
            raise InvalidArgument(f"--summary and --by-class print a table: --format {', '.join(SUMMARY_FORMATS)}, "
                                  f"not {format}")
        _check_experiment_options(experiment, format, alpha, by_sigma)
        # an experiment has no per-image rows to export: its csv and json are its tables' numbers
        tabled = format in SUMMARY_FORMATS and (format in TABLE_FORMATS or summary_ or by_class
                                                or experiment is not None)
        interval = _interval(ci, ci_alpha)
        if interval is not None and not tabled:
            raise InvalidArgument(f"--ci applies to the tables ({', '.join(TABLE_FORMATS)}, or csv and json with "
                                  f"--summary), not to --format {format}")
        _check_plot(plot, title)
        radius_list = None if radii is None else accuracy.parse_radii(radii)
        engine = common.database(common.settings(ctx), write=False)
        if experiment is not None:
            jobs = print_experiment(engine, experiment, radius_list, by_sigma=by_sigma, by_class=by_class,
                                    ci=interval, format=format, linf=linf, rows=plot is not None)
            if plot:
                curves = [plots.Curve(job.label, job.rows, job.method, job.sigma, job.target) for job in jobs]
                plots.plot_curves(curves, plot, ci=interval, norm=_norm(linf), title=title or
                                  f"{experiment}: certified accuracy vs {_norm(linf)} radius")
                _written(plot, format)
            return
        with session_scope(engine) as session:
            predicted = views.prediction(session, job)
        if predicted is not None:
            given = {"--radii": radii, "--alpha": alpha, "--by-class": by_class or None, "--summary": summary_ or None,
                     "--ci": interval, "--format tsv": format == "tsv" or None, "--linf": linf or None}
            refused = [option for option, value in given.items() if value is not None]
            if refused:
                raise InvalidArgument(f"job {job} is a PREDICT job (a class or an abstain per image, no radius): "
                                      f"{refused[0]} does not apply")
            return _prediction(job, *predicted, format)
        with session_scope(engine) as session:
            [report] = views.report_jobs(session, [job])
            sequential = views.sequential_costs(session, job)
            spend = views.api_spend_line(session, job)
            exported = exports.export_rows(repo.results_for_job(session, job))
            if alpha is not None:
                from dsq.apis import results as api_results

                exported = api_results.recertify(session, job, alpha)
                report = report._replace(rows=accuracy.as_results(exported))
            if linf:
                if not tabled:
                    raise InvalidArgument(f"--linf applies to the tables ({', '.join(TABLE_FORMATS)}, or csv and "
                                          f"json with --summary), not to the per-image --format {format}")
                [report] = views.in_linf(session, [report])
                sequential = sequential and (report.target, *sequential[1:])
            radius_list = radius_list or views.table_radii(session, [report], linf=linf)
            if alpha is None:  # its table counted by the database, as the dashboard's (re-certified: its rows)
                [report] = views.tallied(session, [report], [sequential[0]] if sequential else radius_list)
        if sequential and radii is not None and radius_list != [sequential[0]]:
            raise InvalidArgument(f"job {job} is sequential: it answers only at radius {sequential[0]:g} "
                                  f"(--radii {sequential[0]:g}); any other --radii does not apply")
        if report.partial:
            common.say(report.partial, err=True)
        if spend:
            common.say(spend, err=True)
        if not tabled:
            fields = exports.EXPORT_FIELDS if alpha is None else ()
            text = {"csv": lambda: exports.to_csv(exported, fields), "json": lambda: exports.to_json(exported, fields),
                    "tsv": lambda: exports.to_tsv(report.rows)}[format]()
            typer.echo(text, nl=not text.endswith("\n"))
            return
        if sequential and format == "table" and not by_class:
            common.console.print(views.sequential_summary(report.label, report.rows, *sequential, ci=interval))
            common.say(tables.sequential_note(sequential[0]))
            return
        table = summary.build([report], [sequential[0]] if sequential else radius_list, ci=interval,
                              by_class=by_class)
        if linf:
            table = table._replace(notes=[*table.notes, views.linf_note([report])])
        title = (f"{report.label}: {tables.accuracy_title(interval)}, {len(report.rows)} images"
                 + (" (partial)" if report.partial else ""))
        show(table, title, format)


def _prediction(job: int, found: list[dict], api: bool, partial: str | None, format: str) -> None:
    """A PREDICT job's answers: per image in csv and json, a table and its summary otherwise."""
    from dsq.report import predictions

    if partial:
        common.say(partial, err=True)
    if format in ("csv", "json"):
        text = json.dumps(found, indent=1) if format == "json" else exports.records_to_csv(found)
        typer.echo(text, nl=not text.endswith("\n"))
        return
    rows, notes = predictions.text_rows(found), predictions.summary_lines(found, api=api)
    if format == "markdown":
        typer.echo(exports.to_markdown(predictions.HEADER, rows, notes=notes), nl=False)
    elif format == "latex":
        typer.echo(exports.to_latex(predictions.HEADER, rows, caption=f"job {job}: PREDICT", notes=notes), nl=False)
    else:
        common.console.print(tables.render_table(predictions.HEADER, rows, title=f"job {job}: PREDICT"))
        for note in notes:
            common.say(note)


def show(table: summary.Table, title: str, format: str, *, images: bool = False, first: str = "job") -> None:
    """A table on the terminal, as Markdown or LaTeX to paste into a paper, or as CSV or JSON; and its notes."""
    if format in ("csv", "json"):
        _show_records(table, summary.records(table), title, format)
        return
    header, rows = summary.header(table, first=first, images=images), summary.text_rows(table, images=images)
    if format == "markdown":
        typer.echo(exports.to_markdown(header, rows, notes=table.notes), nl=False)
    elif format == "latex":
        typer.echo(exports.to_latex(header, rows, caption=title, notes=table.notes), nl=False)
    else:
        common.console.print(tables.render_table(header, rows, title=title))
        for note in table.notes:
            common.say(note)


def _norm(linf: bool) -> str:
    return "L∞" if linf else "L2"


def _written(plot: str, format: str) -> None:
    """Say where the curves went: on stderr beside data or text to paste (csv, json, markdown, latex)."""
    common.say(f"curves written to {plot}", err=format != "table")


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


def _check_experiment_options(experiment: str | None, format: str, alpha: float | None, by_sigma: bool) -> None:
    """Refuse what an experiment's tables cannot do, and --by-sigma without an experiment."""
    if experiment is None:
        if by_sigma:
            raise InvalidArgument("--by-sigma splits an experiment's table: give --experiment NAME")
        return
    if format not in SUMMARY_FORMATS:
        raise InvalidArgument(f"--experiment prints tables: --format {', '.join(SUMMARY_FORMATS)}, not {format} "
                              f"(per-image rows: dsq results JOB --format {format})")
    if alpha is not None:
        raise InvalidArgument("--alpha re-certifies one certify-api job: give its id, not --experiment")


def print_experiment(engine, name: str, radii: list[float] | None, *, by_sigma: bool, by_class: bool = False,
                     ci: float | None = None, format: str = "table", notes: Sequence[str] = (),
                     linf: bool = False, rows: bool = False) -> list[summary.Job]:
    """An experiment's tables in ``format`` (``views.experiment_report``), as ``dsq compare`` prints a table; its
    notes (and ``notes``) once after them on the terminal. Returns its jobs, with their rows if ``rows`` (for the
    curves)."""
    with session_scope(engine) as session:
        report = views.experiment_report(session, name, radii, by_sigma=by_sigma, by_class=by_class, ci=ci,
                                         linf=linf, rows=rows)
    if report.warning:
        common.say(report.warning, err=True)
    report = report._replace(notes=[*report.notes, *notes])
    if format in ("csv", "json"):  # one data set: each row says its table
        _show_records(summary.Table(report.radii, [], report.notes), report.records(), report.title, format)
    else:
        _show_tables(report.shown, format, report.notes)
    return report.jobs


def _show_tables(shown: list[views.ExperimentTable], format: str, notes: list[str]) -> None:
    """Tables one after the other, ``notes`` under the last. On a terminal the others have none (they would repeat);
    in Markdown and LaTeX each keeps its own and its title, as a pasted table is read alone."""
    for k, part in enumerate(shown):
        last = k == len(shown) - 1
        own = notes if last else [] if format == "table" else part.table.notes
        if format == "markdown":
            typer.echo(f"**{part.title}**\n")
        show(part.table._replace(notes=own), part.title, format, first="method")
        if not last and format != "table":
            typer.echo("")


def _show_records(table: summary.Table, records: list[dict], title: str, format: str) -> None:
    """A table's records (``summary.records``, of one table or several) as CSV (its notes on stderr) or as one JSON
    object with its title, radii and notes."""
    if format == "json":
        typer.echo(exports.table_to_json(title, table.radii, records, table.notes))
        return
    typer.echo(exports.records_to_csv(records), nl=False)
    for note in table.notes:  # the data stays a clean CSV
        common.say(note, err=True)


def compare(ctx: typer.Context, job_ids: List[int] = typer.Argument(..., help="Job ids."),
            radii: Optional[str] = typer.Option(None, help=RADII_HELP + " " + DEFAULT_RADII_HELP),
            envelope: bool = typer.Option(False, help="Add a row per method with several jobs (a method: a job's "
                                          "name without its sigma, MSE s=0.25 -> MSE): their best per radius."),
            plot: Optional[str] = typer.Option(None, help=PLOT_HELP),
            title: Optional[str] = typer.Option(None, help=TITLE_HELP),
            ci: bool = typer.Option(False, "--ci", help=CI_HELP + " On --plot: a band around each curve."),
            ci_alpha: Optional[float] = typer.Option(None, "--ci-alpha", help=CI_ALPHA_HELP),
            by_class: bool = typer.Option(False, "--by-class", help=BY_CLASS_HELP),
            format: str = typer.Option("table", "--format", help="table, markdown, latex, csv or json."),
            linf: bool = typer.Option(False, "--linf", help=LINF_HELP)):
    """Certified accuracy per radius, one row per job, clean accuracy in parentheses; ACR and abstain rate."""
    with common.boundary():
        if format not in SUMMARY_FORMATS:
            raise InvalidArgument(f"--format must be one of {', '.join(SUMMARY_FORMATS)}, got {format!r}")
        interval = _interval(ci, ci_alpha)
        _check_plot(plot, title)
        radius_list = None if radii is None else accuracy.parse_radii(radii)
        engine = common.database(common.settings(ctx), write=False)
        with session_scope(engine) as session:
            jobs = views.report_jobs(session, job_ids)
            jobs = views.in_linf(session, jobs) if linf else jobs
            radius_list = radius_list or views.table_radii(session, jobs, linf=linf)
            jobs = views.tallied(session, jobs, radius_list)
        warning = views.image_warning(jobs)
        if warning:
            common.say(warning, err=True)
        groups = views.envelope_groups(jobs) if envelope else []
        if envelope and not groups:
            common.say(views.envelope_warning(jobs), err=True)
        table = summary.build(jobs, radius_list, ci=interval, by_class=by_class, envelopes=groups)
        if linf:
            table = table._replace(notes=[*table.notes, views.linf_note(jobs)])
        show(table, tables.accuracy_title(interval), format, images=True)  # in every format: how many images
        if plot:
            curves = [plots.Curve(job.label, job.rows, job.method, job.sigma, job.target) for job in jobs]
            plots.plot_curves(curves, plot, title=title or "certified accuracy", envelope=envelope, ci=interval,
                              norm=_norm(linf))
            _written(plot, format)
