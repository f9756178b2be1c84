"""Results to tables, envelopes and curves: certified accuracy as in Cohen et al. (2019) and Salman et al. (2020).

Input rows are any objects or dicts with ``image_index, label, prediction, radius`` and optionally ``correct`` and
``seconds`` (database rows, dicts read back from JSON, ...); nothing here touches a database or the CLI.

Symbols: for the per-image results of a job, the *certified accuracy* at radius r is the fraction of images whose
smoothed prediction is correct and certified with radius >= r. At r = 0 it is the *clean accuracy of the smoothed
classifier* (correct and not abstaining, prediction -1 never being correct).

With a confidence level, a certified accuracy k/n over n images carries its two-sided Clopper-Pearson interval
(``clopper_pearson``): the uncertainty from certifying a sample of the test set, beside the alpha of each image's
certificate. A *method* is a job name without its sigma (``split_sigma``: ``MSE s=0.25`` -> ``MSE``): the jobs of
one method differ only in sigma, and its envelope takes the best of them at each radius.

A *sequential* job (a target radius r, ``dsq.sequential``) answers one question per image: certified within
radius >= r, or not. Its certified accuracy at r is the fraction of images correct and certified; at any other
radius it answers nothing (its stored radii are lower bounds, not the largest radius the samples allow), so its
table (``sequential_table``) has that one number and what it cost: samples (or queries) per image.

Comparison tables follow the Denoised Smoothing paper's Tables 1-2 ("standard accuracy is in parenthesis"): one row
per job, one column per radius, every cell ``A (C)`` with A the certified accuracy in percent and C the clean
accuracy of the job that produced A: the smoothed classifier's accuracy at r = 0 unless the caller passes another
(e.g. the base classifier's accuracy without noise). In an envelope row (the best job per radius, e.g. across
sigma) C is the clean accuracy of the job attaining that cell, so it can differ from cell to cell, as in the paper.
"""

from __future__ import annotations

import csv
import datetime
import io
import json
import math
import os
import re
from dataclasses import asdict, dataclass
from typing import Any, Iterable, Mapping, NamedTuple, Sequence

from dsq.errors import InvalidArgument
from dsq.text import safe

RESULT_FIELDS = ("image_index", "label", "prediction", "radius", "correct", "seconds")
DEFAULT_RADII = (0.0, 0.25, 0.5, 0.75, 1.0, 1.25, 1.5)
TSV_HEADER = "idx\tlabel\tpredict\tradius\tcorrect\ttime"  # Cohen et al.'s code/certify.py log header
ABSTAIN = -1

Rows = Iterable[Any]
Jobs = Sequence[tuple[str, Rows]]


@dataclass(frozen=True)
class Result:
    """One certified image, read from any row: ``correct`` already means ``prediction == label != -1``."""

    image_index: int
    label: int
    prediction: int
    radius: float
    correct: bool
    seconds: float


class Envelope(NamedTuple):
    """Best certified accuracy per radius across jobs, the job attaining it (first on ties), and its clean accuracy."""

    accuracy: list[float]
    best: list[str]
    clean: list[float]


# ---------------------------------------------------------------------------------------------- rows


def field(row: Any, name: str, default: Any = ...) -> Any:
    """``row[name]`` for a mapping, ``row.name`` otherwise (ORM objects, SQLAlchemy ``Row``, dataclasses)."""
    if isinstance(row, Mapping):
        value = row.get(name, default)
    else:
        value = getattr(row, name, default)
    if value is ...:
        raise InvalidArgument(f"result row {row!r} has no {name!r}: expected fields {', '.join(RESULT_FIELDS)}")
    return value


