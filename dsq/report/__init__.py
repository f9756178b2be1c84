"""Results to tables, envelopes and curves: certified accuracy as in Cohen et al. (2019) and Salman et al. (2020).

Import the module you need; each is cheap to import (no torch, no Ray; scipy, rich and matplotlib only when used):

- ``accuracy``: per-image rows as ``Result``, certified and clean accuracy, per-job counts, ``parse_radii``
- ``intervals``: Clopper-Pearson confidence intervals on a certified accuracy, ``check_alpha``
- ``envelopes``: the best of several jobs per radius, as numbers or a step curve; ``split_sigma`` (a job's method)
- ``tables``: comparison and sequential tables as strings, and ``render_table`` to print them
- ``exports``: per-image JSON, CSV and Cohen et al.'s TSV log; tables as Markdown or LaTeX
- ``summary``: one table's lines (per job, class, envelope: accuracy, ACR, abstain rate) and notes, as text or records
- ``plots``: certified accuracy against radius as a PNG, PDF or SVG figure

Imports go one way: ``accuracy`` and ``intervals`` import nothing of this package; ``envelopes`` and ``exports``
import ``accuracy``; ``plots`` imports ``accuracy``, ``envelopes`` and ``intervals``; ``tables`` imports ``accuracy``,
``envelopes`` and ``intervals``; ``summary`` imports ``accuracy``, ``intervals`` and ``tables``.
"""
