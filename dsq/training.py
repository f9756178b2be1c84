"""The training loop: denoisers against frozen classifiers, and classifiers.

Deterministic: model initialization, data order, noise and data augmentation
each come from a generator seeded by (spec seed, purpose, epoch), never from
global RNG state; the caller's global RNG state is left as it was.
Progress is reported through a callback ``on_progress(done, total, metrics)``
so the caller (a Ray trainer, the CLI) decides how to show it.

A batch loss that is NaN or inf, or weights that hold NaN or inf after an
epoch, stop training with ``TrainingDiverged`` (naming the epoch, and the batch
for a loss): the model is never returned, so no broken checkpoint is saved.

Resumable: given a ``Checkpointing``, ``fit`` hands it a resumable state at the end
of every epoch and, within a long epoch, every ``every_seconds`` (model, optimizer,
LR schedule, every RNG state, epoch and batch, the losses so far), and starts from
the state it was given, if any. A resumed run ends with the weights, bit for bit,
of one that ran uninterrupted (on the CPU). A state that does not fit the model is
said in one line and training starts over from epoch 1.
"""

from __future__ import annotations

import contextlib
import copy
import hashlib
import math
import random
import time
from dataclasses import dataclass, field
from typing import Callable, Sequence

import numpy as np
import torch
from torch import nn
from torch.utils.data import BatchSampler, DataLoader, Dataset, RandomSampler

from dsq import classifiers as classifier_registry
from dsq import denoisers as denoiser_registry
from dsq import checks, objectives
from dsq.errors import InvalidArgument, TrainingDiverged

Progress = Callable[[int, int, dict], None]
DIFFUSION_EVAL_SIGMAS = (0.25, 0.5)  # where a DDPM's one-shot denoising is measured after training


def seeded(seed: int, purpose: str, epoch: int = 0) -> int:
    """A 63-bit seed derived from (spec seed, purpose, epoch) alone."""
    key = f"dsq-train/{seed}/{purpose}/{epoch}".encode()
    return int.from_bytes(hashlib.blake2b(key, digest_size=8).digest(), "little") >> 1