def as_result(row: Any) -> Result:
    """A :class:`Result` from a row; a stored ``correct`` is kept (an API job's label rule) but never for abstains."""
    prediction, label = int(field(row, "prediction")), int(field(row, "label"))
    stored = field(row, "correct", None)
    correct = (prediction == label if stored is None else bool(int(stored))) and prediction != ABSTAIN
    seconds = field(row, "seconds", None)
    return Result(
        image_index=int(field(row, "image_index")),
        label=label,
        prediction=prediction,
        radius=float(field(row, "radius")),
        correct=correct,
        seconds=0.0 if seconds is None else float(seconds),
    )


def as_results(rows: Rows) -> list[Result]:
    """All rows as :class:`Result`, ordered by image index."""
    return sorted((as_result(r) for r in rows), key=lambda r: r.image_index)


# ---------------------------------------------------------------------------------------------- accuracy


def certified_counts(rows: Rows, radii: Sequence[float]) -> tuple[int, list[int]]:
    """``(n, k per radius)``: the number of images, and of those with ``correct and radius >= r`` for each r."""
    results = as_results(rows)
    if not results:
        raise InvalidArgument("no certified images: certified accuracy needs at least one result row")
    return len(results), [sum(1 for x in results if x.correct and x.radius >= r) for r in radii]


def certified_accuracy(rows: Rows, radii: Sequence[float]) -> list[float]:
    """Fraction of rows with ``correct and radius >= r`` for each r in ``radii`` (Cohen et al.'s definition)."""
    n, counts = certified_counts(rows, radii)
    return [k / n for k in counts]


def clopper_pearson(k: int, n: int, alpha: float = 0.05) -> tuple[float, float]:
    """Two-sided (1 - alpha) Clopper-Pearson interval for a proportion, k successes of n (exact, conservative).

    lower = Beta quantile alpha/2 of (k, n - k + 1), 0 when k = 0; upper = quantile 1 - alpha/2 of (k + 1, n - k),
    1 when k = n.
    """
    check_alpha(alpha)
    if not 0 <= k <= n or n < 1:
        raise InvalidArgument(f"a proportion needs 0 <= k <= n and n >= 1, got k = {k}, n = {n}")
    from scipy.stats import beta

    lower = 0.0 if k == 0 else float(beta.ppf(alpha / 2, k, n - k + 1))
    upper = 1.0 if k == n else float(beta.ppf(1 - alpha / 2, k + 1, n - k))
    return lower, upper


def check_alpha(alpha: float) -> float:
    """``alpha`` of a confidence interval, checked: a number strictly between 0 and 1."""
    if not (isinstance(alpha, (int, float)) and 0 < alpha < 1):
        raise InvalidArgument(f"the confidence interval's alpha must be between 0 and 1 (e.g. 0.05), got {alpha!r}")
    return float(alpha)


def accuracy_title(ci: float | None = None) -> str:
    """What a table's cells are: ``certified accuracy % (clean)``, with ``[95% CI]`` when they carry intervals."""
    return "certified accuracy % " + ("" if ci is None else f"[{100 * (1 - ci):g}% CI] ") + "(clean)"


def clean_accuracy(rows: Rows) -> float:
    """Accuracy of the smoothed classifier: correct and not abstaining (certified accuracy at r = 0)."""
    return certified_accuracy(rows, [0.0])[0]


def parse_radii(text: str) -> list[float]:
    """``"0.25,0.5,1"`` -> ``[0.25, 0.5, 1.0]``, sorted and without duplicates; garbage or r < 0 is InvalidArgument."""
    parts = [p.strip() for p in str(text).split(",")]
    if not any(parts):
        raise InvalidArgument(f"no radii in {text!r}: expected comma-separated numbers >= 0, e.g. 0,0.25,0.5")
    radii = []
    for part in parts:
        try:
            r = float(part)
        except ValueError:
            raise InvalidArgument(f"radius {part!r} in {text!r} is not a number: expected e.g. 0,0.25,0.5") from None
        if not math.isfinite(r) or r < 0:
            raise InvalidArgument(f"radius {part!r} in {text!r} must be a finite number >= 0")
        radii.append(r)
    return sorted(set(radii))


