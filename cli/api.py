"""``dsq submit certify-api`` and ``dsq emulate``: certify a vision API, or serve a local stand-in for one."""

from __future__ import annotations

import os
import time
from typing import List, Optional

import typer

from cli import common
from cli.submit import (AFTER_HELP, CLASSES_HELP, MAX_N_HELP, PRIORITY_HELP, RADIUS_HELP, WAIT_HELP, attempts_option,
                        no_upload_option)
from dsq.apis.providers import EMBEDDED, PROVIDERS
from dsq.kinds.certify_api import DEFAULT_N


ENDPOINT_HELP = ("vendor (the real service; needs credentials), embedded (an emulator inside the job), or "
                 "HOST:PORT / http://HOST:PORT of `dsq emulate`. Default: vendor if credentials are configured, "
                 "else embedded.")
SIZE_HELP = ("Resize and center-crop input files to SIZE; with --dataset, folder and imagenet images "
             "(default: a folder's own size, imagenet 224).")


def register(app: typer.Typer, submit_app: typer.Typer) -> None:
    submit_app.command(name="certify-api")(certify_api)
    app.command()(emulate)


def certify_api(ctx: typer.Context,
                provider: str = typer.Option(..., help=f"One of {', '.join(PROVIDERS)}."),
                sigma: float = typer.Option(..., help="Noise level in [0,1] pixel units."),
                dataset: Optional[str] = typer.Option(None, help="digits, cifar10, imagenet or folder:PATH."),
                input: List[str] = typer.Option([], "--input", help="An image file to certify (repeatable)."),
                denoiser: Optional[str] = typer.Option(None, help="Denoiser before the API: checkpoint or job:ID."),
                endpoint: Optional[str] = typer.Option(None, help=ENDPOINT_HELP),
                n0: int = typer.Option(20, help="Selection queries per image."),
                n: Optional[int] = typer.Option(None, help=f"Estimation queries per image (default {DEFAULT_N})."),
                alpha: float = 0.001,
                radius: Optional[float] = typer.Option(None, help=RADIUS_HELP.replace("samples", "queries")),
                max_n: Optional[int] = typer.Option(None, help=MAX_N_HELP.replace("samples", "queries")),
                max_queries: Optional[int] = typer.Option(None, help="Query budget of the job (all its runs)."),
                qps: Optional[float] = typer.Option(None, help="Queries per second (default: the vendor's quota)."),
                burst: Optional[int] = typer.Option(None, help="Token-bucket burst."),
                concurrency: Optional[int] = typer.Option(None, help="Queries in flight at most."),
                price_per_1000: Optional[float] = typer.Option(None, help="USD per 1,000 queries for the estimate."),
                split: str = "test", skip: int = 1, max_images: Optional[int] = None,
                size: Optional[int] = typer.Option(None, help=SIZE_HELP),
                classes: Optional[str] = typer.Option(None, metavar="A,B,C", help=CLASSES_HELP),
                scale: int = typer.Option(1, help="Upscale the encoded image by this factor (nearest)."),
                seed: int = 0, data_root: Optional[str] = None, name: Optional[str] = None,
                dry_run: bool = typer.Option(False, help="Check and estimate cost; submit nothing."),
                priority: int = typer.Option(0, help=PRIORITY_HELP),
                after: List[int] = typer.Option([], help=AFTER_HELP),
                max_attempts: str = attempts_option(), no_upload: bool = no_upload_option(),
                wait: bool = typer.Option(False, help=WAIT_HELP)):
    """Certify a vision API's smoothed top label (with an optional denoiser in front), within a budget."""
    from cli.submit import class_list, launch
    from dsq import specs
    from dsq.db.session import session_scope
    from dsq.kinds import certify_api

    def spec_of() -> certify_api.ApiCertifySpec:
        where = certify_api.default_endpoint(provider, os.environ) if endpoint is None else endpoint
        return certify_api.ApiCertifySpec(
            provider=provider, sigma=sigma, dataset=dataset, inputs=tuple(input), denoiser=denoiser,
            endpoint=None if where == "vendor" else where, n0=n0, n=specs.given_n(n, max_n, radius, DEFAULT_N),
            alpha=alpha, radius=radius, max_n=max_n, max_queries=max_queries,
            qps=qps, burst=burst, concurrency=concurrency, price_per_1000=price_per_1000, split=split, skip=skip,
            max_images=max_images, size=size, classes=class_list(classes), scale=scale, seed=seed, data_root=data_root, name=name)

    if dry_run:
        with common.boundary():
            spec = spec_of()
            config = common.settings(ctx)
            with session_scope(common.database(config, write=False)) as session:
                images = certify_api.check(session, spec, config)
            for line in estimate_lines(spec, images) + [f"info: {specs.reach(spec)}"]:
                common.say(line, err=True)
        common.console.print("dry run: nothing submitted")
        return
    launch(ctx, spec_of, wait, priority, tuple(after), describe=estimate_lines, max_attempts=max_attempts,
           no_upload=no_upload)


def estimate_lines(spec, images: int) -> list[str]:
    """Who answers, and the job's cost estimate for its ``images``."""
    from dsq.kinds import certify_api

    target = {None: "the vendor", EMBEDDED: "the embedded emulator"}.get(spec.endpoint, spec.endpoint)
    return [f"target: {target}", *certify_api.estimate(spec, images).lines(spec.provider)]


def emulate(provider: str = typer.Option(..., help=f"One of {', '.join(PROVIDERS)}."),
            port: int = typer.Option(0, help="Port on 127.0.0.1 (0: any free port)."),
            throttle: float = typer.Option(0.0, help="Fraction of requests answered as throttled."),
            errors: float = typer.Option(0.0, help="Fraction of requests failing with a server error."),
            latency: float = typer.Option(0.0, help="Seconds added to each request."),
            retry_after: Optional[float] = typer.Option(None, help="Retry-After seconds sent when throttling (HTTP)."),
            classifier: Optional[str] = typer.Option(None, help="dsq classifier checkpoint to label with "
                                                     "(default: a digits logistic regression)."),
            size: Optional[int] = typer.Option(None, help="Resize images to SIZE for --classifier.")):
    """Serve a local emulator of a vision API for the real SDK clients, until interrupted (then exit 128 + the
    signal's number: 130 on Ctrl-C, 143 on SIGTERM)."""
    from dsq.apis import emulators
    from dsq.apis.emulators import labellers

    with common.boundary():
        labeller = labellers.checkpoint_labeller(classifier, size) if classifier else None
        config = emulators.EmulatorConfig(throttle=throttle, errors=errors, latency=latency, retry_after=retry_after)
        emulator = emulators.start(provider, port=port, labeller=labeller, config=config)
    common.console.print(f"{provider} emulator at {emulator.endpoint}: "
                         f"dsq submit certify-api --provider {provider} --endpoint {emulator.endpoint} ...")
    try:
        with common.signals_raise():  # SIGINT and SIGTERM stop it even where the parent left SIGINT ignored
            while True:
                time.sleep(5)
    except common.Stopped as stopped:
        raise common.signal_exit(stopped.number) from None
    finally:
        common.console.print(f"served {emulator.ledger.billed} answers")
        emulator.stop()
