"""Denoisers: shapes, sizes, initial behaviour, and compatibility with the reference's names."""

import pytest
import torch

from dsq.checkpoints import load_checkpoint
from dsq.denoisers import DENOISERS, DnCNN, MemNet, build_denoiser
from dsq.errors import InvalidArgument, UnknownName


def count_parameters(model):
    return sum(p.numel() for p in model.parameters())


def randomize(model, seed=0):
    """Give every parameter and BN statistic non-trivial values (unlike the init)."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, tensor in model.state_dict().items():
            if tensor.is_floating_point():
                values = torch.rand(tensor.shape, generator=generator)
                tensor.copy_(values * 0.1 + (0.5 if "running_var" in name else 0.0))
    return model


def dncnn_reference_keys(depth=17):
    """Keys of microsoft/denoised-smoothing's DnCNN: ``self.dncnn`` = conv, relu,
    (conv, bn, relu) × (depth − 2), conv — first conv with bias, the others without."""
    keys = ["dncnn.0.weight", "dncnn.0.bias"]
    for block in range(depth - 2):
        conv, bn = 2 + 3 * block, 3 + 3 * block
        keys.append(f"dncnn.{conv}.weight")
        keys += [f"dncnn.{bn}.{s}" for s in
                 ("weight", "bias", "running_mean", "running_var", "num_batches_tracked")]
    keys.append(f"dncnn.{3 * (depth - 2) + 2}.weight")
    return keys


def memnet_reference_keys(num_memblock=3, num_resblock=6):
    """Keys of the reference MemNet (BNReLUConv = Sequential(bn, relu, conv))."""
    def unit(prefix):
        bn = [f"{prefix}.bn.{s}" for s in
              ("weight", "bias", "running_mean", "running_var", "num_batches_tracked")]
        return bn + [f"{prefix}.conv.weight"]
    keys = unit("feature_extractor") + unit("reconstructor")
    for m in range(num_memblock):
        for r in range(num_resblock):
            for half in ("relu_conv1", "relu_conv2"):
                keys += unit(f"dense_memory.{m}.recursive_unit.{r}.{half}")
        keys += unit(f"dense_memory.{m}.gate_unit")
    return keys


@pytest.mark.parametrize("arch", sorted(DENOISERS))
@pytest.mark.parametrize("channels", [1, 3])
def test_output_shape_equals_input_shape(arch, channels):
    model = build_denoiser(arch, channels).eval()
    noisy = torch.rand(2, channels, 12, 10)
    with torch.no_grad():
        assert model(noisy).shape == noisy.shape


def test_dncnn_parameter_count_matches_the_paper():
    # first conv C*64*9 + 64 bias; 15 × (64*64*9 conv + 2*64 BN); last conv 64*C*9.
    def expected(c, w=64, depth=17):
        return c * w * 9 + w + (depth - 2) * (w * w * 9 + 2 * w) + w * c * 9
    assert count_parameters(build_denoiser("dncnn", 3)) == expected(3) == 558_400  # ≈ 0.56 M
    assert count_parameters(build_denoiser("dncnn", 1)) == expected(1) == 556_096
    assert count_parameters(build_denoiser("dncnn_wide", 3)) == expected(3, w=128) == 2_222_720


def test_memnet_parameter_count_and_dense_gates():
    model = build_denoiser("memnet", 3)
    # resblock: 2 × (BN 2*64 + conv 64*64*9); gate m: BN + 1×1 conv over (6+m)*64 channels.
    resblocks = 18 * 2 * (2 * 64 + 64 * 64 * 9)
    gates = sum(2 * (6 + m) * 64 + (6 + m) * 64 * 64 for m in (1, 2, 3))
    ends = (2 * 3 + 3 * 64 * 9) + (2 * 64 + 64 * 3 * 9)
    assert count_parameters(model) == resblocks + gates + ends == 1_436_678
    for m, block in enumerate(model.dense_memory, start=1):
        assert block.gate_unit.conv.in_channels == (6 + m) * 64


def test_dncnn_is_the_identity_at_initialisation():
    # The reference zero-initialises the last conv (and it has no bias): noise estimate ≡ 0.
    noisy = torch.rand(3, 1, 8, 8)
    for model in (build_denoiser("dncnn", 1), DnCNN(in_channels=1, depth=5, width=8)):
        assert torch.equal(model.train()(noisy), noisy)
        assert torch.equal(model.eval()(noisy), noisy)


def test_memnet_global_residual():
    # The reference keeps the default init (not the identity); with the reconstructor's conv
    # zeroed only the global skip x̃ + ... remains, so D becomes the identity.
    model = MemNet(in_channels=3, width=8, num_memblock=2, num_resblock=2).eval()
    noisy = torch.rand(2, 3, 8, 8)
    with torch.no_grad():
        assert not torch.allclose(model(noisy), noisy)
        model.reconstructor.conv.weight.zero_()
        assert torch.equal(model(noisy), noisy)


def test_dncnn_output_is_input_minus_predicted_noise():
    model = randomize(DnCNN(in_channels=3, depth=4, width=8)).eval()
    noisy = torch.rand(2, 3, 8, 8)
    with torch.no_grad():
        assert torch.allclose(model(noisy), noisy - model.dncnn(noisy))


@pytest.mark.parametrize("arch", sorted(DENOISERS))
def test_eval_mode_does_not_couple_samples_in_a_batch(arch):
    model = randomize(build_denoiser(arch, 1)).eval()
    batch = torch.rand(4, 1, 8, 8)
    with torch.no_grad():
        alone = model(batch[:1])
        together = model(batch)[:1]
    assert torch.allclose(alone, together, atol=1e-6)


def test_parameter_names_are_the_reference_names():
    assert list(build_denoiser("dncnn", 3).state_dict()) == dncnn_reference_keys()
    assert list(build_denoiser("dncnn_wide", 3).state_dict()) == dncnn_reference_keys()
    assert list(build_denoiser("memnet", 3).state_dict()) == memnet_reference_keys()
    assert build_denoiser("dncnn", 3).dncnn[3].eps == 1e-4  # affects eval outputs


@pytest.mark.parametrize("reference_arch, channels, depth, width", [
    ("cifar_dncnn", 3, 17, 64), ("dncnn", 1, 5, 16), ("imagenet_dncnn", 3, 6, 8),
    ("cifar_dncnn_wide", 3, 4, 16),
])
def test_reference_dncnn_checkpoint_loads(tmp_path, reference_arch, channels, depth, width):
    # depth and width are read back from the tensors, so small variants load as well
    source = randomize(DnCNN(in_channels=channels, depth=depth, width=width)).eval()
    state = {f"module.{key}": value for key, value in source.state_dict().items()}
    assert [k[len("module."):] for k in state] == dncnn_reference_keys(depth)
    path = tmp_path / "checkpoint.pth.tar"
    torch.save({"epoch": 90, "arch": reference_arch, "state_dict": state}, path)
    model, metadata = load_checkpoint(path)
    assert metadata["kind"] == "denoiser" and metadata["reference_arch"] == reference_arch
    assert metadata["arch_kwargs"] == {"in_channels": channels, "depth": depth, "width": width}
    assert metadata["epoch"] == 90
    noisy = torch.rand(2, channels, 8, 8)
    with torch.no_grad():
        assert torch.equal(model(noisy), source(noisy))


def test_reference_memnet_checkpoint_loads(tmp_path):
    source = randomize(MemNet(in_channels=3)).eval()
    state = {f"module.{key}": value for key, value in source.state_dict().items()}
    torch.save({"arch": "imagenet_memnet", "state_dict": state}, tmp_path / "m.pth")
    model, metadata = load_checkpoint(tmp_path / "m.pth")
    assert metadata["arch"] == "memnet" and not model.training
    noisy = torch.rand(1, 3, 8, 8)
    with torch.no_grad():
        assert torch.equal(model(noisy), source(noisy))


def test_unknown_arch_lists_the_known_ones():
    with pytest.raises(UnknownName, match="dncnn, dncnn_wide, memnet, unet"):
        build_denoiser("restormer", 3)


def test_bad_sizes_are_invalid_arguments():
    with pytest.raises(InvalidArgument, match="depth"):
        build_denoiser("dncnn", 3, depth=1)
    with pytest.raises(InvalidArgument, match="in_channels"):
        build_denoiser("memnet", 0)
    with pytest.raises(InvalidArgument, match="dncnn"):
        build_denoiser("dncnn", 3, heads=4)
