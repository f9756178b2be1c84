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
``predict_counts``, ``sum_counts``) are pure functions of counts, so shards
computed anywhere can be summed and the bound computed once per image.

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

import math
from dataclasses import asdict, dataclass
from typing import Iterable, Sequence

import numpy as np
import torch
from scipy.stats import binomtest, norm
from statsmodels.stats.proportion import proportion_confint

from dsq import sampling
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
    if n_a <= 0:
        return 0.0
    return float(proportion_confint(n_a, n, alpha=2 * alpha, method="beta")[0])


def radius(p_lower: float, sigma: float) -> float:
    """R = sigma * Phi^-1(p_lower), 0.0 when the bound does not exceed 1/2."""
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
    if not isinstance(drawn, (int, np.integer)) or isinstance(drawn, bool):
        raise InvalidArgument(f"{name} (samples drawn) must be an integer, got {drawn!r}")
    if drawn < votes:
        raise InvalidArgument(f"{name} = {drawn} samples drawn is fewer samples than the {votes} votes counted")
    return int(drawn)


def predict_counts(counts, *, alpha: float) -> int:
    """PREDICT from vote counts: the top class if a two-sided binomial test
    of its count against the runner-up rejects equality at level alpha."""
    counts = np.asarray(counts, dtype=np.int64)
    order = np.argsort(-counts, kind="stable")
    n_a = int(counts[order[0]])
    n_b = int(counts[order[1]]) if len(counts) > 1 else 0
    if n_a + n_b == 0:
        return ABSTAIN
    p_value = binomtest(n_a, n_a + n_b, 0.5).pvalue
    return int(order[0]) if p_value <= alpha else ABSTAIN


def sum_counts(shard_counts: Iterable[Sequence[int]]) -> np.ndarray:
    """Sum count vectors of shards (padding shorter vectors with zeros)."""
    total = np.zeros(0, dtype=np.int64)
    for counts in shard_counts:
        total, counts = _same_length(total, np.asarray(counts, dtype=np.int64))
        total = total + counts
    return total


def certify(model, x, *, sigma, n0, n, alpha, batch_size, seed, device=None, image=0) -> Certificate:
    """CERTIFY (Cohen et al., Algorithm 'certify') for one image ``x`` of shape [C, H, W].

    Selection and estimation samples come from independent streams derived from
    (seed, image, phase, batch); the same arguments give the same certificate.
    """
    validate(sigma=sigma, n0=n0, n=n, alpha=alpha, batch_size=batch_size)
    check_image(model, x, device)
    common = dict(sigma=sigma, batch_size=batch_size, seed=seed, image=image, device=device)
    selection = sampling.sample_phase(model, x, num=n0, phase=sampling.SELECTION, **common)
    estimation = sampling.sample_phase(model, x, num=n, phase=sampling.ESTIMATION, **common)
    return certify_counts(selection, estimation, alpha=alpha, sigma=sigma, n0=n0, n=n)


def certify_radius(model, x, *, sigma, radius, n0, max_n, alpha, batch_size, seed, device=None,
                   image=0) -> Certificate:
    """Sequential, anytime-valid certification of one image at a target ``radius`` (``dsq.sequential``).

    cA from n0 selection samples as in CERTIFY; then estimation batches of ``batch_size`` (the
    same stream CERTIFY draws) until the test decides, at most ``max_n`` samples. ``prediction``
    is cA if g is certified within >= ``radius`` (else -1), ``radius`` the certified radius
    (0.0 if not), ``n`` the estimation samples drawn, ``p_lower`` the anytime-valid bound at
    stopping; P(wrong certificate) <= alpha whatever the stopping time.
    """
    from dsq import sequential  # it builds on this module

    return sequential.certify_radius(model, x, sigma=sigma, radius=radius, n0=n0, max_n=max_n, alpha=alpha,
                                     batch_size=batch_size, seed=seed, device=device, image=image)


def predict(model, x, *, sigma, n, alpha, batch_size, seed, device=None, image=0) -> int:
    """PREDICT (Cohen et al.): the smoothed prediction, or -1 to abstain."""
    validate(sigma=sigma, n0=1, n=n, alpha=alpha, batch_size=batch_size)
    check_image(model, x, device)
    counts = sampling.sample_phase(model, x, sigma=sigma, num=n, batch_size=batch_size, seed=seed,
                                   image=image, phase=sampling.PREDICTION, device=device)
    return predict_counts(counts, alpha=alpha)


def validate(*, sigma, n0, n, alpha, batch_size) -> None:
    """Raise InvalidArgument unless sigma > 0, n0, n, batch_size >= 1 and 0 < alpha < 1."""
    if not _is_real(sigma) or not sigma > 0 or not math.isfinite(sigma):
        raise InvalidArgument(f"sigma must be a finite number > 0, got {sigma!r}")
    for name, value in (("n0", n0), ("n", n), ("batch size", batch_size)):
        if not isinstance(value, (int, np.integer)) or isinstance(value, bool) or value < 1:
            raise InvalidArgument(f"{name} must be an integer >= 1, got {value!r}")
    if not _is_real(alpha) or not 0 < alpha < 1:
        raise InvalidArgument(f"alpha must be in (0, 1), got {alpha!r}")


def check_image(model, x, device=None) -> int:
    """Check that ``x`` is one finite [C, H, W] image the model accepts; return K (number of classes)."""
    if not isinstance(x, torch.Tensor) or x.dim() != 3:
        shape = tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__
        raise InvalidArgument(f"expected one image of shape [C, H, W], got {shape}")
    non_finite = int((~torch.isfinite(x)).sum()) if x.is_floating_point() else 0
    if non_finite:
        raise InvalidArgument(f"{non_finite} of {x.numel()} pixels are not finite (NaN or inf); "
                              f"the image must be finite, in [0, 1]")
    device = torch.device(device) if device is not None else sampling.model_device(model)
    with sampling.eval_mode(model), torch.inference_mode():
        try:
            logits = model(x.to(device)[None])
        except (RuntimeError, ValueError, AssertionError, IndexError, TypeError) as error:  # shapes it cannot take
            first_line = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
            raise InvalidArgument(f"the model cannot take an image of shape {tuple(x.shape)}: {first_line}") from None
    if logits.dim() != 2 or logits.shape[0] != 1:
        raise InvalidArgument(f"the model must return logits [B, K], got shape {tuple(logits.shape)}")
    return int(logits.shape[1])


def input_channels(model) -> int | None:
    """The channels of the images ``model`` takes, from its first NormalizeLayer or Conv2d; None if it has neither.

    Modules are seen in the order they were registered, so for f o D (``Sequential(D, f)``) it is D's.
    TorchScript modules are recognised by the class they were scripted from.
    """
    for module in model.modules():
        name = getattr(module, "original_name", type(module).__name__)
        if name == "NormalizeLayer":
            return int(module.means.numel())
        if name == "Conv2d":
            return int(module.weight.shape[1]) * int(module.groups)
    return None


def _same_length(a: np.ndarray, b: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    size = max(len(a), len(b))
    return np.pad(a, (0, size - len(a))), np.pad(b, (0, size - len(b)))


def _is_real(value) -> bool:
    return isinstance(value, (int, float, np.integer, np.floating)) and not isinstance(value, bool)
