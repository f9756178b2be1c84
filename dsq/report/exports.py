"""Results as files and text to paste elsewhere: per-image JSON, CSV and Cohen et al.'s TSV log; Markdown and LaTeX
tables (of the strings ``dsq.report.tables`` builds).

Per-image exports keep every number at full precision (the TSV log excepted: it copies Cohen et al.'s format).
"""

from __future__ import annotations

import csv
import datetime
import io
import json
from dataclasses import asdict
from typing import Any, Sequence

from dsq.report.accuracy import RESULT_FIELDS, Rows, as_result, as_results, field

# Cohen et al.'s code/certify.py log header, word for word, so that their analysis code reads a dsq log.
TSV_HEADER = "idx\tlabel\tpredict\tradius\tcorrect\ttime"
# The columns of a stored result beside RESULT_FIELDS, exported as stored: what redoes the bound (p_lower, the
# counts, n0, n, alpha, sigma) and where it was computed (worker, device).
STORED_FIELDS = ("p_lower", "counts_selection", "counts_estimation", "n0", "n", "alpha", "sigma", "worker", "device")
# What a result's ``extra`` tells of how it was certified: its model's precision, fixed n or sequential, and the
# sequential target radius.
EXTRA_FIELDS = ("precision", "mode", "target_radius")
EXPORT_FIELDS = STORED_FIELDS + EXTRA_FIELDS  # every exported column beside RESULT_FIELDS, in the files' order
# LaTeX's ten special characters, each as the text-mode command that prints it: a name such as "mse_0.25" or a
# "%" in a cell would otherwise break the document or start a comment.
_LATEX_SPECIAL = {"&": r"\&", "%": r"\%", "$": r"\$", "#": r"\#", "_": r"\_", "{": r"\{", "}": r"\}",
                  "~": r"\textasciitilde{}", "^": r"\textasciicircum{}", "\\": r"\textbackslash{}"}


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


def export_rows(rows: Rows) -> list[dict[str, Any]]:
    """Stored result rows as dicts with every column a paper needs (precision and mode from ``extra``)."""
    out = []
    for row in rows:
        extra = field(row, "extra", None) or {}
        item = {name: field(row, name, None) for name in RESULT_FIELDS + STORED_FIELDS}
        # extra names a model only for a local model (fp32 unless a precision was chosen) and a mode only for a
        # sequential job: an API job's precision and a fixed-n job's mode are the defaults
        item.update(precision=(extra.get("model") or {}).get("precision", "fp32"), mode=extra.get("mode", "fixed"),
                    target_radius=extra.get("target_radius"))
        out.append(item)
    return out


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


def to_markdown(header: Sequence[str], rows: Sequence[Sequence[str]], *, notes: Sequence[str] = ()) -> str:
    """A GitHub-flavoured Markdown table (pipes in cells escaped), and its notes as a list below it."""
    def line(cells):
        return "| " + " | ".join(str(c).replace("|", "\\|") for c in cells) + " |"
    text = "\n".join([line(header), "|" + "---|" * len(header)] + [line(r) for r in rows]) + "\n"
    return text + ("\n" + "".join(f"- {note}\n" for note in notes) if notes else "")


def to_latex(header: Sequence[str], rows: Sequence[Sequence[str]], *, caption: str | None = None,
             notes: Sequence[str] = ()) -> str:
    """A booktabs LaTeX table (``\\usepackage{booktabs}``), special characters escaped; notes in small type below."""
    def cell(text):
        return "".join(_LATEX_SPECIAL.get(ch, ch) for ch in str(text))

    lines = [r"\begin{table}[t]", r"\centering"]
    if caption:
        lines.append(r"\caption{" + cell(caption) + "}")
    lines += [r"\begin{tabular}{l" + "r" * (len(header) - 1) + "}", r"\toprule",
              " & ".join(cell(h) for h in header) + r" \\", r"\midrule"]
    lines += [" & ".join(cell(c) for c in row) + r" \\" for row in rows]
    lines += [r"\bottomrule", r"\end{tabular}"]
    if notes:
        lines += [r"\par\smallskip{\footnotesize", " \\\\\n".join(cell(note) for note in notes) + "}"]
    lines.append(r"\end{table}")
    return "\n".join(lines) + "\n"


def table_object(title: str, radii: Sequence[float], records: Sequence[dict], notes: Sequence[str]) -> dict:
    """A table's numbers (``summary.records``) as one object, with its title, radii and notes."""
    return {"title": title, "radii": list(radii), "rows": list(records), "notes": list(notes)}


def table_to_json(title: str, radii: Sequence[float], records: Sequence[dict], notes: Sequence[str]) -> str:
    """:func:`table_object` as JSON text."""
    return json.dumps(table_object(title, radii, records, notes), indent=1)


def records_to_csv(records: Sequence[dict]) -> str:
    """A table's numbers as CSV: a not-answered number (None) is ``n/a``, a job's own line has no class, an
    interval is a JSON list."""
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=list(dict.fromkeys(k for r in records for k in r)), lineterminator="\n",
                            restval="")
    writer.writeheader()
    for item in records:
        writer.writerow({k: ("" if k == "class" else "n/a") if v is None else json.dumps(v) if isinstance(v, list)
                         else v for k, v in item.items()})
    return buffer.getvalue()
