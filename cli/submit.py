"""``dsq submit``: queue a training or certification job; a worker runs it."""

from __future__ import annotations

import json
from typing import List, Optional

import typer

from cli import common
from dsq.kinds.certify import DEFAULT_N, PREVIEWS

app = typer.Typer(help="Submit a job: train a denoiser or classifier, or certify a smoothed classifier.",
                  no_args_is_help=True)

PRIORITY_HELP = "Higher runs first (default 0); equal priorities run oldest first."
AFTER_HELP = "Run only after this job succeeded (repeatable); job:N references add this by themselves."
WAIT_HELP = "Follow the job until it ends (exit 1 unless it succeeded)."
ATTEMPTS_HELP = ("Runs that may end in an unexpected error or a dead worker before the job ends failed (an integer "
                 ">= 1; retried after an error with exponential backoff). Bad input fails at once.")
RADIUS_HELP = ("Certify sequentially at this target L2 radius: per image 'radius >= R or not', stopping as soon "
               "as an anytime-valid test knows (dsq results reports accuracy at R and samples per image).")
MAX_N_HELP = "With --radius: the most estimation samples per image (default: --n)."
SIZE_HELP = ("Resize each image (shorter side) to N and center-crop it to NxN; folder and imagenet datasets only. "
             "Default: a folder's own size when all its images share one (required when they differ); "
             "imagenet 224.")
CLASSES_HELP = ("folder: datasets: the class order the model was trained with, e.g. cat,dog,fox (label i is the "
                "i-th; default: the class folders sorted by name). It must name the folder's classes exactly.")
MODEL_HELP = ("job:ID, a checkpoint or TorchScript file, torchvision:NAME or package.module:function "
              "(see README, 'Bring your own model').")
WEIGHTS_HELP = "State dict file (torch.save) for a torchvision:NAME or package.module:function {}."
ARGS_HELP = 'Arguments of a torchvision:NAME or package.module:function {} as JSON, e.g. {{"num_classes": 10}}.'
MEAN_HELP = ("Normalization of a TorchScript, torchvision or package.module:function classifier, one value per "
             "channel, e.g. 0.485,0.456,0.406 (default: none; ImageNet's for torchvision:NAME).")


NO_UPLOAD_HELP = ("Read the files and folders given by path where the job runs, as given (data on storage every "
                  "node shares), instead of uploading them to an S3 artifact store at submit.")


def no_upload_option():
    """``--no-upload``: paths read as given where the job runs (``dsq.uploads``)."""
    return typer.Option(False, "--no-upload", help=NO_UPLOAD_HELP)


def attempts_option():
    """``--max-attempts N``, read as text so that a non-integer is one line (exit 2), not a usage box."""
    return typer.Option("3", "--max-attempts", metavar="N", help=ATTEMPTS_HELP)


def max_attempts_of(text: str) -> int:
    """``--max-attempts`` as an integer >= 1; else ``InvalidArgument``."""
    from dsq import checks
    from dsq.errors import InvalidArgument

    try:
        value = int(text.strip())
    except ValueError:
        raise InvalidArgument(f"--max-attempts must be an integer >= 1, got {text!r}") from None
    return checks.positive_int("--max-attempts", value)


def launch(ctx: typer.Context, spec_of, wait: bool, priority: int = 0, after: tuple[int, ...] = (),
           describe=None, max_attempts: str = "3", no_upload: bool = False) -> None:
    """Validate and queue a job, print its id, make sure a worker serves the queue; follow it with --wait.

    ``describe(spec, work total)`` gives lines to print about the job once it is checked and queued. Its local
    files go to an S3 artifact store first, unless ``no_upload`` (``dsq.uploads``).
    """
    from dsq import jobs, specs
    from dsq.db.session import session_scope
    from workers import background

    config = common.settings(ctx)
    with common.boundary():
        attempts = max_attempts_of(max_attempts)
        spec = spec_of()
        common.check_cluster(config)  # refuse before anything is written
        if getattr(spec, "sigma", 0.0) > specs.WARN_SIGMA:
            common.say(f"warning: sigma {spec.sigma:g} is above {specs.WARN_SIGMA:g} pixel range units; "
                       f"if you meant 0-255 units, sigma is {spec.sigma:g}/255 = {spec.sigma / 255:.4g}", err=True)
        engine = common.database(config)
        with session_scope(engine) as session:
            job = jobs.submit(session, spec, config, priority=priority, after=after, max_attempts=attempts,
                              upload=not no_upload, say=lambda line: common.say(line, err=True))
            job_id, total = job.id, job.progress_total
        for line in describe(spec, total) if describe else []:
            common.say(line, err=True)
        if spec.kind in ("certify", "certify_api"):  # the spec already refused an n that can never certify
            common.say(f"info: {specs.reach(spec)}", err=True)
    common.console.print(f"job {job_id}")
    with common.boundary():
        started = background.ensure_worker(config, engine)
    if started:
        common.say(started, err=True)
    if wait:
        common.finish(engine, job_id, common.follow(engine, job_id, f"job {job_id}"))


