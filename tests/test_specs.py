"""Job specs: JSON round trip and validation with named errors and useful messages."""

from __future__ import annotations

import dataclasses
import json

import pytest

from dsq import bounds, kinds, specs
from dsq.errors import DsqError, InvalidArgument, UnknownName
from dsq.kinds.certify import CertifySpec
from dsq.kinds.preview import PreviewSpec
from dsq.kinds.train import TrainSpec

CLASSIFIER = dict(dataset="digits", target="classifier", arch="small_cnn", objective="standard", sigma=0.0)
MSE = dict(dataset="digits", target="denoiser", arch="dncnn", objective="mse", sigma=0.25)
STAB = dict(MSE, objective="stab", classifier="job:1")
STAB_MSE = dict(MSE, objective="stab_mse", classifier="job:1", init="job:2")
CERTIFY = dict(dataset="digits", classifier="job:1", denoiser="job:3", sigma=0.25)

SPECS = [
    TrainSpec(**CLASSIFIER, arch_kwargs={"width": 16}, epochs=3, seed=7, name="f"),
    TrainSpec(**dict(CLASSIFIER, objective="gaussian", sigma=0.5), optimizer="sgd", lr=0.1, weight_decay=1e-4),
    TrainSpec(**MSE, arch_kwargs={"depth": 6, "width": 32}, data_root="/data"),
    TrainSpec(**STAB_MSE),
    TrainSpec(**dict(MSE, objective="stab"), surrogates=("job:4", "surrogate.pt")),
    CertifySpec(**CERTIFY, n0=10, n=500, alpha=0.01, batch_size=100, max_images=20, skip=3, workers=2),
    CertifySpec(dataset="cifar10", classifier="f.pt", sigma=1.0, split="train", name="plain"),
    CertifySpec(**CERTIFY, n=10_000, radius=0.25, name="sequential"),
    CertifySpec(**CERTIFY, radius=0.1, max_n=2_000, name="sequential, capped"),
    CertifySpec(dataset="folder:/data/pets", classifier="f.pt", sigma=0.25, size=32, name="resized"),
    CertifySpec(**CERTIFY, previews=0, name="no previews"),
    PreviewSpec(job=4, image=7, of=CertifySpec(**CERTIFY, seed=3).to_dict()),
    TrainSpec(**dict(CLASSIFIER, dataset="folder:/data/pets"), size=64),
]


def error_of(call) -> DsqError:
    """The named dsq error a call raises (fails the test if it raises nothing or something else)."""
    with pytest.raises(DsqError) as caught:
        call()
    return caught.value


# ------------------------------------------------------------------------------ round trip


@pytest.mark.parametrize("spec", SPECS,
                         ids=lambda s: f"{s.kind}-{getattr(s, 'objective', getattr(s, 'sigma', None))}-{s.name}")
def test_round_trip_through_dict_and_json(spec):
    data = spec.to_dict()
    assert kinds.from_dict(data) == spec
    through_json = json.loads(json.dumps(data))
    assert through_json == data  # to_dict is already plain JSON (tuples become lists)
    rebuilt = kinds.from_dict(through_json)
    assert rebuilt == spec and type(rebuilt) is type(spec)
    assert rebuilt.to_dict() == data


def test_to_dict_holds_every_field_and_lists_for_tuples():
    spec = TrainSpec(**dict(MSE, objective="clf"), surrogates=("a.pt", "job:9"))
    data = spec.to_dict()
    assert set(data) == {f.name for f in dataclasses.fields(TrainSpec)}
    assert data["surrogates"] == ["a.pt", "job:9"] and data["kind"] == "train"
    assert TrainSpec(**dict(MSE, objective="clf"), surrogates=["a.pt", "job:9"]).surrogates == ("a.pt", "job:9")


def test_model_references():
    white, black = TrainSpec(**STAB_MSE), SPECS[4]
    assert white.classifiers == ("job:1",) and white.references() == ("job:1", "job:2")
    assert black.classifiers == ("job:4", "surrogate.pt") and black.references() == ("job:4", "surrogate.pt")
    assert TrainSpec(**MSE).references() == ()
    assert CertifySpec(**CERTIFY).references() == ("job:1", "job:3")
    assert specs.is_job_reference("job:12") and not specs.is_job_reference("job:x")
    assert not specs.is_job_reference("/ckpt/job:12.pt")


# ------------------------------------------------------------------------------ sigma


