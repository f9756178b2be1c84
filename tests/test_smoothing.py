"""Certify/predict: statistics, soundness against a closed-form truth, determinism, shards."""

import math

import numpy as np
import pytest
import torch
from scipy.stats import norm
from torch import nn

from dsq import sampling, smoothing
from dsq.errors import InvalidArgument


class Halfspace(nn.Module):
    """f(x) = 1 if w.x + b > 0 else 0. Its smoothed classifier is known in closed form:
    P(f(x + delta) = 1) = Phi((w.x + b) / (sigma |w|)), and the exact L2 radius of g
    at x is the distance |w.x + b| / |w| to the hyperplane."""

    def __init__(self, w: torch.Tensor, b: float):
        super().__init__()
        self.register_buffer("w", w.flatten())
        self.b = b

    def forward(self, x):
        margin = x.flatten(1) @ self.w + self.b
        return torch.stack([-margin, margin], dim=1)

    def distance(self, x):
        return abs(float(x.flatten() @ self.w) + self.b) / float(self.w.norm())


@pytest.fixture(scope="module")
def halfspace():
    torch.manual_seed(0)
    return Halfspace(torch.randn(1, 4, 4), b=-0.2)


def points_at(model, distances):
    """Images whose signed distance to the hyperplane is each of ``distances``."""
    unit = model.w / model.w.norm()
    base = torch.full((16,), 0.5)
    base_distance = (float(base @ model.w) + model.b) / float(model.w.norm())
    return [(base + (d - base_distance) * unit).reshape(1, 4, 4) for d in distances]


def test_known_radii_for_unanimous_votes():
    # All n votes for the top class, alpha = 0.001 (Cohen et al.'s setting).
    for n, expected in ((100_000, 3.81), (10_000, 3.20)):
        p_lower = smoothing.lower_confidence_bound(n, n, 0.001)
        assert smoothing.radius(p_lower, 1.0) == pytest.approx(expected, abs=0.005)
        assert smoothing.radius(p_lower, 0.5) == pytest.approx(expected / 2, abs=0.003)


def test_abstain_threshold_and_no_nan():
    # 50 of 100 votes: the lower bound is far below 1/2 -> abstain, radius 0.
    cert = smoothing.certify_counts([0, 10], [50, 50], alpha=0.001, sigma=0.25)
    assert cert.prediction == smoothing.ABSTAIN and cert.radius == 0.0
    # Zero votes for the selected class: p_lower is 0, never NaN.
    cert = smoothing.certify_counts([0, 5, 0], [7, 0, 3], alpha=0.001, sigma=0.5)
    assert cert.p_lower == 0.0 and cert.prediction == -1 and not math.isnan(cert.radius)
    # Just above and below 1/2: the rule follows the bound, not the point estimate.
    lo = smoothing.lower_confidence_bound(5100, 10000, 0.001)
    hi = smoothing.lower_confidence_bound(5400, 10000, 0.001)
    assert lo < 0.5 < hi
    assert smoothing.certify_counts([0, 1], [4900, 5100], alpha=0.001, sigma=1).prediction == -1
    cert = smoothing.certify_counts([0, 1], [4600, 5400], alpha=0.001, sigma=1)
    assert cert.prediction == 1 and cert.radius == pytest.approx(float(np.sqrt(1) * norm.ppf(hi)))


def test_selection_tie_breaks_to_lowest_class():
    assert smoothing.certify_counts([3, 5, 5], [0, 100, 0], alpha=0.01, sigma=1).prediction == 1


def test_predict_counts_binomial_test():
    assert smoothing.predict_counts([0, 90, 10], alpha=0.001) == 1
    assert smoothing.predict_counts([52, 48, 0], alpha=0.001) == -1
    assert smoothing.predict_counts([0, 0, 0], alpha=0.001) == -1


@pytest.mark.parametrize("kwargs, message", [
    (dict(sigma=0), "sigma"), (dict(sigma=-0.1), "sigma"), (dict(sigma=float("nan")), "sigma"),
    (dict(n0=0), "n0"), (dict(n=0), "n must"), (dict(batch_size=0), "batch size"),
    (dict(n=2.5), "n must"), (dict(alpha=0), "alpha"), (dict(alpha=1), "alpha"),
])
def test_bad_parameters_raise_named_error(halfspace, kwargs, message):
    args = dict(sigma=0.25, n0=10, n=100, alpha=0.001, batch_size=50, seed=0) | kwargs
    with pytest.raises(InvalidArgument, match=message):
        smoothing.certify(halfspace, torch.zeros(1, 4, 4), **args)