def envelope(jobs: Jobs, radii: Sequence[float]) -> Envelope:
    """Best certified accuracy per radius across ``jobs`` (e.g. one job per sigma) and which job attains it."""
    if not jobs:
        raise InvalidArgument("envelope needs at least one job")
    best = [_best(_table(jobs, radii), j) for j in range(len(radii))]
    return Envelope([t.certified[j] / t.n for j, t in enumerate(best)], [t.label for t in best],
                    [t.clean / t.n for t in best])


class _Counts(NamedTuple):
    """One job's numbers: its images n, those correct (r = 0), and those certified correct per radius."""

    label: str
    n: int
    clean: int
    certified: list[int]


def _table(jobs: Jobs, radii: Sequence[float]) -> list[_Counts]:
    """The :class:`_Counts` of each job; a job without rows is InvalidArgument naming it."""
    table = []
    for label, rows in jobs:
        try:
            n, (clean, *certified) = certified_counts(rows, [0.0, *radii])
        except InvalidArgument as e:
            raise InvalidArgument(f"job {label}: {e}") from None
        table.append(_Counts(label, n, clean, certified))
    return table


def _best(table: Sequence[_Counts], j: int) -> _Counts:
    """The job with the highest certified accuracy at the j-th radius (max() keeps the first of equals)."""
    return max(table, key=lambda t: t.certified[j] / t.n)


# ---------------------------------------------------------------------------------------------- tables


def compare_header(radii: Sequence[float], first: str = "job") -> list[str]:
    """Column titles of :func:`compare_table`: the job label, then ``r = 0.25`` ... per radius."""
    return [first] + [f"r = {r:g}" for r in radii]


def format_cell(accuracy: float, clean: float, decimals: int = 1,
                interval: tuple[float, float] | None = None) -> str:
    """``"57.0 (71.2)"``: certified accuracy, clean accuracy in parentheses, both in percent.

    With a confidence ``interval`` (fractions) on the certified accuracy: ``"57.0 [47.1, 66.5] (71.2)"``.
    """
    return f"{_percent(accuracy, decimals, interval)} ({100 * clean:.{decimals}f})"


def _percent(fraction: float, decimals: int, interval: tuple[float, float] | None = None) -> str:
    text = f"{100 * fraction:.{decimals}f}"
    if interval is not None:
        text += f" [{100 * interval[0]:.{decimals}f}, {100 * interval[1]:.{decimals}f}]"
    return text


def _interval(k: int, n: int, ci: float | None) -> tuple[float, float] | None:
    return None if ci is None else clopper_pearson(k, n, ci)


def _cell(t: _Counts, j: int, decimals: int, ci: float | None, clean: float | None = None) -> str:
    """The j-th radius of one job as a cell; ``ci`` (an alpha) adds the Clopper-Pearson interval over its images."""
    clean = t.clean / t.n if clean is None else clean
    return format_cell(t.certified[j] / t.n, clean, decimals, _interval(t.certified[j], t.n, ci))


def compare_table(
    jobs: Jobs,
    radii: Sequence[float],
    *,
    clean: Mapping[str, float] | None = None,
    decimals: int = 1,
    ci: float | None = None,
) -> list[list[str]]:
    """One row of strings per job: its label, then ``A (C)`` per radius (see the module docstring).

    ``clean`` maps a job label to another clean accuracy (a fraction, e.g. the base classifier's without noise).
    ``ci`` (an alpha, e.g. 0.05) adds to each cell the two-sided Clopper-Pearson interval of A over the images.
    """
    return [[t.label] + [_cell(t, j, decimals, ci, (clean or {}).get(t.label)) for j in range(len(radii))]
            for t in _table(jobs, radii)]