def test_sigma_zero_only_for_standard_classifiers():
    assert TrainSpec(**CLASSIFIER).sigma == 0.0
    for base in (dict(CLASSIFIER, objective="gaussian"), MSE, STAB):
        error = error_of(lambda: TrainSpec(**dict(base, sigma=0.0)))
        assert isinstance(error, InvalidArgument)
        assert "sigma must be > 0 (sigma 0 is only for a 'standard' classifier)" in str(error)
    error = error_of(lambda: CertifySpec(**dict(CERTIFY, sigma=0.0)))
    assert isinstance(error, InvalidArgument) and "sigma must be a finite number > 0, got 0.0" in str(error)


@pytest.mark.parametrize("sigma", [-0.25, float("nan"), float("inf"), "0.25", True, None])
def test_bad_sigma(sigma):
    for make in (lambda: TrainSpec(**dict(MSE, sigma=sigma)), lambda: TrainSpec(**dict(CLASSIFIER, sigma=sigma)),
                 lambda: CertifySpec(**dict(CERTIFY, sigma=sigma))):
        error = error_of(make)
        assert isinstance(error, InvalidArgument) and "sigma" in str(error) and repr(sigma) in str(error)


# ------------------------------------------------------------------------------ certify numbers


@pytest.mark.parametrize("field, value, words", [
    ("n0", 0, "n0 must be an integer >= 1"),
    ("n", 0, "n must be an integer >= 1"),
    ("n", 10.0, "n must be an integer >= 1"),
    ("batch_size", 0, "batch size must be an integer >= 1"),
    ("batch_size", -5, "batch size must be an integer >= 1"),
    ("alpha", 0.0, "alpha must be in (0, 1)"),
    ("alpha", 1.0, "alpha must be in (0, 1)"),
    ("alpha", 1.5, "alpha must be in (0, 1)"),
    ("skip", 0, "skip must be an integer >= 1"),
    ("workers", 0, "workers must be an integer >= 1"),
    ("precision", "fp8", "precision must be one of fp32, bf16, fp16"),
    ("compile", "yes", "compile must be true or false"),
    ("max_images", 0, "max images must be an integer >= 1"),
    ("split", "val", "split must be one of train, test"),
    ("seed", 1.5, "seed must be an integer"),
    ("size", 0, "size must be an integer >= 1"),
    ("size", 32.0, "size must be an integer >= 1"),
    ("size", True, "size must be an integer >= 1"),
    ("previews", -1, "previews must be an integer >= 0"),
    ("previews", 101, "previews must be at most 100"),
])
def test_bad_certify_spec(field, value, words):
    error = error_of(lambda: CertifySpec(**{**CERTIFY, field: value}))
    assert isinstance(error, InvalidArgument)
    assert words in str(error) and repr(value) in str(error)


def test_a_preview_spec_runs_as_its_certify_job_and_waits_for_its_models():
    spec = PreviewSpec(job=4, image=7, of=CertifySpec(**CERTIFY, seed=3).to_dict())
    assert spec.certify == CertifySpec(**CERTIFY, seed=3) and spec.seed == 3
    assert spec.model_roles() == [("job:1", "classifier"), ("job:3", "denoiser")]
    assert CertifySpec(**CERTIFY).previews == 4  # a certify job's first 4 images, unless told
    for changes, words in (({"image": -1}, "image must be an integer >= 0"), ({"job": 0}, "job must be"),
                           ({"of": {**CERTIFY, "sigma": -1}}, "sigma"), ({"of": "job:4"}, "of must be")):
        assert words in str(error_of(lambda: PreviewSpec(**{**spec.to_dict(), **changes})))


# ------------------------------------------------------------------------------ sequential certification


def test_a_target_radius_makes_a_sequential_spec_whose_max_n_defaults_to_n():
    fixed, capped = CertifySpec(**CERTIFY, n=5_000), CertifySpec(**CERTIFY, radius=0.2, max_n=800)
    assert not fixed.sequential and (fixed.radius, fixed.max_n, fixed.most_n) == (None, None, 5_000)
    up_to_n = CertifySpec(**CERTIFY, n=5_000, radius=0.2)
    assert up_to_n.sequential and (up_to_n.max_n, up_to_n.most_n) == (5_000, 5_000)
    assert capped.most_n == 800


def test_specs_stored_before_sequential_certification_load_as_fixed_n():
    old = CertifySpec(**CERTIFY, n=500).to_dict()
    del old["radius"], old["max_n"]
    assert kinds.from_dict(old) == CertifySpec(**CERTIFY, n=500)


