"""The inference fast path computes the same function as the model it was prepared from."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
from torch import nn

from dsq import fastpath, smoothing
from dsq.classifiers import build_classifier
from dsq.denoisers import build_denoiser
from dsq.errors import InvalidArgument

RTOL = 1e-4


def randomize_batch_norms(model: nn.Module, seed: int = 0) -> nn.Module:
    """Non-trivial running statistics and affine parameters, so folding really changes weights."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, nn.BatchNorm2d):
                size = module.num_features
                module.running_mean.copy_(torch.rand(size, generator=generator) - 0.5)
                module.running_var.copy_(torch.rand(size, generator=generator) + 0.5)
                module.weight.copy_(torch.rand(size, generator=generator) + 0.5)
                module.bias.copy_(torch.rand(size, generator=generator) - 0.5)
    return model.eval()


def dncnn(channels=3, **kwargs):
    torch.manual_seed(0)
    denoiser = build_denoiser("dncnn", channels, **kwargs)
    for module in denoiser.modules():  # the reference init zeroes the last conv: D would be the identity
        if isinstance(module, nn.Conv2d):
            nn.init.normal_(module.weight, 0.0, 0.05)
    return randomize_batch_norms(denoiser)


def classifier(arch, channels=3, **options):
    torch.manual_seed(1)
    model = build_classifier(arch, num_classes=10, in_channels=channels, mean=[0.5] * channels,
                             std=[0.25] * channels, **options)
    return randomize_batch_norms(model)


def relative_error(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max() / b.abs().max())


def outputs(model, x):
    with torch.inference_mode():
        return model(x)


def batch_norms(model):
    return [m for m in model.modules() if isinstance(m, nn.BatchNorm2d)]


CASES = {
    "dncnn": (lambda: dncnn(), (3, 32, 32), 15),
    "cifar_resnet20": (lambda: classifier("cifar_resnet20"), (3, 32, 32), 21),
    "small_cnn": (lambda: classifier("small_cnn", 1), (1, 8, 8), 3),
    "dncnn + cifar_resnet20": (lambda: nn.Sequential(dncnn(), classifier("cifar_resnet20")), (3, 32, 32), 36),
    "small dncnn + small_cnn": (lambda: nn.Sequential(dncnn(1, depth=5, width=16), classifier("small_cnn", 1)),
                                (1, 8, 8), 6),
    "resnet18": (lambda: classifier("resnet18"), (3, 64, 64), 20),
}


@pytest.mark.parametrize("name", list(CASES))
@pytest.mark.parametrize("channels_last", [None, False, True])
def test_prepared_model_matches_the_original(name, channels_last):
    build, shape, expected_folds = CASES[name]
    model = build()
    x = torch.rand(4, *shape, generator=torch.Generator().manual_seed(2))
    prepared = fastpath.prepare_for_inference(model, device="cpu", channels_last=channels_last)
    assert prepared.folded == expected_folds
    assert batch_norms(prepared) == []  # every BN of these nets directly and solely follows a conv
    assert relative_error(outputs(prepared, x), outputs(model, x)) < RTOL
    assert outputs(prepared, x).dtype == torch.float32


def test_the_original_model_is_unchanged():
    model = nn.Sequential(dncnn(), classifier("cifar_resnet20")).train()
    before = copy.deepcopy(model.state_dict())
    norms = len(batch_norms(model))
    fastpath.prepare_for_inference(model, device="cpu", channels_last=True)
    assert model.training and all(m.training for m in model.modules())
    assert len(batch_norms(model)) == norms
    after = model.state_dict()
    assert before.keys() == after.keys()
    for key, tensor in before.items():
        assert torch.equal(tensor, after[key]), key
        assert after[key].is_contiguous(), key  # not converted to channels-last in place
    assert all(p.requires_grad for p in model.parameters())