def envelope_row(jobs: Jobs, radii: Sequence[float], *, label: str = "envelope", decimals: int = 1,
                 ci: float | None = None) -> list[str]:
    """The :func:`envelope` as a table row; each cell carries the clean accuracy of the job attaining it.

    With ``ci``, a cell's interval is that job's: it does not account for picking the best of several jobs.
    """
    if not jobs:
        raise InvalidArgument("envelope needs at least one job")
    table = _table(jobs, radii)
    return [label] + [_cell(_best(table, j), j, decimals, ci) for j in range(len(radii))]


def render_table(header: Sequence[str], rows: Sequence[Sequence[str]], *, title: str | None = None):
    """A ``rich.table.Table`` with ``header`` and string ``rows`` (first column left, the others right-aligned).

    Every string is printed as it is: job names, labels and titles are user text, so control characters show
    as escapes and rich markup as written (``dsq.text.safe``), never as colours or terminal commands.
    """
    from rich.table import Table

    table = Table(title=None if title is None else safe(title))
    for k, name in enumerate(header):
        table.add_column(safe(name), justify="left" if k == 0 else "right", no_wrap=True)
    for row in rows:
        table.add_row(*(safe(cell) for cell in row))
    return table


def sequential_header(unit: str = "samples") -> list[str]:
    """Column titles of :func:`sequential_table`; ``unit`` is what an image costs (samples, queries)."""
    return ["job", "target radius", "certified accuracy %", f"mean {unit}/image", f"median {unit}/image", "images"]


def sequential_table(jobs: Sequence[tuple[str, Rows, Sequence[float]]], radius: float, *,
                     decimals: int = 1, ci: float | None = None) -> list[list[str]]:
    """One row per sequential job at target ``radius``: (label, rows, cost per image in the rows' order).

    The cost is what each image took: estimation samples drawn, or queries billed for an API job. ``ci`` (an
    alpha) adds the Clopper-Pearson interval of the certified accuracy over the images.
    """
    table = []
    for label, rows, costs in jobs:
        [t] = _table([(label, rows)], [radius])
        mean, median = cost_summary(costs)
        accuracy = _percent(t.certified[0] / t.n, decimals, _interval(t.certified[0], t.n, ci))
        table.append([label, f"{radius:g}", accuracy, f"{mean:,.0f}", f"{median:,.0f}", str(len(costs))])
    return table


def sequential_note(radius: float) -> str:
    """What a sequential job does not answer, in one line."""
    return (f"a sequential job answers only 'certified within radius >= {radius:g}, or not' per image; it does not "
            f"answer other radii (certify with a fixed n for accuracy at every radius)")


def cost_summary(costs: Sequence[float]) -> tuple[float, float]:
    """(mean, median) of per-image costs; InvalidArgument when there are none."""
    if not costs:
        raise InvalidArgument("no certified images: samples per image need at least one result row")
    ordered = sorted(float(c) for c in costs)
    middle = len(ordered) // 2
    median = ordered[middle] if len(ordered) % 2 else (ordered[middle - 1] + ordered[middle]) / 2
    return sum(ordered) / len(ordered), median


# ---------------------------------------------------------------------------------------------- per-image files


def to_dicts(rows: Rows, extra_fields: Sequence[str] = ()) -> list[dict[str, Any]]:
    """Per-image results as plain dicts (``RESULT_FIELDS`` plus ``extra_fields`` read from the rows), by index."""
    rows = sorted(rows, key=lambda r: int(field(r, "image_index")))
    out = []
    for row in rows:
        item = asdict(as_result(row))
        item.update({name: _plain(field(row, name, None)) for name in extra_fields})
        out.append(item)
    return out


def _plain(value: Any) -> Any:
    """JSON-friendly: numpy scalars and arrays to Python numbers and lists."""
    if hasattr(value, "tolist"):
        return value.tolist()
    return value


def to_json(rows: Rows, extra_fields: Sequence[str] = ()) -> str:
    """A JSON list of per-image objects; radii at full precision, ``correct`` a boolean."""
    return json.dumps(to_dicts(rows, extra_fields), indent=1)


