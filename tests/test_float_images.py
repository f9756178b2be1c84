"""Float images (a float TIFF) with NaN or inf pixels are refused when they load, never read as 0 or 255; 16-bit
grey images are scaled to 8 bits, not clipped."""

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
    expected = torch.full((1, 8, 8), 128 / 255)  # finite ones load, read in [0, 1] (0.5 and 0.25, to 8 bits)
    expected[0, 3, 4] = 64 / 255
    assert torch.allclose(images[1][0], expected)
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


def test_a_16_bit_image_is_scaled_not_clipped(tmp_path):
    """PIL converts 16-bit grey to 8 bits by clipping at 255: a 16-bit scan would be read as white nearly everywhere.
    Folders and input files read it scaled by 255/65535."""
    levels = np.array([[0, 257, 32896, 65535]], dtype=np.uint16).repeat(4, axis=0)
    for split in ("train", "test"):
        (tmp_path / "scans" / split / "a").mkdir(parents=True)
        Image.fromarray(levels).save(tmp_path / "scans" / split / "a" / "0.png")
    path = tmp_path / "scans" / "test" / "a" / "0.png"
    assert Image.open(path).mode.startswith("I;16")
    expected = torch.tensor([0, 1, 128, 255], dtype=torch.float32).div(255).repeat(4, 1)
    for x in (datasets.get_dataset(f"folder:{tmp_path / 'scans'}", "test")[0][0], base.load_image(str(path))):
        assert torch.allclose(x[0], expected, atol=1e-6), x
    wide = tmp_path / "wide.tiff"
    Image.fromarray(np.full((4, 4), 70000, dtype=np.int32), mode="I").save(wide)
    with pytest.raises(UnreadableImage, match="values from 70000 to 70000"):
        base.load_image(str(wide))


def test_a_float_image_outside_0_1_is_refused(tmp_path):
    bright = tmp_path / "bright.tiff"
    Image.fromarray(np.full((4, 4), 200.0, dtype=np.float32), mode="F").save(bright)
    with pytest.raises(UnreadableImage, match="dsq reads float images in \\[0, 1\\]"):
        base.load_image(str(bright))
