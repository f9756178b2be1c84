"""Float images (a float TIFF) with NaN or inf pixels are refused when they load, never read as 0 or 255."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image
from typer.testing import CliRunner

from cli.main import app
from dsq import datasets
from dsq.apis import base
from dsq.errors import InvalidArgument, UnreadableImage


def float_tiff(path, value: float) -> str:
    pixels = np.full((8, 8), 0.5, dtype=np.float32)
    pixels[3, 4] = value
    Image.fromarray(pixels, mode="F").save(path)
    return str(path)


@pytest.fixture
def folder(tmp_path):
    for split in ("train", "test"):
        for label in ("a", "b"):
            (tmp_path / "data" / split / label).mkdir(parents=True)
            float_tiff(tmp_path / "data" / split / label / "0.tiff", 0.25)
    return tmp_path / "data"


@pytest.mark.parametrize("value", [float("nan"), float("inf"), float("-inf")])
def test_a_non_finite_float_image_is_refused_naming_the_file(folder, value):
    bad = float_tiff(folder / "test" / "a" / "0.tiff", value)
    images = datasets.get_dataset(f"folder:{folder}", "test")
    with pytest.raises(InvalidArgument, match="1 of 64 pixels are not finite") as refused:
        images[0]
    assert bad in str(refused.value)
    assert torch.isfinite(images[1][0]).all()  # finite float images still load
    with pytest.raises(UnreadableImage, match="not finite"):
        base.load_image(bad)


@pytest.mark.db
def test_submit_refuses_a_folder_whose_image_is_not_finite(folder, tmp_path):
    float_tiff(folder / "test" / "a" / "0.tiff", float("nan"))
    model = torch.jit.script(torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(64, 2)))
    model.save(str(tmp_path / "f.pt"))
    result = CliRunner().invoke(app, ["--db", f"sqlite:///{tmp_path / 'dsq.db'}", "submit", "certify", "--dataset",
                                      f"folder:{folder}", "--classifier", str(tmp_path / "f.pt"), "--sigma", "0.25"],
                                env={"DSQ_HOME": str(tmp_path), "DSQ_WORKER_AUTOSTART": "0"})
    assert result.exit_code == 2, result.output
    assert "pixels are not finite" in result.output and "Traceback" not in result.output
