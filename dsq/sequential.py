"""Sequential certification at a target radius: anytime-valid, stops as soon as it knows.

CERTIFY (``dsq.smoothing``) draws a fixed n and reports the largest radius it can.
Often the question is only "is g robust at x within r?" and most images answer it
after a few hundred samples. This module asks that question batch by batch and stops
when it is answered, without losing the guarantee (Voracek, NeurIPS 2024, asks it
with confidence sequences; this is one of them).

Symbols, as in dsq.smoothing (Cohen et al. 2019), plus the sequential test:

- r        the target radius; g is robust at x within r when pA > p0
- p0       Phi(r / sigma), since R = sigma * Phi^-1(pA) >= r  <=>  pA >= p0
- S, F, t  after t estimation samples: S votes for cA, F = t - S failures
           (votes for other classes and samples that vote for no class)
- W_t(p)   the wealth of the test of H0: pA <= p, a one-sided beta-binomial mixture
           (Robbins 1970; Howard et al. 2021): the likelihood ratio of the uniform
           prior on [p, 1] against p,
               W_t(p) = int_p^1 q^S (1-q)^F dq / ((1 - p) p^S (1-p)^F)
                      = B(S+1, F+1) P(Beta(S+1, F+1) > p) / ((1 - p) p^S (1-p)^F)
- Ville    under H0 every q^S (1-q)^F / (p^S (1-p)^F) with q >= p is a nonnegative
           supermartingale with value 1 at t = 0, so is their mixture, and
           P(exists t: W_t(p) >= 1/alpha) <= alpha
- p_lower  inf {p : W_t(p) < 1/alpha}: a confidence sequence, P(exists t: pA < p_lower_t) <= alpha
- certify  at the first batch end where W_t(p0) >= 1/alpha, i.e. p_lower >= p0; the
           certified radius is sigma * Phi^-1(p_lower) >= r
- futile   stop without a certificate: the mirror test on the failures (H0: pA >= p0)
           rejects at level ``futility_alpha``, or r is out of reach of both the sequence
           and the final test even if every remaining sample votes for cA (an image is never
           curtailed while the final test could still certify it; the mirror test stops one
           with pA >= p0 with probability <= futility_alpha, all it can take from the final test)
- split    alpha = alpha_seq + alpha_final, alpha_final = alpha * ``final_share``: the
           sequence above runs at alpha_seq (1/alpha_seq in place of 1/alpha); an image that
           reaches max_n undecided gets one fixed-n decision, the one-sided Clopper-Pearson
           bound at level alpha_final on all max_n samples: certify iff it is >= p0, and
           p_lower at max_n is the larger of the two bounds

With u = (q - p) / (1 - p), W_t(p) = E_{u ~ U(0,1)} [(1 + u (1-p)/p)^S (1-u)^F]: it
falls as p grows and grows with S (and with t at fixed F). So the set where H0 is
rejected is an interval [0, p_lower), "W_t(p0) >= 1/alpha" and "p_lower >= p0" are the
same decision, and the best any run of max_n samples can do is all of them for cA (for the
final bound as well, which grows with the successes at n = max_n).

Guarantee. A certificate is wrong only if pA < p_lower at the time it is returned. Before
max_n that is the confidence sequence failing at that time; at max_n it is the sequence or
the final bound failing. So the wrong-certificate event lies inside {exists t: pA < p_lower_t
of the sequence} (probability <= alpha_seq by Ville, whatever the stopping rule) union {pA <
Clopper-Pearson bound at n = max_n} (a fixed n: probability <= alpha_final), and the union
bound gives P(wrong) <= alpha_seq + alpha_final = alpha, whatever the stopping time:
early stops (to certify or not), futility and the runner's schedule keep it. The test is
evaluated only at batch ends, in batch order, so the same batches give the same decision
on any number of workers.

The statistics (``log_wealth``, ``lower_bound``, ``SequentialTest``, ``decide``, ``Stream``,
``final_bound``, ``max_sequential_radius``) are pure functions of counts, on top of the fixed-n
statistics of ``dsq.bounds``; ``dsq.smoothing.certify_radius`` is a thin loop over ``dsq.sampling``
that feeds ``Stream``, as the job runners feed it the batches their workers return, in any order.
``SequentialTest.trace`` is p_lower at each look, up to the stop: what a result stores (``extra.trace``) and its
image's dashboard page plots.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass, field
from typing import Iterable

import numpy as np
from scipy.special import betaincc, betaln
from scipy.special import ndtr

from dsq import bounds, checks
from dsq.errors import InvalidArgument

CONTINUE, CERTIFIED, FUTILE = "continue", "certified", "futile"

# Bisection steps for p_lower on [0, 1]: 2^-64 is below the spacing of doubles near 1
# (1.1e-16), where bounds on pA live, so the bound is as tight as a float allows there.
# A bound below 2^-64 rounds down to 0.0, which is still a valid lower bound.
BISECTION_STEPS = 64

# The share of alpha kept for the final fixed-n decision at max_n. Measured on the digits models
# of ``dsq bench --sequential`` (200 images, 16 rows, alpha 0.001, max_n 10,000; BENCHMARKS.md):
# certified accuracy below fixed n = 10,000 summed over the rows was 9.0 points with no final
# decision (share 0, worst row 2.5), 4.5 at 0.1, 3.5 at 0.25, 0.5 at 0.5 (worst row 0.5), 1.0 at 0.75;
# mean samples per image, averaged over the rows, 858, 867, 876, 890, 913. Half is where the final
# decision wins back the near-boundary images and the sequence (at alpha/2) is still nearly as fast:
# 1/alpha_seq is only log(2) = 0.7 more nats of evidence.
FINAL_SHARE = 0.5

# The most looks an image's trace keeps (``SequentialTest.trace``): a job's looks are about 100 by its batch size
# (``dsq.sizing.SEQUENTIAL_LOOKS``), an API job's may be a thousand; beyond this they are thinned evenly.
TRACE_POINTS = 100


def log_wealth(successes: int, failures: int, p: float) -> float:
    """log W_t(p): evidence against H0: pA <= p from S successes and F failures.

    -inf when p >= 1 (nothing can reject pA <= 1) or when the posterior tail underflows
    (W is then far below 1); +inf when p <= 0 and S >= 1.
    """
    if p >= 1.0:
        return -math.inf
    if p <= 0.0:
        return math.inf if successes > 0 else -math.log1p(failures)
    tail = float(betaincc(successes + 1, failures + 1, p))
    if tail <= 0.0:
        return -math.inf
    return (float(betaln(successes + 1, failures + 1)) + math.log(tail)
            - successes * math.log(p) - (failures + 1) * math.log1p(-p))


@functools.lru_cache(maxsize=65_536)
def final_bound(successes: int, n: int, alpha: float) -> float:
    """The final decision's bound: one-sided (1 - alpha) Clopper-Pearson on pA from ``successes`` of n; 0.0 if none."""
    return bounds.lower_confidence_bound(int(successes), int(n), float(alpha))


