"""Diffusion denoisers (dsq.diffusion): the one-shot step against closed forms, the learned-variance layout, no
second noise, determinism, shard-invariance, diffusers folders, and a DDPM dsq trains."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from torch import nn

from dsq import diffusion, sampling
from dsq.errors import CheckpointError, InvalidArgument

SCHEDULE = diffusion.schedule_alphas(diffusion.STANDARD_SCHEDULE)


class GaussianPosterior(nn.Module):
    """The exact ε-prediction E[ε | x_t] for data x0 ~ N(mean, s² I) in [-1, 1] under the schedule ``alphas``.

    With x_t = sqrt(a) x0 + sqrt(1 - a) ε: E[ε | x_t] = sqrt(1 - a) (x_t - sqrt(a) mean) / (a s² + 1 - a).
    ``learned_variance`` appends C channels of junk, as a model that learns its variance does.
    """

    def __init__(self, alphas, mean: float, s: float, learned_variance: bool = False):
        super().__init__()
        self.alphas = torch.tensor(alphas, dtype=torch.float64)
        self.mean, self.s, self.learned_variance = mean, s, learned_variance
        self.seen = []

    def forward(self, x_t, t):
        self.seen.append((x_t.clone(), t.clone()))
        a = self.alphas[t].view(-1, 1, 1, 1).to(x_t.dtype)
        eps = (1 - a).sqrt() * (x_t - a.sqrt() * self.mean) / (a * self.s ** 2 + 1 - a)
        return torch.cat([eps, torch.full_like(eps, 1e6)], 1) if self.learned_variance else eps


def posterior_mean_image(y, alphas, t, mean, s):
    """What the one-shot denoiser must return for the Gaussian data above, computed in float64 from the paper's
    formulas: x_t = sqrt(a)(2y - 1), E[x0 | x_t] = mean + sqrt(a) s² (x_t - sqrt(a) mean) / (a s² + 1 - a)."""
    a = float(alphas[t])
    x_t = math.sqrt(a) * (2 * y.double() - 1)
    x0 = mean + math.sqrt(a) * s ** 2 * (x_t - math.sqrt(a) * mean) / (a * s ** 2 + 1 - a)
    return (x0.clamp(-1, 1) + 1) / 2


# -- t* --------------------------------------------------------------------------------------------


def test_timestep_is_the_first_whose_noise_level_reaches_two_sigma():
    # noise levels sqrt((1 - a) / a) of 0.1, 0.2, ..., 1.0 exactly: a = 1 / (1 + level²)
    levels = np.arange(1, 11) / 10
    alphas = 1 / (1 + levels ** 2)
    for sigma, expected in [(0.05, 0), (0.1, 1), (0.1001, 2), (0.25, 4), (0.5, 9)]:
        for given in (alphas, list(alphas), torch.tensor(alphas)):
            assert diffusion.timestep_for_sigma(given, sigma) == expected
    with pytest.raises(InvalidArgument, match=r"cannot denoise σ = 0.6: .* serves σ ≤ 0.5"):
        diffusion.timestep_for_sigma(alphas, 0.6)
    for bad in (0, -0.1, float("nan"), float("inf")):
        with pytest.raises(InvalidArgument):
            diffusion.timestep_for_sigma(alphas, bad)


def test_the_standard_schedule_gives_the_published_timesteps():
    t = diffusion.timestep_for_sigma(SCHEDULE, 0.25)
    assert t == 145 and round(float(SCHEDULE[t]), 3) == 0.798  # the example of Carlini et al.'s setup
    levels = np.sqrt((1 - SCHEDULE) / SCHEDULE)
    for sigma in (0.12, 0.25, 0.5, 1.0):
        t = diffusion.timestep_for_sigma(SCHEDULE, sigma)
        assert levels[t] >= 2 * sigma > levels[t - 1]
    assert diffusion.largest_sigma(SCHEDULE) == pytest.approx(levels[-1] / 2)


# -- the one-shot step ------------------------------------------------------------------------------


@pytest.mark.parametrize("sigma", [0.12, 0.25, 0.5, 1.0])
def test_one_shot_step_is_the_exact_posterior_mean_for_gaussian_data(sigma):
    mean, s = 0.3, 0.4
    denoiser = diffusion.OneShotDenoiser(GaussianPosterior(SCHEDULE, mean, s), SCHEDULE, sigma)
    y = torch.rand(3, 2, 5, 4, generator=torch.Generator().manual_seed(0), dtype=torch.float64) * 1.4 - 0.2
    expected = posterior_mean_image(y, SCHEDULE, diffusion.timestep_for_sigma(SCHEDULE, sigma), mean, s)
    assert torch.allclose(denoiser(y), expected, atol=1e-12)
    assert denoiser(y).min() >= 0 and denoiser(y).max() <= 1


def test_point_data_is_recovered_whatever_the_noise():
    # Data that is one image x*: the optimal ε-model returns (x_t - sqrt(a) x0*) / sqrt(1 - a), so x̂0 = x0*.
    target = torch.rand(1, 1, 4, 4, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    alphas = torch.tensor(SCHEDULE)

    def eps(x_t, t):
        a = alphas[t].view(-1, 1, 1, 1)
        return (x_t - a.sqrt() * (2 * target - 1)) / (1 - a).sqrt()

    model = type("PointData", (nn.Module,), {"forward": lambda self, x_t, t: eps(x_t, t)})()
    denoiser = diffusion.OneShotDenoiser(model, SCHEDULE, 0.5)
    noisy = target + 0.5 * torch.randn(6, 1, 4, 4, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    assert torch.allclose(denoiser(noisy), target.expand(6, -1, -1, -1), atol=1e-9)


def test_a_learned_variance_model_uses_its_first_channels():
    y = torch.rand(2, 3, 4, 4, dtype=torch.float64)
    plain = diffusion.OneShotDenoiser(GaussianPosterior(SCHEDULE, 0.0, 0.5), SCHEDULE, 0.25)
    learned = diffusion.OneShotDenoiser(GaussianPosterior(SCHEDULE, 0.0, 0.5, learned_variance=True), SCHEDULE, 0.25)
    assert torch.equal(plain(y), learned(y))
    odd = diffusion.OneShotDenoiser(lambda_model(lambda x, t: torch.zeros(len(x), 5, 4, 4)), SCHEDULE, 0.25)
    with pytest.raises(InvalidArgument, match="returns 5 channels for 3-channel images"):
        odd(y)


def lambda_model(function):
    return type("Model", (nn.Module,), {"forward": lambda self, x, t: function(x, t)})()


def test_no_second_noise_and_the_step_is_deterministic():
    model = GaussianPosterior(SCHEDULE, 0.1, 0.3)
    denoiser = diffusion.OneShotDenoiser(model, SCHEDULE, 0.25)
    y = torch.rand(4, 1, 3, 3, dtype=torch.float64)
    torch.manual_seed(0)
    first = denoiser(y)
    torch.manual_seed(123)
    assert torch.equal(denoiser(y), first)
    a = float(SCHEDULE[denoiser.timestep])
    for x_t, t in model.seen:  # the model sees the smoothed image scaled, and nothing drawn on top of it
        assert torch.equal(x_t, math.sqrt(a) * (2 * y - 1))
        assert t.dtype == torch.long and t.shape == (4,) and set(t.tolist()) == {denoiser.timestep}
    assert denoiser.describe() == f"diffusion denoiser: timestep 145 of 1000 (ᾱ 0.798) for σ 0.25"


def test_v_and_sample_predictions_give_the_same_posterior_mean():
    mean, s, sigma = -0.2, 0.5, 0.5
    gaussian = GaussianPosterior(SCHEDULE, mean, s)
    alphas = torch.tensor(SCHEDULE)

    def v(x_t, t):  # v = sqrt(a) ε - sqrt(1 - a) x0, with the exact ε and x0 = (x_t - sqrt(1 - a) ε) / sqrt(a)
        a = alphas[t].view(-1, 1, 1, 1)
        e = gaussian(x_t, t)
        return a.sqrt() * e - (1 - a).sqrt() * (x_t - (1 - a).sqrt() * e) / a.sqrt()

    def x0(x_t, t):
        a = alphas[t].view(-1, 1, 1, 1)
        return (x_t - (1 - a).sqrt() * gaussian(x_t, t)) / a.sqrt()

    y = torch.rand(2, 1, 4, 4, dtype=torch.float64)
    expected = diffusion.OneShotDenoiser(gaussian, SCHEDULE, sigma)(y)
    for kind, function in (("v_prediction", v), ("sample", x0)):
        assert torch.allclose(diffusion.OneShotDenoiser(lambda_model(function), SCHEDULE, sigma, kind)(y), expected,
                              atol=1e-12)
    with pytest.raises(InvalidArgument, match="prediction type must be one of"):
        diffusion.OneShotDenoiser(gaussian, SCHEDULE, sigma, "flow")


def test_bad_schedules_are_refused():
    for bad in ([], [0.5, 1.5], [[0.9]], [0.9, float("nan")], "abc"):
        with pytest.raises(InvalidArgument, match="alphas_cumprod"):
            diffusion.timestep_for_sigma(bad, 0.25)


def test_counts_do_not_depend_on_how_samples_are_split_into_shards():
    unet = diffusion.build_unet(1, sample_size=8, block_out_channels=(16,), layers_per_block=1)
    classifier = nn.Sequential(nn.Flatten(), nn.Linear(64, 4))
    torch.manual_seed(0)
    model = nn.Sequential(diffusion.OneShotDenoiser(unet, SCHEDULE, 0.25), classifier).eval()
    x = torch.rand(1, 8, 8)

    def counts(splits):
        total, start = None, 0
        for count in splits:
            part = sampling.sample_counts(model, x, sigma=0.25, start=start, count=count, batch_size=10, seed=3,
                                          image=0, phase="estimation")
            total = part if total is None else total + part
            start += count
        return total.tolist()

    whole = counts([60])
    assert sum(whole) == 60 and counts([20, 20, 20]) == whole == counts([10, 40, 10])


# -- what a factory may return ---------------------------------------------------------------------


def test_a_factory_may_return_a_pair_or_a_dict():
    eps = GaussianPosterior(SCHEDULE, 0.0, 0.5)
    pair = diffusion.as_diffusion((eps, SCHEDULE))
    table = diffusion.as_diffusion({"eps_model": eps, "alphas_cumprod": torch.tensor(SCHEDULE),
                                    "prediction_type": "epsilon", "sample_size": 8})
    assert pair.eps_model is eps and table.sample_size == 8 and diffusion.as_diffusion(eps) is None
    with pytest.raises(InvalidArgument, match="also extra"):
        diffusion.as_diffusion({"eps_model": eps, "alphas_cumprod": SCHEDULE, "extra": 1})
    denoiser = pair.denoiser(0.25)
    assert isinstance(denoiser, diffusion.OneShotDenoiser) and denoiser.timestep == 145


# -- diffusers folders ------------------------------------------------------------------------------


def tiny_pipeline(folder, channels=1, size=8, prediction_type="epsilon", learned=False):
    """A random-weight DDPM in diffusers' own format, as DDPMPipeline.save_pretrained writes it."""
    from diffusers import DDPMPipeline, DDPMScheduler, UNet2DModel

    torch.manual_seed(0)
    unet = UNet2DModel(sample_size=size, in_channels=channels, out_channels=channels * (2 if learned else 1),
                       block_out_channels=(16,), layers_per_block=1, down_block_types=("DownBlock2D",),
                       up_block_types=("UpBlock2D",), norm_num_groups=8)
    scheduler = DDPMScheduler(num_train_timesteps=1000, beta_schedule="linear", prediction_type=prediction_type,
                              variance_type="learned_range" if learned else "fixed_small")
    DDPMPipeline(unet=unet, scheduler=scheduler).save_pretrained(folder)
    return unet.eval()