def test_specs_stored_before_the_size_option_load_with_none():
    for spec in (CertifySpec(**CERTIFY), TrainSpec(**MSE)):
        old = spec.to_dict()
        del old["size"]
        assert kinds.from_dict(old) == spec and kinds.from_dict(old).size is None


@pytest.mark.parametrize("changes, words", [
    ({"radius": 0.0}, "radius must be a finite number > 0, got 0.0"),
    ({"radius": -1}, "radius must be a finite number > 0, got -1"),
    ({"radius": float("nan")}, "radius must be a finite number > 0, got nan"),
    ({"radius": float("inf")}, "radius must be a finite number > 0, got inf"),
    ({"radius": "0.5"}, "radius must be a finite number > 0, got '0.5'"),
    ({"max_n": 1_000}, "max n (1000) needs a target radius (--radius)"),
    ({"radius": 0.1, "max_n": 50}, "max n must be at least n0 = 100, got 50"),
    ({"radius": 0.1, "max_n": 0}, "max n must be an integer >= 1, got 0"),
    ({"radius": 0.1, "max_n": 1e4}, "max n must be an integer >= 1, got 10000.0"),
    ({"radius": 0.8, "max_n": 10_000}, "radius 0.8 is out of reach: 10000 samples at alpha 0.001 certify at most "
                                       "radius 0.7927 at sigma 0.25 (such a job could only spend samples)"),
])
def test_bad_sequential_spec(changes, words):
    error = error_of(lambda: CertifySpec(**CERTIFY, **changes))
    assert isinstance(error, InvalidArgument) and words in str(error)


def test_reach_says_the_largest_radius_and_refuses_an_n_that_can_never_certify():

    assert specs.reach(CertifySpec(**CERTIFY, n=1_000)) == "n = 1,000 at alpha 0.001 certifies radius 0.6158 at most (2.46 sigma)"
    assert bounds.max_radius(1_000, 0.001, 0.25) == pytest.approx(0.6158, abs=1e-4)
    assert "at most 2,000 estimation samples (they can reach radius 0.6675 at most)" in specs.reach(
        CertifySpec(**CERTIFY, radius=0.1, max_n=2_000))
    error = error_of(lambda: specs.reach(CertifySpec(**CERTIFY, n0=5, n=9)))
    assert isinstance(error, InvalidArgument) and "n = 9 estimation samples can never certify at alpha 0.001" in str(error)
    assert "the smallest n that can is 10" in str(error)
    assert specs.reach(CertifySpec(**CERTIFY, n0=5, n=10)).startswith("n = 10 at alpha 0.001 certifies radius")


@pytest.mark.parametrize("n, max_n, radius, expected", [
    (None, None, None, 100_000), (500, None, None, 500), (None, None, 0.2, 100_000), (500, None, 0.2, 500),
    (None, 700, 0.2, 700), (700, 700, 0.2, 700), (None, 700, None, 100_000)])
def test_given_n_from_the_command_line_options(n, max_n, radius, expected):
    assert specs.given_n(n, max_n, radius, 100_000) == expected


def test_an_explicit_n_that_contradicts_max_n_is_refused():
    error = error_of(lambda: specs.given_n(1_000, 700, 0.2, 100_000))
    assert isinstance(error, InvalidArgument) and "--n 1000 contradicts --max-n 700" in str(error)


# ------------------------------------------------------------------------------ train choices and numbers


