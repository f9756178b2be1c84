"""Image folders end to end: their own size, --size, grayscale images converted for an RGB classifier.

A classifier is trained on a folder of 32x32 RGB PNGs, then certifies that folder at 32x32, a folder of
grayscale PNGs (converted, and the job's log says so) and a folder of mixed sizes (refused without --size).
"""

import json

import numpy as np
import pytest
import torch
from PIL import Image

from dsq import pipeline
from dsq.classifiers import build_classifier
from dsq.db import repo
from dsq.db.session import open_database, session_scope
from dsq.denoisers import build_denoiser
from dsq.errors import InvalidArgument
from tests.test_cli import dsq, home, serving  # noqa: F401 - the same in-process CLI and worker, a home of its own
from dsq.kinds.certify import CertifySpec
from tests.conftest import NARROW

CLASSES = ("cat", "dog", "fox")
TINY = ["--sigma", "0.25", "--n0", "10", "--n", "100", "--batch-size", "50", "--workers", "1"]


def write_folder(folder, sizes, mode="RGB", per_class=2):
    """``per_class`` PNGs per class, each of the next size in ``sizes`` (cycled), one colour per class."""
    rng = np.random.default_rng(0)
    k = 0
    for label, name in enumerate(CLASSES):
        (folder / name).mkdir(parents=True)
        for _ in range(per_class):
            width, height = sizes[k % len(sizes)]
            base = np.zeros((height, width, 3), dtype=np.int64) + 40
            base[..., label] = 200
            pixels = np.clip(base + rng.integers(-30, 30, size=base.shape), 0, 255).astype(np.uint8)
            picture = Image.fromarray(pixels)
            (picture.convert("L") if mode == "L" else picture).save(folder / name / f"{k}.png")
            k += 1


@pytest.fixture(scope="module")
def folders(home):
    data = home / "data"
    write_folder(data / "pets" / "train", [(32, 32)], per_class=4)
    write_folder(data / "pets" / "test", [(32, 32)])
    write_folder(data / "grey", [(32, 32)], mode="L")
    write_folder(data / "mixed", [(32, 32), (40, 24)])
    return data


@pytest.fixture(scope="module")
def trained(dsq, home, folders, ray_session):
    """Job 1: a 3-class RGB classifier trained on the 32x32 folder."""
    with serving(dsq.database, home):
        out = dsq("submit", "train", "--dataset", f"folder:{folders / 'pets'}", "--target", "classifier",
                  *NARROW, "--objective", "standard", "--sigma", "0", "--epochs", "1", "--wait")
    assert out.exit_code == 0, out.output
    return 1


def jobs_in(home):
    engine = open_database(f"sqlite:///{home / 'dsq.db'}")
    with session_scope(engine) as session:
        jobs = repo.list_jobs(session, limit=1000)
    engine.dispose()
    return jobs


def spec_of(home, job_id):
    return next(job.spec for job in jobs_in(home) if job.id == job_id)


def test_a_folder_is_certified_at_its_own_size(dsq, home, folders, trained):
    with serving(dsq.database, home):
        out = dsq("submit", "certify", "--dataset", f"folder:{folders / 'pets'}", "--classifier", "job:1", *TINY,
                  "--max-images", "2", "--wait")
    assert out.exit_code == 0, out.output
    job_id = max(job.id for job in jobs_in(home))
    rows = json.loads(dsq("results", job_id, "--format", "json").output)
    assert [row["image_index"] for row in rows] == [0, 1]
    assert spec_of(home, job_id)["size"] is None and "grayscale" not in dsq("logs", job_id).output


def test_grayscale_images_are_converted_for_an_rgb_classifier_and_the_log_says_so(dsq, home, folders, trained):
    with serving(dsq.database, home):
        out = dsq("submit", "certify", "--dataset", f"folder:{folders / 'grey'}", "--classifier", "job:1", *TINY,
                  "--max-images", "1", "--wait")
    assert out.exit_code == 0, out.output
    job_id = max(job.id for job in jobs_in(home))
    logs = dsq("logs", job_id).output
    assert "are grayscale (1 channel): the model takes 3, so the grey channel is repeated" in logs


def test_images_of_different_sizes_need_a_size(dsq, home, folders, trained):
    before = len(jobs_in(home))
    out = dsq("submit", "certify", "--dataset", f"folder:{folders / 'mixed'}", "--classifier", "job:1", *TINY)
    lines = out.stderr.strip().splitlines()
    assert out.exit_code == 2 and len(lines) == 1, out.output
    assert "differ in size (32x32 and 40x24): pass --size N" in lines[0]
    assert len(jobs_in(home)) == before  # nothing written
    with serving(dsq.database, home):
        out = dsq("submit", "certify", "--dataset", f"folder:{folders / 'mixed'}", "--classifier", "job:1", *TINY,
                  "--size", "16", "--max-images", "1", "--wait")
    assert out.exit_code == 0, out.output
    assert spec_of(home, max(job.id for job in jobs_in(home)))["size"] == 16


@pytest.mark.parametrize("args, expected", [
    (["--dataset", "digits", "--size", "16"], "digits images are always 8x8: --size 16 applies to folder and imagenet"),
    (["--dataset", "digits", "--size", "0"], "size must be an integer >= 1, got 0"),
])
def test_a_size_that_cannot_apply_is_refused(dsq, home, trained, args, expected):
    before = len(jobs_in(home))
    out = dsq("submit", "certify", *args, "--classifier", "job:1", *TINY)
    lines = out.stderr.strip().splitlines()
    assert out.exit_code == 2 and len(lines) == 1 and expected in lines[0], out.output
    assert len(jobs_in(home)) == before


def test_help_says_what_size_defaults_to(dsq):
    for command in ("certify", "train"):
        out = dsq("submit", command, "--help")
        assert out.exit_code == 0 and "--size" in out.output
        assert "own size when all its images share one" in " ".join(out.output.replace("│", " ").split())


# ---------------------------------------------------------------------------------------------- without a queue


def classifier(channels):
    return build_classifier("small_cnn", num_classes=3, in_channels=channels, mean=[0.5] * channels,
                            std=[0.25] * channels)


def test_a_denoiser_and_a_classifier_of_different_channels_are_refused():
    assert pipeline.model_channels(classifier(3)) == 3
    assert pipeline.model_channels(classifier(1), build_denoiser("dncnn", 1, depth=3, width=8)) == 1
    with pytest.raises(InvalidArgument, match="the denoiser takes and returns 1-channel images but the classifier "
                                              "takes 3-channel images: they cannot be chained"):
        pipeline.model_channels(classifier(3), build_denoiser("dncnn", 1, depth=3, width=8))


def test_a_model_that_cannot_take_the_images_is_one_line_naming_them():
    spec = CertifySpec(dataset="folder:/data/pets", classifier="f.pt", sigma=0.25)
    flat = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(3 * 8 * 8, 3))  # takes 3x8x8 only
    with pytest.raises(InvalidArgument) as error:
        pipeline.takes_images([flat], torch.rand(3, 32, 32), spec)
    message = str(error.value)
    assert "\n" not in message and "the model cannot take an image of shape (3, 32, 32)" in message
    assert message.endswith("(the images of folder:/data/pets are 3-channel, 32x32; --size N resizes them)")
    assert pipeline.takes_images([flat], torch.rand(3, 8, 8), spec) == 3