def test_a_diffusers_pipeline_folder_round_trips(tmp_path):
    unet = tiny_pipeline(tmp_path / "ddpm")
    loaded = diffusion.load_diffusers(str(tmp_path / "ddpm"))
    assert (loaded.channels, loaded.sample_size, loaded.prediction_type) == (1, 8, "epsilon")
    assert np.allclose(loaded.alphas_cumprod, SCHEDULE, atol=1e-6)  # diffusers' linear schedule is the standard one
    x_t, t = torch.randn(3, 1, 8, 8), torch.tensor([0, 145, 999])
    with torch.inference_mode():
        assert torch.equal(loaded.eps_model(x_t, t), unet(x_t, t).sample)
    assert (tmp_path / "ddpm" / "unet" / "diffusion_pytorch_model.safetensors").is_file()


def test_a_unet_folder_with_its_scheduler_beside_it_and_bin_weights_load(tmp_path):
    unet = tiny_pipeline(tmp_path / "ddpm")
    folder = tmp_path / "ddpm" / "unet"  # scheduler in ../scheduler
    assert torch.equal(diffusion.load_diffusers(str(folder)).eps_model(torch.ones(1, 1, 8, 8), torch.tensor([5])),
                       unet(torch.ones(1, 1, 8, 8), torch.tensor([5])).sample.detach())
    alone = tmp_path / "alone"
    alone.mkdir()
    (alone / "config.json").write_text((folder / "config.json").read_text())
    (alone / "scheduler_config.json").write_text((tmp_path / "ddpm" / "scheduler" / "scheduler_config.json")
                                                 .read_text())
    torch.save(unet.state_dict(), alone / "diffusion_pytorch_model.bin")
    assert torch.equal(diffusion.load_diffusers(str(alone)).eps_model(torch.ones(1, 1, 8, 8), torch.tensor([5])),
                       unet(torch.ones(1, 1, 8, 8), torch.tensor([5])).sample.detach())


