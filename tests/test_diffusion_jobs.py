"""Diffusion denoisers in jobs, on a real local Ray and SQLite: a DDPM trained by dsq, a diffusers folder as
``--denoiser``, fixed-n and sequential certification, bf16, 1 or 3 sampler workers, an API job, experiments
that share one model across σ, and every bad input through the dsq command (one line, exit 2, nothing written)."""

from __future__ import annotations

import json

import pytest
import torch
from typer.testing import CliRunner

from cli.main import app
from dsq import checkpoints, diffusion, experiments, references, views
from dsq.db import repo
from dsq.db.session import open_database, session_scope
from dsq.kinds.certify import CertifySpec
from dsq.kinds.train import TrainSpec
from dsq.settings import Settings

from .test_apis import api_spec
from .test_apis import results as api_rows
from .test_apis import emulator  # noqa: F401 - fixture shared with test_apis
from .test_diffusion import tiny_pipeline
from .test_jobs import run

SMALL_UNET = {"block_out_channels": [16], "layers_per_block": 1, "norm_num_groups": 8}


@pytest.fixture(scope="module")
def world(tmp_path_factory, ray_session):
    """A database with a digits classifier (job 1) and a DDPM dsq trained (job 2); a diffusers folder."""
    home = tmp_path_factory.mktemp("diffusion-home")
    config = Settings(database_url=f"sqlite:///{home / 'dsq.db'}", home=home)
    engine = open_database(config.database_url)
    f = run(config, engine, TrainSpec(dataset="digits", target="classifier", arch="small_cnn",
                                      objective="standard", sigma=0.0, epochs=2, batch_size=64, name="f"))
    ddpm = run(config, engine, TrainSpec(dataset="digits", target="denoiser", arch="unet", objective="diffusion",
                                         sigma=0.0, epochs=1, batch_size=128, arch_kwargs=SMALL_UNET, name="ddpm"))
    folder = home / "ddpm-diffusers"
    tiny_pipeline(folder)
    yield config, engine, f, ddpm, f"diffusers:{folder}"
    engine.dispose()


def certify(f, denoiser, **overrides):
    return CertifySpec(**{**dict(dataset="digits", classifier=f"job:{f}", denoiser=denoiser, sigma=0.25, n0=20,
                                 n=100, alpha=0.001, batch_size=40, max_images=3, seed=2), **overrides})


def rows_of(engine, job_id):
    with session_scope(engine) as session:
        return [(r.image_index, r.prediction, r.radius, r.counts_selection, r.counts_estimation)
                for r in repo.results_for_job(session, job_id)]


def logs_of(engine, job_id):
    with session_scope(engine) as session:
        return [line.message for line in repo.logs_for_job(session, job_id)]


def test_a_trained_ddpm_is_a_denoiser_at_every_sigma(world):
    config, engine, f, ddpm, _ = world
    with session_scope(engine) as session:
        path = references.resolve(session, f"job:{ddpm}", config)
        job = repo.get_job(session, ddpm)
        metrics = repo.artifacts_for_job(session, ddpm)[0].metrics
    model = checkpoints.load_model(path)
    assert isinstance(model, diffusion.DiffusionModel)
    assert (model.channels, model.sample_size, len(model.alphas_cumprod)) == (1, 8, 1000)
    assert job.spec["sigma"] == 0.0 and {"test_loss", "test_mse_sigma_0.25", "test_mse_sigma_0.5"} <= set(metrics)
    for sigma, t in ((0.25, 145), (0.5, 259)):
        with session_scope(engine) as session:
            denoiser = references.load(session, f"job:{ddpm}", config, "denoiser", sigma=sigma)
        assert denoiser.timestep == t
    shown = CliRunner().invoke(app, ["--db", config.database_url, "show", str(ddpm)],
                               env={"DSQ_HOME": str(config.home)})
    assert shown.exit_code == 0, shown.output
    assert "diffusion: linear schedule, T = 1000" in shown.output


