"""Experiment files: expansion into jobs and dependencies, the shipped presets, bad files, --dry-run."""

from pathlib import Path

import pytest
from typer.testing import CliRunner

from cli.main import app
from dsq import experiments, jobqueue
from dsq.db import repo
from dsq.db.session import open_database, session_scope
from dsq.errors import InvalidArgument
from dsq.kinds.certify import CertifySpec
from dsq.kinds.train import TrainSpec

PRESETS = Path(__file__).resolve().parents[1] / "experiments"
PAPER_METHODS = {"no denoiser", "MSE", "STAB+MSE white-box", "STAB+MSE black-box",
                 "Cohen et al. (Gaussian training)"}


def by_key(plan):
    return {step.key: step for step in plan.steps}


def test_the_digits_preset_is_the_demo_plan():
    plan = experiments.load(PRESETS / "digits.toml")
    steps = by_key(plan)
    assert len(plan.steps) == 23 and plan.name == "digits"
    trains = [s for s in plan.steps if isinstance(s.spec, TrainSpec)]
    assert sorted(s.key for s in trains) == sorted(
        ["f", "surrogate", "ddpm"] + [f"{m}@{s}" for m in ("mse", "stab_white", "stab_black", "cohen")
                                      for s in (0.25, 0.5)])
    assert steps["ddpm"].spec.objective == "diffusion" and steps["ddpm"].spec.sigma == 0.0
    assert [steps[f"diffusion (one-shot)@{s}"].spec.denoiser for s in (0.25, 0.5)] == ["step:ddpm"] * 2
    assert steps["f"].spec.sigma == 0.0 and steps["mse@0.5"].spec.sigma == 0.5
    white = steps["stab_white@0.5"]
    assert white.needs == ["f", "mse@0.5"] and white.spec.classifier == "step:f" and white.spec.init == "step:mse@0.5"
    assert steps["stab_black@0.25"].spec.surrogates == ("step:surrogate",)
    certify = steps["STAB+MSE black-box@0.25"]
    assert certify.spec.denoiser == "step:stab_black@0.25" and certify.spec.n == 1000 and certify.spec.sigma == 0.25
    assert certify.meta == {"method": "STAB+MSE black-box", "sigma": 0.25, "radii": list(plan.radii)}
    assert steps["Cohen et al. (Gaussian training)@0.5"].needs == ["cohen@0.5"]
    order = [s.key for s in plan.steps]
    assert all(order.index(need) < order.index(s.key) for s in plan.steps for need in s.needs)


@pytest.mark.parametrize("name, sigmas, jobs, trains", [("cifar10", (0.12, 0.25, 0.5, 1.0), 38, 18),
                                                        ("imagenet", (0.25, 0.5, 1.0), 24, 9)])
def test_the_paper_presets_expand_to_every_method_and_sigma(name, sigmas, jobs, trains):
    plan = experiments.load(PRESETS / f"{name}.toml")
    certs = [s for s in plan.steps if isinstance(s.spec, CertifySpec)]
    assert len(plan.steps) == jobs and len(plan.steps) - len(certs) == trains
    assert {(s.meta["method"], s.meta["sigma"]) for s in certs} == {(m, s) for m in PAPER_METHODS for s in sigmas}
    assert all(s.spec.n0 == 100 and s.spec.n == 10_000 and s.spec.alpha == 0.001 for s in certs)
    assert all(experiments._images(s.spec) == 500 for s in certs)  # every 20th CIFAR-10 / 100th ImageNet image
    lines = experiments.describe(plan)
    assert lines[-1].startswith(f"{jobs} jobs ({trains} train, {len(certs)} certify); {len(certs) * 500 * 10_100:,}")
    if name == "imagenet":
        cohen = by_key(plan)["Cohen et al. (Gaussian training)@0.5"].spec
        assert cohen.classifier == "checkpoints/cohen-imagenet-resnet50-0.5.pt"


def write(tmp_path, text) -> Path:
    path = tmp_path / "plan.toml"
    path.write_text(text)
    return path


BASE = 'name = "t"\ndataset = "digits"\nsigmas = [0.25]\n[[methods]]\nlabel = "plain"\nclassifier = "f"\n'
MODEL = '[models.f]\ntarget = "classifier"\narch = "small_cnn"\nobjective = "standard"\n'