def test_pickled_objects_in_bin_weights_are_never_run(tmp_path):
    tiny_pipeline(tmp_path / "ddpm")
    folder = tmp_path / "ddpm" / "unet"
    (folder / "diffusion_pytorch_model.safetensors").unlink()
    torch.save({"evil": Exploit()}, folder / "diffusion_pytorch_model.bin")
    with pytest.raises(CheckpointError, match="not a readable weights file"):
        diffusion.load_diffusers(str(tmp_path / "ddpm"))
    assert not (tmp_path / "pwned").exists()


class Exploit:
    def __reduce__(self):
        import os

        return (os.system, ("touch pwned",))


def test_learned_variance_and_v_prediction_folders(tmp_path):
    tiny_pipeline(tmp_path / "v", prediction_type="v_prediction")
    assert diffusion.load_diffusers(str(tmp_path / "v")).prediction_type == "v_prediction"
    tiny_pipeline(tmp_path / "learned", learned=True)
    model = diffusion.load_diffusers(str(tmp_path / "learned"))
    assert model.denoiser(0.25)(torch.rand(2, 1, 8, 8)).shape == (2, 1, 8, 8)


@pytest.mark.parametrize("breakage, message", [
    ("empty", "is not a diffusers model: it has neither model_index.json"),
    ("no scheduler", "no scheduler config"),
    ("no weights", "has no weights"),
    ("wrong weights", "the weights do not fit the UNet"),
    ("conditional", "the UNet is a UNet2DConditionModel"),
    ("prediction", "prediction type 'flow' is not one dsq denoises with"),
])
def test_broken_folders_are_one_line(tmp_path, breakage, message):
    folder = tmp_path / "ddpm"
    tiny_pipeline(folder)
    if breakage == "empty":
        folder = tmp_path / "empty"
        folder.mkdir()
    elif breakage == "no scheduler":
        (folder / "scheduler" / "scheduler_config.json").unlink()
    elif breakage == "no weights":
        (folder / "unet" / "diffusion_pytorch_model.safetensors").unlink()
    elif breakage == "wrong weights":
        from safetensors.torch import save_file

        save_file({"conv_in.weight": torch.zeros(3, 3)}, str(folder / "unet" / "diffusion_pytorch_model.safetensors"))
    else:
        path = folder / ("unet/config.json" if breakage == "conditional" else "scheduler/scheduler_config.json")
        config = json.loads(path.read_text())
        config.update({"_class_name": "UNet2DConditionModel"} if breakage == "conditional"
                      else {"prediction_type": "flow"})
        path.write_text(json.dumps(config))
    with pytest.raises((CheckpointError, InvalidArgument), match=message) as error:
        diffusion.load_diffusers(str(folder))
    assert "\n" not in str(error.value)


