"""The training loop: denoisers against frozen classifiers, and classifiers.

Deterministic: model initialization, data order, noise and data augmentation
each come from a generator seeded by (spec seed, purpose, epoch), never from
global RNG state; the caller's global RNG state is left as it was.
Progress is reported through a callback ``on_progress(done, total, metrics)``
so the caller (a Ray trainer, the CLI) decides how to show it.

A batch loss that is NaN or inf, or weights that hold NaN or inf after an
epoch, stop training with ``TrainingDiverged`` (naming the epoch, and the batch
for a loss): the model is never returned, so no broken checkpoint is saved.
"""

from __future__ import annotations

import contextlib
import copy
import hashlib
import math
import time
from typing import Callable, Sequence

import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset

from dsq import classifiers as classifier_registry
from dsq import denoisers as denoiser_registry
from dsq import objectives
from dsq.errors import InvalidArgument, TrainingDiverged

Progress = Callable[[int, int, dict], None]
DIFFUSION_EVAL_SIGMAS = (0.25, 0.5)  # where a DDPM's one-shot denoising is measured after training


def seeded(seed: int, purpose: str, epoch: int = 0) -> int:
    """A 63-bit seed derived from (spec seed, purpose, epoch) alone."""
    key = f"dsq-train/{seed}/{purpose}/{epoch}".encode()
    return int.from_bytes(hashlib.blake2b(key, digest_size=8).digest(), "little") >> 1


@contextlib.contextmanager
def private_cpu_rng(seed: int):
    """Run a block with the global CPU RNG seeded to ``seed``; restore the caller's state after.

    For what draws from the global generator by design: weight initialisers and the
    datasets' augmentation transforms (random crops and flips).
    """
    with torch.random.fork_rng(devices=[]):
        torch.default_generator.manual_seed(seed)
        yield


def build_model(spec, info) -> nn.Module:
    """A freshly initialised model for the spec, seeded by the spec's seed."""
    with private_cpu_rng(seeded(spec.seed, "init")):
        if spec.objective == "diffusion":  # the ε-model takes the images' size unless told another
            return denoiser_registry.build_denoiser(spec.arch, info.channels,
                                                    **{"sample_size": info.height, **spec.arch_kwargs})
        if spec.target == "denoiser":
            return denoiser_registry.build_denoiser(spec.arch, info.channels, **spec.arch_kwargs)
        return classifier_registry.build_classifier(
            spec.arch, num_classes=info.num_classes, in_channels=info.channels,
            mean=info.mean, std=info.std, **spec.arch_kwargs)


def make_optimizer(spec, parameters):
    """The spec's optimizer and its step learning-rate schedule (stepped once per epoch)."""
    if spec.optimizer == "sgd":
        optimizer = torch.optim.SGD(parameters, lr=spec.lr, momentum=spec.momentum, weight_decay=spec.weight_decay)
    else:
        optimizer = torch.optim.Adam(parameters, lr=spec.lr, weight_decay=spec.weight_decay)
    return optimizer, torch.optim.lr_scheduler.StepLR(optimizer, step_size=spec.lr_step, gamma=spec.lr_gamma)


def train(spec, train_set: Dataset, test_set: Dataset, info, *,
          classifiers: Sequence[nn.Module] = (), init: nn.Module | None = None,
          device: str | torch.device = "cpu", on_progress: Progress | None = None) -> tuple[nn.Module, dict]:
    """Train the model a spec describes; return it (in eval mode) and its metrics.

    ``classifiers`` are the frozen target (white-box) or surrogates (black-box);
    ``init`` is the MSE denoiser that ``stab_mse`` fine-tunes (a copy is trained;
    ``init`` itself is left unchanged).
    """
    if spec.objective == "stab_mse" and init is None:
        raise InvalidArgument("objective 'stab_mse' fine-tunes an MSE denoiser: pass it as init")
    device = torch.device(device)
    model = (copy.deepcopy(init) if init is not None else build_model(spec, info)).to(device)
    frozen = [objectives.freeze(c.to(device)) for c in classifiers]
    if spec.target == "denoiser":
        loss_fn = objectives.denoiser_loss(spec.objective, model, spec.sigma, frozen)
    else:
        loss_fn = objectives.classifier_loss(spec.objective, model, spec.sigma)
    started = time.monotonic()
    last_loss = fit(model, loss_fn, train_set, spec, device, on_progress)
    model.eval()
    metrics = evaluate(spec, model, frozen, test_set, device)
    metrics.update(train_loss=last_loss, seconds=time.monotonic() - started)
    return model, metrics