@app.command()
def train(ctx: typer.Context,
          dataset: str = typer.Option(..., help="digits, cifar10, imagenet or folder."),
          size: Optional[int] = typer.Option(None, metavar="N", help=SIZE_HELP),
          classes: Optional[str] = typer.Option(None, metavar="A,B,C", help=CLASSES_HELP),
          target: str = typer.Option("denoiser", help="denoiser or classifier."),
          arch: Optional[str] = typer.Option(None, help="dncnn, dncnn_wide, memnet, unet (diffusion, the "
                                             "default there); or a classifier architecture."),
          objective: str = typer.Option(..., help="mse, stab, stab_mse, clf, diffusion (a DDPM, a denoiser at "
                                        "every sigma) for a denoiser; standard, gaussian for a classifier."),
          sigma: Optional[float] = typer.Option(None, help="Noise level in [0,1] pixel units (default 0.25; 0 "
                                                "for standard; none for diffusion)."),
          classifier: Optional[str] = typer.Option(None, help="White-box target classifier: " + MODEL_HELP),
          classifier_weights: Optional[str] = typer.Option(None, help=WEIGHTS_HELP.format("classifier")),
          classifier_args: Optional[str] = typer.Option(None, help=ARGS_HELP.format("classifier")),
          mean: Optional[str] = typer.Option(None, help=MEAN_HELP),
          std: Optional[str] = typer.Option(None, help="Standard deviations to go with --mean."),
          surrogate: List[str] = typer.Option([], help="Black-box surrogate classifier(s), repeatable."),
          init: Optional[str] = typer.Option(None, help="Denoiser to fine-tune (stab_mse)."),
          arch_kwargs: str = typer.Option("{}", help='Architecture arguments as JSON, e.g. {"depth": 8}.'),
          optimizer: str = "adam", lr: float = 1e-3, epochs: int = 10, batch_size: int = 128,
          lr_step: int = 30, lr_gamma: float = 0.1, seed: int = 0,
          data_root: Optional[str] = None, name: Optional[str] = None,
          priority: int = typer.Option(0, help=PRIORITY_HELP),
          after: List[int] = typer.Option([], help=AFTER_HELP),
          max_attempts: str = attempts_option(), no_upload: bool = no_upload_option(),
          wait: bool = typer.Option(False, help=WAIT_HELP)):
    """Train a denoiser in front of frozen classifier(s), or a classifier (standard or Gaussian)."""
    from dsq.kinds.train import TrainSpec, default_arch, default_sigma

    launch(ctx, lambda: TrainSpec(
        dataset=dataset, target=target, arch=default_arch(arch, objective), objective=objective,
        sigma=default_sigma(sigma, objective),
        arch_kwargs=parse_json(arch_kwargs), classifier=absolute(classifier),
        surrogates=tuple(map(absolute, surrogate)), init=absolute(init),
        optimizer=optimizer, lr=lr, epochs=epochs, batch_size=batch_size, lr_step=lr_step,
        lr_gamma=lr_gamma, seed=seed, size=size, classes=class_list(classes), data_root=data_root, name=name,
        models=model_options(classifier=(absolute(classifier), absolute(classifier_weights), classifier_args,
                                         mean, std))),
        wait, priority, tuple(after), max_attempts=max_attempts, no_upload=no_upload)


