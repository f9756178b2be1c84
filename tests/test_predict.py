"""PREDICT as a job (``dsq submit predict``): Cohen et al.'s binomial abstain on a dataset or on image files, for a
white-box model and for a vision API, stored per image and shown by ``dsq results``; and its refusals."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from PIL import Image
from scipy.stats import binomtest
from typer.testing import CliRunner

from cli.main import app
from dsq import bounds, datasets, jobs, pipeline, references, smoothing
from dsq.db import repo
from dsq.db.session import open_database, session_scope
from dsq.errors import InvalidArgument
from dsq.kinds.certify import CertifySpec
from dsq.kinds.certify_api import ApiCertifySpec
from dsq.kinds.train import TrainSpec
from dsq.report import predictions
from dsq.settings import Settings

from .test_apis import FAST
from .test_apis import emulator  # noqa: F401 - fixture shared with test_apis
from .test_jobs import run

runner = CliRunner()


# ------------------------------------------------------------------------------------------------ the test itself


def test_the_binomial_test_matches_its_closed_form():
    for n in (11, 12, 30):  # n of n votes: the two-sided p-value is 2 / 2^n
        prediction, p_value = bounds.prediction_test([0, n, 0], alpha=0.001)
        assert prediction == 1 and math.isclose(p_value, 2 / 2 ** n)
    assert bounds.prediction_test([0, 10, 0], alpha=0.001) == (-1, 2 / 2 ** 10)  # 10 of 10 is not enough at 0.001
    assert bounds.prediction_test([50, 50, 0], alpha=0.5)[0] == -1  # a tie never answers
    assert bounds.prediction_test([], alpha=0.1) == (-1, 1.0)
    counts = [3, 60, 37]  # the runner-up, not all the others, is what the top class is tested against
    assert bounds.prediction_test(counts, alpha=0.05) == (1, pytest.approx(binomtest(60, 97, 0.5).pvalue))


@pytest.mark.parametrize("alpha", [0.5, 0.05, 0.001, 1e-9])
def test_the_smallest_n_that_can_answer(alpha):
    n = bounds.min_predict_n(alpha)
    assert bounds.prediction_test([n], alpha=alpha)[0] == 0
    assert n == 1 or bounds.prediction_test([n - 1], alpha=alpha)[0] == -1


def spec(**overrides) -> CertifySpec:
    fields = dict(dataset="digits", classifier="job:1", sigma=0.25, n0=0, n=200, alpha=0.001, predict=True)
    return CertifySpec(**{**fields, **overrides})


@pytest.mark.parametrize("overrides, message", [
    ({"n0": 100}, "PREDICT draws no selection samples: n0 must be 0"),
    ({"radius": 0.25}, "PREDICT certifies no radius"),
    ({"n": 10}, "n = 10 samples can only abstain at alpha 0.001 (even 10 of 10 votes leave a p-value above "
                "alpha); the smallest n that can answer is 11"),
    ({"predict": "yes"}, "predict must be true or false"),
    ({"inputs": ("a.png",)}, "give either a dataset or a list of input images, not both"),
    ({"dataset": None}, "not both and not neither"),
    ({"dataset": None, "inputs": "a.png"}, "inputs must be a list of image file paths"),
    ({"alpha": 1.5}, "alpha"),
    ({"dataset": None, "inputs": ("a.png",), "predict": False, "n0": 100, "n": 1000},
     "input files have no label, so a certified accuracy of them would mean nothing"),
])
def test_a_predict_spec_refuses(overrides, message):
    with pytest.raises(InvalidArgument, match=None) as refused:
        spec(**overrides)
    assert message in str(refused.value)


def test_a_predict_spec_round_trips_and_says_what_it_answers():
    from dsq import kinds, specs

    one = spec(dataset=None, inputs=("/tmp/a.png", "/tmp/b.png"))
    assert kinds.from_dict(one.to_dict()) == one
    assert "PREDICT: 200 samples per image" in specs.reach(one)
    api = ApiCertifySpec(provider="aws", sigma=0.25, dataset="digits", n0=0, n=50, predict=True, endpoint="embedded")
    assert api.queries_per_image == 51 and kinds.from_dict(api.to_dict()) == api


@pytest.mark.parametrize("args, message", [
    ([], "give --classifier (a white-box model) or --provider (a vision API), one of them"),
    (["--classifier", "job:1", "--provider", "aws"], "one of them"),
    (["--provider", "aws", "--workers", "2"], "--workers applies to a white-box --classifier, not to --provider"),
    (["--classifier", "job:1", "--max-queries", "100"], "--max-queries applies to --provider"),
    (["--classifier", "job:1", "--n", "5"], "the smallest n that can answer is 11"),
])
def test_submit_predict_refuses_in_one_line(args, message, tmp_path):
    out = runner.invoke(app, ["--db", f"sqlite:///{tmp_path / 'never.db'}", "submit", "predict", "--dataset",
                              "digits", "--sigma", "0.25", *args])
    assert out.exit_code == 2, out.output
    assert message in out.output and "Traceback" not in out.output
    assert not (tmp_path / "never.db").exists()


def test_the_answers_add_up_and_unlabelled_images_are_not_scored():
    rows = [dict(image_index=0, label=None, prediction=3, correct=False, n=100, alpha=0.001, sigma=0.25,
                 counts_estimation=[0, 0, 0, 97, 3], extra={"mode": "predict", "p_value": 1e-20}),
            dict(image_index=1, label=None, prediction=-1, correct=False, n=100, alpha=0.001, sigma=0.25,
                 counts_estimation=[50, 50], extra={"mode": "predict", "p_value": 1.0})]
    found = predictions.records(rows, {"inputs": ["/x/a.png", "/x/b.png"], "predict": True})
    assert [f["input"] for f in found] == ["/x/a.png", "/x/b.png"]
    assert [f["correct"] for f in found] == [None, None] and found[1]["answer"] is None
    lines = predictions.summary_lines(found, api=False)
    assert "2 images, n = 100, alpha 0.001, sigma 0.25: 1 answered, 1 abstained (50.0%)" in lines[0]
    assert not any(line.startswith("accuracy") for line in lines)
    assert "2 images have no label (input files)" in lines[1]
    assert predictions.text_rows(found)[1][2] == "abstain"


# ------------------------------------------------------------------------------------------------ jobs on Ray


@pytest.fixture(scope="module")
def world(tmp_path_factory, ray_session):
    """A database with a digits classifier f (job 1), and three digits written as image files."""
    home = tmp_path_factory.mktemp("predict-home")
    config = Settings(database_url=f"sqlite:///{home / 'dsq.db'}", home=home)
    engine = open_database(config.database_url)
    f = run(config, engine, TrainSpec(dataset="digits", target="classifier", arch="small_cnn",
                                      objective="standard", sigma=0.0, epochs=3, batch_size=64, name="f"))
    test = datasets.get_dataset("digits", "test")
    files = []
    for index in range(3):
        x, _ = test[index]
        path = home / f"digit-{index}.png"
        Image.fromarray(np.round(x[0].numpy() * 255).astype(np.uint8), "L").save(path)
        files.append(str(path))
    yield config, engine, f, files
    engine.dispose()


def submit(config, engine, one) -> int:
    with session_scope(engine) as session:
        return jobs.submit(session, one, config).id


def test_a_predict_job_answers_as_predict_does_in_process(world):
    """The job's answers and votes, sharded over 2 sampler actors, are those of ``smoothing.predict`` on the same
    images and seed: the same samples, counted once each."""
    from tests.test_jobs import run_job

    config, engine, f, _ = world
    one = spec(classifier=f"job:{f}", n=120, batch_size=40, max_images=4, seed=3, workers=2)
    job_id = submit(config, engine, one)
    assert run_job(config, job_id) == "succeeded"
    with session_scope(engine) as session:
        rows = repo.results_for_job(session, job_id)
        model = references.load(session, f"job:{f}", config, "classifier")
    test = datasets.get_dataset("digits", "test")
    assert len(rows) == 4
    for row in rows:
        x, label = test[row.image_index]
        expected = smoothing.predict(pipeline.chain(model), x, sigma=0.25, n=120, alpha=0.001, batch_size=40,
                                     seed=3, image=row.image_index)
        assert row.prediction == expected and row.radius == 0.0 and row.n0 == 0 and sum(row.counts_estimation) == 120
        assert row.extra["mode"] == "predict" and row.correct == (expected == int(label))
        assert math.isclose(row.extra["p_value"], bounds.prediction_test(row.counts_estimation, alpha=0.001)[1])
    assert sum(row.prediction >= 0 for row in rows) >= 3  # a trained f on clean-ish digits answers

    shown = runner.invoke(app, ["--db", config.database_url, "results", str(job_id)])
    assert shown.exit_code == 0, shown.output
    assert "PREDICT" in shown.output and "4 images, n = 120" in shown.output and "accuracy" in shown.output
    as_json = runner.invoke(app, ["--db", config.database_url, "results", str(job_id), "--format", "json"])
    assert [item["prediction"] for item in json.loads(as_json.output)] == [
        None if r.prediction < 0 else r.prediction for r in rows]
    as_markdown = runner.invoke(app, ["--db", config.database_url, "results", str(job_id), "--format", "markdown"])
    assert as_markdown.output.startswith("| image | input or label | prediction |"), as_markdown.output
    for refused in (["--radii", "0.5"], ["--by-class"], ["--format", "tsv"]):
        out = runner.invoke(app, ["--db", config.database_url, "results", str(job_id), *refused])
        assert out.exit_code == 2 and "is a PREDICT job" in out.output, out.output
    compared = runner.invoke(app, ["--db", config.database_url, "compare", str(job_id)])
    assert compared.exit_code == 2 and "is a PREDICT job" in compared.output, compared.output


def test_predict_on_image_files_has_no_label_and_refuses_bad_files(world, tmp_path):
    from tests.test_jobs import run_job

    config, engine, f, files = world
    one = spec(classifier=f"job:{f}", dataset=None, inputs=tuple(files), n=100, batch_size=50, seed=1)
    job_id = submit(config, engine, one)
    assert run_job(config, job_id) == "succeeded"
    with session_scope(engine) as session:
        rows = repo.results_for_job(session, job_id)
    assert [r.label for r in rows] == [None, None, None] and all(r.extra["mode"] == "predict" for r in rows)
    test = datasets.get_dataset("digits", "test")
    answered = [(r.prediction, int(test[r.image_index][1])) for r in rows if r.prediction >= 0]
    assert answered and sum(p == label for p, label in answered) >= len(answered) - 1  # the PNGs are the digits
    shown = runner.invoke(app, ["--db", config.database_url, "results", str(job_id)])
    assert shown.exit_code == 0 and "digit-0.png" in shown.output and "have no label" in shown.output, shown.output

    bad = tmp_path / "not-an-image.png"
    bad.write_text("hello")
    big = tmp_path / "big.png"
    Image.new("L", (16, 16)).save(big)
    before = _job_count(engine)
    for inputs, message in (((files[0], str(bad)), "not a readable image"),
                            ((files[0], str(tmp_path / "missing.png")), "file not found"),
                            ((files[0], str(big)), "the input images differ in size")):
        out = runner.invoke(app, ["--db", config.database_url, "submit", "predict", "--classifier", f"job:{f}",
                                  "--sigma", "0.25", *sum((["--input", p] for p in inputs), [])])
        assert out.exit_code == 2 and message in out.output and "Traceback" not in out.output, out.output
    assert _job_count(engine) == before


def _job_count(engine) -> int:
    with session_scope(engine) as session:
        return len(repo.list_jobs(session))


def test_predict_through_a_vision_api_reuses_certifications_answers(world, emulator):
    """An API PREDICT job asks the clean image and n noisy ones: those of certification's estimation phase, so a
    certify-api job of the same images and seed pays for none of them again."""
    from tests.test_jobs import run_job

    config, engine, _, _ = world
    server = emulator("aws")
    common = dict(provider="aws", sigma=0.25, dataset="digits", max_images=2, n=20, endpoint=server.endpoint,
                  seed=4, **FAST)
    job_id = submit(config, engine, ApiCertifySpec(n0=0, predict=True, **common))
    assert run_job(config, job_id) == "succeeded"
    with session_scope(engine) as session:
        rows = repo.results_for_job(session, job_id)
    assert len(rows) == 2 and all(r.extra["mode"] == "predict" and r.n == 20 for r in rows)
    for row in rows:
        answer = None if row.prediction < 0 else row.extra["labels"][row.prediction]
        assert answer == row.extra["certified_label"]
        assert row.correct == (answer == row.extra["clean_label"])
    billed = server.ledger.billed
    assert billed == 2 * 21
    certify_id = submit(config, engine, ApiCertifySpec(n0=5, **common))
    assert run_job(config, certify_id) == "succeeded"
    assert server.ledger.billed - billed == 2 * 5  # only the selection queries are new
    shown = runner.invoke(app, ["--db", config.database_url, "results", str(job_id)])
    assert shown.exit_code == 0 and "agree with the API's answer on the clean image" in shown.output, shown.output


def test_predict_through_the_cli(world, monkeypatch):
    """``dsq submit predict`` on a white-box classifier and an image file: checked, queued, then run."""
    config, engine, f, files = world
    monkeypatch.setenv("DSQ_WORKER_AUTOSTART", "0")
    monkeypatch.setenv("DSQ_HOME", str(config.home))
    out = runner.invoke(app, ["--db", config.database_url, "submit", "predict", "--classifier", f"job:{f}",
                              "--sigma", "0.25", "--input", files[1], "--n", "50"])
    assert out.exit_code == 0, out.output
    assert "PREDICT: 50 samples per image" in out.output
    job_id = int(out.output.split("job ")[-1].split()[0])
    from tests.test_jobs import run_job

    assert run_job(config, job_id) == "succeeded"
    with session_scope(engine) as session:
        assert repo.get_job(session, job_id).spec["predict"] is True


def test_the_loader_converts_channels(tmp_path):
    path = tmp_path / "rgb.png"
    Image.new("RGB", (4, 4), (255, 0, 0)).save(path)
    grey, _ = datasets.InputImages((str(path),), channels=1)[0]
    assert grey.shape == (1, 4, 4) and torch.allclose(grey, torch.full((1, 4, 4), 0.299))
