"""Confidence intervals on a certified accuracy: exact two-sided Clopper-Pearson intervals for k of n images.

With a confidence level, a certified accuracy k/n over n images carries its two-sided Clopper-Pearson interval
(``clopper_pearson``): the uncertainty from certifying a sample of the test set, beside the alpha of each image's
certificate. scipy is imported only when an interval is computed.
"""

from __future__ import annotations

from dsq.errors import InvalidArgument

# A 95% interval, the level papers usually report; ``dsq results|compare --ci`` use it unless --ci-alpha says otherwise.
DEFAULT_ALPHA = 0.05


def check_alpha(alpha: float) -> float:
    """``alpha`` of a confidence interval, checked: a number strictly between 0 and 1."""
    if not (isinstance(alpha, (int, float)) and 0 < alpha < 1):
        raise InvalidArgument(f"the confidence interval's alpha must be between 0 and 1 (e.g. 0.05), got {alpha!r}")
    return float(alpha)


def clopper_pearson(k: int, n: int, alpha: float = DEFAULT_ALPHA) -> tuple[float, float]:
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


def optional_interval(k: int, n: int, alpha: float | None) -> tuple[float, float] | None:
    """:func:`clopper_pearson` of k of n at ``alpha``; None when ``alpha`` is None (no interval asked for)."""
    return None if alpha is None else clopper_pearson(k, n, alpha)
