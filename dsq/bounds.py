"""The statistics of randomized smoothing (Cohen et al. 2019): pure functions of vote counts.

Symbols as in ``dsq.smoothing``: cA the top class of the selection votes, nA its votes among the n
estimation samples, p_lower the one-sided (1 - alpha) Clopper-Pearson lower bound on pA, R = sigma *
Phi^-1(p_lower) the certified L2 radius, and abstain (-1) when p_lower < 1/2.

scipy.stats and statsmodels take a second or more to import, so they are imported by the functions that
certify. What every submit checks (``max_radius``) needs no scipy: the standard library's normal quantile
agrees with scipy's ``ndtri`` to 1e-15 there, and the radii of certificates still come from scipy.

Shards computed anywhere return count vectors; ``sum_counts`` adds them and the bound is computed
once per image. Both ``dsq.smoothing`` (the sampling loops) and ``dsq.sequential`` (the anytime-valid
test) build on this module, which imports neither torch nor them.
"""

from __future__ import annotations

import math
import numbers
from dataclasses import asdict, dataclass
from statistics import NormalDist
from typing import Iterable, Sequence

import numpy as np

from dsq import checks
from dsq.errors import InvalidArgument

ABSTAIN = -1


@dataclass(frozen=True)
class Certificate:
    """The outcome of CERTIFY for one image, ready to be stored."""

    prediction: int
    radius: float
    p_lower: float
    counts_selection: np.ndarray
    counts_estimation: np.ndarray
    n0: int
    n: int
    alpha: float
    sigma: float

    @property
    def abstained(self) -> bool:
        return self.prediction == ABSTAIN

    def to_dict(self) -> dict:
        out = asdict(self)
        out["counts_selection"] = [int(c) for c in self.counts_selection]
        out["counts_estimation"] = [int(c) for c in self.counts_estimation]
        return out


def lower_confidence_bound(n_a: int, n: int, alpha: float) -> float:
    """One-sided (1 - alpha) Clopper-Pearson lower bound on pA from nA of n votes.

    A zero count gives 0.0 (never NaN).
    """
    from statsmodels.stats.proportion import proportion_confint  # a second to import: only certifying needs it

    if n_a <= 0:
        return 0.0
    return float(proportion_confint(n_a, n, alpha=2 * alpha, method="beta")[0])


def radius(p_lower: float, sigma: float) -> float:
    """R = sigma * Phi^-1(p_lower), 0.0 when the bound does not exceed 1/2."""
    from scipy.stats import norm  # a second to import: only certifying needs it

    if p_lower <= 0.5:
        return 0.0
    return float(sigma * norm.ppf(p_lower))


def certify_counts(counts_selection, counts_estimation, *, alpha: float, sigma: float,
                   n: int | None = None, n0: int | None = None) -> Certificate:
    """CERTIFY from vote counts: cA from selection, nA of n from estimation.

    ``n`` and ``n0`` are the numbers of samples drawn in each phase (default: the
    counts' sums); samples that voted for no class (non-finite logits) are the
    difference and count as failures for cA. Ties in the selection counts go to
    the lowest class index.
    """
    selection = np.asarray(counts_selection, dtype=np.int64)
    estimation = np.asarray(counts_estimation, dtype=np.int64)
    selection, estimation = _same_length(selection, estimation)
    n0 = _samples_drawn("n0", n0, selection)
    n = _samples_drawn("n", n, estimation)
    c_a = int(np.argmax(selection))
    p_lower = lower_confidence_bound(int(estimation[c_a]), n, alpha)
    prediction = c_a if p_lower >= 0.5 else ABSTAIN
    return Certificate(
        prediction=prediction,
        radius=radius(p_lower, sigma) if prediction != ABSTAIN else 0.0,
        p_lower=p_lower,
        counts_selection=selection,
        counts_estimation=estimation,
        n0=n0,
        n=n,
        alpha=float(alpha),
        sigma=float(sigma),
    )


