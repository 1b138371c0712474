"""The image classifiers of the comparison harness, from plain torch layers and
``dfp.nn.BatchNorm2d`` (torch's batch norm, bit for bit, but where its training kernel
would stall on several threads: channel counts that are not a multiple of 16, as
pruning and Net2Net leave them; and on the batch statistics a DFP16 convolution hands
over). Each ReLU behind a batch norm, and a residual added before it, go through
``norm_relu``: fused into the norm's passes where it runs dfp's kernels.

``build(name, in_channels, num_classes, image_size)`` returns a float32 ``nn.Module``
mapping images ``(N, in_channels, image_size, image_size)`` to logits ``(N, num_classes)``.
The models know nothing of number formats: the harness converts them with ``dfp.convert``. Every
model calls its first convolution ``conv1`` and its classifier ``fc``, so a format can
keep them in fp32 by name (``filter_fn=lambda name, m: name not in ("conv1", "fc")``).

Convolutions get He et al.'s initialisation for ReLU networks (normal, std
``sqrt(2 / fan_in)``, He et al. 2015); batch norms start at weight 1, bias 0 (the last
batch norm of a residual branch is not zero-initialised, as in He et al. 2016); linear
layers keep PyTorch's default. Draws come from torch's global generator, so
``torch.manual_seed`` makes ``build`` reproducible.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch import nn

from .nn.batch_norm import BatchNorm2d, _add_relu


def norm_relu(norm: nn.Module, x: torch.Tensor, residual: torch.Tensor | None = None) -> torch.Tensor:
    """``torch.relu(norm(x) + residual)`` (residual optional): one fused call where norm is
    ``dfp.nn.BatchNorm2d``, torch's ops after any other norm (one swapped in by hand, say)."""
    if isinstance(norm, BatchNorm2d):
        return norm(x, residual=residual, relu=True)
    return _add_relu(norm(x), residual, relu=True)


