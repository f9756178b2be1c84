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
    """A job to plot: label and rows, and its method and sigma (when None, read from the label: ``split_sigma``)."""

    label: str
    rows: Rows
    method: str | None = None
    sigma: float | None = None


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
                envelope: bool = True) -> None:
    """Certified accuracy vs radius: a step curve per job, one colour per method and one line style per sigma.

    ``jobs`` are (label, rows) pairs or :class:`Curve`. With ``envelope``, each method with several curves also
    gets its envelope (the best of its curves at each radius), thicker and in its colour. The legend stands right
    of the axes. The format follows the extension of ``path`` (``plot_format``): PNG at 150 dpi, or PDF and SVG
    with their text kept as text (TrueType fonts in a PDF). Agg, no pyplot state.
    """
    from matplotlib import rc_context
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fmt = plot_format(path)
    curves, limit = _curves_and_limit(jobs, max_radius)
    figure = Figure(figsize=FIGURE_SIZE)
    FigureCanvasAgg(figure)
    axes = figure.add_subplot()
    _draw_methods(axes, curves, limit, envelope)
    _style_axes(axes, limit, title)
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


def _draw_methods(axes, curves: Sequence[Curve], limit: float, envelope: bool) -> None:
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
            style = "-" if c.sigma is None else LINE_STYLES[sigmas.index(c.sigma) % len(LINE_STYLES)]
            axes.plot(*_until_zero(*curve(c.rows, limit)), drawstyle="steps-pre", color=colour, linestyle=style,
                      linewidth=CURVE_WIDTH, label=c.label if c.sigma is None else sigma_label(c.method, c.sigma))
        if envelope and len(mine) > 1:
            _draw_envelope(axes, method, mine, limit, colour)


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
    return max(LIMIT_MIN, math.ceil(largest * LIMIT_MARGIN / LIMIT_STEP) * LIMIT_STEP)


def _style_axes(axes, max_radius: float, title: str | None) -> None:
    axes.set_xlim(0.0, max_radius)
    axes.set_ylim(0.0, 1.0)
    axes.set_xlabel("radius (L2)")
    axes.set_ylabel("certified accuracy")
    axes.grid(True, alpha=0.3)  # faint: a guide to read values off, not lines to confuse with curves
    entries = len(axes.get_legend_handles_labels()[1])
    # right of the axes (x = 1.02 in axes units), top-aligned with them: never over a curve
    axes.legend(loc="upper left", bbox_to_anchor=(1.02, 1.0), borderaxespad=0.0, frameon=False, fontsize="small",
                ncol=1 if entries <= LEGEND_COLUMN else 2)
    if title:
        axes.set_title(title)
