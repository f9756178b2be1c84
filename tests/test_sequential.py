"""Sequential certification at a target radius: validity under optional stopping, speed, edges.

Where the truth is known: Bernoulli batches from numpy with a chosen pA (fast, for the
many-trials checks), and a halfspace under Gaussian noise, whose pA and exact radius
are closed-form, through ``certify_radius`` with a real torch model.
"""

import math

import numpy as np
import pytest
import torch
from scipy.integrate import quad
from scipy.stats import beta, binom, norm
from torch import nn

from dsq import bounds, sequential, smoothing
from dsq.errors import InvalidArgument
from dsq.sequential import CERTIFIED, CONTINUE, FUTILE
from tests.test_smoothing import Halfspace


class NaNModel(nn.Module):
    """Two logits, always NaN: no sample votes for any class."""

    def forward(self, x):
        return torch.full((x.shape[0], 2), float("nan"))


@pytest.fixture(scope="module")
def halfspace():
    torch.manual_seed(0)
    return Halfspace(torch.randn(1, 4, 4), b=-0.2)


def point_at(model, distance):
    """An image whose signed distance to the hyperplane is ``distance``."""
    unit = model.w / model.w.norm()
    base = torch.full((16,), 0.5)
    base_distance = (float(base @ model.w) + model.b) / float(model.w.norm())
    return (base + (distance - base_distance) * unit).reshape(1, 4, 4)