class SmallCNN(nn.Module):
    """Three 3x3 conv-BN-ReLU layers (16, 32, 64 channels), a 2x2 max-pool after the
    first two, and a linear classifier on the flattened features: about 25 k parameters
    for 8x8 digits, 55 k for 28x28 MNIST.

    (N, in_channels, image_size, image_size) -> (N, num_classes); ``image_size >= 4``.
    """

    def __init__(self, in_channels: int, num_classes: int, image_size: int) -> None:
        super().__init__()
        self.input_shape = (in_channels, image_size, image_size)
        self.conv1 = nn.Conv2d(in_channels, 16, 3, padding=1, bias=False)
        self.bn1 = BatchNorm2d(16)
        self.conv2 = nn.Conv2d(16, 32, 3, padding=1, bias=False)
        self.bn2 = BatchNorm2d(32)
        self.conv3 = nn.Conv2d(32, 64, 3, padding=1, bias=False)
        self.bn3 = BatchNorm2d(64)
        self.pool = nn.MaxPool2d(2)
        pooled = image_size // 2 // 2
        self.fc = nn.Linear(64 * pooled * pooled, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # The classifier's width depends on the image size, so say so before a shape error deep inside.
        if tuple(x.shape[1:]) != self.input_shape:
            raise ValueError(
                f"SmallCNN was built for images of shape {self.input_shape} (C, H, W), got a batch of shape "
                f"{tuple(x.shape)}; build it with the data set's channels and image size"
            )
        x = self.pool(norm_relu(self.bn1, self.conv1(x)))
        x = self.pool(norm_relu(self.bn2, self.conv2(x)))
        x = norm_relu(self.bn3, self.conv3(x))
        return self.fc(torch.flatten(x, 1))


class BasicBlock(nn.Module):
    """ResNet basic block (He et al. 2016): conv3x3-BN-ReLU-conv3x3-BN plus the shortcut,
    then ReLU. Where the shape changes the shortcut is a 1x1 convolution with batch norm
    (option B); elsewhere the identity.

    (N, in_channels, H, W) -> (N, out_channels, ceil(H / stride), ceil(W / stride)).
    """

    def __init__(self, in_channels: int, out_channels: int, stride: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, stride, padding=1, bias=False)
        self.bn1 = BatchNorm2d(out_channels)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, padding=1, bias=False)
        self.bn2 = BatchNorm2d(out_channels)
        self.shortcut = nn.Sequential()
        if stride != 1 or in_channels != out_channels:
            self.shortcut = nn.Sequential(
                nn.Conv2d(in_channels, out_channels, 1, stride, bias=False), BatchNorm2d(out_channels)
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = norm_relu(self.bn1, self.conv1(x))
        return norm_relu(self.bn2, self.conv2(y), residual=self.shortcut(x))


class CifarResNet(nn.Module):
    """The CIFAR-style ResNet: a 3x3 stride-1 stem convolution (no max-pool), stages of
    basic blocks whose first block halves the resolution (except in the first stage),
    global average pooling and a linear classifier.

    Args:
        widths: channels of each stage, e.g. (16, 32, 64) for ResNet-20.
        blocks_per_stage: basic blocks in every stage, e.g. 3 for ResNet-20.

    (N, in_channels, H, W) -> (N, num_classes), for any H, W >= 1.
    """

    def __init__(self, widths: Sequence[int], blocks_per_stage: int, in_channels: int, num_classes: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, widths[0], 3, padding=1, bias=False)
        self.bn1 = BatchNorm2d(widths[0])
        stages = []
        channels = widths[0]
        for index, width in enumerate(widths):
            blocks = []
            for block in range(blocks_per_stage):
                stride = 2 if index > 0 and block == 0 else 1
                blocks.append(BasicBlock(channels, width, stride))
                channels = width
            stages.append(nn.Sequential(*blocks))
        self.stages = nn.Sequential(*stages)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(channels, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stages(norm_relu(self.bn1, self.conv1(x)))
        return self.fc(torch.flatten(self.pool(x), 1))


def resnet20(in_channels: int, num_classes: int) -> CifarResNet:
    """He et al. 2016's CIFAR ResNet-20: 16/32/64 channels, 3 blocks per stage; 0.27 M
    parameters for 3 channels and 10 classes (272,474 with the option-B shortcuts)."""
    return CifarResNet((16, 32, 64), 3, in_channels, num_classes)


def resnet18(in_channels: int, num_classes: int) -> CifarResNet:
    """The CIFAR variant of ResNet-18: 64/128/256/512 channels, 2 blocks per stage, a
    3x3 stem without max-pool; 11.2 M parameters for 3 channels and 10 classes."""
    return CifarResNet((64, 128, 256, 512), 2, in_channels, num_classes)


# name -> (constructor taking in_channels, num_classes, image_size; smallest image size: the total downsampling)
_BUILDERS: dict[str, tuple[Callable[[int, int, int], nn.Module], int]] = {
    "small_cnn": (SmallCNN, 4),
    "resnet20": (lambda c, k, s: resnet20(c, k), 4),
    "resnet18": (lambda c, k, s: resnet18(c, k), 8),
}

MODELS: tuple[str, ...] = tuple(_BUILDERS)
RESNETS: tuple[str, ...] = ("resnet20", "resnet18")  # the CifarResNets, which Net2DeeperNet can deepen


def build(name: str, in_channels: int, num_classes: int, image_size: int) -> nn.Module:
    """A freshly initialised float32 model ``name`` (one of ``MODELS``) for square images
    ``(in_channels, image_size, image_size)`` and ``num_classes`` classes.

    ``image_size`` must be at least the model's total downsampling (4 for small_cnn and
    resnet20, 8 for resnet18), so that its last stage still sees distinct pixels.
    """
    if name not in _BUILDERS:
        raise ValueError(f"unknown model {name!r}; choose one of {', '.join(MODELS)}")
    for argument, value in (("in_channels", in_channels), ("num_classes", num_classes), ("image_size", image_size)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"build({name!r}, ...): {argument} must be a positive int, got {value!r}")
    constructor, smallest = _BUILDERS[name]
    if image_size < smallest:
        raise ValueError(
            f"model {name!r} downsamples its input {smallest}x and needs images of at least {smallest}x{smallest} "
            f"pixels, got {image_size}x{image_size}; upsample the images or choose another model"
        )
    model = constructor(in_channels, num_classes, image_size)
    _init_weights(model)
    return model


def initialise(model: nn.Module) -> nn.Module:
    """Draw every parameter of ``model`` afresh, as ``build`` does (batch-norm running
    statistics reset too), for its current shapes: a network narrowed by channel
    surgery then trains from scratch with the initialisation of its own widths."""
    for module in model.modules():
        if hasattr(module, "reset_parameters"):  # batch norms reset their running statistics too
            module.reset_parameters()
    _init_weights(model)
    return model


def _init_weights(model: nn.Module) -> None:
    for module in model.modules():
        if isinstance(module, nn.Conv2d):
            nn.init.kaiming_normal_(module.weight, mode="fan_in", nonlinearity="relu")
