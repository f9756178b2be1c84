"""Certified accuracy against radius as a figure: a step curve per job, one colour per method, one line style per
sigma, and each method's envelope. matplotlib is imported only when a figure is drawn (Agg, no pyplot state).
"""

from __future__ import annotations

import math
import os
from typing import NamedTuple, Sequence

from dsq.errors import InvalidArgument
from dsq.report.accuracy import Rows, as_results
from dsq.report.envelopes import curve, envelope_curve, split_sigma
from dsq.report.intervals import clopper_pearson

# What a paper takes, all written by matplotlib's Agg canvas: PNG for screens and slides, PDF and SVG (vector,
# their text kept as text) for print.
PLOT_FORMATS = ("png", "pdf", "svg")
# One per sigma, since colour already marks the method: solid, dashed, dotted, dash-dot, then three dash patterns
# of their own, told apart in print; cycled past seven sigmas.
LINE_STYLES = ("-", "--", ":", "-.", (0, (5, 1, 1, 1, 1, 1)), (0, (1, 4)), (0, (8, 3)))
# Inches: matplotlib's default width and less than its default height (4.8), as curves over radius need width
# more than height; the legend beside the axes widens the saved figure further (bbox_inches="tight").
FIGURE_SIZE = (6.4, 4.2)
PNG_DPI = 150  # sharper than matplotlib's default 100 on screens and slides; PDF and SVG are vector
BAND_ALPHA = 0.15  # a confidence band (--ci): light enough that the curves of other methods show through it
CURVE_WIDTH = 1.3  # below matplotlib's default 1.5, so that overlapping dashed and dotted curves stay apart
# An envelope is a band beneath the curves it follows: thick (about 3.5 curves) and light, so that they stay
# readable on it; drawn above the grid (zorder 1.5 with matplotlib's default axes.axisbelow "line") and below the
# curves (Line2D's default zorder 2).
ENVELOPE_WIDTH, ENVELOPE_ALPHA, ENVELOPE_ZORDER = 4.5, 0.35, 1.8
# matplotlib's qualitative colour maps, one colour per method: tab10's ten well-separated colours, tab20's twenty
# (ten hues, each dark then pale) past ten methods, cycled beyond.
FEW_COLOURS, MANY_COLOURS = "tab10", "tab20"
LEGEND_COLUMN = 16  # about as many small-text legend entries as fit in one column beside the axes; more take two
# The x axis ends 5% past the largest certified radius, so that the last step shows, at 0.5 at least (a readable
# axis when little is certified), rounded up to a multiple of 0.25 (the step of DEFAULT_RADII) for round ticks.
LIMIT_MARGIN, LIMIT_MIN, LIMIT_STEP = 1.05, 0.5, 0.25


class Curve(NamedTuple):
    """A job to plot: label and rows, its method and sigma (when None, read from the label: ``split_sigma``), and
    for a sequential job the one radius it answers (a point, not a curve)."""

    label: str
    rows: Rows
    method: str | None = None
    sigma: float | None = None
    target: float | None = None


def sigma_label(method: str, sigma: float) -> str:
    """``"MSE σ=0.25"``: how a plot names a method at one sigma."""
    return f"{method} σ={sigma:g}".strip()


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
                envelope: bool = True, ci: float | None = None, norm: str = "L2") -> None:
    """Certified accuracy vs radius: a step curve per job, one colour per method and one line style per sigma.

    ``jobs`` are (label, rows) pairs or :class:`Curve`. With ``envelope``, each method with several curves also
    gets its envelope (the best of its curves at each radius), thicker and in its colour. A sequential job is a
    point at its target radius (it answers no other). ``ci`` (an alpha) shades each curve's two-sided
    Clopper-Pearson band over the images (an error bar on a point). The legend stands right
    of the axes. The format follows the extension of ``path`` (``plot_format``): PNG at 150 dpi, or PDF and SVG
    with their text kept as text (TrueType fonts in a PDF). ``norm`` names the radius on the x axis (L2, or L∞
    for radii ``views.in_linf`` turned). Agg, no pyplot state.
    """
    from matplotlib import rc_context
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fmt = plot_format(path)
    curves, limit = _curves_and_limit(jobs, max_radius)
    figure = Figure(figsize=FIGURE_SIZE)
    FigureCanvasAgg(figure)
    axes = figure.add_subplot()
    _draw_methods(axes, curves, limit, envelope, ci)
    _style_axes(axes, limit, title, norm)
    with rc_context({"svg.fonttype": "none", "pdf.fonttype": 42}):  # text as text; TrueType (42) in a PDF
        figure.savefig(path, format=fmt, dpi=PNG_DPI, bbox_inches="tight")


def _curves_and_limit(jobs: Sequence[tuple], max_radius: float | None) -> tuple[list[Curve], float]:
    """The jobs as :class:`Curve` (none is InvalidArgument), and the radius the axes end at (> 0)."""
    if not jobs:
        raise InvalidArgument("plot_curves needs at least one job")
    curves = [_as_curve(job) for job in jobs]
    limit = _plot_limit(curves) if max_radius is None else float(max_radius)
    if not limit > 0:
        raise InvalidArgument(f"max_radius must be > 0, got {max_radius!r}")
    return curves, limit