@app.command()
def certify(ctx: typer.Context,
            dataset: str = typer.Option(..., help="digits, cifar10, imagenet or folder."),
            size: Optional[int] = typer.Option(None, metavar="N", help=SIZE_HELP),
            classes: Optional[str] = typer.Option(None, metavar="A,B,C", help=CLASSES_HELP),
            classifier: str = typer.Option(..., help="Base classifier: " + MODEL_HELP),
            denoiser: Optional[str] = typer.Option(None, help="Denoiser in front of it (none: plain smoothing): "
                                                   + MODEL_HELP),
            classifier_weights: Optional[str] = typer.Option(None, help=WEIGHTS_HELP.format("classifier")),
            classifier_args: Optional[str] = typer.Option(None, help=ARGS_HELP.format("classifier")),
            mean: Optional[str] = typer.Option(None, help=MEAN_HELP),
            std: Optional[str] = typer.Option(None, help="Standard deviations to go with --mean."),
            denoiser_weights: Optional[str] = typer.Option(None, help=WEIGHTS_HELP.format("denoiser")),
            denoiser_args: Optional[str] = typer.Option(None, help=ARGS_HELP.format("denoiser")),
            sigma: float = typer.Option(..., help="Noise level in [0,1] pixel units."),
            n0: int = 100,
            n: Optional[int] = typer.Option(None, help=f"Estimation samples per image (default {DEFAULT_N:,})."),
            alpha: float = 0.001,
            radius: Optional[float] = typer.Option(None, help=RADIUS_HELP),
            max_n: Optional[int] = typer.Option(None, help=MAX_N_HELP),
            batch_size: Optional[int] = typer.Option(
                None, help="Samples per forward pass (default: chosen for the hardware when the job starts)."),
            split: str = "test", skip: int = 1, max_images: Optional[int] = None, seed: int = 0,
            workers: Optional[int] = typer.Option(
                None, help="Sampler actors sharing each image's samples (default: one per GPU, else one per CPU)."),
            precision: str = typer.Option("fp32", help="fp32, or bf16/fp16 autocast (changes f; recorded)."),
            compile: bool = typer.Option(False, "--compile", help="torch.compile the sampler's model."),
            previews: int = typer.Option(PREVIEWS, metavar="K", help="Its first K images get a preview on their "
                                         "dashboard page: a few noisy samples beside their denoised versions, from "
                                         "noise of their own (no count changes); 0: none."),
            data_root: Optional[str] = None, name: Optional[str] = None,
            priority: int = typer.Option(0, help=PRIORITY_HELP),
            after: List[int] = typer.Option([], help=AFTER_HELP),
            max_attempts: str = attempts_option(), no_upload: bool = no_upload_option(),
            wait: bool = typer.Option(False, help=WAIT_HELP)):
    """Certify the smoothed classifier f(D(x + noise)) on a deterministic subset of a dataset."""
    from dsq import specs
    from dsq.kinds.certify import CertifySpec

    launch(ctx, lambda: CertifySpec(
        dataset=dataset, classifier=absolute(classifier), denoiser=absolute(denoiser), sigma=sigma, n0=n0,
        n=specs.given_n(n, max_n, radius, DEFAULT_N), alpha=alpha, radius=radius, max_n=max_n,
        batch_size=batch_size, split=split, skip=skip, max_images=max_images, seed=seed, workers=workers,
        precision=precision, compile=compile, previews=previews, size=size, classes=class_list(classes),
        data_root=data_root, name=name, models=model_options(
            classifier=(absolute(classifier), absolute(classifier_weights), classifier_args, mean, std),
            denoiser=(absolute(denoiser), absolute(denoiser_weights), denoiser_args, None, None))),
        wait, priority, tuple(after), max_attempts=max_attempts, no_upload=no_upload)


def preview(ctx: typer.Context, job: str = typer.Argument(..., metavar="JOB", help="A certify job's id."),
            image: str = typer.Argument(..., metavar="IMAGE",
                                        help="One of its images (the index its results and pages show)."),
            priority: int = typer.Option(0, help=PRIORITY_HELP),
            wait: bool = typer.Option(False, help=WAIT_HELP)):
    """Ask a worker for the preview of one image of a certify job (a few noisy samples beside their denoised
    versions), shown on the image's dashboard page."""
    from dsq.db.session import session_scope
    from dsq.kinds import preview as previews

    def spec_of():
        number, index = _number("job", job), _number("image", image)
        config = common.settings(ctx)
        with session_scope(common.database(config)) as session:
            return previews.request(session, number, index, config)

    launch(ctx, spec_of, wait, priority)


def _number(name: str, text: str) -> int:
    """A command-line job id or image index as an integer; else one line (``InvalidArgument``)."""
    from dsq.errors import InvalidArgument

    if not text.strip().isdigit():
        raise InvalidArgument(f"{name} {text!r}: a number >= 0")
    return int(text)


PREDICT_N = 1_000  # PREDICT's default n: a clear-cut image answers well below it, and it costs 1% of certify's n


