"""Channel spaces: the sets of layers that must agree on one channel dimension.

A channel space is the output channels of its writers (a conv or linear layer, each with
the batch norm that follows it) and the input channels of its readers. In a plain chain a
space has one writer and one reader; at a residual join every layer that adds into the
stream (the stem, the last conv of each block, a projection shortcut) is a writer and every
layer that reads it (the first conv of each block, a projection shortcut, the classifier) is
a reader. Removing or copying a channel of a space changes all of them with the same
indices, so residual additions never need a gather or a scatter (PruneTrain's "channel
union", Lym et al. 2019; one shared mapping for Net2WiderNet).

Spaces name their layers as ``model.named_modules()`` does, so one description applies to
the model, to a deep copy of it (SWALP's weight average) and, under
DistributedDataParallel, to ``ddp.module`` on every rank.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from ..models import CifarResNet, SmallCNN


@dataclass(frozen=True)
class Writer:
    """A layer whose output channels (dim 0 of its weight) are the space's channels, and
    the batch norm right after it (None if there is none)."""

    layer: str
    norm: str | None = None


@dataclass(frozen=True)
class Reader:
    """A layer whose input channels (dim 1 of its weight) are the space's channels.

    ``features_per_channel``: for a linear layer after ``flatten`` of an (N, C, H, W)
    tensor, the H * W consecutive input features of one channel; 1 otherwise.
    """

    layer: str
    features_per_channel: int = 1


@dataclass(frozen=True)
class ChannelSpace:
    """One channel dimension shared by ``writers`` and ``readers`` (see the module docstring)."""

    name: str
    writers: tuple[Writer, ...]
    readers: tuple[Reader, ...]

    def width(self, model: nn.Module) -> int:
        """The number of channels of the space in ``model``; raises ValueError when its
        layers disagree (the model does not match the description)."""
        modules = dict(model.named_modules())
        widths = {}
        for writer in self.writers:
            widths[writer.layer] = _module(modules, writer.layer, self).weight.shape[0]
            if writer.norm is not None:
                widths[writer.norm] = _module(modules, writer.norm, self).num_features
        for reader in self.readers:
            features = _module(modules, reader.layer, self).weight.shape[1]
            if features % reader.features_per_channel:
                raise ValueError(
                    f"channel space {self.name!r}: {reader.layer} has {features} input features, not a multiple of "
                    f"its {reader.features_per_channel} features per channel"
                )
            widths[reader.layer] = features // reader.features_per_channel
        if len(set(widths.values())) != 1:
            raise ValueError(
                f"channel space {self.name!r}: its layers disagree on the number of channels ({widths}); the "
                "description does not match the model"
            )
        return next(iter(widths.values()))


def _module(modules: dict[str, nn.Module], name: str, space: ChannelSpace) -> nn.Module:
    if name not in modules:
        raise ValueError(
            f"channel space {space.name!r} names a module {name!r} that the model does not have; describe the "
            "spaces of this model (channel_spaces) again after changing its depth"
        )
    return modules[name]


def channel_spaces(model: nn.Module) -> list[ChannelSpace]:
    """The channel spaces of a ``dfp.models`` network (SmallCNN or CifarResNet, torch or
    dfp layers, any width and depth): every channel dimension between two layers. The
    input image channels and the classes are not spaces (nothing may remove them).

    Raises TypeError for another model: describe its spaces by hand with ``ChannelSpace``.
    """
    if isinstance(model, nn.parallel.DistributedDataParallel):
        model = model.module
    if isinstance(model, SmallCNN):
        return _small_cnn_spaces(model)
    if isinstance(model, CifarResNet):
        return _resnet_spaces(model)
    raise TypeError(
        f"channel_spaces knows dfp.models.SmallCNN and CifarResNet, not {type(model).__name__}; build the list "
        "of ChannelSpace(name, writers, readers) of this model by hand"
    )


def _small_cnn_spaces(model: SmallCNN) -> list[ChannelSpace]:
    # The classifier reads the flattened (C, H', W') output of conv3: H' * W' features per channel.
    pooled = model.fc.in_features // model.conv3.out_channels
    return [
        ChannelSpace("conv1", (Writer("conv1", "bn1"),), (Reader("conv2"),)),
        ChannelSpace("conv2", (Writer("conv2", "bn2"),), (Reader("conv3"),)),
        ChannelSpace("conv3", (Writer("conv3", "bn3"),), (Reader("fc", pooled),)),
    ]


def _resnet_spaces(model: CifarResNet) -> list[ChannelSpace]:
    spaces = []
    stream_name = "stem"  # the stream the stem writes, named after the stage whose blocks add into it
    writers, readers = [Writer("conv1", "bn1")], []
    for s, stage in enumerate(model.stages):
        for b, block in enumerate(stage):
            prefix = f"stages.{s}.{b}"
            readers.append(Reader(f"{prefix}.conv1"))
            if len(block.shortcut):
                # A projection reads the current stream and starts a new one, which it writes.
                readers.append(Reader(f"{prefix}.shortcut.0"))
                spaces.append(ChannelSpace(stream_name, tuple(writers), tuple(readers)))
                writers, readers = [Writer(f"{prefix}.shortcut.0", f"{prefix}.shortcut.1")], []
            stream_name = f"stages.{s}"
            writers.append(Writer(f"{prefix}.conv2", f"{prefix}.bn2"))
            inner = (Writer(f"{prefix}.conv1", f"{prefix}.bn1"),), (Reader(f"{prefix}.conv2"),)
            spaces.append(ChannelSpace(f"{prefix}.conv1", *inner))
    readers.append(Reader("fc"))
    spaces.append(ChannelSpace(stream_name, tuple(writers), tuple(readers)))
    return spaces
