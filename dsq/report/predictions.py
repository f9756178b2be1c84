"""The results of a PREDICT job: per image a class (or an API label) or an abstain, and what they add up to.

A PREDICT job (``predict`` in its spec, ``dsq submit predict``) stores one row per image with ``extra.mode`` =
"predict": its radius and ``p_lower`` are 0 and mean nothing, so no certified-accuracy table may count it.
Correct means: the dataset's label for a white-box job on a dataset; the API's own answer on the clean image
for an API job; unknown for input files, which have no label. An abstain is never correct.
"""

from __future__ import annotations

from typing import Any, Sequence

from dsq.report.exports import field

FIELDS = ("image_index", "input", "label", "prediction", "answer", "abstained", "correct", "p_value", "votes", "n",
          "alpha", "sigma")
HEADER = ["image", "input or label", "prediction", "p-value", "votes"]


def is_prediction(spec: dict | None) -> bool:
    """Whether a job's stored spec is a PREDICT job's."""
    return bool((spec or {}).get("predict"))


def records(rows: Sequence[Any], spec: dict) -> list[dict]:
    """One dict of ``FIELDS`` per stored row, by image index."""
    inputs = spec.get("inputs") or ()
    out = []
    for row in sorted(rows, key=lambda r: int(field(r, "image_index"))):
        extra = field(row, "extra", None) or {}
        index, prediction = int(field(row, "image_index")), int(field(row, "prediction"))
        abstained = prediction < 0
        api = "clean_label" in extra
        votes = field(row, "counts_estimation", None) or []
        label = extra["clean_label"] if api else field(row, "label", None)
        out.append({
            "image_index": index,
            "input": extra.get("input") or (inputs[index] if index < len(inputs) else None),
            "label": label,
            "prediction": None if abstained else prediction,
            "answer": None if abstained else (extra.get("certified_label") if api else str(prediction)),
            "abstained": abstained,
            "correct": None if label is None else bool(field(row, "correct")),
            "p_value": extra.get("p_value"),
            "votes": int(max(votes)) if votes else 0,
            "n": int(field(row, "n")), "alpha": float(field(row, "alpha")), "sigma": float(field(row, "sigma")),
        })
    return out


def text_rows(found: Sequence[dict]) -> list[list[str]]:
    """The per-image table's cells: the input file (or the label), the answer or "abstain", the test's p-value."""
    cells = []
    for item in found:
        where = item["input"] if item["input"] else "" if item["label"] is None else f"label {item['label']}"
        if item["input"] and item["label"] is not None and item["input"] != item["label"]:
            where = f"{item['input']} (clean: {item['label']})"
        p_value = "" if item["p_value"] is None else f"{item['p_value']:.2g}"
        cells.append([str(item["image_index"]), where, "abstain" if item["abstained"] else str(item["answer"]),
                      p_value, f"{item['votes']} of {item['n']}"])
    return cells


def summary_lines(found: Sequence[dict], *, api: bool) -> list[str]:
    """What the answers add up to: how many answered and abstained, and how many were right where that is known."""
    total = len(found)
    if not total:
        return []
    abstained = sum(item["abstained"] for item in found)
    first = found[0]
    lines = [f"{total} images, n = {first['n']:,}, alpha {first['alpha']:g}, sigma {first['sigma']:g}: "
             f"{total - abstained} answered, {abstained} abstained ({100 * abstained / total:.1f}%)"]
    labelled = [item for item in found if item["correct"] is not None]
    if labelled:
        right = sum(item["correct"] for item in labelled)
        against = "the API's answer on the clean image" if api else "the label"
        lines.append(f"accuracy {100 * right / len(labelled):.1f}% ({right} of {len(labelled)} agree with "
                     f"{against}; an abstain counts as wrong)")
    if len(labelled) < total:
        lines.append(f"{total - len(labelled)} images have no label (input files): their answers are shown, "
                     f"not scored")
    lines.append("PREDICT answers a class (or abstains); it certifies no radius (dsq submit certify does)")
    return lines
