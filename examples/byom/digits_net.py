"""A classifier written without dsq, to certify with dsq ("Bring your own model" in the README).

    python examples/byom/digits_net.py OUT_DIR

trains a small convolutional net on the digits train split with Gaussian noise (sigma 0.25), as
randomized smoothing needs, in about ten seconds on a CPU, and writes it twice:

* ``OUT_DIR/digits_net.pt``: TorchScript (``torch.jit.save``), for ``--classifier OUT_DIR/digits_net.pt``;
* ``OUT_DIR/digits_net.weights.pt``: its state dict, for ``--classifier digits_net:make`` with
  ``--classifier-weights`` (this module must then be importable: ``PYTHONPATH=examples/byom``).

Like most classifiers it expects normalized pixels, so dsq is told its ``--mean`` and ``--std``.
"""

import sys
import warnings
from pathlib import Path

import torch
from torch import nn

MEAN, STD = 0.3, 0.38  # the digits' pixel statistics, rounded: pass them as --mean 0.3 --std 0.38


def make(width: int = 16, classes: int = 10) -> nn.Module:
    """The architecture: two convolutions and a linear head, for 1-channel 8x8 images."""
    return nn.Sequential(
        nn.Conv2d(1, width, 3, padding=1), nn.ReLU(),
        nn.Conv2d(width, 2 * width, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
        nn.Flatten(), nn.Linear(2 * width * 16, classes))


def train(out: Path, sigma: float = 0.25, epochs: int = 30) -> None:
    from dsq.datasets import get_dataset

    torch.manual_seed(0)
    data = get_dataset("digits", "train")
    images = torch.stack([data[i][0] for i in range(len(data))])
    labels = torch.tensor([data[i][1] for i in range(len(data))])
    net = make()
    optimizer = torch.optim.Adam(net.parameters(), lr=3e-3)
    for _ in range(epochs):
        for batch in torch.randperm(len(images)).split(64):
            noisy = images[batch] + sigma * torch.randn_like(images[batch])
            loss = nn.functional.cross_entropy(net((noisy - MEAN) / STD), labels[batch])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
    net.eval()
    out.mkdir(parents=True, exist_ok=True)
    torch.save(net.state_dict(), out / "digits_net.weights.pt")
    with warnings.catch_warnings():  # torch 2.14 marks TorchScript deprecated in favour of torch.export
        warnings.simplefilter("ignore", FutureWarning)
        torch.jit.save(torch.jit.script(net), out / "digits_net.pt")
    print(f"wrote {out / 'digits_net.pt'} and {out / 'digits_net.weights.pt'}")


if __name__ == "__main__":
    train(Path(sys.argv[1] if len(sys.argv) > 1 else "."))