@contextlib.contextmanager
def private_cpu_rng(seed: int):
    """Run a block with the global CPU RNGs (torch's, numpy's, Python's) seeded from ``seed``; restore the
    caller's states after.

    For what draws from a global generator by design: weight initialisers and the
    datasets' augmentation transforms (random crops and flips).
    """
    numpy_state, python_state = np.random.get_state(), random.getstate()
    try:
        with torch.random.fork_rng(devices=[]):
            torch.default_generator.manual_seed(seed)
            np.random.seed(seed % 2**32)
            random.seed(seed)
            yield
    finally:
        np.random.set_state(numpy_state)
        random.setstate(python_state)


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
          device: str | torch.device = "cpu", on_progress: Progress | None = None,
          checkpointing: Checkpointing | None = None) -> tuple[nn.Module, dict]:
    """Train the model a spec describes; return it (in eval mode) and its metrics.

    ``classifiers`` are the frozen target (white-box) or surrogates (black-box);
    ``init`` is the MSE denoiser that ``stab_mse`` fine-tunes (a copy is trained;
    ``init`` itself is left unchanged). ``checkpointing``: resumable states (see ``fit``).
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
    position = fit(model, loss_fn, train_set, spec, device, on_progress, checkpointing)
    model.eval()
    metrics = evaluate(spec, model, frozen, test_set, device)
    metrics.update(train_loss=position.losses[-1] if position.losses else float("nan"),
                   seconds=position.seconds + time.monotonic() - started)
    return model, metrics


RESUME_FORMAT, RESUME_VERSION = "dsq-resumable-training", 1


@dataclass
class Checkpointing:
    """How ``fit`` keeps a resumable state: the one to start from, where to hand new ones, how often."""

    saved: object = None  # a state read back (None: start at epoch 1); checked before use
    save: Callable[[dict], None] | None = None  # None: no state is made
    say: Callable[[str], None] = lambda line: None  # one line for the job's log
    every_seconds: float = 300.0  # within an epoch; every epoch's end is a checkpoint too


@dataclass
class Position:
    """Where a training is: epochs done, batches done of the next one, and what the losses were."""

    epoch: int = 0
    step: int = 0
    total: float = 0.0  # sum of the batch losses of the epoch under way
    losses: list = field(default_factory=list)  # each finished epoch's mean batch loss
    seconds: float = 0.0  # time trained before this run resumed
    rng: dict | None = None  # the RNG states mid-epoch (an epoch's start reseeds every generator)


def fit(model, loss_fn, train_set, spec, device, on_progress: Progress | None,
        checkpointing: Checkpointing | None = None) -> Position:
    """Run ``spec.epochs`` epochs (from a resumable state, if one is given and fits); return where it ended.

    Raises TrainingDiverged as soon as a batch loss, or the weights after an epoch, are not finite.
    """
    keep = checkpointing or Checkpointing()
    optimizer, scheduler = make_optimizer(spec, _trainable(model))
    position = Position()
    if keep.saved is not None:
        position, optimizer, scheduler = _resume(spec, model, optimizer, scheduler, keep)
    noise = torch.Generator(device=device)
    started, last_save = time.monotonic(), time.monotonic()

    def checkpoint(at: Position) -> None:
        nonlocal last_save
        if keep.save is None:
            return
        keep.save(_state(spec, model, optimizer, scheduler, at, position.seconds + time.monotonic() - started))
        last_save = time.monotonic()

    def mid_epoch(at: Position) -> None:
        if keep.save is not None and time.monotonic() - last_save >= keep.every_seconds:
            checkpoint(Position(at.epoch, at.step, at.total, at.losses, rng=_rng_states(noise)))

    for epoch in range(position.epoch, spec.epochs):
        model.train()
        noise.manual_seed(seeded(spec.seed, "noise", epoch))
        with private_cpu_rng(seeded(spec.seed, "augment", epoch)):
            if position.rng:
                _set_rng_states(position.rng, noise)
            at = Position(epoch, position.step, position.total, position.losses)
            _epoch(model, loss_fn, optimizer, _loader(train_set, spec, epoch, at.step), device, noise, at, mid_epoch)
        _check_weights(model, optimizer, epoch + 1)
        scheduler.step()
        position = Position(epoch + 1, losses=[*at.losses, at.total / max(at.step, 1)], seconds=position.seconds)
        checkpoint(position)
        if on_progress:
            on_progress(epoch + 1, spec.epochs, {"epoch": epoch + 1, "loss": position.losses[-1]})
    return position


def _trainable(model: nn.Module) -> list:
    return [p for p in model.parameters() if p.requires_grad]


def _epoch(model, loss_fn, optimizer, loader, device, noise, at: Position, mid_epoch) -> None:
    """The rest of an epoch's pass over the training data, from batch ``at.step``; ``at`` counts the batches
    and sums their losses (TrainingDiverged on a non-finite one). ``mid_epoch(at)`` follows every batch."""
    for x, y in loader:
        loss = loss_fn(x.to(device), y.to(device), noise)
        value, at.step = float(loss.detach()), at.step + 1
        if not math.isfinite(value):
            raise TrainingDiverged(f"training diverged: the loss is {value} at epoch {at.epoch + 1}, batch "
                                   f"{at.step}; try a lower learning rate (it is {_learning_rate(optimizer):g})")
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        at.total += value
        mid_epoch(at)


# ----------------------------------------------------------------------------- resumable state
def _state(spec, model, optimizer, scheduler, at: Position, seconds: float) -> dict:
    """A resumable state: tensors and plain data only, so ``torch.load(weights_only=True)`` reads it."""
    return {"format": RESUME_FORMAT, "version": RESUME_VERSION, "epochs": spec.epochs,
            "epoch": at.epoch, "step": at.step, "total": at.total, "losses": list(at.losses), "seconds": seconds,
            "model": {name: tensor.detach().cpu().clone() for name, tensor in model.state_dict().items()},
            "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(), "rng": at.rng}


def _resume(spec, model, optimizer, scheduler, keep: Checkpointing):
    """(the position a saved state holds, optimizer, schedule), all restored; or, when the state does not fit,
    one line said and a fresh start (the model as it was, a new optimizer and schedule)."""
    fresh = {name: tensor.clone() for name, tensor in model.state_dict().items()}
    try:
        position = _restore(spec, model, optimizer, scheduler, keep.saved)
    except (ValueError, KeyError, IndexError, TypeError, AttributeError, RuntimeError) as error:
        model.load_state_dict(fresh)
        reason = f"it lacks {error}" if isinstance(error, KeyError) else checks.first_line(error, 200)
        keep.say(f"the resumable checkpoint does not fit this training ({reason}); starting over from epoch 1")
        optimizer, scheduler = make_optimizer(spec, _trainable(model))
        return Position(), optimizer, scheduler
    where = f"epoch {position.epoch + 1} of {spec.epochs}" + (f", batch {position.step + 1}" if position.step else "")
    keep.say(f"resuming at {where}" if position.epoch < spec.epochs else
             f"resuming after all {spec.epochs} epochs: evaluating and storing the model")
    return position, optimizer, scheduler


def _restore(spec, model, optimizer, scheduler, saved) -> Position:
    """Load a saved state into the model, optimizer and schedule; ValueError (and kin) when it does not fit."""
    from dsq import checkpoints

    if not isinstance(saved, dict) or (saved.get("format"), saved.get("version")) != (RESUME_FORMAT, RESUME_VERSION):
        raise ValueError(f"not a dsq resumable state of version {RESUME_VERSION}")
    epoch, step, losses = saved["epoch"], saved["step"], saved["losses"]
    if saved["epochs"] != spec.epochs or not (isinstance(epoch, int) and isinstance(step, int)
                                              and 0 <= epoch <= spec.epochs and step >= 0 and len(losses) == epoch):
        raise ValueError(f"it is at epoch {epoch!r}, batch {step!r} of {saved['epochs']!r}")
    problem = checkpoints.mismatch(model.state_dict(), saved["model"])
    if problem:
        raise ValueError(f"the model differs: {problem}")
    _check_optimizer_state(optimizer, saved["optimizer"])
    model.load_state_dict(saved["model"], strict=True)
    optimizer.load_state_dict(saved["optimizer"])
    scheduler.load_state_dict(saved["scheduler"])
    rng = saved["rng"] if step else None
    return Position(epoch, step, float(saved["total"]), [float(x) for x in losses], float(saved["seconds"]), rng)


def _check_optimizer_state(optimizer, saved: dict) -> None:
    """ValueError unless every tensor of the saved optimizer state has its parameter's shape."""
    params = [p for group in optimizer.param_groups for p in group["params"]]
    saved_params = [i for group in saved["param_groups"] for i in group["params"]]
    if len(saved_params) != len(params):
        raise ValueError(f"the optimizer had {len(saved_params)} parameters, this model has {len(params)}")
    for index, state in saved["state"].items():
        for name, value in state.items():
            if isinstance(value, torch.Tensor) and value.ndim and value.shape != params[saved_params.index(index)].shape:
                raise ValueError(f"the optimizer's {name} of parameter {index} has shape {tuple(value.shape)}")


