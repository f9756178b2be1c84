"""The training loop: denoisers against frozen classifiers, and classifiers.

Deterministic: model initialization, data order and noise each come from a
generator seeded by (spec seed, purpose, epoch), never from global RNG state.
Progress is reported through a callback ``on_progress(done, total, metrics)``
so the caller (a Ray trainer, the CLI) decides how to show it.
"""

from __future__ import annotations

import hashlib
import time
from typing import Callable, Sequence

import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset

from dsq import classifiers as classifier_registry
from dsq import denoisers as denoiser_registry
from dsq import objectives
from dsq.specs import TrainSpec

Progress = Callable[[int, int, dict], None]


def seeded(seed: int, purpose: str, epoch: int = 0) -> int:
    key = f"dsq-train/{seed}/{purpose}/{epoch}".encode()
    return int.from_bytes(hashlib.blake2b(key, digest_size=8).digest(), "little") >> 1


def build_model(spec: TrainSpec, info) -> nn.Module:
    """A freshly initialised model for the spec, seeded by the spec's seed."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seeded(spec.seed, "init"))
        if spec.target == "denoiser":
            return denoiser_registry.build_denoiser(spec.arch, info.channels, **spec.arch_kwargs)
        return classifier_registry.build_classifier(
            spec.arch, num_classes=info.num_classes, in_channels=info.channels,
            mean=info.mean, std=info.std, **spec.arch_kwargs)


def make_optimizer(spec: TrainSpec, parameters):
    if spec.optimizer == "sgd":
        optimizer = torch.optim.SGD(parameters, lr=spec.lr, momentum=spec.momentum, weight_decay=spec.weight_decay)
    else:
        optimizer = torch.optim.Adam(parameters, lr=spec.lr, weight_decay=spec.weight_decay)
    return optimizer, torch.optim.lr_scheduler.StepLR(optimizer, step_size=spec.lr_step, gamma=spec.lr_gamma)


def train(spec: TrainSpec, train_set: Dataset, test_set: Dataset, info, *,
          classifiers: Sequence[nn.Module] = (), init: nn.Module | None = None,
          device: str | torch.device = "cpu", on_progress: Progress | None = None) -> tuple[nn.Module, dict]:
    """Train the model a spec describes; return it (in eval mode) and its metrics.

    ``classifiers`` are the frozen target (white-box) or surrogates (black-box);
    ``init`` is the MSE denoiser that ``stab_mse`` fine-tunes.
    """
    device = torch.device(device)
    model = (init if init is not None else build_model(spec, info)).to(device)
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


def fit(model, loss_fn, train_set, spec: TrainSpec, device, on_progress: Progress | None) -> float:
    """Run ``spec.epochs`` epochs; return the mean loss of the last epoch."""
    optimizer, scheduler = make_optimizer(spec, [p for p in model.parameters() if p.requires_grad])
    noise = torch.Generator(device=device)
    mean_loss = float("nan")
    for epoch in range(spec.epochs):
        model.train()
        noise.manual_seed(seeded(spec.seed, "noise", epoch))
        total, batches = 0.0, 0
        for x, y in _loader(train_set, spec, epoch):
            loss = loss_fn(x.to(device), y.to(device), noise)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            total, batches = total + float(loss.detach()), batches + 1
        scheduler.step()
        mean_loss = total / max(batches, 1)
        if on_progress:
            on_progress(epoch + 1, spec.epochs, {"epoch": epoch + 1, "loss": mean_loss})
    return mean_loss


def evaluate(spec: TrainSpec, model, classifiers, test_set, device) -> dict:
    """Test metrics: accuracy on clean and noisy images (of f o D for a denoiser)."""
    noise = torch.Generator(device=device).manual_seed(seeded(spec.seed, "eval"))
    sigma = spec.sigma
    if spec.target == "classifier":
        pipeline = model
    else:
        pipeline = nn.Sequential(model, classifiers[0]) if classifiers else None
    metrics = {}
    with torch.inference_mode():
        x, y = _all(test_set, device)
        noisy = objectives.noisy(x, sigma, noise)
        if spec.target == "denoiser":
            metrics["test_mse"] = float(((model(noisy) - x) ** 2).mean())
        if pipeline is not None:
            metrics["clean_accuracy"] = accuracy(pipeline, x, y)
            if sigma > 0:
                metrics["noisy_accuracy"] = accuracy(pipeline, noisy, y)
    return metrics


def accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor, batch_size: int = 512) -> float:
    model.eval()
    with torch.inference_mode():
        correct = sum(int((model(x[i:i + batch_size]).argmax(1) == y[i:i + batch_size]).sum())
                      for i in range(0, len(x), batch_size))
    return correct / max(len(x), 1)


def _loader(dataset, spec: TrainSpec, epoch: int) -> DataLoader:
    order = torch.Generator().manual_seed(seeded(spec.seed, "order", epoch))
    return DataLoader(dataset, batch_size=spec.batch_size, shuffle=True, generator=order, drop_last=False)


def _all(dataset, device) -> tuple[torch.Tensor, torch.Tensor]:
    xs, ys = zip(*(dataset[i] for i in range(len(dataset))))
    return torch.stack(xs).to(device), torch.as_tensor(ys).to(device)