@app.command()
def predict(ctx: typer.Context,
            classifier: Optional[str] = typer.Option(None, help="White-box base classifier: " + MODEL_HELP),
            provider: Optional[str] = typer.Option(None, help="A vision API instead: aws, google, azure or clarifai "
                                                   "(its top label is f; see dsq submit certify-api)."),
            dataset: Optional[str] = typer.Option(None, help="digits, cifar10, imagenet or folder:PATH."),
            input: List[str] = typer.Option([], "--input", help="An image file to predict (repeatable); "
                                            "instead of --dataset."),
            denoiser: Optional[str] = typer.Option(None, help="Denoiser in front of f: " + MODEL_HELP),
            sigma: float = typer.Option(..., help="Noise level in [0,1] pixel units."),
            n: int = typer.Option(PREDICT_N, help="Noisy samples (or queries) per image."),
            alpha: float = typer.Option(0.001, help="Level of the binomial test: the chance of a wrong answer "
                                        "(rather than an abstain) is at most alpha per image."),
            size: Optional[int] = typer.Option(None, metavar="N", help=SIZE_HELP + " Also resizes --input files."),
            classes: Optional[str] = typer.Option(None, metavar="A,B,C", help=CLASSES_HELP),
            classifier_weights: Optional[str] = typer.Option(None, help=WEIGHTS_HELP.format("classifier")),
            classifier_args: Optional[str] = typer.Option(None, help=ARGS_HELP.format("classifier")),
            mean: Optional[str] = typer.Option(None, help=MEAN_HELP),
            std: Optional[str] = typer.Option(None, help="Standard deviations to go with --mean."),
            batch_size: Optional[int] = typer.Option(None, help="White-box: samples per forward pass (default: "
                                                     "chosen for the hardware)."),
            workers: Optional[int] = typer.Option(None, help="White-box: sampler actors sharing each image."),
            precision: str = typer.Option("fp32", help="White-box: fp32, or bf16/fp16 autocast."),
            endpoint: Optional[str] = typer.Option(None, help="API: vendor, embedded or HOST:PORT (dsq submit "
                                                   "certify-api --help)."),
            max_queries: Optional[int] = typer.Option(None, help="API: query budget of the job (all its runs)."),
            price_per_1000: Optional[float] = typer.Option(None, help="API: USD per 1,000 queries."),
            split: str = "test", skip: int = 1, max_images: Optional[int] = None, seed: int = 0,
            data_root: Optional[str] = None, name: Optional[str] = None,
            priority: int = typer.Option(0, help=PRIORITY_HELP),
            after: List[int] = typer.Option([], help=AFTER_HELP),
            max_attempts: str = attempts_option(), no_upload: bool = no_upload_option(),
            wait: bool = typer.Option(False, help=WAIT_HELP)):
    """PREDICT (Cohen et al.): each image's smoothed class, or an abstain, from n noisy samples; no radius."""
    import os

    from dsq.errors import InvalidArgument

    def spec_of():
        if (classifier is None) == (provider is None):
            raise InvalidArgument("give --classifier (a white-box model) or --provider (a vision API), one of them")
        shared = dict(sigma=sigma, dataset=dataset, inputs=tuple(absolute(path) for path in input),
                      denoiser=absolute(denoiser), n0=0, n=n, alpha=alpha, split=split, skip=skip,
                      max_images=max_images, size=size, classes=class_list(classes), seed=seed,
                      data_root=data_root, name=name, predict=True)
        if provider is not None:
            white_box = {"--classifier-weights": classifier_weights, "--classifier-args": classifier_args,
                         "--mean": mean, "--std": std, "--batch-size": batch_size, "--workers": workers,
                         "--precision": None if precision == "fp32" else precision}
            given = [option for option, value in white_box.items() if value is not None]
            if given:
                raise InvalidArgument(f"{given[0]} applies to a white-box --classifier, not to --provider")
            from dsq.kinds import certify_api

            where = certify_api.default_endpoint(provider, os.environ) if endpoint is None else endpoint
            return certify_api.ApiCertifySpec(provider=provider, endpoint=None if where == "vendor" else where,
                                              max_queries=max_queries, price_per_1000=price_per_1000, **shared)
        api = {"--endpoint": endpoint, "--max-queries": max_queries, "--price-per-1000": price_per_1000}
        given = [option for option, value in api.items() if value is not None]
        if given:
            raise InvalidArgument(f"{given[0]} applies to --provider (a vision API), not to a white-box --classifier")
        from dsq.kinds.certify import CertifySpec

        return CertifySpec(
            classifier=absolute(classifier), batch_size=batch_size, workers=workers, precision=precision,
            models=model_options(
                classifier=(absolute(classifier), absolute(classifier_weights), classifier_args, mean, std)),
            **shared)

    launch(ctx, spec_of, wait, priority, tuple(after), max_attempts=max_attempts, no_upload=no_upload)