def test_bad_image_shape_raises_named_error(halfspace):
    with pytest.raises(InvalidArgument, match=r"\[C, H, W\]"):
        smoothing.certify(halfspace, torch.zeros(4, 4), sigma=0.5, n0=1, n=1, alpha=0.1, batch_size=1, seed=0)
    with pytest.raises(InvalidArgument, match="cannot take an image"):
        smoothing.certify(halfspace, torch.zeros(1, 5, 5), sigma=0.5, n0=1, n=1, alpha=0.1, batch_size=1, seed=0)


def test_radii_are_sound_and_tighten_with_n(halfspace):
    """Certified radii never exceed the exact radius; more samples close the gap."""
    sigma, alpha = 0.5, 0.001
    distances = [0.05, 0.2, 0.4, 0.7, 1.0, -0.3, -0.8]
    gaps = {}
    for n in (1_000, 100_000):
        gaps[n] = []
        for i, x in enumerate(points_at(halfspace, distances)):
            cert = smoothing.certify(halfspace, x, sigma=sigma, n0=100, n=n, alpha=alpha,
                                     batch_size=10_000, seed=7, image=i)
            truth = halfspace.distance(x)
            assert cert.radius <= truth + 1e-9
            if cert.prediction != -1:
                assert cert.prediction == int(distances[i] > 0)
            gaps[n].append(truth - cert.radius)
    assert max(gaps[100_000]) < 0.05
    assert np.mean(gaps[100_000]) < np.mean(gaps[1_000])


def test_false_certificates_are_rare(halfspace):
    """Over many independent seeds the radius exceeds the truth at most about alpha of the time."""
    x = points_at(halfspace, [0.3])[0]
    truth = halfspace.distance(x)
    over = sum(
        smoothing.certify(halfspace, x, sigma=0.5, n0=20, n=200, alpha=0.05, batch_size=200, seed=s).radius > truth
        for s in range(200)
    )
    assert over <= 25  # expected <= 10 (alpha = 5%); 25 is far in the binomial tail


def test_same_seed_same_certificate_other_seed_other_counts(halfspace):
    x = points_at(halfspace, [0.1])[0]
    args = dict(sigma=0.5, n0=100, n=2_000, alpha=0.001, batch_size=300)
    a = smoothing.certify(halfspace, x, seed=1, **args)
    b = smoothing.certify(halfspace, x, seed=1, **args)
    c = smoothing.certify(halfspace, x, seed=2, **args)
    assert a.to_dict() == b.to_dict()
    assert not np.array_equal(a.counts_estimation, c.counts_estimation)
    # Selection and estimation are independent streams, and images have their own streams.
    d = smoothing.certify(halfspace, x, seed=1, image=5, **args)
    assert not np.array_equal(a.counts_estimation, d.counts_estimation)


@pytest.mark.parametrize("shards", [1, 2, 3, 7, 50])
def test_shard_sums_equal_unsharded_plan(halfspace, shards):
    x = points_at(halfspace, [0.05])[0]
    args = dict(sigma=0.5, batch_size=64, seed=3, image=11)
    whole = smoothing.certify(halfspace, x, n0=100, n=1_000, alpha=0.001, **args)
    parts = {}
    for phase, num in ((sampling.SELECTION, 100), (sampling.ESTIMATION, 1_000)):
        plan = sampling.plan_shards(num, 64, shards, phase)
        assert sum(s.count for s in plan) == num
        counts = [sampling.sample_counts(halfspace, x, start=s.start, count=s.count, phase=phase, **args)
                  for s in reversed(plan)]  # any order
        parts[phase] = smoothing.sum_counts(counts)
    sharded = smoothing.certify_counts(parts[sampling.SELECTION], parts[sampling.ESTIMATION],
                                       alpha=0.001, sigma=0.5)
    assert sharded.to_dict() == whole.to_dict()


def test_model_is_evaluated_in_eval_mode_and_restored():
    model = nn.Sequential(nn.Flatten(), nn.Linear(4, 8), nn.BatchNorm1d(8), nn.Dropout(0.5), nn.Linear(8, 3))
    model.train()
    x = torch.rand(1, 2, 2)
    args = dict(sigma=0.25, n0=50, n=500, alpha=0.01, seed=0)
    small = smoothing.certify(model, x, batch_size=7, **args)
    large = smoothing.certify(model, x, batch_size=7, **args)
    assert model.training  # restored
    assert small.to_dict() == large.to_dict()  # dropout / batch statistics never used


def test_predict_is_deterministic(halfspace):
    x = points_at(halfspace, [0.6])[0]
    assert smoothing.predict(halfspace, x, sigma=0.25, n=1000, alpha=0.001, batch_size=100, seed=0) == 1
    x = points_at(halfspace, [0.0])[0]
    assert smoothing.predict(halfspace, x, sigma=0.25, n=1000, alpha=0.001, batch_size=100, seed=0) == -1
