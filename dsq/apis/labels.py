"""Certify over string labels: the top label of an API answer, and CERTIFY on the labels of an image's queries.

Pure functions of labels (no torch, no queries): ``dsq.apis.base`` makes the queries, the runner sends them,
and these turn the answers into a certificate, also again later from the stored answers
(``dsq.apis.recertify``). See ``dsq.apis.base`` for the base classifier f these labels are the votes of.

- top_label  the most confident label; ties go to the lexicographically smallest label; an empty answer
             is its own class ``"<none>"``
- counts     over an open label space: per image, the labels seen (clean, selection, estimation) sorted
             lexicographically give the class indices, so ``certify_counts`` breaks ties as ``top_label`` does
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable, Sequence

import numpy as np

from dsq import bounds, sequential

CLEAN, SELECTION, ESTIMATION = "clean", "selection", "estimation"  # the query phases (dsq.sampling's names)
NO_LABEL = "<none>"
ENCODING = "png8: clip(x+delta) -> denoiser -> clamp[0,1] -> round(x*255) uint8 -> PNG"


def top_label(labels: Iterable[tuple[str, float]]) -> str:
    """The most confident label; ties to the lexicographically smallest; ``"<none>"`` if empty."""
    labels = [(str(name), float(confidence)) for name, confidence in labels]
    if not labels:
        return NO_LABEL
    best = max(confidence for _, confidence in labels)
    return min(name for name, confidence in labels if confidence == best)


@dataclass(frozen=True)
class ApiCertificate:
    """A certificate over string labels: ``cert`` indexes ``labels``."""

    cert: bounds.Certificate
    labels: list[str]
    clean_label: str
    trace: list | None = None  # sequential: [n, p_lower] at each look (``SequentialTest.trace``)

    @property
    def label_index(self) -> int:
        return self.labels.index(self.clean_label)

    @property
    def certified_label(self) -> str | None:
        return None if self.cert.abstained else self.labels[self.cert.prediction]

    @property
    def correct(self) -> bool:
        return self.certified_label == self.clean_label


def certify_labels(clean_label: str, selection: Sequence[str], estimation: Sequence[str], *,
                   alpha: float, sigma: float) -> ApiCertificate:
    """CERTIFY from the top labels of the selection and estimation queries."""
    labels = sorted({clean_label, *selection, *estimation})
    position = {label: i for i, label in enumerate(labels)}
    counts_selection = np.bincount([position[label] for label in selection], minlength=len(labels))
    counts_estimation = np.bincount([position[label] for label in estimation], minlength=len(labels))
    cert = bounds.certify_counts(counts_selection, counts_estimation, alpha=alpha, sigma=sigma,
                                    n0=len(selection), n=len(estimation))
    return ApiCertificate(cert, labels, clean_label)


def predict_labels(clean_label: str, estimation: Sequence[str], *, alpha: float,
                   sigma: float) -> tuple[ApiCertificate, float]:
    """PREDICT from the top labels of the n noisy queries: ``(answer, p-value)``; the answer has no radius and its
    ``p_lower`` is 0 (``bounds.prediction_test``). Ties go to the smallest label, as ``top_label``'s do."""
    labels = sorted({clean_label, *estimation})
    position = {label: i for i, label in enumerate(labels)}
    counts = np.bincount([position[label] for label in estimation], minlength=len(labels))
    prediction, p_value = bounds.prediction_test(counts, alpha=alpha)
    cert = bounds.Certificate(prediction=prediction, radius=0.0, p_lower=0.0, counts_selection=np.zeros_like(counts),
                              counts_estimation=counts, n0=0, n=len(estimation), alpha=alpha, sigma=sigma)
    return ApiCertificate(cert, labels, clean_label), p_value


def selection_winner(clean_label: str, selection: Sequence[str]) -> str:
    """cA as ``certify_labels`` picks it: the most frequent selection label, ties to the smallest label."""
    labels = sorted({clean_label, *selection})
    votes = np.bincount([labels.index(label) for label in selection], minlength=len(labels))
    return labels[int(np.argmax(votes))]


def certify_labels_at_radius(clean_label: str, selection: Sequence[str], estimation: Sequence[str], *,
                             radius: float, alpha: float, sigma: float, max_n: int, batch: int) -> ApiCertificate:
    """The sequential test at ``radius`` (``dsq.sequential``) over the estimation labels in batches of ``batch``.

    Batches after the decision are ignored; labels that run out before a decision leave the test
    undecided, which certifies nothing (stopping at any time keeps the guarantee).
    """
    c_a = selection_winner(clean_label, selection)
    test = sequential.SequentialTest.at_radius(radius, sigma, alpha, max_n)
    for start in range(0, len(estimation), batch):
        chunk = estimation[start:start + batch]
        if test.update(sum(label == c_a for label in chunk), len(chunk)) != sequential.CONTINUE:
            break
    used = list(estimation[:test.trials])
    labels = sorted({clean_label, *selection, *used})
    position = {label: i for i, label in enumerate(labels)}
    counts_selection = np.bincount([position[label] for label in selection], minlength=len(labels))
    counts_estimation = np.bincount([position[label] for label in used], minlength=len(labels))
    cert = sequential.to_certificate(test, counts_selection, counts_estimation, n0=len(selection), sigma=sigma,
                                     radius=radius)
    return ApiCertificate(cert, labels, clean_label, test.trace())