def test_counts_are_the_same_on_one_or_three_samplers_and_the_log_names_the_timestep(world):
    config, engine, f, _, folder = world
    one = run(config, engine, certify(f, folder, workers=1))
    three = run(config, engine, certify(f, folder, workers=3))
    assert rows_of(engine, one) == rows_of(engine, three) and len(rows_of(engine, one)) == 3
    assert "diffusion denoiser: timestep 145 of 1000 (ᾱ 0.798) for σ 0.25" in logs_of(engine, one)
    with session_scope(engine) as session:
        assert views.default_method(session, repo.get_job(session, one)) == "diffusion (one-shot) ddpm-diffusers"
        shown = [{i: repo.preview_for_image(session, job, i).png for i in repo.previewed_indices(session, job)}
                 for job in (one, three)]
    assert len(shown[0]) == 3 and shown[0] == shown[1]  # the DDPM's previews: the same on any number of samplers


def test_a_ddpm_job_certifies_fixed_n_sequentially_and_in_bf16(world):
    config, engine, f, ddpm, _ = world
    for spec in (certify(f, f"job:{ddpm}", sigma=0.5),
                 certify(f, f"job:{ddpm}", n=200, radius=0.1, max_n=200),
                 certify(f, f"job:{ddpm}", precision="bf16")):
        job_id = run(config, engine, spec)
        assert len(rows_of(engine, job_id)) == 3
        timestep = 259 if spec.sigma == 0.5 else 145
        assert any(f"timestep {timestep} of 1000" in line for line in logs_of(engine, job_id))
        with session_scope(engine) as session:  # an unnamed job's name in tables
            assert views.default_method(session, repo.get_job(session, job_id)) == "diffusion (one-shot)"


def test_a_diffusion_denoiser_in_front_of_a_vision_api(world, emulator, settings):
    config, engine, _, _, folder = world
    server = emulator("aws")
    spec = api_spec("aws", server.endpoint, denoiser=folder)
    with session_scope(engine) as session:
        from dsq import jobs

        job_id = jobs.submit(session, spec, config).id
    from tests.test_jobs import run_job

    assert run_job(config, job_id) == "succeeded"
    assert len(api_rows(engine, job_id)) == 2
    assert any("diffusion denoiser: timestep 145" in line for line in logs_of(engine, job_id))


def test_an_experiment_trains_one_ddpm_for_every_sigma(world):
    plan = experiments.expand({
        "name": "diffusion", "dataset": "digits", "sigmas": [0.25, 0.5, 1.0],
        "models": {"f": {"target": "classifier", "arch": "small_cnn", "objective": "standard"},
                   "ddpm": {"arch": "unet", "objective": "diffusion", "arch_kwargs": SMALL_UNET}},
        "methods": [{"label": "diffusion", "classifier": "f", "denoiser": "ddpm"},
                    {"label": "diffusers", "classifier": "f", "denoiser": world[4]}]})
    trains = [step for step in plan.steps if isinstance(step.spec, TrainSpec)]
    assert [step.key for step in trains] == ["f", "ddpm"] and trains[1].spec.sigma == 0.0
    certifies = [step for step in plan.steps if step.spec.kind == "certify"]
    assert {(step.spec.sigma, step.spec.denoiser) for step in certifies if step.meta["method"] == "diffusion"} == {
        (sigma, "step:ddpm") for sigma in (0.25, 0.5, 1.0)}
    assert all(step.needs == ["f", "ddpm"] for step in certifies if step.meta["method"] == "diffusion")


# -- bad input, through the command ------------------------------------------------------------------