def parse_json(text: str, option: str = "--arch-kwargs") -> dict:
    from dsq.errors import InvalidArgument

    try:
        value = json.loads(text)
    except json.JSONDecodeError:
        raise InvalidArgument(f"{option} must be a JSON object, got {text!r}") from None
    if not isinstance(value, dict):
        raise InvalidArgument(f"{option} must be a JSON object, got {text!r}")
    return value


def class_list(text: str | None) -> tuple[str, ...] | None:
    """``--classes cat,dog,fox`` as names (the spec checks them)."""
    return None if text is None else tuple(part.strip() for part in text.split(","))


def absolute(path: str | None) -> str | None:
    """An existing file, or a ``diffusers:`` folder, as an absolute path (a worker may run elsewhere); anything
    else unchanged."""
    import os

    if path and path.startswith("diffusers:") and os.path.isdir(path[len("diffusers:"):]):
        return "diffusers:" + os.path.abspath(path[len("diffusers:"):])
    return os.path.abspath(path) if path and os.path.isfile(path) else path


def model_options(**roles) -> dict:
    """A spec's ``models`` from the options of each role: (reference, weights, args JSON, mean, std)."""
    from dsq import usermodels
    from dsq.errors import InvalidArgument

    models = {}
    for role, (reference, weights, args, mean, std) in roles.items():
        given = {"weights": weights, "args": args and parse_json(args, f"--{role}-args"),
                 "mean": usermodels.parse_numbers(mean, "mean"), "std": usermodels.parse_numbers(std, "std")}
        given = {key: value for key, value in given.items() if value is not None}
        if given and not reference:
            raise InvalidArgument(f"--{role}-weights, --{role}-args, --mean and --std need --{role}")
        if given:
            models[reference] = given
    return models


@app.command()
def experiment(ctx: typer.Context, file: str = typer.Argument(..., help="An experiment file (TOML); see experiments/."),
               name: Optional[str] = typer.Option(None, help="Group name (default: the file's `name`)."),
               dry_run: bool = typer.Option(False, help="Print the job graph and sample counts; submit nothing."),
               priority: int = typer.Option(0, help=PRIORITY_HELP),
               max_attempts: Optional[str] = typer.Option(None, "--max-attempts", metavar="N",
                                                          help=ATTEMPTS_HELP + " Default: the file's max_attempts, "
                                                          "else 3."),
               set_: List[str] = typer.Option([], "--set", metavar="KEY=VALUE",
                                              help="Change a key of the file for this run (repeatable), e.g. "
                                              "--set max_images=20 --set n=200; recorded with every job."),
               max_jobs: int = typer.Option(1_000, help="Refuse a plan of more jobs than this (a typo in a "
                                            "generated file should not queue thousands)."),
               no_upload: bool = no_upload_option()):
    """Queue a whole plan (models to train, a sigma grid, methods to certify) as jobs with their dependencies."""
    from dsq import experiments
    from dsq.db.session import session_scope
    from workers import background

    config = common.settings(ctx)
    with common.boundary():
        attempts = None if max_attempts is None else max_attempts_of(max_attempts)
        plan = experiments.load(file, max_jobs=max_jobs, overrides=tuple(set_))
        for line in experiments.describe(plan):
            common.say(line)
        if dry_run:
            for line in experiments.missing_data(plan, config):
                common.say(line, err=True)
            common.say("dry run: nothing submitted")
            return
        common.check_cluster(config)
        engine = common.database(config)
        with session_scope(engine) as session:
            ids = experiments.submit(session, plan, config, experiment=name or plan.name, priority=priority,
                                     max_attempts=attempts, upload=not no_upload,
                                     say=lambda line: common.say(line, err=True))
        common.say(f"experiment {name or plan.name}: jobs {min(ids.values())}-{max(ids.values())} queued; "
                   f"see dsq jobs --experiment {name or plan.name}")
        started = background.ensure_worker(config, engine)
    if started:
        common.say(started, err=True)
