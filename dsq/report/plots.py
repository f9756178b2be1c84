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

PLOT_FORMATS = ("png", "pdf", "svg")
LINE_STYLES = ("-", "--", ":", "-.", (0, (5, 1, 1, 1, 1, 1)), (0, (1, 4)), (0, (8, 3)))  # one per sigma


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
    figure = Figure(figsize=(6.4, 4.2))
    FigureCanvasAgg(figure)
    axes = figure.add_subplot()
    _draw_methods(axes, curves, limit, envelope)
    _style_axes(axes, limit, title)
    with rc_context({"svg.fonttype": "none", "pdf.fonttype": 42}):
        figure.savefig(path, format=fmt, dpi=150, bbox_inches="tight")


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
    colours = colormaps["tab10" if len(methods) <= 10 else "tab20"].colors
    for m, method in enumerate(methods):
        mine = [c for c in curves if c.method == method]
        colour = colours[m % len(colours)]
        for c in mine:
            style = "-" if c.sigma is None else LINE_STYLES[sigmas.index(c.sigma) % len(LINE_STYLES)]
            axes.plot(*_until_zero(*curve(c.rows, limit)), drawstyle="steps-pre", color=colour, linestyle=style,
                      linewidth=1.3, label=c.label if c.sigma is None else sigma_label(c.method, c.sigma))
        if envelope and len(mine) > 1:
            _draw_envelope(axes, method, mine, limit, colour)


def _draw_envelope(axes, method: str, mine: Sequence[Curve], limit: float, colour) -> None:
    """The envelope of one method's curves: beneath them, thick and light, in their colour."""
    best = _until_zero(*envelope_curve([c.rows for c in mine], limit))
    axes.plot(*best, drawstyle="steps-pre", color=colour, linewidth=4.5, alpha=0.35, solid_capstyle="butt",
              zorder=1.8, label=f"{method} envelope".strip())


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