class ConvFeedsBatchNormAndSum(nn.Module):
    """conv's output goes to the BN and to a residual sum: folding would change the sum."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 3, 3, padding=1)
        self.bn = nn.BatchNorm2d(3)
        self.other = nn.Conv2d(3, 3, 3, padding=1)
        self.other_bn = nn.BatchNorm2d(3)

    def forward(self, x):
        y = self.conv(x)
        return self.bn(y) + y + self.other_bn(self.other(x))


class SharedBatchNorm(nn.Module):
    """One BN after two convolutions: it can be folded into neither."""

    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Conv2d(3, 4, 3, padding=1), nn.Conv2d(3, 4, 1)
        self.bn = nn.BatchNorm2d(4)

    def forward(self, x):
        return self.bn(self.a(x)) * self.bn(self.b(x))


class InputDependentControlFlow(nn.Module):
    """A forward torch.fx cannot trace: left as it is, its children still visited."""

    def __init__(self):
        super().__init__()
        self.conv, self.bn = nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4)
        self.tail = nn.Sequential(nn.Conv2d(4, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU())

    def forward(self, x):
        y = self.bn(self.conv(x))
        if y.sum() > 0:
            y = -y
        return self.tail(y)


def weight_normed():
    """A conv whose weight is recomputed from a parametrization at every call: folding would be undone."""
    conv = nn.utils.parametrizations.weight_norm(nn.Conv2d(3, 4, 3, padding=1))
    return nn.Sequential(conv, nn.BatchNorm2d(4), nn.Conv2d(4, 4, 3, padding=1), nn.BatchNorm2d(4))


def hooked():
    """An old-style hook on the conv (as torch.nn.utils.weight_norm installs): left alone."""
    model = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4))
    model[0].register_forward_pre_hook(lambda module, args: None)
    return model


@pytest.mark.parametrize("module, expected_folds", [
    (ConvFeedsBatchNormAndSum(), 1), (SharedBatchNorm(), 0), (InputDependentControlFlow(), 1),
    (weight_normed(), 1), (hooked(), 0),
    (build_denoiser("memnet", 3, width=8, num_memblock=2, num_resblock=2), 0),  # BN -> ReLU -> conv
])
def test_folds_only_where_the_conv_output_feeds_only_that_batch_norm(module, expected_folds):
    model = randomize_batch_norms(module)
    x = torch.rand(4, 3, 16, 16, generator=torch.Generator().manual_seed(3))
    prepared = fastpath.prepare_for_inference(model, device="cpu")
    assert prepared.folded == expected_folds
    assert relative_error(outputs(prepared, x), outputs(model, x)) < RTOL


def test_batch_norm_in_training_mode_is_never_folded():
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4)).train()
    with pytest.raises(InvalidArgument):
        fastpath.fold_batch_norms(model)


def test_channels_last_by_default_for_convolutional_models_only():
    convolutional = fastpath.prepare_for_inference(classifier("small_cnn", 1), device="cpu")
    linear = fastpath.prepare_for_inference(nn.Sequential(nn.Flatten(), nn.Linear(64, 10)), device="cpu")
    assert convolutional.channels_last is True and linear.channels_last is False
    assert convolutional.net[1].features[0].weight.is_contiguous(memory_format=torch.channels_last)
    assert convolutional.describe()["folded_batch_norms"] == 3
    assert outputs(linear, torch.rand(2, 1, 8, 8)).shape == (2, 10)


def test_reduced_precision_is_close_and_returns_float32_logits():
    model = nn.Sequential(dncnn(1, depth=5, width=16), classifier("small_cnn", 1))
    x = torch.rand(16, 1, 8, 8, generator=torch.Generator().manual_seed(4))
    prepared = fastpath.prepare_for_inference(model, device="cpu", precision="bf16")
    logits = outputs(prepared, x)
    assert logits.dtype == torch.float32
    assert relative_error(logits, outputs(model, x)) < 0.1
    assert prepared.describe()["precision"] == "bf16"


def test_bad_requests_are_refused():
    with pytest.raises(InvalidArgument):
        fastpath.prepare_for_inference(classifier("small_cnn", 1), device="cpu", precision="int4")
    prepared = fastpath.prepare_for_inference(classifier("small_cnn", 1), device="cpu")
    with pytest.raises(InvalidArgument):
        prepared.train()
    prepared.eval()  # eval stays allowed: sampling.eval_mode calls it


def pipeline(top_class_boost: float = 0.0) -> nn.Module:
    """Small DnCNN + small CNN on 8x8 images; a boost on one logit makes the vote well separated."""
    model = nn.Sequential(dncnn(1, depth=5, width=16), classifier("small_cnn", 1))
    with torch.no_grad():
        model[1][1].classifier.bias[3] += top_class_boost
    return model


CERTIFY = dict(sigma=0.25, n0=64, n=512, alpha=0.001, batch_size=100, seed=7)


def test_certificates_with_the_prepared_model_equal_the_original_on_a_well_separated_input():
    model = pipeline(top_class_boost=20.0)
    x = torch.rand(1, 8, 8, generator=torch.Generator().manual_seed(5))
    prepared = fastpath.prepare_for_inference(model, device="cpu")
    original = smoothing.certify(model, x, **CERTIFY)
    fast = smoothing.certify(prepared, x, **CERTIFY)
    assert fast.prediction == original.prediction == 3
    assert (fast.radius, fast.p_lower) == (original.radius, original.p_lower)
    np.testing.assert_array_equal(fast.counts_selection, original.counts_selection)
    np.testing.assert_array_equal(fast.counts_estimation, original.counts_estimation)


def test_counts_with_the_prepared_model_differ_at_most_by_rare_near_ties():
    model = pipeline()
    x = torch.rand(1, 8, 8, generator=torch.Generator().manual_seed(6))
    prepared = fastpath.prepare_for_inference(model, device="cpu")
    spread = {**CERTIFY, "sigma": 1.0}  # enough noise to split the vote of these random weights
    original = smoothing.certify(model, x, **spread)
    fast = smoothing.certify(prepared, x, **spread)
    assert np.count_nonzero(original.counts_estimation) > 1  # a spread vote, not a trivial one
    assert np.abs(fast.counts_estimation - original.counts_estimation).sum() <= 2
    assert np.abs(fast.counts_selection - original.counts_selection).sum() <= 2


# ----------------------------------------------------------------------------- the benchmark's helpers (not timed)
def test_no_library_module_imports_the_benchmark():
    """bench/ is a leaf: dsq/ and workers/ neither import it nor name it in a string (``dsq bench`` loads it)."""
    import ast
    import re
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    named = re.compile(r"^bench(\.\w+)*$|-m bench\b|\bbench\.[A-Za-z_]|(?<![\w./-])bench/")
    found = []
    for path in sorted([*(root / "dsq").rglob("*.py"), *(root / "workers").rglob("*.py")]):
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            modules = [alias.name for alias in node.names] if isinstance(node, ast.Import) else \
                [node.module or ""] if isinstance(node, ast.ImportFrom) and node.level == 0 else []
            strings = [node.value] if isinstance(node, ast.Constant) and isinstance(node.value, str) else []
            if any(m == "bench" or m.startswith("bench.") for m in modules) or any(named.search(s) for s in strings):
                found.append(f"{path.relative_to(root)}:{node.lineno}")
    assert not found, found


def test_reference_loop_counts_every_sample():
    from bench import trials

    model = pipeline()
    counts = trials.reference_sample_noise(model, torch.rand(1, 8, 8), 250, 100, 0.5, 10)
    assert counts.sum() == 250 and len(counts) == 10


def test_benchmark_ratios_and_verdicts():
    import bench

    results = {"forward_samples_per_s": 100.0, "sampling_samples_per_s": 95.0, "reference_samples_per_s": 70.0,
               "peak_rss_mb_small_n": 1000.0, "peak_rss_mb_large_n": 1050.0,
               "ray_jobs": {"workers_1": {"samples_per_s": 80.0, "in_process_control_samples_per_s": 100.0,
                                            "workers": 1, "threads_per_worker": 2,
                                            "samples_per_s_with_startup": 60.0}}}
    out = bench.ratios(results)
    results |= out | {"pair": "p", "config": {"batch_size": 32, "threads": 2, "device": "cpu"}}
    [(header, rows, title)] = bench.tables(results)  # no variants or sweep measured: the summary only
    assert title == "p, batch 32, 2 threads, cpu" and len(header) == 4
    assert ["sampling_over_reference", "1.357", "target >= 1.5", "FAIL"] in rows
    assert out["sampling_over_forward"] == pytest.approx(0.95)
    assert out["ray_over_in_process"] == pytest.approx(0.8)
    assert out["verdicts"] == {"sampling_over_forward": "PASS", "ray_over_in_process": "FAIL",
                               "memory_large_over_small": "PASS", "sampling_over_reference": "FAIL"}


def test_synthetic_cifar10_reads_as_cifar10(tmp_path):
    from dsq import datasets
    from bench import rayjobs

    rayjobs.write_synthetic_cifar10(tmp_path, images=3)
    test_set = datasets.get_dataset("cifar10", "test", root=str(tmp_path))
    assert len(test_set) == 3 and tuple(test_set[0][0].shape) == (3, 32, 32)


def test_steady_rate_skips_start_up_and_the_draining_last_image():
    from bench import rayjobs

    assert rayjobs.steady_rate([10.0, 12.0, 14.0, 14.5], per_image=100) == pytest.approx(50.0)
    assert np.isnan(rayjobs.steady_rate([10.0, 12.0], per_image=100))


def test_benchmark_batch_size_is_what_a_certify_job_would_choose():
    import bench
    from dsq import sizing

    digits = bench.with_batch_size(bench.BenchConfig(pair="digits"))
    assert digits.batch_size == sizing.CPU_ACTIVATION_BYTES // (64 * 8 * 8 * 4) == 512  # small_cnn's widest layer
    cifar = bench.with_batch_size(bench.BenchConfig(pair="cifar"))
    assert cifar.batch_size == sizing.CPU_ACTIVATION_BYTES // (64 * 32 * 32 * 4) == 32  # DnCNN's 64 channels
    assert bench.with_batch_size(bench.BenchConfig(batch_size=100)).batch_size == 100
