"""Training objectives for denoisers (Salman et al. 2020, Section 3) and classifiers.

Symbols: x a clean batch in [0, 1], y its labels, delta ~ N(0, sigma^2 I),
D the denoiser being trained, F a frozen classifier (normalization inside).

- ``mse``      E || D(x + delta) - x ||^2                      (no classifier)
- ``stab``     E CE(F(D(x + delta)), argmax F(x))               (stability)
- ``stab_mse`` the STAB loss, starting from an MSE-trained denoiser (the
               paper's "STAB+MSE": fine-tuning; the starting point is the
               training spec's ``init``)
- ``clf``      E CE(F(D(x + delta)), y)                         (true labels)
- ``diffusion`` the DDPM objective E ||eps(x_t, t) - eps||^2 (``dsq.diffusion``):
               no sigma, no classifier; the model denoises at every sigma

White-box: F is the target classifier itself. Black-box: F is one or more
surrogate classifiers; with several, the loss is the mean of each surrogate's
loss, each against its own clean prediction, so the denoiser is pushed to
produce images that every surrogate classifies as it classifies the clean one.

Classifiers are frozen: kept in eval mode (batch statistics never couple the
samples of a batch) with ``requires_grad`` off, so gradients reach D only.

Classifier objectives: ``standard`` (CE on clean images, sigma = 0) and
``gaussian`` (CE on x + delta, Cohen et al.'s Gaussian data augmentation).
"""

from __future__ import annotations

from typing import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from dsq.errors import InvalidArgument, UnknownName
from dsq.specs import CLASSIFIER_OBJECTIVES, DENOISER_OBJECTIVES, NEEDS_CLASSIFIER


Loss = Callable[[torch.Tensor, torch.Tensor, torch.Generator], torch.Tensor]


def noisy(x: torch.Tensor, sigma: float, generator: torch.Generator) -> torch.Tensor:
    """x + delta with delta ~ N(0, sigma^2 I), drawn from an explicit generator."""
    if sigma == 0:
        return x
    return x + sigma * torch.randn(x.shape, generator=generator, device=x.device, dtype=x.dtype)


def freeze(classifier: nn.Module) -> nn.Module:
    """Eval mode and no gradients for the classifier's own parameters."""
    classifier.eval()
    for parameter in classifier.parameters():
        parameter.requires_grad_(False)
    return classifier


def denoiser_loss(objective: str, denoiser: nn.Module, sigma: float,
                  classifiers: Sequence[nn.Module] = ()) -> Loss:
    """The loss ``(x, y, generator) -> scalar`` of a denoiser objective."""
    if objective not in DENOISER_OBJECTIVES:
        raise UnknownName(f"unknown denoiser objective {objective!r}; expected one of {', '.join(DENOISER_OBJECTIVES)}")
    if objective in NEEDS_CLASSIFIER and not classifiers:
        raise InvalidArgument(f"objective {objective!r} needs a classifier (white-box) or surrogate classifiers")
    frozen = [freeze(c) for c in classifiers]

    def mse(x, y, generator):
        return F.mse_loss(denoiser(noisy(x, sigma, generator)), x)

    def stab(x, y, generator):
        denoised = denoiser(noisy(x, sigma, generator))
        losses = []
        for classifier in frozen:
            with torch.no_grad():
                target = classifier(x).argmax(dim=1)
            losses.append(F.cross_entropy(classifier(denoised), target))
        return torch.stack(losses).mean()

    def clf(x, y, generator):
        denoised = denoiser(noisy(x, sigma, generator))
        return torch.stack([F.cross_entropy(c(denoised), y) for c in frozen]).mean()

    if objective == "diffusion":
        from dsq import diffusion

        schedule = torch.tensor(diffusion.schedule_alphas(diffusion.STANDARD_SCHEDULE), dtype=torch.float32)
        return lambda x, y, generator: diffusion.ddpm_loss(denoiser, x, schedule, generator)
    return {"mse": mse, "stab": stab, "stab_mse": stab, "clf": clf}[objective]


def classifier_loss(objective: str, classifier: nn.Module, sigma: float) -> Loss:
    """Cross-entropy on clean (``standard``) or Gaussian-augmented (``gaussian``) images."""
    if objective not in CLASSIFIER_OBJECTIVES:
        raise UnknownName(f"unknown classifier objective {objective!r}; expected one of {', '.join(CLASSIFIER_OBJECTIVES)}")
    noise = 0.0 if objective == "standard" else sigma
    if objective == "gaussian" and not sigma > 0:
        raise InvalidArgument("objective 'gaussian' needs sigma > 0")

    def loss(x, y, generator):
        return F.cross_entropy(classifier(noisy(x, noise, generator)), y)

    return loss