def fit(model, loss_fn, train_set, spec, device, on_progress: Progress | None) -> float:
    """Run ``spec.epochs`` epochs; return the mean loss of the last epoch.

    Raises TrainingDiverged as soon as a batch loss, or the weights after an epoch, are not finite.
    """
    optimizer, scheduler = make_optimizer(spec, [p for p in model.parameters() if p.requires_grad])
    noise = torch.Generator(device=device)
    mean_loss = float("nan")
    for epoch in range(spec.epochs):
        model.train()
        noise.manual_seed(seeded(spec.seed, "noise", epoch))
        with private_cpu_rng(seeded(spec.seed, "augment", epoch)):
            mean_loss = _epoch(model, loss_fn, optimizer, _loader(train_set, spec, epoch), device, noise, epoch + 1)
        _check_weights(model, optimizer, epoch + 1)
        scheduler.step()
        if on_progress:
            on_progress(epoch + 1, spec.epochs, {"epoch": epoch + 1, "loss": mean_loss})
    return mean_loss


def _epoch(model, loss_fn, optimizer, loader, device, noise, epoch: int) -> float:
    """One pass over the training data; return the mean batch loss (TrainingDiverged on a non-finite one)."""
    total, batches = 0.0, 0
    for x, y in loader:
        loss = loss_fn(x.to(device), y.to(device), noise)
        value, batches = float(loss.detach()), batches + 1
        if not math.isfinite(value):
            raise TrainingDiverged(f"training diverged: the loss is {value} at epoch {epoch}, batch {batches}; "
                                   f"try a lower learning rate (it is {_learning_rate(optimizer):g})")
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        total += value
    return total / max(batches, 1)


def _check_weights(model: nn.Module, optimizer, epoch: int) -> None:
    """Raise TrainingDiverged if a parameter or floating buffer holds NaN or inf (a finite loss with NaN gradients)."""
    tensors = [*model.parameters(), *(b for b in model.buffers() if b.is_floating_point())]
    if not all(bool(torch.isfinite(t).all()) for t in tensors):
        raise TrainingDiverged(f"training diverged: the model's weights are not finite after epoch {epoch}; "
                               f"try a lower learning rate (it is {_learning_rate(optimizer):g})")


def _learning_rate(optimizer) -> float:
    return float(optimizer.param_groups[0]["lr"])


def evaluate(spec, model, classifiers, test_set, device, batch_size: int = 256) -> dict:
    """Test metrics: accuracy on clean and noisy images (of f o D for a denoiser), and D's MSE.

    Streams the test set in batches (it may not fit in memory at once); the noise comes
    from one generator seeded by the spec, drawn batch after batch in dataset order.
    """
    noise = torch.Generator(device=device).manual_seed(seeded(spec.seed, "eval"))
    if spec.objective == "diffusion":
        return _evaluate_diffusion(model, test_set, device, noise, batch_size)
    denoiser = model.eval() if spec.target == "denoiser" else None
    pipeline = _pipeline(spec, model, classifiers)
    sums = {"test_mse": 0.0, "clean_accuracy": 0, "noisy_accuracy": 0}
    images = pixels = 0
    with torch.inference_mode():
        for x, y in _batches(test_set, batch_size):
            x, y = x.to(device), y.to(device)
            noisy = objectives.noisy(x, spec.sigma, noise)
            if denoiser is not None:
                sums["test_mse"] += float(((denoiser(noisy) - x) ** 2).sum())
            if pipeline is not None:
                sums["clean_accuracy"] += _correct(pipeline, x, y)
                sums["noisy_accuracy"] += _correct(pipeline, noisy, y)
            images, pixels = images + len(x), pixels + x.numel()
    return _metrics(sums, images, pixels, has_mse=denoiser is not None,
                    has_accuracy=pipeline is not None, noisy=spec.sigma > 0)


