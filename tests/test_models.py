"""The harness's models: output shapes for every data shape, parameter counts against the
published architectures, training through dfp layers, reproducible builds, clear errors."""

from __future__ import annotations

import copy
import math

import pytest
import torch
from torch import nn

import dfp
import dfp.nn
from dfp import models

DATA_SHAPES = [(1, 8), (1, 28), (3, 32)]  # (channels, image size): digits, MNIST, CIFAR-10


def parameter_count(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


@pytest.fixture(scope="module")
def cifar_resnet18() -> nn.Module:
    """ResNet-18 for CIFAR-10, built once (half a second): tests must not change it."""
    torch.manual_seed(0)
    return models.build("resnet18", 3, 10, 32)


@pytest.mark.parametrize("name", models.MODELS)
@pytest.mark.parametrize(("channels", "size"), DATA_SHAPES)
def test_logits_have_one_row_per_image_and_one_column_per_class(name, channels, size):
    torch.manual_seed(0)
    model = models.build(name, channels, 7, size).eval()
    with torch.no_grad():
        logits = model(torch.randn(2, channels, size, size))
    assert logits.shape == (2, 7)
    assert logits.dtype == torch.float32
    assert torch.isfinite(logits).all()


def test_resnet20_has_he_et_al_parameter_count():
    # He et al.'s ResNet-20 with option-A (zero-padding) shortcuts has the often quoted
    # 269,722 parameters (0.27 M); the two option-B projections add a 1x1 conv and a batch
    # norm each: 16 * 32 + 2 * 32 + 32 * 64 + 2 * 64 = 2,752.
    model = models.build("resnet20", 3, 10, 32)
    assert parameter_count(model) == 269_722 + 2_752
    convs = [m for m in model.modules() if isinstance(m, nn.Conv2d)]
    assert len(convs) == 1 + 3 * 3 * 2 + 2  # stem, 9 blocks of two, two projections
    assert sorted({m.out_channels for m in convs}) == [16, 32, 64]


def test_resnet18_has_the_cifar_variant_parameter_count(cifar_resnet18):
    model = cifar_resnet18
    assert parameter_count(model) == 11_173_962  # the CIFAR ResNet-18: 3x3 stem, no max-pool
    assert model.conv1.kernel_size == (3, 3) and model.conv1.stride == (1, 1)
    assert not any(isinstance(m, nn.MaxPool2d) for m in model.modules())
    assert model.fc.in_features == 512


def test_parameter_counts_follow_channels_classes_and_image_size():
    # Only the stem conv depends on the channels and only fc on the classes.
    base = parameter_count(models.build("resnet20", 3, 10, 32))
    assert parameter_count(models.build("resnet20", 1, 10, 32)) == base - 2 * 16 * 9
    assert parameter_count(models.build("resnet20", 3, 100, 32)) == base + 90 * (64 + 1)
    # The small CNN flattens 64 x (size / 4)^2 features into its classifier.
    assert models.build("small_cnn", 1, 10, 8).fc.in_features == 64 * 2 * 2
    assert models.build("small_cnn", 1, 10, 28).fc.in_features == 64 * 7 * 7


@pytest.mark.parametrize(("name", "channels", "size"), [("small_cnn", 1, 8), ("resnet20", 3, 32), ("resnet18", 3, 32)])
def test_converted_model_trains_through_dfp_layers(name, channels, size):
    torch.manual_seed(0)
    model = models.build(name, channels, 10, size)
    layers = sum(isinstance(m, (nn.Conv2d, nn.Linear)) for m in model.modules())
    dfp.convert(model, "dfp16")
    assert sum(isinstance(m, (dfp.nn.Conv2d, dfp.nn.Linear)) for m in model.modules()) == layers
    x, y = torch.randn(2, channels, size, size), torch.tensor([3, 5])
    loss = nn.functional.cross_entropy(model(x), y)
    loss.backward()
    assert math.isfinite(loss.item())
    for parameter_name, p in model.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), parameter_name
    assert model.conv1.weight.grad.abs().sum() > 0 and model.fc.weight.grad.abs().sum() > 0


@pytest.mark.parametrize("name", models.MODELS)
def test_first_conv_and_classifier_are_named_for_keeping_them_fp32(name, cifar_resnet18):
    model = copy.deepcopy(cifar_resnet18) if name == "resnet18" else models.build(name, 3, 10, 32)
    assert isinstance(model.conv1, nn.Conv2d) and model.conv1.in_channels == 3
    assert isinstance(model.fc, nn.Linear) and model.fc.out_features == 10
    dfp.convert(model, "dfp16", filter_fn=lambda layer, module: layer not in ("conv1", "fc"))
    assert type(model.conv1) is nn.Conv2d and type(model.fc) is nn.Linear
    assert sum(isinstance(m, dfp.nn.Conv2d) for m in model.modules()) > 0


@pytest.mark.parametrize("name", ["small_cnn", "resnet20"])  # resnet18 shares resnet20's code
def test_build_is_reproducible_under_a_seed(name):
    def weights(seed: int) -> dict[str, torch.Tensor]:
        torch.manual_seed(seed)
        return models.build(name, 1, 10, 8).state_dict()

    first, again, other = weights(0), weights(0), weights(1)
    assert all(torch.equal(first[k], again[k]) for k in first)
    assert not torch.equal(first["conv1.weight"], other["conv1.weight"])


def test_convolutions_get_he_initialisation(cifar_resnet18):
    weight = cifar_resnet18.stages[3][1].conv2.weight  # 512 x 512 x 3 x 3
    expected = math.sqrt(2 / (512 * 9))
    assert abs(weight.std().item() / expected - 1) < 0.01
    assert abs(weight.mean().item()) < 0.01 * expected


def test_unknown_model_lists_the_known_ones():
    with pytest.raises(ValueError, match="unknown model 'vgg16'; choose one of small_cnn, resnet20, resnet18"):
        models.build("vgg16", 3, 10, 32)


@pytest.mark.parametrize(("name", "size"), [("small_cnn", 3), ("resnet20", 2), ("resnet18", 4)])
def test_too_small_images_are_refused(name, size):
    with pytest.raises(ValueError, match=f"needs images of at least .* got {size}x{size}"):
        models.build(name, 1, 10, size)


@pytest.mark.parametrize("argument", ["in_channels", "num_classes", "image_size"])
@pytest.mark.parametrize("value", [0, -3, 2.0, True])
def test_sizes_must_be_positive_ints(argument, value):
    arguments = {"in_channels": 1, "num_classes": 10, "image_size": 8, argument: value}
    with pytest.raises(ValueError, match=f"{argument} must be a positive int"):
        models.build("small_cnn", **arguments)


def test_small_cnn_names_the_expected_input_shape():
    model = models.build("small_cnn", 1, 10, 8)
    with pytest.raises(
        ValueError, match=r"built for images of shape \(1, 8, 8\).*got a batch of shape \(2, 1, 28, 28\)"
    ):
        model(torch.randn(2, 1, 28, 28))