def _rng_states(noise: torch.Generator) -> dict:
    """Every RNG state a batch draws from: torch's global CPU one (augmentation, dropout), the noise generator,
    numpy's and Python's, and CUDA's when there is one. (The batch order is the epoch's seeded permutation:
    the batch index is its whole state.)"""
    keys, pos, has_gauss, gauss = np.random.get_state()[1:]
    version, words, python_gauss = random.getstate()
    states = {"torch": torch.get_rng_state(), "noise": noise.get_state(),
              "numpy": {"keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos),
                        "has_gauss": int(has_gauss), "gauss": float(gauss)},
              "python": {"version": version, "words": torch.tensor(words, dtype=torch.int64), "gauss": python_gauss}}
    if torch.cuda.is_available():
        states["cuda"] = torch.cuda.get_rng_state_all()
    return states


def _set_rng_states(states: dict, noise: torch.Generator) -> None:
    torch.set_rng_state(states["torch"])
    noise.set_state(states["noise"])
    numpy = states["numpy"]
    np.random.set_state(("MT19937", numpy["keys"].numpy().astype(np.uint32), numpy["pos"],
                         numpy["has_gauss"], numpy["gauss"]))
    python = states["python"]
    random.setstate((python["version"], tuple(python["words"].tolist()), python["gauss"]))
    if states.get("cuda") and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(states["cuda"])


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


def _loader(dataset, spec, epoch: int, start: int = 0) -> DataLoader:
    """The epoch's shuffled training batches from batch ``start`` on, in an order seeded by (spec seed, epoch).

    The batches skipped are never read, so their augmentation draws nothing: a resumed epoch restores
    the RNG states as they were after batch ``start``.
    """
    order = torch.Generator().manual_seed(seeded(spec.seed, "order", epoch))
    batches = list(BatchSampler(RandomSampler(dataset, generator=order), spec.batch_size, drop_last=False))
    return DataLoader(dataset, batch_sampler=batches[start:], generator=torch.Generator())


def _batches(dataset, batch_size: int) -> DataLoader:
    """The dataset in order, in batches; its own generator keeps the global RNG untouched."""
    return DataLoader(dataset, batch_size=batch_size, shuffle=False, generator=torch.Generator())
