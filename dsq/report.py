"""Results to tables, envelopes and curves: certified accuracy as in Cohen et al. (2019) and Salman et al. (2020).

Input rows are any objects or dicts with ``image_index, label, prediction, radius`` and optionally ``correct`` and
``seconds`` (database rows, dicts read back from JSON, ...); nothing here touches a database or the CLI.

Symbols: for the per-image results of a job, the *certified accuracy* at radius r is the fraction of images whose
smoothed prediction is correct and certified with radius >= r. At r = 0 it is the *clean accuracy of the smoothed
classifier* (correct and not abstaining, prediction -1 never being correct).

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


def certified_accuracy(rows: Rows, radii: Sequence[float]) -> list[float]:
    """Fraction of rows with ``correct and radius >= r`` for each r in ``radii`` (Cohen et al.'s definition)."""
    results = as_results(rows)
    if not results:
        raise InvalidArgument("no certified images: certified accuracy needs at least one result row")
    n = len(results)
    return [sum(1 for x in results if x.correct and x.radius >= r) / n for r in radii]


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
    table = [(label, *_job_accuracy(label, rows, radii)) for label, rows in jobs]
    accuracy, best, clean = [], [], []
    for j in range(len(radii)):
        label, clean_acc, acc = max(table, key=lambda t: t[2][j])  # max() keeps the first of equals
        accuracy.append(acc[j])
        best.append(label)
        clean.append(clean_acc)
    return Envelope(accuracy, best, clean)


def _job_accuracy(label: str, rows: Rows, radii: Sequence[float]) -> tuple[float, list[float]]:
    """``(clean accuracy, certified accuracy per radius)`` of one job; no rows is InvalidArgument naming it."""
    try:
        clean, *accuracies = certified_accuracy(rows, [0.0, *radii])
    except InvalidArgument as e:
        raise InvalidArgument(f"job {label}: {e}") from None
    return clean, accuracies


# ---------------------------------------------------------------------------------------------- tables


def compare_header(radii: Sequence[float], first: str = "job") -> list[str]:
    """Column titles of :func:`compare_table`: the job label, then ``r = 0.25`` ... per radius."""
    return [first] + [f"r = {r:g}" for r in radii]


def format_cell(accuracy: float, clean: float, decimals: int = 1) -> str:
    """``"57.0 (71.2)"``: certified accuracy, clean accuracy in parentheses, both in percent."""
    return f"{100 * accuracy:.{decimals}f} ({100 * clean:.{decimals}f})"


def compare_table(
    jobs: Jobs,
    radii: Sequence[float],
    *,
    clean: Mapping[str, float] | None = None,
    decimals: int = 1,
) -> list[list[str]]:
    """One row of strings per job: its label, then ``A (C)`` per radius (see the module docstring).

    ``clean`` maps a job label to another clean accuracy (a fraction, e.g. the base classifier's without noise).
    """
    table = []
    for label, rows in jobs:
        smoothed_clean, accuracies = _job_accuracy(label, rows, radii)
        clean_acc = (clean or {}).get(label, smoothed_clean)
        table.append([label] + [format_cell(a, clean_acc, decimals) for a in accuracies])
    return table


def envelope_row(jobs: Jobs, radii: Sequence[float], *, label: str = "envelope", decimals: int = 1) -> list[str]:
    """The :func:`envelope` as a table row; each cell carries the clean accuracy of the job attaining it."""
    env = envelope(jobs, radii)
    return [label] + [format_cell(a, c, decimals) for a, c in zip(env.accuracy, env.clean)]


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
                     decimals: int = 1) -> list[list[str]]:
    """One row per sequential job at target ``radius``: (label, rows, cost per image in the rows' order).

    The cost is what each image took: estimation samples drawn, or queries billed for an API job.
    """
    table = []
    for label, rows, costs in jobs:
        [accuracy] = _job_accuracy(label, rows, [radius])[1]
        mean, median = cost_summary(costs)
        table.append([label, f"{radius:g}", f"{100 * accuracy:.{decimals}f}", f"{mean:,.0f}", f"{median:,.0f}",
                      str(len(costs))])
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


def curve(rows: Rows, max_radius: float) -> tuple[list[float], list[float]]:
    """Exact step curve of certified accuracy on [0, max_radius]: breakpoints and the accuracy at each.

    Accuracy is constant on each interval (r_k, r_k+1] between breakpoints (draw with ``steps-pre``).
    """
    results = as_results(rows)
    breaks = sorted({x.radius for x in results if x.correct and 0.0 < x.radius < max_radius})
    radii = [0.0] + breaks + [max_radius]
    return radii, certified_accuracy(results, radii)


def plot_curves(jobs: Jobs, path: str, *, title: str | None = None, max_radius: float | None = None) -> None:
    """Certified accuracy vs radius, one step curve per job, saved as a PNG at ``path`` (Agg, no pyplot state)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    if not jobs:
        raise InvalidArgument("plot_curves needs at least one job")
    folder = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(folder):
        raise InvalidArgument(f"cannot write plot {path}: folder {folder} does not exist")
    jobs = [(label, as_results(rows)) for label, rows in jobs]
    limit = _plot_limit(jobs) if max_radius is None else float(max_radius)
    if not limit > 0:
        raise InvalidArgument(f"max_radius must be > 0, got {max_radius!r}")
    figure = Figure(figsize=(6.4, 4.8))
    FigureCanvasAgg(figure)
    axes = figure.add_subplot()
    for label, results in jobs:
        radii, accuracy = curve(_nonempty(label, results), limit)
        axes.plot(radii, accuracy, drawstyle="steps-pre", label=label)
    _style_axes(axes, limit, title)
    figure.savefig(path, format="png", dpi=150)


def _plot_limit(jobs: Sequence[tuple[str, list[Result]]]) -> float:
    """A little beyond the largest certified radius (at least 0.5), rounded up to a multiple of 0.25."""
    largest = max((x.radius for _, results in jobs for x in results if x.correct), default=0.0)
    return max(0.5, math.ceil(largest * 1.05 / 0.25) * 0.25)


def _nonempty(label: str, results: list[Result]) -> list[Result]:
    if not results:
        raise InvalidArgument(f"job {label}: no certified images to plot")
    return results


def _style_axes(axes, max_radius: float, title: str | None) -> None:
    axes.set_xlim(0.0, max_radius)
    axes.set_ylim(0.0, 1.0)
    axes.set_xlabel("radius (L2)")
    axes.set_ylabel("certified accuracy")
    axes.grid(True, alpha=0.3)
    axes.legend(loc="upper right")
    if title:
        axes.set_title(title)
