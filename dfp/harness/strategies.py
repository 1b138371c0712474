"""Structural training strategies, crossed with the formats: the network changes shape
while it trains (see ``dfp.structure`` for the surgery).

=====================  ===========================================================================
strategy               what changes
=====================  ===========================================================================
none                   nothing: the architecture of ``--model``
prunetrain             PruneTrain (Lym et al., SC 2019): group lasso over every channel from the
                       first step, its coefficient set at step one from the penalty ratio; at the
                       end of every ``prune_every``-th epoch (not the last) the channels whose
                       weights all fell below ``threshold`` are removed, with channel union at
                       residual joins; with ``grow_batch`` the mini-batch then grows as the
                       forward FLOPs per image fell, the learning rate with it (linear scaling):
                       described in the paper, absent from its released code; with
                       ``proximal`` the group lasso is a proximal step after each update
                       (group soft-thresholding by learning rate x lambda, which zeroes groups
                       exactly; SWALP's weights leave the DFP16 grid until its next step)
                       instead of a penalty in the loss: in neither; with ``penalty_epochs`` the
                       group lasso acts in the first that many epochs only, and the pruned
                       network trains without it for the rest: in neither; with
                       ``prune_multiple`` each width stays a multiple of it (the strongest zero
                       channels kept back): in neither; with ``lasso_weights`` "flops" each
                       layer's groups weigh as many times as its output has positions (the
                       penalty on FLOPs, as MorphNet's): in neither
net2net                Net2Net (Chen et al., ICLR 2016): start at ``start_width`` of every channel
                       space (and, on ResNets, ``start_depth`` of every stage's blocks), widen
                       with Net2WiderNet at the end of each of ``grow_epochs`` (evenly to the
                       full width at the last), new channels' incoming weights perturbed by
                       ``GROW_NOISE`` of their std to break the symmetry (with ``widen_split``
                       "random", readers' weights also shared among a channel's copies in
                       random proportions, or "fresh": new channels drawn afresh and read with
                       zero weights: neither in Net2Net; with ``keep_filter_norms`` every
                       reader behind a batch norm scaled back to its filters' norms, so it keeps
                       its effective learning rate: not in Net2Net); then deepen with
                       Net2DeeperNet: identity blocks at the end of each stage, evenly to the
                       full depth at the last
net2net+prunetrain     grow as net2net, with the regulariser from the first step; prune as
                       prunetrain, only after the last growth. The coefficient set at step one is
                       kept after growth (not recomputed)
pruned-scratch         the control (Liu et al., ICLR 2019): the final architecture of the
                       prunetrain run with the same settings, initialised afresh and trained
                       from scratch as ``none``
=====================  ===========================================================================

Not implemented: removing a whole residual branch.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from .. import distributed, models, structure
from ..structure import ChannelSpace

NONE, PRUNETRAIN, NET2NET, GROW_THEN_PRUNE, PRUNED_SCRATCH = (
    "none",
    "prunetrain",
    "net2net",
    "net2net+prunetrain",
    "pruned-scratch",
)
STRATEGIES: tuple[str, ...] = (NONE, PRUNETRAIN, NET2NET, GROW_THEN_PRUNE, PRUNED_SCRATCH)
GROW_NOISE = 0.05  # erogol/Net2Net's noise on the widened layer, a fraction of its weights' std
LASSO_WEIGHTS = ("uniform", "flops")  # every group alike (PruneTrain), or by its layer's output positions


@dataclass(frozen=True)
class StrategySettings:
    """The options of the structural strategies (``cli`` documents each)."""

    penalty_ratio: float = structure.PENALTY_RATIO
    threshold: float = structure.THRESHOLD
    prune_every: int = 3
    start_width: float = 0.5
    start_depth: float = 1.0
    grow_epochs: tuple[int, ...] = (1,)
    widen_split: str = "even"  # structure.widening's split
    keep_filter_norms: bool = False  # structure.keeping_filter_norms after each widening
    grow_batch: bool = False
    proximal: bool = False
    penalty_epochs: int | None = None  # None: the group lasso acts in every epoch
    prune_multiple: int = 1  # widths after pruning kept multiples of this
    lasso_weights: str = "uniform"  # one of LASSO_WEIGHTS

    def for_strategy(self, strategy: str) -> dict[str, Any]:
        """The settings that ``strategy`` uses, as stored in a run's config (an option at
        its default that older runs lacked is left out, so that they still match)."""
        prune = {"penalty_ratio": self.penalty_ratio, "threshold": self.threshold, "prune_every": self.prune_every}
        if self.grow_batch:
            prune["grow_batch"] = True
        if self.proximal:
            prune["proximal"] = True
        if self.penalty_epochs is not None:
            prune["penalty_epochs"] = self.penalty_epochs
        if self.prune_multiple > 1:
            prune["prune_multiple"] = self.prune_multiple
        if self.lasso_weights != "uniform":
            prune["lasso_weights"] = self.lasso_weights
        grow = {"start_width": self.start_width, "grow_epochs": list(self.grow_epochs)}
        if self.start_depth < 1:
            grow["start_depth"] = self.start_depth
        if self.widen_split != "even":
            grow["widen_split"] = self.widen_split
        if self.keep_filter_norms:
            grow["keep_filter_norms"] = True
        return {
            NONE: {},
            PRUNETRAIN: prune,
            PRUNED_SCRATCH: prune,  # identifies the prunetrain run it copies
            NET2NET: grow,
            GROW_THEN_PRUNE: {**grow, **prune},
        }[strategy]


def check_strategy_name(name: str) -> None:
    if name not in STRATEGIES:
        raise ValueError(f"unknown strategy {name!r}; choose from {', '.join(STRATEGIES)}")


class GroupLasso:
    """PruneTrain's penalty ``lambda * R(W)`` added to the loss; lambda is set at the first
    call from that step's cross-entropy (the mean over ranks, so that every rank uses the
    same one) and then kept. ``proximal``: the loss stays as it is, and ``after_step``
    shrinks the groups by the penalty's proximal step instead. Once ``active`` is False
    (``StrategySettings.penalty_epochs``) it does neither. ``input_shape`` (of one image):
    each layer's groups weigh as many times as its output has positions at that input
    (``structure.group_lasso``); None: every group alike."""

    def __init__(
        self,
        model: nn.Module,
        penalty_ratio: float,
        ctx: distributed.Context,
        proximal: bool = False,
        input_shape: tuple[int, ...] | None = None,
    ) -> None:
        self.model = model
        self.penalty_ratio = penalty_ratio
        self.ctx = ctx
        self.proximal = proximal
        self.input_shape = input_shape
        self.positions: dict[str, int] = {}
        self.coefficient: float | None = None
        self.active = True

    def _weights(self, spaces: list[ChannelSpace]) -> dict[str, int] | None:
        if self.input_shape is None:
            return None
        layers = {group.layer for space in spaces for group in (*space.writers, *space.readers)}
        if not layers <= self.positions.keys():  # the first call, or blocks inserted since
            self.positions = structure.output_positions(self.model, self.input_shape)
        return self.positions

    def __call__(self, loss: torch.Tensor) -> torch.Tensor:
        if not self.active or (self.proximal and self.coefficient is not None):
            return loss
        spaces = structure.channel_spaces(self.model)
        penalty = structure.group_lasso(self.model, spaces, self._weights(spaces))
        if self.coefficient is None:
            cross_entropy = distributed.all_reduce_mean(loss.detach().item(), self.ctx)
            penalty_value = distributed.all_reduce_mean(penalty.detach().item(), self.ctx)
            self.coefficient = structure.coefficient(cross_entropy, penalty_value, self.penalty_ratio)
        return loss if self.proximal else loss + self.coefficient * penalty.to(loss.dtype)

    def stop(self, optimizer: torch.optim.Optimizer | None) -> None:
        """Ends the penalty, and clears the momentum of the weights it held at exactly zero:
        while the proximal step zeroed them after every update, their momentum decayed
        towards subnormal values (0.9^k of a gradient long gone), which the updates would
        now write into the weights, and a convolution over subnormal fp32 weights runs up
        to 75x slower on an Intel Xeon (a pruned ResNet-20's epoch stalled; docs/harness.md)."""
        self.active = False
        if optimizer is None:
            return
        with torch.no_grad():
            for group in optimizer.param_groups:
                for weight in group["params"]:
                    momentum = optimizer.state.get(weight, {}).get("momentum_buffer")
                    if momentum is not None:
                        momentum.masked_fill_(weight == 0, 0.0)

    def after_step(self, lr: float) -> None:
        """After an optimizer step at learning rate ``lr``: the proximal step, if that is
        how the penalty applies (every rank shrinks the same weights alike)."""
        if self.active and self.proximal and self.coefficient is not None:
            spaces = structure.channel_spaces(self.model)
            structure.shrink_groups(self.model, spaces, lr * self.coefficient, self._weights(spaces))


class StructuredRun:
    """What a strategy does to one run: the architecture it starts from, the penalty it adds
    to the loss, and the surgery at the end of an epoch."""

    def __init__(
        self,
        strategy: str,
        settings: StrategySettings,
        epochs: int,
        seed: int,
        full_widths: dict[str, int],
        start_widths: dict[str, int] | None,
        depths: tuple[list[int], list[int]] | None = None,
    ) -> None:
        self.strategy = strategy
        self.settings = settings
        self.epochs = epochs
        self.seed = seed
        self.full_widths = full_widths
        self.start_widths = start_widths
        self.depths = depths  # (full, start) blocks of each stage, where the run deepens
        self.regulariser: GroupLasso | None = None
        self.surgeries: list[dict[str, Any]] = []

    @classmethod
    def plan(
        cls,
        strategy: str,
        settings: StrategySettings | None,
        epochs: int,
        seed: int,
        model: nn.Module,
        control_widths: dict[str, int] | None = None,
    ) -> StructuredRun:
        """The plan for ``model`` (freshly built, full width). ``control_widths``: for
        pruned-scratch, the final widths of the prunetrain run it copies."""
        check_strategy_name(strategy)
        settings = settings or StrategySettings()
        full = structure.widths(model, structure.channel_spaces(model))
        start, depths = None, None
        if strategy in (NET2NET, GROW_THEN_PRUNE):
            start = {name: max(1, round(width * settings.start_width)) for name, width in full.items()}
            if settings.start_depth < 1:
                if not isinstance(model, models.CifarResNet):
                    raise ValueError(
                        f"a start depth below 1 deepens ResNets (Net2DeeperNet inserts residual blocks), not a "
                        f"{type(model).__name__}; choose a ResNet model or a start depth of 1"
                    )
                blocks = [len(stage) for stage in model.stages]
                depths = (blocks, [max(1, round(n * settings.start_depth)) for n in blocks])
        elif strategy == PRUNED_SCRATCH:
            if control_widths is None:
                raise ValueError(
                    "pruned-scratch trains the final architecture of a prunetrain run: it needs that run's widths; "
                    "put prunetrain before it in --strategies"
                )
            start = dict(control_widths)
        return cls(strategy, settings, epochs, seed, full, start, depths)

    def shape_initial_model(self, model: nn.Module) -> None:
        """Cut the freshly built ``model`` to the start depth (the first blocks of each
        stage), narrow it to the start widths and draw its weights afresh for them (an
        initialisation of its own shape, not a slice of a larger one)."""
        if self.start_widths is None:
            return
        for stage, count in enumerate(self.depths[1] if self.depths else ()):
            model.stages[stage] = nn.Sequential(*list(model.stages[stage])[:count])
        spaces = structure.channel_spaces(model)
        present = {space.name for space in spaces}
        changes = {
            name: width
            for name, width in self.start_widths.items()
            if name in present and width != self.full_widths[name]
        }
        structure.apply(model, structure.narrowing(model, spaces, changes))
        models.initialise(model)

    def make_regulariser(
        self, model: nn.Module, ctx: distributed.Context, input_shape: tuple[int, ...]
    ) -> GroupLasso | None:
        """The group lasso of the prunetrain strategies (None for the others); ``input_shape``:
        of one image, for weights by FLOPs."""
        if self.strategy in (PRUNETRAIN, GROW_THEN_PRUNE):
            weighted = self.settings.lasso_weights == "flops"
            self.regulariser = GroupLasso(
                model, self.settings.penalty_ratio, ctx, self.settings.proximal, input_shape if weighted else None
            )
        return self.regulariser

    def after_epoch(self, epoch: int, model: nn.Module, optimizer: torch.optim.Optimizer, average: Any) -> bool:
        """The surgery due at the end of ``epoch`` (1-based), applied to ``model`` (not a
        DDP wrapper), ``optimizer`` and SWALP's ``average``; True if the shape changed."""
        penalty_epochs = self.settings.penalty_epochs
        if self.regulariser is not None and penalty_epochs is not None and epoch >= penalty_epochs:
            self.regulariser.stop(optimizer)
        spaces = structure.channel_spaces(model)
        if self.strategy in (NET2NET, GROW_THEN_PRUNE) and epoch in self.settings.grow_epochs:
            return self._grow(epoch, model, spaces, optimizer, average)
        last_growth = max(self.settings.grow_epochs) if self.strategy == GROW_THEN_PRUNE else 0
        if (
            self.strategy in (PRUNETRAIN, GROW_THEN_PRUNE)
            and epoch % self.settings.prune_every == 0
            and last_growth < epoch < self.epochs
        ):
            surgery, widths = structure.pruning(model, spaces, self.settings.threshold, self.settings.prune_multiple)
            if widths:
                structure.apply(model, surgery, optimizer, average)
                self.surgeries.append({"epoch": epoch, "kind": "prune", "widths": widths})
            return bool(widths)
        return False

    def batch_after_surgery(self, epoch: int, batch: int, flops: tuple[float, float], multiple: int, most: int) -> int:
        """The mini-batch for the epochs after ``epoch``'s surgery: with ``grow_batch``,
        after a pruning, ``batch`` times the fall of the forward FLOPs per image (``flops``:
        before, after), rounded down to a multiple of ``multiple``, at most ``most``: the
        work per step stays about the same (PruneTrain grows it into the memory the pruning
        freed); else ``batch``. Recorded with the surgery."""
        pruned = bool(self.surgeries) and self.surgeries[-1]["epoch"] == epoch and self.surgeries[-1]["kind"] == "prune"
        before, after = flops
        if not (self.settings.grow_batch and pruned and after > 0):
            return batch
        grown = min(most, max(batch, int(batch * before / after) // multiple * multiple))
        self.surgeries[-1]["batch_size"] = grown
        return grown

    def _grow(self, epoch: int, model: nn.Module, spaces: list[ChannelSpace], optimizer, average) -> bool:
        # Growth steps move the width evenly from the start to the full width.
        step = sorted(self.settings.grow_epochs).index(epoch) + 1
        fraction = step / len(self.settings.grow_epochs)
        # The same generator on every rank: the ranks must draw the same mappings and noise.
        generator = torch.Generator().manual_seed(self.seed * 1000 + epoch)
        surgery, widths = structure.Surgery(), {}
        for space in spaces:
            width, full = space.width(model), self.full_widths[space.name]
            start = self.start_widths[space.name]
            target = max(width, round(start + (full - start) * fraction))
            if target > width:
                mapping = structure.wider_mapping(width, target, generator)
                widening = structure.widening(model, space, mapping, GROW_NOISE, generator, self.settings.widen_split)
                surgery = surgery.merged(widening)
                widths[space.name] = target
        if widths:
            if self.settings.keep_filter_norms:
                surgery = structure.keeping_filter_norms(model, spaces, surgery)
            structure.apply(model, surgery, optimizer, average)
        blocks = self._deepen(model, fraction, optimizer, average)
        if widths or blocks:
            self.surgeries.append(
                {"epoch": epoch, "kind": "grow", "widths": widths, **({"blocks": blocks} if blocks else {})}
            )
        return bool(widths or blocks)

    def _deepen(self, model: nn.Module, fraction: float, optimizer, average) -> list[int] | None:
        """Identity blocks at the end of each stage, evenly to the full depth at the last
        growth step (they take the width the stage has now); the new block counts, or None
        where none was added."""
        if self.depths is None:
            return None
        added = False
        for stage, (full, start) in enumerate(zip(*self.depths)):
            target = start + round((full - start) * fraction)
            while len(model.stages[stage]) < target:
                structure.insert_block(model, stage, len(model.stages[stage]) - 1, optimizer, average)
                added = True
        return [len(stage) for stage in model.stages] if added else None