def _draw_methods(axes, curves: Sequence[Curve], limit: float, envelope: bool, ci: float | None) -> None:
    """Each method's curves in its colour, a line style per sigma, and with ``envelope`` its envelope (of several)."""
    from matplotlib import colormaps

    methods = list(dict.fromkeys(c.method for c in curves))
    sigmas = sorted({c.sigma for c in curves if c.sigma is not None})
    few = colormaps[FEW_COLOURS].colors
    colours = few if len(methods) <= len(few) else colormaps[MANY_COLOURS].colors
    for m, method in enumerate(methods):
        mine = [c for c in curves if c.method == method]
        colour = colours[m % len(colours)]
        for c in mine:
            label = c.label if c.sigma is None or c.target is not None else sigma_label(c.method, c.sigma)
            if c.target is not None:
                _draw_point(axes, c, colour, label, ci)
                continue
            style = "-" if c.sigma is None else LINE_STYLES[sigmas.index(c.sigma) % len(LINE_STYLES)]
            radii, accuracy = _until_zero(*curve(c.rows, limit))
            axes.plot(radii, accuracy, drawstyle="steps-pre", color=colour, linestyle=style, linewidth=CURVE_WIDTH,
                      label=label)
            if ci is not None:
                low, high = zip(*(clopper_pearson(round(a * len(c.rows)), len(c.rows), ci) for a in accuracy))
                axes.fill_between(radii, low, high, step="pre", color=colour, alpha=BAND_ALPHA, linewidth=0)
        curves_only = [c for c in mine if c.target is None]
        if envelope and len(curves_only) > 1:
            _draw_envelope(axes, method, curves_only, limit, colour)


def _draw_point(axes, c: Curve, colour, label: str, ci: float | None) -> None:
    """A sequential job: its certified accuracy at its target radius, with its interval as an error bar."""
    n = len(c.rows)
    k = sum(1 for x in c.rows if x.correct and x.radius >= c.target)
    error = None
    if ci is not None:
        low, high = clopper_pearson(k, n, ci)
        error = [[k / n - low], [high - k / n]]
    point = axes.errorbar([c.target], [k / n], yerr=error, fmt="D", color=colour, capsize=3, label=label)
    point.lines[0].set_gid(f"sequential-{c.target:g}-{len(axes.lines)}")  # an SVG names it: a point, not a curve


def _draw_envelope(axes, method: str, mine: Sequence[Curve], limit: float, colour) -> None:
    """The envelope of one method's curves: beneath them, thick and light, in their colour."""
    best = _until_zero(*envelope_curve([c.rows for c in mine], limit))
    axes.plot(*best, drawstyle="steps-pre", color=colour, linewidth=ENVELOPE_WIDTH, alpha=ENVELOPE_ALPHA,
              solid_capstyle="butt", zorder=ENVELOPE_ZORDER, label=f"{method} envelope".strip())


def _as_curve(job: tuple) -> Curve:
    """A :class:`Curve` with its rows read (none is InvalidArgument) and its method and sigma known."""
    found = Curve(*job)
    results = as_results(found.rows)
    if not results:
        raise InvalidArgument(f"job {found.label}: no certified images to plot")
    method, sigma = (found.method, None) if found.method is not None else split_sigma(found.label)
    return Curve(found.label, results, method, found.sigma if found.sigma is not None else sigma, found.target)


def _until_zero(radii: list[float], accuracy: list[float]) -> tuple[list[float], list[float]]:
    """A step curve that ends where it drops to 0 (no line along the axis), unless it is 0 from the start."""
    k = next((k for k, a in enumerate(accuracy) if k and a == 0), None)
    if k is None:
        return radii, accuracy
    return radii[:k] + [radii[k - 1]], accuracy[:k] + [0.0]


def _plot_limit(curves: Sequence[Curve]) -> float:
    """A little beyond the largest certified radius (at least 0.5), rounded up to a multiple of 0.25."""
    largest = max([x.radius for c in curves for x in c.rows if x.correct] + [c.target or 0.0 for c in curves])
    return max(LIMIT_MIN, math.ceil(largest * LIMIT_MARGIN / LIMIT_STEP) * LIMIT_STEP)


def _style_axes(axes, max_radius: float, title: str | None, norm: str = "L2") -> None:
    axes.set_xlim(0.0, max_radius)
    axes.set_ylim(0.0, 1.0)
    axes.set_xlabel(f"radius ({norm})")
    axes.set_ylabel("certified accuracy")
    axes.grid(True, alpha=0.3)  # faint: a guide to read values off, not lines to confuse with curves
    entries = len(axes.get_legend_handles_labels()[1])
    # right of the axes (x = 1.02 in axes units), top-aligned with them: never over a curve
    axes.legend(loc="upper left", bbox_to_anchor=(1.02, 1.0), borderaxespad=0.0, frameon=False, fontsize="small",
                ncol=1 if entries <= LEGEND_COLUMN else 2)
    if title:
        axes.set_title(title)