@pytest.mark.parametrize("text, expected", [
    (BASE + MODEL + "epochz = 3\n", "[models.f]: unknown key 'epochz'"),
    (BASE.replace("sigmas = [0.25]", "sigmas = []") + MODEL, "sigmas must be a non-empty list"),
    (BASE + MODEL + "epochs = -1\n", "[models.f]: epochs must be an integer >= 1"),
    (BASE + MODEL + "classifier = \"g\"\n[models.g]\ntarget = \"classifier\"\narch = \"small_cnn\"\n"
     "objective = \"gaussian\"\nclassifier = \"f\"\n", "uses itself"),
    (BASE.replace('label = "plain"\n', "") + MODEL, "missing key 'label'"),
    (BASE + MODEL + "[certify]\nn = 0\n", "n must be an integer >= 1"),
    (BASE + MODEL + "[certify]\nsigma = 0.5\n", "[certify]: unknown key 'sigma'"),
    ('name = "t"\n', "missing key 'dataset'"),
    (BASE + MODEL + "[[methods]]\nlabel = \"plain\"\nclassifier = \"f\"\n", "two methods are labelled 'plain'"),
    ('name = "x\\u001b[31m"\n' + BASE[10:] + MODEL, "control character"),
    ("not toml [", "not a readable TOML file"),
])
def test_a_bad_file_is_one_line_naming_the_file_and_the_key(tmp_path, text, expected):
    path = write(tmp_path, text)
    with pytest.raises(InvalidArgument) as error:
        experiments.load(path)
    assert str(error.value).startswith(f"{path}: ") and expected in str(error.value)
    assert "\n" not in str(error.value)


def test_a_size_for_the_whole_file_goes_to_every_job(tmp_path):
    plan = experiments.load(write(tmp_path, BASE.replace('dataset = "digits"', 'dataset = "folder:/data/pets"\nsize = 32')
                                  + MODEL))
    assert [step.spec.size for step in plan.steps] == [32, 32]
    (method,) = [step.spec for step in plan.steps if step.spec.kind == "certify"]
    assert method.dataset == "folder:/data/pets"


def dsq(home, *args):
    return CliRunner().invoke(app, ["--db", f"sqlite:///{home / 'dsq.db'}", *map(str, args)],
                              env={"DSQ_HOME": str(home), "RAY_ADDRESS": ""})


def test_dry_run_lists_every_job_and_writes_nothing(tmp_path):
    out = dsq(tmp_path, "submit", "experiment", PRESETS / "cifar10.toml", "--dry-run")
    assert out.exit_code == 0, out.output
    assert "#38  certify  Cohen et al. (Gaussian training) s=1: sigma 1, 500 images" in out.output
    assert "after #1, #7" in out.output and "dry run: nothing submitted" in out.output
    assert not (tmp_path / "dsq.db").exists()
    bad = dsq(tmp_path, "submit", "experiment", write(tmp_path, BASE + MODEL + "epochz = 3\n"))
    assert bad.exit_code == 2 and bad.stderr.count("\n") == 1 and "epochz" in bad.stderr


@pytest.mark.db
def test_an_experiment_is_queued_in_one_transaction_with_its_dependencies(tmp_path):
    plan_path = write(tmp_path, BASE.replace('classifier = "f"', 'classifier = "f"\ndenoiser = "d"') + MODEL
                      + "epochs = 1\n[models.d]\narch = \"dncnn\"\nobjective = \"stab\"\nclassifier = \"f\"\n"
                      "arch_kwargs = { depth = 3, width = 8 }\n")
    home = tmp_path / "home"
    engine = open_database(f"sqlite:///{home / 'dsq.db'}")
    settings = __import__("dsq.settings", fromlist=["Settings"]).Settings(
        database_url=f"sqlite:///{home / 'dsq.db'}", home=home)
    plan = experiments.load(plan_path)
    with session_scope(engine) as session:
        ids = experiments.submit(session, plan, settings, experiment="exp-1", priority=4)
    with session_scope(engine) as session:
        certify = repo.get_job(session, ids["plain@0.25"])
        assert certify.spec["classifier"] == f"job:{ids['f']}" and certify.spec["denoiser"] == f"job:{ids['d@0.25']}"
        assert [d.id for d in jobqueue.dependencies(session, certify.id)] == sorted([ids["f"], ids["d@0.25"]])
        assert {j.experiment for j in repo.list_jobs(session)} == {"exp-1"}
        assert {j.priority for j in repo.list_jobs(session)} == {4}
    broken = write(tmp_path, BASE.replace('classifier = "f"', 'classifier = "missing.pt"') + MODEL)
    before = len(ids)
    out = dsq(home, "submit", "experiment", broken)
    assert out.exit_code == 2 and "checkpoint not found: missing.pt" in out.stderr
    with session_scope(engine) as session:
        assert len(repo.list_jobs(session)) == before  # the model f of that file was not queued either
    engine.dispose()