def to_csv(rows: Rows, extra_fields: Sequence[str] = ()) -> str:
    """CSV with a header line; radii at full precision (``repr``), ``correct`` as 0/1."""
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=list(RESULT_FIELDS) + list(extra_fields), lineterminator="\n")
    writer.writeheader()
    for item in to_dicts(rows, extra_fields):
        item["correct"] = int(item["correct"])
        writer.writerow({k: json.dumps(v) if isinstance(v, list) else v for k, v in item.items()})
    return buffer.getvalue()


EXPORT_FIELDS = ("p_lower", "counts_selection", "counts_estimation", "n0", "n", "alpha", "sigma", "worker", "device",
                 "precision", "mode", "target_radius")  # every stored column, beside RESULT_FIELDS


def export_rows(rows: Rows) -> list[dict[str, Any]]:
    """Stored result rows as dicts with every column a paper needs (precision and mode from ``extra``)."""
    out = []
    for row in rows:
        extra = field(row, "extra", None) or {}
        item = {name: field(row, name, None) for name in RESULT_FIELDS + EXPORT_FIELDS[:9]}
        item.update(precision=(extra.get("model") or {}).get("precision", "fp32"), mode=extra.get("mode", "fixed"),
                    target_radius=extra.get("target_radius"))
        out.append(item)
    return out


