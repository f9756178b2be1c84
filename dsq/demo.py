"""The embedded end-to-end job: denoised smoothing on real handwritten digits.

On scikit-learn's 8x8 digits (native resolution), as in Salman et al.'s
experiments but small enough for a 2-core CPU:

1. standard-train a small CNN (no noise): the "pretrained" classifier f;
   standard-train a different surrogate classifier (other width, other seed)
2. per sigma: an MSE denoiser; STAB+MSE denoisers fine-tuned from it against f
   (white-box) and against the surrogate only (black-box); a Gaussian-augmented
   classifier (Cohen et al.'s reference row)
3. per sigma: certify no denoiser / MSE / STAB white-box / STAB black-box /
   Cohen, then compare, take the envelope across sigma and plot the curves.

Every step is a job: ``execute(spec) -> job id`` (injected) queues and runs it
through the job system.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

from dsq.specs import CertifySpec, TrainSpec

SIGMAS = (0.25, 0.5)
RADII = (0.0, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.8)
DENOISER = {"depth": 6, "width": 32}


@dataclass(frozen=True)
class DemoConfig:
    n0: int = 100
    n: int = 1000
    alpha: float = 0.001
    max_images: int | None = None  # None: the whole digits test split (364 images)
    batch_size: int | None = None  # None: dsq chooses (dsq.sizing)
    workers: int | None = None  # None: one single-threaded sampler actor per CPU
    classifier_epochs: int = 20
    denoiser_epochs: int = 12
    stab_epochs: int = 6
    seed: int = 0


def classifier(name: str, objective: str, sigma: float, cfg: DemoConfig, *, width: int = 16, seed: int = 0):
    return TrainSpec(dataset="digits", target="classifier", arch="small_cnn", objective=objective, sigma=sigma,
                     arch_kwargs={"width": width}, epochs=cfg.classifier_epochs, batch_size=64, lr=2e-3,
                     lr_step=10, lr_gamma=0.3, seed=seed, name=name)


def denoiser(name: str, objective: str, sigma: float, cfg: DemoConfig, epochs: int, **models):
    return TrainSpec(dataset="digits", target="denoiser", arch="dncnn", objective=objective, sigma=sigma,
                     arch_kwargs=dict(DENOISER), epochs=epochs, batch_size=64, lr=1e-3 if objective == "mse" else 5e-4,
                     lr_step=max(epochs // 2, 1), lr_gamma=0.3, seed=cfg.seed, name=name, **models)


def certify(name: str, sigma: float, cfg: DemoConfig, classifier_job: int, denoiser_job: int | None = None):
    return CertifySpec(dataset="digits", classifier=f"job:{classifier_job}",
                       denoiser=f"job:{denoiser_job}" if denoiser_job else None, sigma=sigma, n0=cfg.n0, n=cfg.n,
                       alpha=cfg.alpha, batch_size=cfg.batch_size, max_images=cfg.max_images, seed=cfg.seed,
                       workers=cfg.workers, name=name)


def run(execute: Callable[[object], int], cfg: DemoConfig = DemoConfig()) -> dict[float, list[tuple[str, int]]]:
    """Train everything, certify everything; return, per sigma, (row label, certify job id)."""
    f = execute(classifier("f: small CNN (standard)", "standard", 0.0, cfg))
    surrogate = execute(classifier("surrogate: small CNN w24 (standard)", "standard", 0.0, cfg, width=24, seed=1))
    rows: dict[float, list[tuple[str, int]]] = {}
    for sigma in SIGMAS:
        mse = execute(denoiser(f"MSE denoiser s={sigma}", "mse", sigma, cfg, cfg.denoiser_epochs))
        white = execute(denoiser(f"STAB+MSE white-box s={sigma}", "stab_mse", sigma, cfg, cfg.stab_epochs,
                                 classifier=f"job:{f}", init=f"job:{mse}"))
        black = execute(denoiser(f"STAB+MSE black-box s={sigma}", "stab_mse", sigma, cfg, cfg.stab_epochs,
                                 surrogates=(f"job:{surrogate}",), init=f"job:{mse}"))
        cohen = execute(classifier(f"Cohen: Gaussian-trained s={sigma}", "gaussian", sigma, cfg, seed=2))
        plan = [("no denoiser", f, None), ("MSE", f, mse), ("STAB+MSE white-box", f, white),
                ("STAB+MSE black-box", f, black), ("Cohen et al. (Gaussian training)", cohen, None)]
        rows[sigma] = [(label, execute(certify(f"{label} s={sigma}", sigma, cfg, c, d))) for label, c, d in plan]
    return rows