def simulate(p_a, p0, *, alpha, max_n, batch, trials, seed):
    """Run the sequential test on ``trials`` independent streams of Bernoulli(p_a) batches."""
    draws = np.random.default_rng(seed).binomial(batch, p_a, size=(trials, max_n // batch))
    return [sequential.decide([(int(s), batch) for s in row], p0=p0, alpha=alpha, max_n=max_n)
            for row in draws]


def peeking_clopper_pearson(p_a, p0, *, alpha, max_n, batch, trials, seed):
    """The wrong rule: certify as soon as a fixed-n Clopper-Pearson bound clears p0 after any batch."""
    draws = np.random.default_rng(seed).binomial(batch, p_a, size=(trials, max_n // batch))
    successes = np.cumsum(draws, axis=1)
    looks = batch * np.arange(1, draws.shape[1] + 1)
    with np.errstate(invalid="ignore"):
        p_lower = np.nan_to_num(beta.ppf(alpha, successes, looks - successes + 1))
    return (p_lower >= p0).any(axis=1)


def exact_certify_probability(p_a, decision_at, max_n):
    """P(a rule certifies) when it looks after every sample, by dynamic programming over (S, t)."""
    mass, certified = np.array([1.0]), 0.0
    for t in range(1, max_n + 1):
        mass = np.concatenate([mass * (1 - p_a), [0.0]]) + np.concatenate([[0.0], mass * p_a])
        for s in np.flatnonzero(mass):
            decision = decision_at(int(s), t)
            certified += mass[s] if decision == CERTIFIED else 0.0
            mass[s] = mass[s] if decision == CONTINUE else 0.0
    return certified


def sequential_rule(p0, alpha, max_n, final_share=sequential.FINAL_SHARE):
    """The decision of the sequential test after S successes in t samples (it depends on nothing else);
    at t = max_n it is the final Clopper-Pearson decision when the sequence has not certified."""
    return lambda s, t: sequential.SequentialTest(p0, alpha, max_n, final_share=final_share).update(s, t)


def peeking_rule(p0, alpha, max_n):
    clears = {}  # t -> for each S, whether the fixed-n bound after t samples clears p0 (one array ppf per t)

    def decision(s, t):
        if t not in clears:
            successes = np.arange(1, t + 1)
            clears[t] = np.concatenate([[False], beta.ppf(alpha, successes, t - successes + 1) >= p0])
        if clears[t][s]:
            return CERTIFIED
        return FUTILE if t == max_n else CONTINUE
    return decision


# ------------------------------------------------------------------------------------------------
# The statistics, from counts
# ------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("s, f, p", [(5, 3, 0.4), (50, 2, 0.8), (0, 10, 0.3), (100, 0, 0.9), (3, 30, 0.05)])
def test_wealth_is_the_truncated_uniform_mixture(s, f, p):
    integral = quad(lambda q: q**s * (1 - q) ** f, p, 1, epsabs=0, epsrel=1e-12)[0]
    assert sequential.log_wealth(s, f, p) == pytest.approx(
        math.log(integral / ((1 - p) * p**s * (1 - p) ** f)), abs=1e-9)


def test_p_lower_matches_the_decision_and_is_never_nan():
    alpha, p0 = 0.001, float(norm.cdf(1.0))
    for trials in (1, 7, 100, 1_000, 100_000, 10_000_000):
        for successes in sorted({0, 1, trials // 2, int(0.9 * trials), trials - 1, trials} - {-1}):
            test = sequential.SequentialTest(p0, alpha, max_n=10**9)
            test.update(successes, trials)
            assert test.trials == trials and test.alpha_seq == alpha * (1 - sequential.FINAL_SHARE)
            p_lower = test.p_lower()
            assert 0.0 <= p_lower < 1.0 and not math.isnan(p_lower)
            assert (test.decision == CERTIFIED) == (p_lower >= p0)
            # Before max_n the bound is the sequence's, at alpha_seq. W at the bound still rejects:
            # the bound is rounded down, never up.
            if successes:
                assert sequential.log_wealth(successes, trials - successes, p_lower) >= math.log(1 / test.alpha_seq)
            expected = sequential.lower_bound(successes, trials, test.alpha_seq)
            assert p_lower == pytest.approx(expected, rel=1e-12, abs=1e-18)
    bounds = [sequential.lower_bound(s, 1_000, 0.001) for s in range(0, 1_001, 50)]
    assert bounds == sorted(bounds) and bounds[0] == 0.0
    # At max_n: the larger of the sequence's bound and the final Clopper-Pearson bound, never NaN.
    for successes in (0, 1, 500, 880, 999, 1_000):
        test = sequential.SequentialTest(p0, alpha, max_n=1_000)
        test.update(successes, 1_000)
        p_lower = test.p_lower()
        assert p_lower == max(sequential.lower_bound(successes, 1_000, test.alpha_seq),
                              smoothing.lower_confidence_bound(successes, 1_000, test.alpha_final))
        assert not math.isnan(p_lower) and (test.decision == CERTIFIED) == (p_lower >= p0)


def test_false_certificates_stay_within_alpha_under_optional_stopping():
    """True radius just below the target (pA slightly under p0), 200 looks: the rate stays <= alpha."""
    alpha, trials = 0.05, 400
    p0, p_a = float(norm.cdf(1.0)), float(norm.cdf(0.98))
    tests = simulate(p_a, p0, alpha=alpha, max_n=5_000, batch=25, trials=trials, seed=1)
    false = sum(t.decision == CERTIFIED for t in tests)
    assert false <= binom.ppf(0.999, trials, alpha)
    # The confidence sequence covers pA at every stop, as often as it promises.
    assert sum(t.p_lower() > p_a for t in tests) <= binom.ppf(0.999, trials, alpha)


def test_peeking_at_a_fixed_n_bound_fails_the_same_check():
    """Teeth: optional stopping on Clopper-Pearson without correction certifies far too often."""
    alpha, trials = 0.05, 400
    p0, p_a = float(norm.cdf(1.0)), float(norm.cdf(0.98))
    certified = peeking_clopper_pearson(p_a, p0, alpha=alpha, max_n=5_000, batch=25, trials=trials, seed=1)
    assert certified.sum() > binom.ppf(0.999, trials, alpha)


@pytest.mark.parametrize("p0, max_n", [(0.7, 300), (0.9, 300)])
def test_exact_false_certificate_probability_with_a_look_after_every_sample(p0, max_n):
    """pA = p0 is the worst case under H0 (the decision is monotone in S); computed exactly, not sampled.

    The rule includes the final Clopper-Pearson decision at t = max_n: sequence at alpha_seq plus final
    at alpha_final stays <= alpha, and the final decision does add certificates to the sequence's.
    """
    alpha = 0.05
    split = exact_certify_probability(p0, sequential_rule(p0, alpha, max_n), max_n)
    alpha_seq = alpha * (1 - sequential.FINAL_SHARE)
    sequence_only = exact_certify_probability(p0, sequential_rule(p0, alpha_seq, max_n, final_share=0.0), max_n)
    assert alpha / 4 < split <= alpha
    assert sequence_only <= alpha_seq and split > sequence_only
    assert split - sequence_only <= alpha * sequential.FINAL_SHARE  # what the final decision adds: <= alpha_final
    assert exact_certify_probability(p0, peeking_rule(p0, alpha, max_n), max_n) > 3 * alpha


def test_the_union_bound_holds_by_simulation_just_under_p0():
    """pA just under p0, where the final fixed-n decision is most often wrong: many trials, rate <= alpha."""
    alpha, trials, max_n, batch = 0.05, 4_000, 2_000, 100
    p0 = float(norm.cdf(1.0))
    p_a = p0 - 0.002
    tests = simulate(p_a, p0, alpha=alpha, max_n=max_n, batch=batch, trials=trials, seed=5)
    false = [t for t in tests if t.decision == CERTIFIED]
    assert len(false) <= binom.ppf(0.999, trials, alpha)
    # Teeth: most wrong certificates come from the final decision, at about its share alpha_final.
    at_max_n = sum(t.trials == max_n for t in false)
    assert at_max_n > binom.ppf(0.001, trials, 0.5 * alpha * sequential.FINAL_SHARE)
    assert sum(t.p_lower() > p_a for t in tests) <= binom.ppf(0.999, trials, alpha)


def test_a_target_well_inside_the_true_radius_certifies_fast():
    """True radius sigma, target sigma/2: nearly all certify, with a small fraction of max_n."""
    max_n = 10_000
    tests = simulate(float(norm.cdf(1.0)), float(norm.cdf(0.5)), alpha=0.001, max_n=max_n,
                     batch=50, trials=200, seed=2)
    assert sum(t.decision == CERTIFIED for t in tests) >= 196
    assert np.median([t.trials for t in tests]) < max_n / 20


def test_unanimous_votes_stop_after_the_first_batch():
    test = sequential.SequentialTest.at_radius(1.0, 1.0, 0.001, 100_000)
    assert test.update(100, 100) == CERTIFIED and test.trials == 100
    assert test.p_lower() >= test.p0


def test_the_trace_is_the_bound_at_each_look_up_to_the_stop():
    test = sequential.SequentialTest.at_radius(0.25, 0.5, 0.001, 10_000)
    for successes in (40, 45, 48, 50, 50):
        if test.update(successes, 50) != sequential.CONTINUE:
            break
    trace = test.trace()
    assert [n for n, _ in trace] == [50 * (k + 1) for k in range(test.batches)]
    assert trace[-1][1] == test.p_lower() and test.decision == CERTIFIED  # the last point is the stored bound
    assert [p for _, p in trace[:-1]] == [p for _, p in test.trace()[:-1]]  # pure: computed from the looks
    assert all(p < test.p0 for _, p in trace[:-1]) and trace[-1][1] >= test.p0  # it stopped at the first pass


def test_a_long_trace_keeps_its_first_and_last_looks():
    test = sequential.SequentialTest(0.6, 0.001, 100_000)
    while test.update(6, 10) == sequential.CONTINUE and test.batches < 500:
        pass
    thinned = test.trace(points=20)
    assert test.batches == 500 and len(thinned) == 20
    assert thinned[0][0] == 10 and thinned[-1] == [5000, test.p_lower()]
    assert [n for n, _ in thinned] == sorted({n for n, _ in thinned})


def test_a_coin_flip_stops_for_futility_without_a_certificate():
    tests = simulate(0.5, float(norm.cdf(0.5)), alpha=0.001, max_n=100_000, batch=100, trials=50, seed=3)
    assert all(t.decision == FUTILE for t in tests)
    assert max(t.trials for t in tests) <= 2_000  # mirror test: ~ log(1/alpha) / KL(0.5, 0.31) = 170 samples
    assert all(t.p_lower() < t.p0 for t in tests)


def test_a_target_out_of_reach_never_certifies():
    alpha, sigma, max_n = 0.001, 0.5, 10_000
    reach = sequential.max_sequential_radius(max_n, alpha, sigma)
    assert 0 < reach < bounds.max_radius(max_n, alpha, sigma)
    above = sequential.SequentialTest.at_radius(reach * 1.001, sigma, alpha, max_n)
    assert above.decision == FUTILE and above.update(100, 100) == FUTILE and above.trials == 0
    # Just below the reach: every sample for cA certifies, and only at max_n.
    below = sequential.decide([(1_000, 1_000)] * 10, p0=float(norm.cdf(reach * 0.9999 / sigma)),
                              alpha=alpha, max_n=max_n)
    assert below.decision == CERTIFIED and below.trials == max_n
    # One failure on the way: out of reach, stopped as soon as it is (curtailment).
    one_miss = sequential.decide([(999, 1_000)] + [(1_000, 1_000)] * 9,
                                 p0=float(norm.cdf(reach * 0.9999 / sigma)), alpha=alpha, max_n=max_n)
    assert one_miss.decision == FUTILE and one_miss.trials == 1_000


def test_at_max_n_the_final_fixed_n_decision_certifies_what_the_anytime_test_cannot():
    # 880 of 1000 at p0 = Phi(1) = 0.841: the anytime test alone (at alpha or at alpha_seq) leaves it
    # uncertified at max_n; Clopper-Pearson at alpha_final on the 1000 samples clears p0.
    p0, alpha = float(norm.cdf(1.0)), 0.001
    batches = [(88, 100)] * 10
    test = sequential.decide(batches, p0=p0, alpha=alpha, max_n=1_000)
    final = smoothing.lower_confidence_bound(880, 1_000, alpha * sequential.FINAL_SHARE)
    assert final > p0 and test.decision == CERTIFIED and test.trials == 1_000 and test.batches == 10
    assert test.p_lower() == final  # the sequence's own bound is lower
    assert test.p_lower() > sequential.lower_bound(880, 1_000, test.alpha_seq)
    for anytime in (sequential.decide(batches, p0=p0, alpha=alpha, max_n=1_000, final_share=0.0),
                    sequential.decide(batches, p0=p0, alpha=test.alpha_seq, max_n=1_000, final_share=0.0)):
        assert anytime.decision == FUTILE and anytime.trials == 1_000 and anytime.p_lower() < p0
    # The decision is only at max_n: the same votes in a longer stream are not certified at 1000.
    longer = sequential.decide(batches, p0=p0, alpha=alpha, max_n=2_000)
    assert longer.decision == CONTINUE and longer.trials == 1_000
    # And as a certificate: radius sigma * Phi^-1(p_lower) >= r.
    cert = sequential.to_certificate(test, [0, 100], [120, 880], n0=100, sigma=0.25, radius=0.25)
    assert cert.prediction == 1 and cert.p_lower == final
    assert cert.radius == pytest.approx(smoothing.radius(final, 0.25)) and cert.radius >= 0.25


def test_curtailment_waits_while_only_the_final_decision_can_still_certify():
    """A target beyond the sequence's reach but within the final test's is not stopped as futile."""
    alpha, sigma, max_n = 0.001, 0.5, 10_000
    test = sequential.SequentialTest(0.5, alpha, max_n)
    sequence_reach = smoothing.radius(sequential.lower_bound(max_n, max_n, test.alpha_seq), sigma)
    final_reach = bounds.max_radius(max_n, test.alpha_final, sigma)
    assert sequence_reach < final_reach
    assert sequential.max_sequential_radius(max_n, alpha, sigma) == pytest.approx(final_reach, rel=1e-9)
    assert sequential.max_sequential_radius(max_n, alpha, sigma, final_share=0.0) == \
        smoothing.radius(sequential.lower_bound(max_n, max_n, alpha), sigma)
    p0 = float(norm.cdf(0.5 * (sequence_reach + final_reach) / sigma))
    assert sequential.SequentialTest(p0, alpha, max_n, final_share=0.0).decision == FUTILE  # pure anytime: hopeless
    waiting = sequential.decide([(1_000, 1_000)] * 9, p0=p0, alpha=alpha, max_n=max_n)
    assert waiting.decision == CONTINUE and waiting.trials == 9_000
    assert waiting.update(1_000, 1_000) == CERTIFIED and waiting.p_lower() >= p0
    # A few failures put it out of the final test's reach too: stopped at once.
    missed = sequential.decide([(990, 1_000)] + [(1_000, 1_000)] * 9, p0=p0, alpha=alpha, max_n=max_n)
    assert missed.decision == FUTILE and missed.trials == 1_000


def test_decide_reads_batches_in_order_and_ignores_those_after_the_decision():
    p0, alpha, max_n = float(norm.cdf(1.0)), 0.001, 10_000
    batches = [(90, 100), (95, 100), (99, 100), (100, 100), (0, 100), (0, 100)]
    first = sequential.decide(batches, p0=p0, alpha=alpha, max_n=max_n)
    again = sequential.decide(batches, p0=p0, alpha=alpha, max_n=max_n)
    by_hand = sequential.SequentialTest(p0, alpha, max_n)
    decisions = [by_hand.update(*b) for b in batches]
    assert first.decision == again.decision == by_hand.decision == CERTIFIED
    assert first.trials == by_hand.trials == 100 * first.batches and first.batches < 5
    assert decisions[: first.batches - 1] == [CONTINUE] * (first.batches - 1)
    assert first.p_lower() == again.p_lower() == by_hand.p_lower()
    # Order matters: the same batches in another order are another stream.
    assert sequential.decide(batches[::-1], p0=p0, alpha=alpha, max_n=max_n).decision == FUTILE


def test_bad_batches_are_refused():
    test = sequential.SequentialTest(0.6, 0.001, max_n=1_050)
    with pytest.raises(InvalidArgument, match="successes"):
        test.update(101, 100)
    with pytest.raises(InvalidArgument, match="trials"):
        test.update(0, 0)
    assert test.update(650, 1_000) == CONTINUE
    with pytest.raises(InvalidArgument, match="max_n"):
        test.update(100, 100)


def test_fixed_n_limits():
    # Cohen et al.'s setting: 100,000 unanimous votes at alpha = 0.001 give 3.81 sigma.
    assert bounds.max_radius(100_000, 0.001, 1.0) == pytest.approx(3.81, abs=0.005)
    for n in (10, 1_000, 123_457):
        p_lower = smoothing.lower_confidence_bound(n, n, 0.001)
        assert bounds.max_radius(n, 0.001, 0.5) == pytest.approx(smoothing.radius(p_lower, 0.5), rel=1e-9)
    assert bounds.max_radius(9, 0.001, 1.0) == 0.0  # 0.001 ** (1/9) < 1/2
    assert bounds.min_n(0.001) == 10 and bounds.min_n(0.25) == 3  # 0.25 ** (1/2) = 1/2 is not > 1/2
    for radius, sigma in ((0.5, 0.25), (1.0, 1.0), (0.01, 0.12)):
        n = bounds.min_n(0.001, radius, sigma)
        assert bounds.max_radius(n, 0.001, sigma) > radius >= bounds.max_radius(n - 1, 0.001, sigma)


@pytest.mark.parametrize("kwargs, message", [
    (dict(radius=0.0), "radius"), (dict(radius=-1.0), "radius"), (dict(radius=float("inf")), "radius"),
    (dict(radius=float("nan")), "radius"), (dict(max_n=0), "max_n"), (dict(max_n=100.0), "max_n"),
    (dict(n0=0), "n0"), (dict(alpha=0.0), "alpha"), (dict(alpha=1.0), "alpha"), (dict(sigma=0.0), "sigma"),
    (dict(batch_size=0), "batch size"),
])
def test_bad_parameters_raise_named_error(halfspace, kwargs, message):
    args = dict(sigma=0.25, radius=0.1, n0=10, max_n=1_000, alpha=0.001, batch_size=100, seed=0) | kwargs
    with pytest.raises(InvalidArgument, match=message):
        smoothing.certify_radius(halfspace, torch.zeros(1, 4, 4), **args)


# ------------------------------------------------------------------------------------------------
# certify_radius with a real torch model
# ------------------------------------------------------------------------------------------------

def test_no_wrong_certificate_on_the_halfspace(halfspace):
    """Certified images are truly robust within the certified radius; targets beyond the truth fail."""
    sigma, alpha = 0.5, 0.001
    for i, distance in enumerate((0.3, 0.6, -0.4)):
        x = point_at(halfspace, distance)
        truth = halfspace.distance(x)
        for target in (0.5 * truth, 0.9 * truth, 1.1 * truth):
            for seed in range(3):
                cert = smoothing.certify_radius(halfspace, x, sigma=sigma, radius=target, n0=100,
                                                 max_n=20_000, alpha=alpha, batch_size=1_000,
                                                 seed=seed, image=i)
                if cert.prediction != smoothing.ABSTAIN:
                    assert cert.prediction == int(distance > 0)
                    assert target <= cert.radius <= truth
                else:
                    assert cert.radius == 0.0
                assert cert.n <= 20_000 and cert.n0 == 100 and not math.isnan(cert.p_lower)
                assert int(cert.counts_estimation.sum()) == cert.n
                if target > truth:
                    assert cert.abstained


def test_a_clear_image_certifies_with_few_samples(halfspace):
    x = point_at(halfspace, 1.0)
    cert = smoothing.certify_radius(halfspace, x, sigma=0.25, radius=0.25, n0=100, max_n=100_000,
                                     alpha=0.001, batch_size=200, seed=0)
    assert cert.prediction == 1 and cert.radius >= 0.25 and cert.n == 200
    assert cert.p_lower >= norm.cdf(1.0)


def test_same_seed_same_certificate_and_the_noise_of_fixed_n_certify(halfspace):
    x = point_at(halfspace, 0.2)
    args = dict(sigma=0.5, radius=0.1, n0=100, max_n=50_000, alpha=0.001, batch_size=250, seed=4)
    a = smoothing.certify_radius(halfspace, x, **args)
    b = smoothing.certify_radius(halfspace, x, **args)
    assert a.to_dict() == b.to_dict() and a.prediction == 1
    fixed = smoothing.certify(halfspace, x, sigma=0.5, n0=100, n=a.n, alpha=0.001, batch_size=250, seed=4)
    assert np.array_equal(a.counts_selection, fixed.counts_selection)
    assert np.array_equal(a.counts_estimation, fixed.counts_estimation)


def test_nan_logits_never_certify():
    cert = smoothing.certify_radius(NaNModel(), torch.full((1, 4, 4), 0.5), sigma=0.25, radius=0.1, n0=50,
                                     max_n=100_000, alpha=0.001, batch_size=100, seed=0)
    assert cert.abstained and cert.radius == 0.0 and cert.p_lower == 0.0
    assert cert.counts_estimation.sum() == 0 and cert.counts_selection.sum() == 0
    assert 0 < cert.n <= 100  # every sample is a failure: the mirror test stops at the first batch


def test_a_hopeless_target_draws_no_estimation_samples(halfspace):
    x = point_at(halfspace, 5.0)
    sigma, max_n = 0.25, 1_000
    target = 1.01 * sequential.max_sequential_radius(max_n, 0.001, sigma)
    cert = smoothing.certify_radius(halfspace, x, sigma=sigma, radius=target, n0=10, max_n=max_n,
                                     alpha=0.001, batch_size=100, seed=0)
    assert cert.abstained and cert.n == 0 and cert.counts_selection.sum() == 10


def test_a_stream_decides_in_batch_order_whatever_order_batches_come_back_in():
    rng = np.random.default_rng(3)
    batch_size, max_n, p0 = 40, 990, float(norm.cdf(0.5))  # 25 batches, the last one cut to 30 samples
    sizes = [batch_size] * 24 + [30]
    counts = [np.array([size - a, a]) for size, a in zip(sizes, rng.binomial(sizes, 0.8))]
    in_order = sequential.Stream(sequential.SequentialTest(p0, 0.001, max_n), 1, batch_size)
    for batch, votes in enumerate(counts):
        in_order.add(batch, votes)
    assert in_order.decided and 0 < in_order.used < 25  # decided before the end, so later batches were ignored
    for seed in range(5):
        shuffled = sequential.Stream(sequential.SequentialTest(p0, 0.001, max_n), 1, batch_size)
        for batch in np.random.default_rng(seed).permutation(25):
            shuffled.add(int(batch), counts[batch])
        assert (shuffled.test.decision, shuffled.test.trials, shuffled.used) == \
               (in_order.test.decision, in_order.test.trials, in_order.used)
        assert shuffled.counts.tolist() == in_order.counts.tolist() == np.sum(counts[:in_order.used], axis=0).tolist()
        assert not shuffled.held
    assert in_order.span(24) == (960, 30) and in_order.span(3) == (120, 40)
    with pytest.raises(InvalidArgument, match="outside the 25 batches"):
        in_order.add(25, [0, 1])


def test_certify_radius_is_part_of_the_smoothing_contract(halfspace):
    x = point_at(halfspace, 0.3)
    args = dict(sigma=0.25, radius=0.1, n0=50, max_n=2_000, alpha=0.001, batch_size=100, seed=1, image=2)
    cert = smoothing.certify_radius(halfspace, x, **args)
    assert cert.to_dict() == smoothing.certify_radius(halfspace, x, **args).to_dict() and cert.prediction == 1