def _evaluate_diffusion(model, test_set, device, noise, batch_size: int,
                        sigmas=DIFFUSION_EVAL_SIGMAS) -> dict:
    """A DDPM's test metrics: its training loss on the test images, and the MSE of its one-shot denoiser
    (``dsq.diffusion``) at a few σ, the use dsq puts it to."""
    from dsq import diffusion

    alphas = diffusion.schedule_alphas(diffusion.STANDARD_SCHEDULE)
    denoisers = {sigma: diffusion.OneShotDenoiser(model.eval(), alphas, sigma) for sigma in sigmas}
    schedule = torch.tensor(alphas, dtype=torch.float32)
    sums = {"test_loss": 0.0, **{f"test_mse_sigma_{sigma:g}": 0.0 for sigma in sigmas}}
    images = pixels = 0
    with torch.inference_mode():
        for x, _ in _batches(test_set, batch_size):
            x = x.to(device)
            sums["test_loss"] += float(diffusion.ddpm_loss(model, x, schedule, noise)) * len(x)
            for sigma, denoiser in denoisers.items():
                denoised = denoiser(objectives.noisy(x, sigma, noise))
                sums[f"test_mse_sigma_{sigma:g}"] += float(((denoised - x) ** 2).sum())
            images, pixels = images + len(x), pixels + x.numel()
    return {key: value / max(images if key == "test_loss" else pixels, 1) for key, value in sums.items()}


def _pipeline(spec, model, classifiers) -> nn.Module | None:
    """What evaluate measures accuracy of: the classifier, or f o D with the first classifier (none: None)."""
    if spec.target == "classifier":
        return model
    return nn.Sequential(model, classifiers[0]) if classifiers else None


def _metrics(sums: dict, images: int, pixels: int, *, has_mse: bool, has_accuracy: bool, noisy: bool) -> dict:
    """Turn evaluate's running sums into means (only the metrics that apply)."""
    metrics = {}
    if has_mse:
        metrics["test_mse"] = sums["test_mse"] / max(pixels, 1)
    if has_accuracy:
        metrics["clean_accuracy"] = sums["clean_accuracy"] / max(images, 1)
        if noisy:
            metrics["noisy_accuracy"] = sums["noisy_accuracy"] / max(images, 1)
    return metrics


def accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor, batch_size: int = 512) -> float:
    """Fraction of images ``x`` that ``model`` (put in eval mode) labels ``y``."""
    correct = sum(_correct(model, x[i:i + batch_size], y[i:i + batch_size]) for i in range(0, len(x), batch_size))
    return correct / max(len(x), 1)


def _correct(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> int:
    """How many of the images ``x`` the model, in eval mode, labels ``y``."""
    model.eval()
    with torch.inference_mode():
        return int((model(x).argmax(1) == y).sum())


def _loader(dataset, spec, epoch: int) -> DataLoader:
    """The epoch's shuffled training batches, in an order seeded by (spec seed, epoch)."""
    order = torch.Generator().manual_seed(seeded(spec.seed, "order", epoch))
    return DataLoader(dataset, batch_size=spec.batch_size, shuffle=True, generator=order, drop_last=False)


def _batches(dataset, batch_size: int) -> DataLoader:
    """The dataset in order, in batches; its own generator keeps the global RNG untouched."""
    return DataLoader(dataset, batch_size=batch_size, shuffle=False, generator=torch.Generator())
