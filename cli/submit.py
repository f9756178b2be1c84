"""``dsq submit``: queue a training or certification job and run it."""

from __future__ import annotations

import json
from typing import List, Optional

import typer

from cli import common
from dsq import jobs, specs
from dsq.db.session import session_scope

app = typer.Typer(help="Submit a job: train a denoiser or classifier, or certify a smoothed classifier.",
                  no_args_is_help=True)


def launch(ctx: typer.Context, spec_of, wait: bool) -> None:
    """Validate, queue and run (locally) or start (on a cluster) a job; print its id."""
    config = common.settings(ctx)
    with common.boundary():
        spec = spec_of()
        if config.ray_address:
            from workers import resources

            resources.connect(config.ray_address)
        engine = common.database(config)
        with session_scope(engine) as session:
            job_id = jobs.submit(session, spec, config).id
    common.console.print(f"job {job_id}")
    if config.ray_address:
        common.start_on_cluster(config, job_id)
        if not wait:
            return
        status = common.follow(engine, job_id, f"job {job_id}")
    else:
        status = common.run_local(config, job_id, f"job {job_id}")
    common.finish(engine, job_id, status)


@app.command()
def train(ctx: typer.Context,
          dataset: str = typer.Option(..., help="digits, cifar10, imagenet or folder."),
          target: str = typer.Option("denoiser", help="denoiser or classifier."),
          arch: str = typer.Option(..., help="dncnn, dncnn_wide, memnet; or a classifier architecture."),
          objective: str = typer.Option(..., help="mse, stab, stab_mse, clf (denoiser); standard, gaussian."),
          sigma: float = typer.Option(0.25, help="Noise level in [0,1] pixel units (0 for standard)."),
          classifier: Optional[str] = typer.Option(None, help="White-box target classifier: checkpoint or job:ID."),
          surrogate: List[str] = typer.Option([], help="Black-box surrogate classifier(s), repeatable."),
          init: Optional[str] = typer.Option(None, help="Denoiser to fine-tune (stab_mse)."),
          arch_kwargs: str = typer.Option("{}", help='Architecture arguments as JSON, e.g. {"depth": 8}.'),
          optimizer: str = "adam", lr: float = 1e-3, epochs: int = 10, batch_size: int = 128,
          lr_step: int = 30, lr_gamma: float = 0.1, seed: int = 0,
          data_root: Optional[str] = None, name: Optional[str] = None,
          wait: bool = typer.Option(False, help="On a cluster: follow the job until it ends.")):
    """Train a denoiser in front of frozen classifier(s), or a classifier (standard or Gaussian)."""
    launch(ctx, lambda: specs.TrainSpec(
        dataset=dataset, target=target, arch=arch, objective=objective, sigma=sigma,
        arch_kwargs=parse_json(arch_kwargs), classifier=classifier, surrogates=tuple(surrogate), init=init,
        optimizer=optimizer, lr=lr, epochs=epochs, batch_size=batch_size, lr_step=lr_step,
        lr_gamma=lr_gamma, seed=seed, data_root=data_root, name=name), wait)


@app.command()
def certify(ctx: typer.Context,
            dataset: str = typer.Option(..., help="digits, cifar10, imagenet or folder."),
            classifier: str = typer.Option(..., help="Base classifier: checkpoint file or job:ID."),
            denoiser: Optional[str] = typer.Option(None, help="Denoiser in front of it (none: plain smoothing)."),
            sigma: float = typer.Option(..., help="Noise level in [0,1] pixel units."),
            n0: int = 100, n: int = 100_000, alpha: float = 0.001,
            batch_size: Optional[int] = typer.Option(
                None, help="Samples per forward pass (default: chosen for the hardware when the job starts)."),
            split: str = "test", skip: int = 1, max_images: Optional[int] = None, seed: int = 0,
            workers: Optional[int] = typer.Option(
                None, help="Sampler actors sharing each image's samples (default: one per GPU, else one per CPU)."),
            precision: str = typer.Option("fp32", help="fp32, or bf16/fp16 autocast (changes f; recorded)."),
            compile: bool = typer.Option(False, "--compile", help="torch.compile the sampler's model."),
            data_root: Optional[str] = None, name: Optional[str] = None,
            wait: bool = typer.Option(False, help="On a cluster: follow the job until it ends.")):
    """Certify the smoothed classifier f(D(x + noise)) on a deterministic subset of a dataset."""
    launch(ctx, lambda: specs.CertifySpec(
        dataset=dataset, classifier=classifier, denoiser=denoiser, sigma=sigma, n0=n0, n=n, alpha=alpha,
        batch_size=batch_size, split=split, skip=skip, max_images=max_images, seed=seed, workers=workers,
        precision=precision, compile=compile, data_root=data_root, name=name), wait)


def parse_json(text: str) -> dict:
    from dsq.errors import InvalidArgument

    try:
        value = json.loads(text)
    except json.JSONDecodeError:
        raise InvalidArgument(f"--arch-kwargs must be a JSON object, got {text!r}") from None
    if not isinstance(value, dict):
        raise InvalidArgument(f"--arch-kwargs must be a JSON object, got {text!r}")
    return value