def _samples_drawn(name: str, drawn: int | None, counts: np.ndarray) -> int:
    """The number of samples drawn in a phase: ``drawn``, or the counts' sum if None."""
    votes = int(counts.sum())
    if drawn is None:
        return votes
    if not isinstance(drawn, numbers.Integral) or isinstance(drawn, bool):
        raise InvalidArgument(f"{name} (samples drawn) must be an integer, got {drawn!r}")
    if drawn < votes:
        raise InvalidArgument(f"{name} = {drawn} samples drawn is fewer samples than the {votes} votes counted")
    return int(drawn)


def predict_counts(counts, *, alpha: float) -> int:
    """PREDICT from vote counts: the top class if a two-sided binomial test
    of its count against the runner-up rejects equality at level alpha."""
    return prediction_test(counts, alpha=alpha)[0]


def prediction_test(counts, *, alpha: float) -> tuple[int, float]:
    """PREDICT's ``(prediction or ABSTAIN, p-value)``: nA against nB, the two largest counts, under Binomial(nA + nB,
    1/2). Ties go to the lowest class index (and abstain, since their p-value is 1)."""
    from scipy.stats import binomtest

    counts = np.asarray(counts, dtype=np.int64)
    order = np.argsort(-counts, kind="stable")
    n_a = int(counts[order[0]]) if len(counts) else 0
    n_b = int(counts[order[1]]) if len(counts) > 1 else 0
    if n_a + n_b == 0:
        return ABSTAIN, 1.0
    p_value = float(binomtest(n_a, n_a + n_b, 0.5).pvalue)
    return (int(order[0]) if p_value <= alpha else ABSTAIN), p_value


def min_predict_n(alpha: float) -> int:
    """The smallest n for which PREDICT can answer at level alpha: n of n votes give p-value 2 / 2^n <= alpha."""
    checks.probability("alpha", alpha)
    return max(1, math.ceil(math.log2(2 / alpha) - 1e-12))


def sum_counts(shard_counts: Iterable[Sequence[int]]) -> np.ndarray:
    """Sum count vectors of shards (padding shorter vectors with zeros)."""
    total = np.zeros(0, dtype=np.int64)
    for counts in shard_counts:
        total, counts = _same_length(total, np.asarray(counts, dtype=np.int64))
        total = total + counts
    return total


def validate(*, sigma, n0, n, alpha, batch_size) -> None:
    """Raise InvalidArgument unless sigma > 0, n0, n, batch_size >= 1 and 0 < alpha < 1."""
    checks.finite("sigma", sigma)
    for name, value in (("n0", n0), ("n", n), ("batch size", batch_size)):
        checks.positive_int(name, value)
    checks.probability("alpha", alpha)


def max_radius(n: int, alpha: float, sigma: float) -> float:
    """The largest radius fixed-n CERTIFY can give (n of n votes): sigma * Phi^-1(alpha^(1/n)), 0 if <= 1/2."""
    checks.positive_int("n", n)
    checks.probability("alpha", alpha)
    checks.finite("sigma", sigma)
    fail = -math.expm1(math.log(alpha) / n)  # 1 - alpha^(1/n), exact for large n
    return 0.0 if fail >= 0.5 else -sigma * NormalDist().inv_cdf(fail)  # Phi^-1(1 - fail), exact in the tail


def min_n(alpha: float, radius: float = 0.0, sigma: float = 1.0) -> int:
    """The smallest n for which fixed-n CERTIFY can certify a radius > ``radius``."""
    from scipy.special import log_ndtr

    checks.probability("alpha", alpha)
    checks.finite("sigma", sigma)
    if not checks.is_real(radius) or not 0 <= radius < math.inf:
        raise InvalidArgument(f"radius must be a finite number >= 0, got {radius!r}")
    log_p0 = float(log_ndtr(radius / sigma))
    if log_p0 >= 0.0:
        raise InvalidArgument(f"no number of samples can certify a radius of {radius} at sigma {sigma}")
    n = max(1, math.floor(math.log(alpha) / log_p0) + 1)
    while max_radius(n, alpha, sigma) <= radius:  # the float quotient may be off by one
        n += 1
    while n > 1 and max_radius(n - 1, alpha, sigma) > radius:
        n -= 1
    return n


def _same_length(a: np.ndarray, b: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    size = max(len(a), len(b))
    return np.pad(a, (0, size - len(a))), np.pad(b, (0, size - len(b)))
