"""The class order of a folder dataset: pinned at submit, logged, shown, and set with --classes for a model trained
with another order; a --classes list that does not name the folder's classes exactly is one line, exit 2."""

from __future__ import annotations

import pytest
from PIL import Image
from typer.testing import CliRunner

from cli.main import app
from dsq import datasets
from dsq.db import repo
from dsq.db.session import open_database, session_scope

pytestmark = pytest.mark.db  # submits through the CLI into a SQLite file
COLOURS = {"cat": (200, 40, 40), "dog": (40, 200, 40), "fox": (40, 40, 200)}


@pytest.fixture
def pets(tmp_path):
    for split in ("train", "test"):
        for name, colour in COLOURS.items():
            (tmp_path / "pets" / split / name).mkdir(parents=True)
            Image.new("RGB", (8, 8), colour).save(tmp_path / "pets" / split / name / "a.png")
    return f"folder:{tmp_path / 'pets'}"


def dsq(tmp_path, *args):
    return CliRunner().invoke(app, ["--db", f"sqlite:///{tmp_path / 'dsq.db'}", *map(str, args)],
                              env={"DSQ_HOME": str(tmp_path), "DSQ_WORKER_AUTOSTART": "0", "RAY_ADDRESS": ""})


def jobs_in(tmp_path):
    engine = open_database(f"sqlite:///{tmp_path / 'dsq.db'}")
    with session_scope(engine) as session:
        found = {job.id: (job.spec, [line.message for line in repo.logs_for_job(session, job.id)])
                 for job in repo.list_jobs(session, limit=None)}
    engine.dispose()
    return found


TRAIN = ["submit", "train", "--target", "classifier", "--arch", "small_cnn", "--objective", "standard", "--sigma", "0"]
CERTIFY = ["submit", "certify", "--classifier", "job:1", "--sigma", "0.25", "--n0", "10", "--n", "100"]


def test_the_class_order_is_pinned_logged_shown_and_set_by_classes(tmp_path, pets):
    assert dsq(tmp_path, *TRAIN, "--dataset", pets).exit_code == 0
    out = dsq(tmp_path, *CERTIFY, "--dataset", pets, "--classes", "fox, dog,cat")
    assert out.exit_code == 0, out.output
    (train, train_log), (certify, certify_log) = jobs_in(tmp_path)[1], jobs_in(tmp_path)[2]
    assert train["classes"] == ["cat", "dog", "fox"] and certify["classes"] == ["fox", "dog", "cat"]
    assert f"class order of {pets}: 0 cat, 1 dog, 2 fox" in train_log
    assert f"class order of {pets}: 0 fox, 1 dog, 2 cat" in certify_log
    assert "class order: 0 fox, 1 dog, 2 cat" in dsq(tmp_path, "show", 2).output
    test_set = datasets.get_dataset(pets, "test", classes=tuple(certify["classes"]))  # as the job's loop reads it
    assert [label for _, label in test_set] == [2, 1, 0]  # files in folder order cat, dog, fox


@pytest.mark.parametrize("classes, expected", [
    ("cat,dog", "--classes cat,dog does not name the classes of"),
    ("cat,dog,fox,wolf", "wolf is not one of them"),
    ("cat,dog,cat", "'cat' is listed twice"),
    ("cat,,dog", "--classes must be class names separated by commas"),
])
def test_classes_that_do_not_match_the_folder_are_one_line_exit_2(tmp_path, pets, classes, expected):
    out = dsq(tmp_path, *TRAIN, "--dataset", pets, "--classes", classes)
    assert out.exit_code == 2 and expected in out.stderr, out.output
    assert out.stderr.count("\n") == 1 and "Traceback" not in out.output
    assert not (tmp_path / "dsq.db").exists() or not jobs_in(tmp_path)


def test_classes_need_a_folder_dataset_and_experiments_take_them(tmp_path, pets):
    out = dsq(tmp_path, *TRAIN, "--dataset", "digits", "--classes", "a,b")
    assert out.exit_code == 2 and "--classes applies to folder: datasets" in out.stderr, out.output
    plan = tmp_path / "plan.toml"
    plan.write_text(f'name = "p"\ndataset = "{pets}"\nsigmas = [0.25]\nclasses = ["dog", "fox", "cat"]\n'
                    '[models.f]\ntarget = "classifier"\narch = "small_cnn"\nobjective = "standard"\n'
                    '[certify]\nn0 = 10\nn = 100\n[[methods]]\nlabel = "plain"\nclassifier = "f"\n')
    out = dsq(tmp_path, "submit", "experiment", plan)
    assert out.exit_code == 0, out.output
    assert [spec["classes"] for spec, _ in jobs_in(tmp_path).values()] == [["dog", "fox", "cat"]] * 2