def lower_bound(successes: int, trials: int, alpha: float) -> float:
    """p_lower = inf {p : W_t(p) < 1/alpha}, rounded down; 0.0 on zero successes (never NaN)."""
    return _bisect(successes, trials - successes, math.log(1 / alpha), 0.0, 1.0)


def _bisect(successes: int, failures: int, threshold: float, lo: float, hi: float) -> float:
    """Largest p found in [lo, hi) with log W(p) >= threshold, given that W(lo) rejects and W(hi) does not."""
    if successes <= 0:
        return 0.0
    for _ in range(BISECTION_STEPS):
        mid = 0.5 * (lo + hi)
        if not lo < mid < hi:
            break
        if log_wealth(successes, failures, mid) >= threshold:
            lo = mid
        else:
            hi = mid
    return lo


@dataclass
class SequentialTest:
    """The sequential test of H0: pA <= p0 at level alpha within max_n samples.

    The confidence sequence runs at ``alpha_seq``; at max_n an undecided image gets the final
    Clopper-Pearson decision at ``alpha_final`` (module docstring, "split"). ``final_share`` 0 is the
    pure anytime test at the whole alpha.

    Feed it the (successes, trials) of each completed estimation batch in batch order;
    ``update`` returns the decision. Once it is not CONTINUE it stands: later batches
    are ignored and not counted (a runner may have drawn them already).
    """

    p0: float
    alpha: float
    max_n: int
    futility_alpha: float | None = None  # None: alpha, so both stops are equally sure
    final_share: float = FINAL_SHARE
    successes: int = field(default=0, init=False)
    trials: int = field(default=0, init=False)
    batches: int = field(default=0, init=False)
    decision: str = field(default=CONTINUE, init=False)
    looks: list = field(default_factory=list, init=False)  # (trials, successes) after each batch counted

    def __post_init__(self) -> None:
        if not checks.is_real(self.p0) or not 0 < self.p0 <= 1:
            raise InvalidArgument(f"p0 must be in (0, 1], got {self.p0!r}")
        checks.probability("alpha", self.alpha)
        self.futility_alpha = self.alpha if self.futility_alpha is None else self.futility_alpha
        checks.probability("futility alpha", self.futility_alpha)
        checks.positive_int("max_n", self.max_n)
        if not checks.is_real(self.final_share) or not 0 <= self.final_share < 1:
            raise InvalidArgument(f"final share must be in [0, 1), got {self.final_share!r}")
        self.alpha_final = float(self.alpha * self.final_share)
        self.alpha_seq = float(self.alpha - self.alpha_final)
        self._threshold = math.log(1 / self.alpha_seq)
        if not self._reachable():
            self.decision = FUTILE

    @classmethod
    def at_radius(cls, radius: float, sigma: float, alpha: float, max_n: int) -> "SequentialTest":
        """The test that certifies g at x within ``radius``: p0 = Phi(radius / sigma)."""
        check_radius(radius)
        checks.finite("sigma", sigma)
        return cls(float(ndtr(radius / sigma)), alpha, max_n)  # Phi(r / sigma), as scipy.stats.norm.cdf

    @property
    def failures(self) -> int:
        return self.trials - self.successes

    def update(self, successes: int, trials: int) -> str:
        """Add one batch (votes for cA, samples drawn) and return the decision."""
        if self.decision != CONTINUE:
            return self.decision
        checks.positive_int("batch trials", trials)
        if not isinstance(successes, (int, np.integer)) or isinstance(successes, bool) \
                or not 0 <= successes <= trials:
            raise InvalidArgument(f"batch successes must be an integer in [0, {trials}], got {successes!r}")
        if self.trials + trials > self.max_n:
            raise InvalidArgument(f"batches exceed max_n = {self.max_n}: {self.trials} + {trials} samples")
        self.successes += int(successes)
        self.trials += int(trials)
        self.batches += 1
        self.looks.append((self.trials, self.successes))
        self.decision = self._decide()
        return self.decision

    def p_lower(self) -> float:
        """The lower bound on pA now, valid at level alpha at any stop; >= p0 exactly when certified.

        Before max_n: the confidence sequence's (at alpha_seq). At max_n: the larger of it and the
        final Clopper-Pearson bound (at alpha_final); the union bound covers either.
        """
        return self._bound(self.successes, self.trials)

    def trace(self, points: int = TRACE_POINTS) -> list[list[float]]:
        """``[[n, p_lower], ...]``: the bound at each look, as ``p_lower`` gave it then (at most ``points`` looks,
        thinned evenly, the first and the last kept). What an image's page plots: p_lower against n up to the stop."""
        looks = self.looks
        if len(looks) > points:
            looks = [looks[i] for i in sorted({round(k * (len(looks) - 1) / (points - 1)) for k in range(points)})]
        return [[trials, self._bound(successes, trials)] for trials, successes in looks]

    def _bound(self, successes: int, trials: int) -> float:
        failures = trials - successes
        if log_wealth(successes, failures, self.p0) >= self._threshold:
            bound = _bisect(successes, failures, self._threshold, self.p0, 1.0)
        else:
            bound = _bisect(successes, failures, self._threshold, 0.0, self.p0)
        if trials >= self.max_n:
            bound = max(bound, self._final(successes))
        return bound

    def _decide(self) -> str:
        if log_wealth(self.successes, self.failures, self.p0) >= self._threshold:
            return CERTIFIED
        if self.trials >= self.max_n:  # the final fixed-n decision, once, at n = max_n
            return CERTIFIED if self._final(self.successes) >= self.p0 else FUTILE
        if not self._reachable():
            return FUTILE
        if log_wealth(self.failures, self.successes, 1 - self.p0) >= math.log(1 / self.futility_alpha):
            return FUTILE
        return CONTINUE

    def _reachable(self) -> bool:
        """Could the sequence or the final decision still certify if every remaining sample voted for cA?"""
        best = self.successes + self.max_n - self.trials
        return log_wealth(best, self.failures, self.p0) >= self._threshold or self._final(best) >= self.p0

    def _final(self, successes: int) -> float:
        """The final Clopper-Pearson bound at n = max_n with ``successes`` votes for cA (0.0 without a final share)."""
        return final_bound(successes, self.max_n, self.alpha_final) if self.alpha_final > 0 else 0.0