def to_markdown(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    """A GitHub-flavoured Markdown table (pipes in cells escaped)."""
    def line(cells):
        return "| " + " | ".join(str(c).replace("|", "\\|") for c in cells) + " |"
    return "\n".join([line(header), "|" + "---|" * len(header)] + [line(r) for r in rows]) + "\n"


_LATEX_SPECIAL = {"&": r"\&", "%": r"\%", "$": r"\$", "#": r"\#", "_": r"\_", "{": r"\{", "}": r"\}",
                  "~": r"\textasciitilde{}", "^": r"\textasciicircum{}", "\\": r"\textbackslash{}"}


def to_latex(header: Sequence[str], rows: Sequence[Sequence[str]], *, caption: str | None = None) -> str:
    """A booktabs LaTeX table (``\\usepackage{booktabs}``), special characters escaped."""
    def cell(text):
        return "".join(_LATEX_SPECIAL.get(ch, ch) for ch in str(text))

    lines = [r"\begin{table}[t]", r"\centering"]
    if caption:
        lines.append(r"\caption{" + cell(caption) + "}")
    lines += [r"\begin{tabular}{l" + "r" * (len(header) - 1) + "}", r"\toprule",
              " & ".join(cell(h) for h in header) + r" \\", r"\midrule"]
    lines += [" & ".join(cell(c) for c in row) + r" \\" for row in rows]
    lines += [r"\bottomrule", r"\end{tabular}", r"\end{table}"]
    return "\n".join(lines) + "\n"


def to_tsv(rows: Rows) -> str:
    """Cohen et al.'s certify log: ``idx label predict radius correct time``, one line per image.

    As in their ``code/certify.py``: radius formatted ``{:.3}`` (3 significant digits: 0.378, 0.0831, 0.0),
    correct as 0/1, time as ``str(datetime.timedelta(seconds=...))`` (e.g. ``0:00:15.400000``).
    """
    lines = [TSV_HEADER]
    for x in as_results(rows):
        time = datetime.timedelta(seconds=x.seconds)
        lines.append(f"{x.image_index}\t{x.label}\t{x.prediction}\t{x.radius:.3}\t{int(x.correct)}\t{time}")
    return "\n".join(lines) + "\n"


# ---------------------------------------------------------------------------------------------- curves

PLOT_FORMATS = ("png", "pdf", "svg")
_SEPARATORS = " _,;:/-"
LINE_STYLES = ("-", "--", ":", "-.", (0, (5, 1, 1, 1, 1, 1)), (0, (1, 4)), (0, (8, 3)))  # one per sigma
_SIGMA_IN_NAME = re.compile(  # " s=0.25", "_sigma0.5", " (σ=1)", "@0.25" ...; the number is group 2
    r"[\s_,;:/-]*(\()?\s*"  # separators, and an opening parenthesis closed after the number
    r"(?:(?<![^\W_])(?:sigma|σ)\s*[=:_ ]?\s*|(?<![^\W_])s\s*=\s*|@)(\d+(?:\.\d+)?|\.\d+)\s*(?(1)\))",
    re.IGNORECASE)


class Curve(NamedTuple):
    """A job to plot: label and rows, and its method and sigma (when None, read from the label: ``split_sigma``)."""

    label: str
    rows: Rows
    method: str | None = None
    sigma: float | None = None


def split_sigma(name: str) -> tuple[str, float | None]:
    """``"MSE s=0.25"`` -> ``("MSE", 0.25)``: a job name without its sigma (the method), and that sigma.

    A sigma is written ``s=0.25``, ``sigma=0.25``, ``sigma 0.25``, ``sigma0.25``, ``σ=0.25`` or ``@0.25``,
    in any case, anywhere in the name (``"cifar_sigma0.5 (bf16)"`` -> ``("cifar (bf16)", 0.5)``);
    a name without one is returned whole, with None.
    """
    match = _SIGMA_IN_NAME.search(name)
    if match is None:
        return name, None
    before, after = name[:match.start()].rstrip(_SEPARATORS), name[match.end():]
    rest = after.lstrip(_SEPARATORS)
    between = after[:len(after) - len(rest)] or name[len(before):match.start()] or " "
    return (before + between + rest if before and rest else before + rest), float(match.group(2))


def sigma_label(method: str, sigma: float) -> str:
    """``"MSE σ=0.25"``: how a plot names a method at one sigma."""
    return f"{method} σ={sigma:g}".strip()


def curve(rows: Rows, max_radius: float) -> tuple[list[float], list[float]]:
    """Exact step curve of certified accuracy on [0, max_radius]: breakpoints and the accuracy at each.

    Accuracy is constant on each interval (r_k, r_k+1] between breakpoints (draw with ``steps-pre``).
    """
    return envelope_curve([rows], max_radius)


def envelope_curve(jobs_rows: Sequence[Rows], max_radius: float) -> tuple[list[float], list[float]]:
    """The step curve of the best certified accuracy of several jobs at each radius (one job: its :func:`curve`)."""
    jobs_rows = [as_results(rows) for rows in jobs_rows]
    breaks = {x.radius for results in jobs_rows for x in results if x.correct and 0.0 < x.radius < max_radius}
    radii = [0.0] + sorted(breaks) + [max_radius]
    return radii, [max(column) for column in zip(*(certified_accuracy(rows, radii) for rows in jobs_rows))]


def plot_format(path: str) -> str:
    """The format a plot is written in, from the extension of ``path`` (png, pdf or svg); its folder must exist."""
    extension = os.path.splitext(str(path))[1].lower().lstrip(".")
    if extension not in PLOT_FORMATS:
        raise InvalidArgument(f"cannot write plot {path}: its name must end in .png, .pdf or .svg (the format)")
    folder = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(folder):
        raise InvalidArgument(f"cannot write plot {path}: folder {folder} does not exist")
    return extension


def plot_curves(jobs: Sequence[tuple], path: str, *, title: str | None = None, max_radius: float | None = None,
                envelope: bool = True) -> None:
    """Certified accuracy vs radius: a step curve per job, one colour per method and one line style per sigma.

    ``jobs`` are (label, rows) pairs or :class:`Curve`. With ``envelope``, each method with several curves also
    gets its envelope (the best of its curves at each radius), thicker and in its colour. The legend stands right
    of the axes. The format follows the extension of ``path`` (``plot_format``): PNG at 150 dpi, or PDF and SVG
    with their text kept as text (TrueType fonts in a PDF). Agg, no pyplot state.
    """
    from matplotlib import colormaps, rc_context
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fmt = plot_format(path)
    if not jobs:
        raise InvalidArgument("plot_curves needs at least one job")
    curves = [_as_curve(job) for job in jobs]
    limit = _plot_limit(curves) if max_radius is None else float(max_radius)
    if not limit > 0:
        raise InvalidArgument(f"max_radius must be > 0, got {max_radius!r}")
    methods = list(dict.fromkeys(c.method for c in curves))
    sigmas = sorted({c.sigma for c in curves if c.sigma is not None})
    colours = colormaps["tab10" if len(methods) <= 10 else "tab20"].colors
    figure = Figure(figsize=(6.4, 4.2))
    FigureCanvasAgg(figure)
    axes = figure.add_subplot()
    for m, method in enumerate(methods):
        mine = [c for c in curves if c.method == method]
        colour = colours[m % len(colours)]
        for c in mine:
            style = "-" if c.sigma is None else LINE_STYLES[sigmas.index(c.sigma) % len(LINE_STYLES)]
            axes.plot(*_until_zero(*curve(c.rows, limit)), drawstyle="steps-pre", color=colour, linestyle=style,
                      linewidth=1.3, label=c.label if c.sigma is None else sigma_label(c.method, c.sigma))
        if envelope and len(mine) > 1:  # beneath the curves, thick and light
            best = _until_zero(*envelope_curve([c.rows for c in mine], limit))
            axes.plot(*best, drawstyle="steps-pre", color=colour, linewidth=4.5, alpha=0.35, solid_capstyle="butt",
                      zorder=1.8, label=f"{method} envelope".strip())
    _style_axes(axes, limit, title)
    with rc_context({"svg.fonttype": "none", "pdf.fonttype": 42}):
        figure.savefig(path, format=fmt, dpi=150, bbox_inches="tight")


def _as_curve(job: tuple) -> Curve:
    """A :class:`Curve` with its rows read (none is InvalidArgument) and its method and sigma known."""
    found = Curve(*job)
    results = as_results(found.rows)
    if not results:
        raise InvalidArgument(f"job {found.label}: no certified images to plot")
    method, sigma = (found.method, None) if found.method is not None else split_sigma(found.label)
    return Curve(found.label, results, method, found.sigma if found.sigma is not None else sigma)


def _until_zero(radii: list[float], accuracy: list[float]) -> tuple[list[float], list[float]]:
    """A step curve that ends where it drops to 0 (no line along the axis), unless it is 0 from the start."""
    k = next((k for k, a in enumerate(accuracy) if k and a == 0), None)
    if k is None:
        return radii, accuracy
    return radii[:k] + [radii[k - 1]], accuracy[:k] + [0.0]


def _plot_limit(curves: Sequence[Curve]) -> float:
    """A little beyond the largest certified radius (at least 0.5), rounded up to a multiple of 0.25."""
    largest = max((x.radius for c in curves for x in c.rows if x.correct), default=0.0)
    return max(0.5, math.ceil(largest * 1.05 / 0.25) * 0.25)


def _style_axes(axes, max_radius: float, title: str | None) -> None:
    axes.set_xlim(0.0, max_radius)
    axes.set_ylim(0.0, 1.0)
    axes.set_xlabel("radius (L2)")
    axes.set_ylabel("certified accuracy")
    axes.grid(True, alpha=0.3)
    entries = len(axes.get_legend_handles_labels()[1])
    axes.legend(loc="upper left", bbox_to_anchor=(1.02, 1.0), borderaxespad=0.0, frameon=False, fontsize="small",
                ncol=1 if entries <= 16 else 2)
    if title:
        axes.set_title(title)
