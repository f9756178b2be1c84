"""Non-finite numbers never certify anything.

A NaN/inf pixel is refused; a sample whose logits are not all finite is drawn but votes for no class
(an abstaining sample, so it can only lower p_lower); a denoiser output that is not finite fails its image
on the API path before any bytes are encoded; a training loss or weights that are not finite stop the job.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from torch import nn
from torch.utils.data import TensorDataset

from dsq import datasets, sampling, smoothing, training
from dsq.apis import base
from dsq.errors import InvalidArgument, NonFiniteOutput, TrainingDiverged
from dsq.kinds.train import TrainSpec

NAN, INF = float("nan"), float("inf")
ARGS = dict(sigma=0.5, n0=50, n=500, alpha=0.001, batch_size=64, seed=0)


class Constant(nn.Module):
    """Logits ``values`` for every input: class 0 wins unless a value says otherwise."""

    def __init__(self, values):
        super().__init__()
        self.values = torch.tensor(values, dtype=torch.float32)

    def forward(self, x):
        return self.values.expand(len(x), -1).clone()


class HalfNaN(nn.Module):
    """Votes for class 0, except on the samples whose noise on pixel 0 is positive (about half of
    them, a function of the sample alone): there all logits are NaN, or (``nan=False``) class 1 wins."""

    def __init__(self, x: torch.Tensor, nan: bool = True):
        super().__init__()
        self.reference, self.nan = float(x.flatten()[0]), nan

    def forward(self, x):
        logits = torch.tensor([[1.0, 0.0]]).expand(len(x), -1).clone()
        other = x.flatten(1)[:, 0] > self.reference
        logits[other] = NAN if self.nan else torch.tensor([0.0, 1.0])
        return logits


# -- images ------------------------------------------------------------------------------


@pytest.mark.parametrize("pixel, count", [(NAN, 1), (INF, 1), (-INF, 1), (NAN, 16)])
def test_non_finite_pixels_are_refused(pixel, count):
    x = torch.full((1, 4, 4), 0.5)
    x.view(-1)[:count] = pixel
    model = Constant([0.0, 1.0])
    message = rf"{count} of 16 pixels .* not finite.* finite, in \[0, 1\]"
    with pytest.raises(InvalidArgument, match=message):
        smoothing.check_image(model, x)
    with pytest.raises(InvalidArgument, match=message):
        smoothing.certify(model, x, **ARGS)
    with pytest.raises(InvalidArgument, match=message):
        smoothing.predict(model, x, sigma=0.5, n=100, alpha=0.001, batch_size=64, seed=0)


# -- logits ------------------------------------------------------------------------------


@pytest.mark.parametrize("values", [[NAN, NAN, NAN], [INF, 0.0, 0.0], [NAN, 5.0, 0.0], [-INF, -INF, -INF]])
def test_a_model_without_finite_logits_abstains(values):
    x = torch.full((1, 4, 4), 0.5)
    cert = smoothing.certify(Constant(values), x, **ARGS)
    assert cert.prediction == smoothing.ABSTAIN and cert.radius == 0.0 and cert.p_lower == 0.0
    assert cert.counts_estimation.sum() == 0 and cert.counts_selection.sum() == 0
    assert (cert.n0, cert.n) == (ARGS["n0"], ARGS["n"])
    assert smoothing.predict(Constant(values), x, sigma=0.5, n=100, alpha=0.001, batch_size=64, seed=0) == -1


def test_one_nan_logit_column_is_never_a_vote_for_the_winner():
    class NaNColumn(nn.Module):  # class 0 would win by far, but its logit is NaN on every sample
        def forward(self, x):
            logits = torch.stack([10 + x.flatten(1).sum(1), x.flatten(1).mean(1), -x.flatten(1).mean(1)], 1)
            logits[:, 0] = NAN
            return logits

    cert = smoothing.certify(NaNColumn(), torch.rand(1, 4, 4), **ARGS)
    assert cert.prediction == smoothing.ABSTAIN and cert.radius == 0.0
    assert cert.counts_estimation[0] == 0 and cert.counts_selection[0] == 0


def test_nan_samples_lower_p_lower_like_failures():
    x = torch.full((1, 4, 4), 0.5)
    nan, failing = (smoothing.certify(HalfNaN(x, nan), x, **ARGS) for nan in (True, False))
    votes = int(failing.counts_estimation[0])
    assert 0.3 * ARGS["n"] < votes < 0.7 * ARGS["n"]  # about half of the samples fail
    assert nan.counts_estimation.tolist() == [votes, 0]  # the NaN samples voted for no class...
    assert nan.n == ARGS["n"]  # ...but were drawn
    as_failures = smoothing.lower_confidence_bound(votes, ARGS["n"], ARGS["alpha"])
    assert nan.p_lower <= as_failures and nan.prediction == smoothing.ABSTAIN
    # From counts: abstaining samples weigh exactly as votes for another class.
    assert smoothing.certify_counts([5, 0], [900, 0], n=1000, alpha=0.001, sigma=0.5).p_lower == \
        smoothing.certify_counts([5, 0], [900, 100], alpha=0.001, sigma=0.5).p_lower


@pytest.mark.parametrize("shards", [1, 3, 7])
def test_shards_of_nan_samples_sum_and_respect_n(shards):
    x = torch.full((1, 4, 4), 0.5)
    model = HalfNaN(x)
    args = dict(sigma=0.5, batch_size=64, seed=3, image=2)
    parts = {}
    for phase, num in ((sampling.SELECTION, 100), (sampling.ESTIMATION, 1_000)):
        plan = sampling.plan_shards(num, 64, shards, phase)
        counts = [sampling.sample_counts(model, x, start=s.start, count=s.count, phase=phase, **args)
                  for s in reversed(plan)]
        parts[phase] = smoothing.sum_counts(counts)
        assert np.array_equal(parts[phase], sampling.sample_phase(model, x, num=num, phase=phase, **args))
        assert 0 < parts[phase].sum() < num
    sharded = smoothing.certify_counts(parts[sampling.SELECTION], parts[sampling.ESTIMATION],
                                       n0=100, n=1_000, alpha=0.001, sigma=0.5)
    whole = smoothing.certify(model, x, n0=100, n=1_000, alpha=0.001, **args)
    assert sharded.to_dict() == whole.to_dict()
    assert (whole.n0, whole.n) == (100, 1_000)
    with pytest.raises(InvalidArgument, match="fewer samples"):
        smoothing.certify_counts([1, 0], [90, 20], n=100, alpha=0.001, sigma=0.5)
    with pytest.raises(InvalidArgument, match="fewer samples"):
        smoothing.certify_counts([5, 1], [90, 0], n0=5, alpha=0.001, sigma=0.5)


# -- the API path: the denoiser's output -------------------------------------------------


class Broken(nn.Module):
    """A denoiser that returns ``value`` on sample ``sample`` of each batch (every sample if None)."""

    def __init__(self, value, sample=None):
        super().__init__()
        self.value, self.sample = value, sample

    def forward(self, batch):
        out = batch.clone()
        if self.sample is None:
            out[:] = self.value
        else:
            out[self.sample, 0, 0, 0] = self.value
        return out


@pytest.mark.parametrize("denoiser", [Broken(NAN), Broken(INF), Broken(-INF, sample=2), Broken(NAN, sample=3)])
def test_a_non_finite_denoiser_output_fails_the_image_before_encoding(denoiser):
    x = torch.full((1, 4, 4), 0.5)
    with pytest.raises(NonFiniteOutput, match=r"denoiser returned NaN or inf .*selection sample"):
        base.image_queries(x, denoiser, sigma=0.5, seed=0, image=0, n0=5, n=5)


def test_encode_png_refuses_non_finite_pixels():
    x = torch.full((1, 4, 4), 0.5)
    x[0, 1, 1] = NAN
    with pytest.raises(InvalidArgument, match="not finite"):
        base.encode_png(x)
    assert base.encode_png(torch.full((1, 4, 4), 2.0)) == base.encode_png(torch.ones(1, 4, 4))  # clamped


# -- training ----------------------------------------------------------------------------


def tiny_spec(**changes) -> TrainSpec:
    fields = dict(dataset="digits", target="classifier", arch="small_cnn", objective="standard", sigma=0.0,
                  arch_kwargs={"width": 4}, epochs=2, batch_size=8)
    return TrainSpec(**{**fields, **changes})


def tiny_data(size: int = 32) -> TensorDataset:
    return TensorDataset(torch.rand(size, 1, 8, 8), torch.arange(size) % 10)


def test_a_nan_loss_stops_training_naming_epoch_and_batch():
    model = nn.Linear(4, 1)
    calls = []

    def loss_fn(x, y, generator):  # finite for 5 batches (one epoch and one batch), then NaN
        calls.append(1)
        loss = model(x.flatten(1)[:, :4]).pow(2).mean()
        return loss * NAN if len(calls) == 6 else loss

    with pytest.raises(TrainingDiverged, match=r"epoch 2, batch 2.*lower learning rate"):
        training.fit(model, loss_fn, tiny_data(), tiny_spec(epochs=3, batch_size=8), "cpu", None)
    assert len(calls) == 6  # stopped at once


def test_weights_that_become_non_finite_stop_training():
    model = nn.Linear(4, 1)

    def loss_fn(x, y, generator):  # a finite loss (0) whose gradient is NaN: sqrt'(0) * 0
        return torch.sqrt((model(x.flatten(1)[:, :4]) * 0).pow(2).sum())

    with pytest.raises(TrainingDiverged, match=r"weights .* not finite after epoch 1.*lower learning rate"):
        training.fit(model, loss_fn, tiny_data(8), tiny_spec(epochs=1), "cpu", None)


def test_a_diverging_training_job_raises_instead_of_returning_a_model():
    info = datasets.dataset_info("digits")
    init = training.build_model(TrainSpec(dataset="digits", target="denoiser", arch="dncnn", objective="mse",
                                          sigma=0.25, arch_kwargs={"depth": 3, "width": 8}), info)
    with torch.no_grad():
        next(init.parameters()).view(-1)[0] = NAN  # a broken MSE denoiser to fine-tune
    classifier = training.build_model(tiny_spec(), info)
    spec = TrainSpec(dataset="digits", target="denoiser", arch="dncnn", objective="stab_mse", sigma=0.25,
                     arch_kwargs={"depth": 3, "width": 8}, classifier="f.pt", init="mse.pt", epochs=1, batch_size=8)
    digits = torch.utils.data.Subset(datasets.get_dataset("digits", "train"), range(16))
    with pytest.raises(TrainingDiverged, match="epoch 1, batch 1"):
        training.train(spec, digits, digits, info, classifiers=[classifier], init=init)
    assert math.isnan(float(next(init.parameters()).detach().view(-1)[0]))  # init itself is left as it was