def decide(batches: Iterable[tuple[int, int]], *, p0: float, alpha: float, max_n: int,
           futility_alpha: float | None = None, final_share: float = FINAL_SHARE) -> SequentialTest:
    """Run the test over (successes, trials) batches in batch order; batches after a decision are ignored.

    The returned test holds the decision, the samples counted (``trials``), the number of
    batches used (``batches``) and ``p_lower()``.
    """
    test = SequentialTest(p0, alpha, max_n, futility_alpha, final_share)
    for successes, trials in batches:
        if test.update(successes, trials) != CONTINUE:
            break
    return test


class Stream:
    """One image's estimation batches, drawn in any order, decided in batch order.

    Batch b is samples [b * batch_size, min((b + 1) * batch_size, max_n)) of the estimation
    stream. ``add`` takes a batch's count vector whenever it comes back; the test sees a batch
    once every batch before it is in, and batches past the decision are ignored, so the decision
    and the samples it counts do not depend on how many workers drew them or in which order.
    """

    def __init__(self, test: SequentialTest, c_a: int, batch_size: int):
        checks.positive_int("batch size", batch_size)
        self.test, self.c_a, self.batch_size = test, int(c_a), int(batch_size)
        self.batches = math.ceil(test.max_n / batch_size)
        self.counts = np.zeros(c_a + 1, dtype=np.int64)  # votes of the batches the test used
        self.used = 0  # batches the test used
        self.held: dict[int, np.ndarray] = {}  # batches back before one of their predecessors

    @property
    def decided(self) -> bool:
        return self.test.decision != CONTINUE

    def span(self, batch: int) -> tuple[int, int]:
        """(start, count) of batch ``batch`` within the estimation stream."""
        start = batch * self.batch_size
        return start, min(self.batch_size, self.test.max_n - start)

    def add(self, batch: int, counts) -> str:
        """Take batch ``batch``'s count vector; feed the test every batch now in order; return the decision."""
        if not 0 <= batch < self.batches:
            raise InvalidArgument(f"batch {batch} is outside the {self.batches} batches of max_n = {self.test.max_n}")
        if not self.decided and batch >= self.used:
            self.held[batch] = np.asarray(counts, dtype=np.int64)
        while not self.decided and self.used in self.held:
            votes = self.held.pop(self.used)
            self.counts = bounds.sum_counts([self.counts, votes])
            self.test.update(int(votes[self.c_a]) if self.c_a < len(votes) else 0, self.span(self.used)[1])
            self.used += 1
        if self.decided:
            self.held.clear()
        return self.test.decision