# -- a user's factory and the presets ----------------------------------------------------------------


def test_a_factory_that_returns_a_diffusion_model_loads_as_the_one_shot_denoiser(tmp_path):
    from dsq import references, usermodels

    (tmp_path / "my_ddpm.py").write_text(
        "import torch\n"
        "from dsq import diffusion\n"
        "def make(width=8):\n"
        "    torch.manual_seed(0)\n"
        "    eps = diffusion.build_unet(1, sample_size=8, block_out_channels=(width,), layers_per_block=1,\n"
        "                               norm_num_groups=4)\n"
        "    return eps, diffusion.schedule_alphas(diffusion.STANDARD_SCHEDULE)\n")
    source = {"reference": "my_ddpm:make", "location": None, "sha256": None,
              "options": usermodels.check_options("my_ddpm:make", {"code": str(tmp_path)}, "denoiser"),
              "sigma": 0.5}
    denoiser = references.load_source(None, source, "denoiser")
    assert isinstance(denoiser, diffusion.OneShotDenoiser) and denoiser.timestep == 259
    assert not any(p.requires_grad for p in denoiser.parameters())
    with pytest.raises(InvalidArgument, match="is a diffusion model: it serves as the denoiser"):
        references.load_source(None, {**source, "sigma": None}, "denoiser")


@pytest.mark.parametrize("preset, images, n", [("cifar10-diffusion", 10_000, 100_000),
                                               ("imagenet-diffusion", 1_000, 10_000)])
def test_the_diffusion_presets_dry_run(preset, images, n):
    from typer.testing import CliRunner

    from cli.main import app

    result = CliRunner().invoke(app, ["submit", "experiment", f"experiments/{preset}.toml", "--dry-run"],
                                env={"DSQ_DATA": "/nonexistent"})
    assert result.exit_code == 0, result.output
    lines = result.output.splitlines()
    for sigma in ("0.25", "0.5", "1"):
        assert any(f"sigma {sigma}, {images} images x {100 + n:,}" in line for line in lines), lines
    assert "3 jobs (0 train, 3 certify)" in result.output and "dry run: nothing submitted" in result.output
    assert "(submitting this plan would be refused)" in result.output  # no data here: said at once