def pipeline_folder(tmp_path, name, **changes):
    """A diffusers folder broken in one way."""
    from diffusers import DDPMPipeline, DDPMScheduler, UNet2DModel

    folder = tmp_path / name
    size, channels = changes.get("size", 8), changes.get("channels", 1)
    unet = UNet2DModel(sample_size=size, in_channels=channels, out_channels=channels, block_out_channels=(16,),
                       layers_per_block=1, down_block_types=("DownBlock2D",), up_block_types=("UpBlock2D",),
                       norm_num_groups=8)
    scheduler = DDPMScheduler(num_train_timesteps=changes.get("timesteps", 1000))
    DDPMPipeline(unet=unet, scheduler=scheduler).save_pretrained(folder)
    if "prediction" in changes:
        path = folder / "scheduler" / "scheduler_config.json"
        path.write_text(json.dumps({**json.loads(path.read_text()), "prediction_type": changes["prediction"]}))
    return folder


def test_every_bad_diffusion_input_is_one_line_exit_2_and_writes_nothing(world, tmp_path):
    config, engine, f, ddpm, folder = world
    not_a_model = tmp_path / "photos"
    not_a_model.mkdir()
    (not_a_model / "cat.png").write_bytes(b"png")
    certify_command = ["submit", "certify", "--dataset", "digits", "--classifier", f"job:{f}", "--sigma", "0.25",
                       "--n", "100", "--max-images", "2"]
    cases = {
        "not a diffusers folder": ([*certify_command, "--denoiser", f"diffusers:{not_a_model}"],
                                   "is not a diffusers model"),
        "no such folder": ([*certify_command, "--denoiser", f"diffusers:{tmp_path / 'none'}"], "no such folder"),
        "other size": ([*certify_command, "--denoiser", f"diffusers:{pipeline_folder(tmp_path, 'big', size=16)}"],
                       "the diffusion model takes 1-channel 16x16 images but the images of digits are 1-channel 8x8"),
        "sigma out of reach": ([*certify_command[:6], "--sigma", "0.2", "--n", "100", "--denoiser",
                                f"diffusers:{pipeline_folder(tmp_path, 'short', timesteps=10)}"],
                               "cannot denoise σ = 0.2: its schedule's largest noise level serves σ ≤ 0.16"),
        "prediction type": ([*certify_command, "--denoiser",
                             f"diffusers:{pipeline_folder(tmp_path, 'flow', prediction='flow')}"],
                            "prediction type 'flow' is not one dsq denoises with"),
        "as a classifier": (["submit", "certify", "--dataset", "digits", "--classifier", folder, "--sigma", "0.25"],
                            "it can only be a denoiser, not a classifier"),
        "diffusion with sigma": (["submit", "train", "--dataset", "digits", "--objective", "diffusion",
                                  "--sigma", "0.25"], "takes no sigma"),
        "diffusion with dncnn": (["submit", "train", "--dataset", "digits", "--objective", "diffusion",
                                  "--arch", "dncnn"], "objective 'diffusion' trains arch unet"),
        "unet for mse": (["submit", "train", "--dataset", "digits", "--objective", "mse", "--arch", "unet"],
                         "objective 'diffusion' trains arch unet, and only it does"),
        "api: other size": (["submit", "certify-api", "--provider", "aws", "--endpoint", "embedded", "--dataset",
                             "digits", "--max-images", "2", "--sigma", "0.25", "--n0", "5", "--n", "20",
                             "--denoiser", f"diffusers:{tmp_path / 'big'}"], "takes 1-channel 16x16 images"),
    }
    with session_scope(engine) as session:
        before = len(repo.list_jobs(session, limit=10_000))
    cli = CliRunner()
    for name, (args, message) in cases.items():
        result = cli.invoke(app, ["--db", config.database_url, *args],
                            env={"DSQ_HOME": str(config.home), "RAY_ADDRESS": "", "DSQ_WORKER_AUTOSTART": "0"})
        lines = [line for line in result.output.splitlines() if line.strip()]
        assert result.exit_code == 2, (name, result.output)
        assert message in result.output and len(lines) == 1 and "Traceback" not in result.output, (name, lines)
    with session_scope(engine) as session:
        assert len(repo.list_jobs(session, limit=10_000)) == before