def to_certificate(test: SequentialTest, counts_selection, counts_estimation, *,
                   n0: int, sigma: float, radius: float) -> bounds.Certificate:
    """The Certificate of a finished test: cA certified within >= radius, or abstain.

    ``counts_estimation`` sums the batches the test used; its cA entry must be the test's successes.
    """
    counts = [np.asarray(c, dtype=np.int64) for c in (counts_selection, counts_estimation)]
    size = max(len(c) for c in counts)
    selection, estimation = (np.pad(c, (0, size - len(c))) for c in counts)
    c_a = int(np.argmax(selection))
    if int(estimation[c_a]) != test.successes or int(estimation.sum()) > test.trials \
            or int(selection.sum()) > n0:
        raise InvalidArgument(f"counts {selection.tolist()} (n0 = {n0}), {estimation.tolist()} do not match the "
                              f"test ({test.successes} votes for class {c_a} of {test.trials} samples)")
    p_lower = test.p_lower()
    certified = test.decision == CERTIFIED
    return bounds.Certificate(
        prediction=c_a if certified else bounds.ABSTAIN,
        # p_lower >= p0 = Phi(radius/sigma); max() only absorbs the round trip Phi^-1(Phi(.)).
        radius=max(bounds.radius(p_lower, sigma), float(radius)) if certified else 0.0,
        p_lower=p_lower,
        counts_selection=selection,
        counts_estimation=estimation,
        n0=int(n0),
        n=test.trials,
        alpha=float(test.alpha),
        sigma=float(sigma),
    )


def max_sequential_radius(max_n: int, alpha: float, sigma: float, final_share: float = FINAL_SHARE) -> float:
    """The largest target radius ``certify_radius`` can ever certify within max_n samples (all for cA).

    The larger of the sequence's reach (mixture bound at alpha_seq) and the final decision's
    (Clopper-Pearson at alpha_final on max_n of max_n, the same bound ``SequentialTest`` uses).
    """
    checks.positive_int("max_n", max_n)
    checks.probability("alpha", alpha)
    checks.finite("sigma", sigma)
    test = SequentialTest(0.5, alpha, max_n, final_share=final_share)  # checks final_share; p0 unused
    best = lower_bound(max_n, max_n, test.alpha_seq)
    if test.alpha_final > 0:
        best = max(best, final_bound(max_n, max_n, test.alpha_final))
    return bounds.radius(best, sigma)


def check_radius(radius) -> float:
    """A target radius is a finite number > 0."""
    return checks.finite("radius", radius)
