"""Randomized smoothing: CERTIFY and PREDICT of Cohen et al. (2019).

Symbols, as in the paper:

- f        the base classifier (here: classifier after a denoiser, f o D),
           a module mapping images in [0, 1] to logits ``[B, K]``
- g        the smoothed classifier g(x) = argmax_c P(f(x + delta) = c),
           delta ~ N(0, sigma^2 I)
- n0       selection samples: guess the top class cA
- n        estimation samples: count nA votes for cA
- alpha    failure probability of the certificate
- p_lower  one-sided (1 - alpha) Clopper-Pearson lower bound on pA
- R        certified L2 radius sigma * Phi^-1(p_lower); abstain (-1) if p_lower < 1/2

``certify_radius`` asks only "is g robust at x within r?" and stops as soon as a sequential,
anytime-valid test knows (``dsq.sequential``).

The statistics (``lower_confidence_bound``, ``radius``, ``certify_counts``,
``predict_counts``, ``sum_counts``) are pure functions of counts in ``dsq.bounds``, which both this
module and ``dsq.sequential`` build on; they are importable from here too. Shards computed anywhere
can be summed and the bound computed once per image. ``check_image`` and ``input_channels`` come
from ``dsq.sampling``.

Non-finite numbers. An image with a NaN or inf pixel is refused
(``check_image`` raises InvalidArgument): x + delta would be NaN or inf
whatever delta, and no model output on it means anything. A noisy sample whose
logits contain a NaN or inf is drawn but votes for no class (``sampling``):
argmax would otherwise hand it to some class, and a model that returns NaN
everywhere would be certified with a large radius. It stays in the binomial
denominator n as an abstaining sample, which is sound: it counts as a failure
for cA, so it can only lower p_lower (never raise it), and a model with no
finite logits always abstains. This is why ``certify_counts`` takes the number
of samples drawn (``n``, ``n0``) rather than the counts' sum.
"""

from __future__ import annotations

import numpy as np

from dsq import checks, sampling, sequential
from dsq.bounds import (ABSTAIN, Certificate, certify_counts, lower_confidence_bound, predict_counts, radius,
                        sum_counts, validate)
from dsq.sampling import check_image, input_channels

__all__ = ["ABSTAIN", "Certificate", "certify", "certify_counts", "certify_radius", "check_image", "input_channels",
           "lower_confidence_bound", "predict", "predict_counts", "radius", "sum_counts", "validate"]


def certify(model, x, *, sigma, n0, n, alpha, batch_size, seed, device=None, image=0) -> Certificate:
    """CERTIFY (Cohen et al., Algorithm 'certify') for one image ``x`` of shape [C, H, W].

    Selection and estimation samples come from independent streams derived from
    (seed, image, phase, batch); the same arguments give the same certificate.
    """
    validate(sigma=sigma, n0=n0, n=n, alpha=alpha, batch_size=batch_size)
    check_image(model, x, device)  # one finite image the model takes: NaN or inf never certifies
    common = dict(sigma=sigma, batch_size=batch_size, seed=seed, image=image, device=device)
    # counts0 <- SAMPLEUNDERNOISE(f, x, n0, sigma); cA <- top index in counts0
    selection = sampling.sample_phase(model, x, num=n0, phase=sampling.SELECTION, **common)
    # counts <- SAMPLEUNDERNOISE(f, x, n, sigma), a stream independent of the selection's
    estimation = sampling.sample_phase(model, x, num=n, phase=sampling.ESTIMATION, **common)
    # pA_lower <- LOWERCONFBOUND(counts[cA], n, 1 - alpha); cA and R = sigma Phi^-1(pA_lower) if pA_lower > 1/2,
    # else abstain
    return certify_counts(selection, estimation, alpha=alpha, sigma=sigma, n0=n0, n=n)


def certify_radius(model, x, *, sigma, radius, n0, max_n, alpha, batch_size, seed, device=None,
                   image=0) -> Certificate:
    """Sequential, anytime-valid certification of one image at a target ``radius`` (``dsq.sequential``).

    cA from n0 selection samples as in CERTIFY; then estimation batch b is samples
    [b * batch_size, (b+1) * batch_size) of the same stream CERTIFY draws, until the test decides,
    at most ``max_n`` samples. ``prediction`` is cA if g is certified within >= ``radius`` (else -1),
    ``radius`` the certified radius (0.0 if not), ``n`` the estimation samples drawn, ``p_lower`` the
    anytime-valid bound at stopping; P(wrong certificate) <= alpha whatever the stopping time.
    """
    sequential.check_radius(radius)
    checks.positive_int("max_n", max_n)
    validate(sigma=sigma, n0=n0, n=max_n, alpha=alpha, batch_size=batch_size)
    check_image(model, x, device)
    common = dict(sigma=sigma, batch_size=batch_size, seed=seed, image=image, device=device)
    selection = sampling.sample_phase(model, x, num=n0, phase=sampling.SELECTION, **common)
    test = sequential.SequentialTest.at_radius(radius, sigma, alpha, max_n)
    stream = sequential.Stream(test, int(np.argmax(selection)), batch_size)
    while not stream.decided:  # one batch at a time, decided at batch ends only
        start, count = stream.span(stream.used)
        stream.add(stream.used, sampling.sample_counts(model, x, start=start, count=count,
                                                       phase=sampling.ESTIMATION, **common))
    return sequential.to_certificate(test, selection, stream.counts, n0=n0, sigma=sigma, radius=radius)


def predict(model, x, *, sigma, n, alpha, batch_size, seed, device=None, image=0) -> int:
    """PREDICT (Cohen et al.): the smoothed prediction, or -1 to abstain."""
    validate(sigma=sigma, n0=1, n=n, alpha=alpha, batch_size=batch_size)
    check_image(model, x, device)
    counts = sampling.sample_phase(model, x, sigma=sigma, num=n, batch_size=batch_size, seed=seed,
                                   image=image, phase=sampling.PREDICTION, device=device)
    return predict_counts(counts, alpha=alpha)