@pytest.mark.parametrize("changes, error_type, words", [
    ({"objective": "sharpen"}, UnknownName, "unknown denoiser objective 'sharpen'; expected one of mse, stab"),
    ({"objective": "standard"}, UnknownName, "unknown denoiser objective 'standard'"),
    ({"target": "classifier", "objective": "mse"}, UnknownName, "unknown classifier objective 'mse'"),
    ({"target": "detector"}, InvalidArgument, "target must be one of denoiser, classifier, got 'detector'"),
    ({"optimizer": "lbfgs"}, InvalidArgument, "optimizer must be one of adam, sgd, got 'lbfgs'"),
    ({"epochs": 0}, InvalidArgument, "epochs must be an integer >= 1, got 0"),
    ({"batch_size": 0}, InvalidArgument, "batch_size must be an integer >= 1, got 0"),
    ({"batch_size": 32.0}, InvalidArgument, "batch_size must be an integer >= 1, got 32.0"),
    ({"lr_step": -1}, InvalidArgument, "lr_step must be an integer >= 1"),
    ({"lr": 0.0}, InvalidArgument, "lr must be a finite number > 0, got 0.0"),
    ({"lr": float("nan")}, InvalidArgument, "lr must be a finite number > 0"),
    ({"lr_gamma": 0}, InvalidArgument, "lr_gamma must be a finite number > 0"),
    ({"momentum": 1.0}, InvalidArgument, "momentum must be a finite number in [0, 1)"),
    ({"weight_decay": -1e-4}, InvalidArgument, "weight_decay must be a finite number >= 0"),
    ({"seed": "0"}, InvalidArgument, "seed must be an integer, got '0'"),
    ({"arch_kwargs": [6, 32]}, InvalidArgument, "arch_kwargs must be a dict"),
    ({"surrogates": "f.pt"}, InvalidArgument, "surrogates must be a list of checkpoint paths"),
    ({"kind": "certify"}, InvalidArgument, "kind 'train', got 'certify'"),
    ({"size": -3}, InvalidArgument, "size must be an integer >= 1, got -3"),
])
def test_bad_train_spec(changes, error_type, words):
    error = error_of(lambda: TrainSpec(**{**MSE, **changes}))
    assert type(error) is error_type
    assert words in str(error)
    assert "\n" not in str(error)  # shown as one line by the CLI


def test_classifier_objectives_need_a_classifier():
    for objective in ("stab", "stab_mse", "clf"):
        error = error_of(lambda: TrainSpec(**dict(MSE, objective=objective, init="job:2")))
        assert isinstance(error, InvalidArgument)
        assert f"objective {objective!r} needs --classifier (white-box) or --surrogate (black-box)" in str(error)
    assert TrainSpec(**dict(MSE, objective="clf"), surrogates=["s.pt"]).classifiers == ("s.pt",)


def test_white_box_and_black_box_exclude_each_other():
    for objective in ("stab", "clf", "mse"):
        error = error_of(lambda: TrainSpec(**dict(MSE, objective=objective), classifier="f.pt", surrogates=["s.pt"]))
        assert isinstance(error, InvalidArgument)
        assert "either --classifier (white-box) or --surrogate (black-box), not both" in str(error)


def test_stab_mse_needs_an_init_denoiser():
    error = error_of(lambda: TrainSpec(**dict(STAB_MSE, init=None)))
    assert isinstance(error, InvalidArgument) and "--init" in str(error) and "MSE denoiser" in str(error)
    assert TrainSpec(**STAB_MSE).init == "job:2"


def test_mse_may_name_a_classifier_for_its_metrics():
    spec = TrainSpec(**MSE, classifier="f.pt")
    assert spec.classifiers == ("f.pt",)


# ------------------------------------------------------------------------------ from_dict


def test_from_dict_unknown_kind():
    for data in ({"kind": "deploy", **CERTIFY}, dict(CERTIFY)):
        error = error_of(lambda: kinds.from_dict(data))
        assert isinstance(error, UnknownName)
        assert "unknown job kind" in str(error) and "train, certify" in str(error)


def test_from_dict_unknown_and_missing_fields():
    data = {**TrainSpec(**STAB).to_dict(), "sigmaa": 0.5, "color": "red"}
    error = error_of(lambda: kinds.from_dict(data))
    assert isinstance(error, InvalidArgument) and "unknown field(s) in train spec: color, sigmaa" in str(error)
    data = CertifySpec(**CERTIFY).to_dict()
    del data["classifier"], data["sigma"]
    error = error_of(lambda: kinds.from_dict(data))
    assert isinstance(error, InvalidArgument)
    assert "certify spec lacks required field(s): classifier, sigma" in str(error)
    assert isinstance(error_of(lambda: kinds.from_dict(["train"])), InvalidArgument)


def test_from_dict_revalidates():
    data = {**TrainSpec(**MSE).to_dict(), "sigma": -1.0}
    assert "sigma" in str(error_of(lambda: kinds.from_dict(data)))
    data = {**CertifySpec(**CERTIFY).to_dict(), "alpha": 2.0}
    assert "alpha must be in (0, 1)" in str(error_of(lambda: kinds.from_dict(data)))


def test_specs_are_frozen():
    spec = TrainSpec(**MSE)
    with pytest.raises(dataclasses.FrozenInstanceError):
        spec.sigma = 0.5  # type: ignore[misc]
