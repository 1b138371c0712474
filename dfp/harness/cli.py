"""Command line of the comparison harness: ``python -m dfp.harness`` / ``dfp-compare``.

``dfp-compare [options]`` trains one model on one data set in every chosen format, batch
size and seed, appends each finished run to ``OUT/results.jsonl`` (a repeated command
resumes, skipping finished runs), writes ``OUT/report.md``, ``pareto.png`` and
``curves.png`` and prints the table. With no options it runs the main job: scikit-learn's
digits, ``small_cnn``, fp32 / bf16 / dfp16 / dfp16-sr / swalp at batch sizes 32 and 128,
a few minutes on 2 CPU cores.

``dfp-compare report --out DIR`` regenerates the report from ``DIR/results.jsonl``.

Under ``torchrun --nproc_per_node=N`` each process trains on its shard of every batch
(DistributedDataParallel; ``--batch-sizes`` are global batches) and rank 0 alone writes.
"""

from __future__ import annotations

import argparse
import importlib.util
import math
import sys
import tempfile
from collections.abc import Callable, Sequence
from pathlib import Path

import torch

from .. import backends, data, distributed, models, structure
from .._errors import BackendUnavailableError
from ..allocator import keep_freed_memory
from . import formats, strategies
from .report import CURVES_FILE, PARETO_FILE, REPORT_FILE, group_markdown, group_records, write_report
from .results import RESULTS_FILE, ResultStore
from .study import StudyConfig, run_study
from .train import NO_COMPRESSION, check_batch_size, check_test_split

DEFAULT_MODEL = {"digits": "small_cnn", "mnist": "small_cnn", "cifar10": "resnet20", "synthetic": "resnet20"}
DEFAULT_TARGET = {"digits": 0.97, "mnist": 0.99, "cifar10": 0.85, "synthetic": None}
DEFAULT_FORMATS = "fp32,bf16,dfp16,dfp16-sr,swalp"
DEFAULT_OUT = "dfp-results"
# The third-party packages of the "harness" extra that every study imports (import name:
# pip name), and those only some data sets need (PIL for CIFAR-10 image folders is found
# out when the data load, see _load_data).
HARNESS_PACKAGES = {"matplotlib": "matplotlib", "tqdm": "tqdm"}
DATA_PACKAGES = {"digits": {"sklearn": "scikit-learn"}}
EXTRAS_HINT = "dfp-compare needs the harness extras: pip install 'dfp[harness]'"


def _parsed(kind: Callable[[str], object], check: Callable[[object], bool], need: str) -> Callable[[str], object]:
    """An argparse type: ``kind(text)`` that satisfies ``check``, else an error saying ``need``."""

    def parse(text: str):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not {need}") from None
        if not check(value):
            raise argparse.ArgumentTypeError(f"{text!r} is not {need}")
        return value

    return parse


def _comma_list(item: Callable[[str], object], need: str) -> Callable[[str], tuple]:
    def parse(text: str) -> tuple:
        items = [part.strip() for part in text.split(",") if part.strip()]
        if not items:
            raise argparse.ArgumentTypeError(f"{text!r}: give a comma-separated list of {need}")
        values = tuple(item(part) for part in items)
        if len(set(values)) != len(values):
            raise argparse.ArgumentTypeError(f"{text!r} names an item twice")
        return values

    return parse


positive_int = _parsed(int, lambda v: v > 0, "a positive integer")
non_negative_int = _parsed(int, lambda v: v >= 0, "a non-negative integer")
positive_float = _parsed(float, lambda v: math.isfinite(v) and v > 0, "a positive finite number")
non_negative_float = _parsed(float, lambda v: math.isfinite(v) and v >= 0, "a non-negative finite number")
momentum_value = _parsed(float, lambda v: 0 <= v < 1, "a momentum in [0, 1)")
fraction = _parsed(float, lambda v: 0 < v <= 1, "an accuracy as a fraction in (0, 1], e.g. 0.97")


def _name_checked_by(check: Callable[[str], None]) -> Callable[[str], str]:
    """An argparse type: the name as given, where ``check`` (raising ValueError) accepts it."""

    def parse(text: str) -> str:
        try:
            check(text)
        except ValueError as err:
            raise argparse.ArgumentTypeError(str(err)) from None
        return text

    return parse


_format_name = _name_checked_by(formats.check_format_name)
_strategy_name = _name_checked_by(strategies.check_strategy_name)


def _missing_packages(packages: dict[str, str]) -> list[str]:
    """The pip names of ``packages`` (import name: pip name) that cannot be imported."""
    return [pip_name for module, pip_name in packages.items() if importlib.util.find_spec(module) is None]


def build_parser() -> argparse.ArgumentParser:
    """The options of a study (``dfp-compare --help``)."""
    parser = argparse.ArgumentParser(
        prog="dfp-compare",
        description="Train a CNN in several number formats (fp32, bf16, fp16, dfp16, dfp16-sr, dfp16-tensor, "
        "swalp), structural strategies (PruneTrain, Net2Net), batch sizes and seeds; report training time "
        "against test accuracy. A repeated command resumes, skipping "
        "finished runs. 'dfp-compare report --out DIR' regenerates the report of an earlier study.",
    )
    what = parser.add_argument_group("what to train")
    what.add_argument(
        "--data",
        choices=data.DATASETS,
        default="digits",
        help="data set; digits ships in scikit-learn (default: %(default)s)",
    )
    what.add_argument("--data-dir", help="directory of the local MNIST / CIFAR-10 copy (needed for those two)")
    what.add_argument("--cache-dir", help="where CIFAR-10 decoded from images is cached (default: no cache)")
    what.add_argument(
        "--model",
        help=f"one of {', '.join(models.MODELS)} (default: small_cnn for digits and MNIST, resnet20 otherwise)",
    )
    what.add_argument(
        "--formats",
        type=_comma_list(_format_name, "formats"),
        default=DEFAULT_FORMATS,
        help=f"comma list from {', '.join(formats.FORMATS)} (default: %(default)s)",
    )
    what.add_argument(
        "--batch-sizes",
        type=_comma_list(positive_int, "batch sizes"),
        default="32,128",
        help="comma list of global batch sizes, all processes together (default: %(default)s)",
    )
    what.add_argument(
        "--seeds", type=_comma_list(non_negative_int, "seeds"), default="0", help="comma list (default: %(default)s)"
    )
    what.add_argument("--epochs", type=positive_int, default=10, help="(default: %(default)s)")
    what.add_argument(
        "--fp32-layers",
        type=_comma_list(str, "layer names"),
        default=(),
        help="comma list of layers kept in fp32 in every format: names from model.named_modules() (a block "
        "keeps all its layers), 'first' (the first conv) or 'last' (the last linear) (default: none)",
    )
    structural = parser.add_argument_group("structural strategies (dfp.harness.strategies), crossed with the formats")
    structural.add_argument(
        "--strategies",
        type=_comma_list(_strategy_name, "strategies"),
        default="none",
        help=f"comma list from {', '.join(strategies.STRATEGIES)} (default: %(default)s)",
    )
    structural.add_argument(
        "--penalty-ratio",
        type=_parsed(float, lambda v: 0 < v < 1, "a ratio in (0, 1)"),
        default=strategies.StrategySettings.penalty_ratio,
        help="prunetrain: the share of the group-lasso penalty in the loss at the first step, which sets its "
        "coefficient for the whole run (default: %(default)s)",
    )
    structural.add_argument(
        "--prune-every",
        type=positive_int,
        default=strategies.StrategySettings.prune_every,
        help="prunetrain: remove zero channels at the end of every N-th epoch (default: %(default)s)",
    )
    structural.add_argument(
        "--prune-threshold",
        type=non_negative_float,
        default=strategies.StrategySettings.threshold,
        help="prunetrain: a channel is zero when all its weights are below this in magnitude (default: %(default)s)",
    )
    structural.add_argument(
        "--grow-batch",
        action="store_true",
        help="prunetrain: after each pruning, grow the mini-batch as the forward FLOPs per image fell (a multiple "
        "of 8 per process) and the learning rate with it, as the paper describes (its code does not)",
    )
    structural.add_argument(
        "--proximal-lasso",
        action="store_true",
        help="prunetrain: apply the group lasso as a proximal step after each update (groups shrunk by "
        "learning rate x lambda, those below it set to exactly zero) instead of a penalty in the loss, so that "
        "channels reach zero within a short schedule; PruneTrain's paper and code use the penalty",
    )
    structural.add_argument(
        "--penalty-epochs",
        type=positive_int,
        default=None,
        help="prunetrain: the group lasso acts in the first N epochs only (after that epoch's pruning the "
        "network trains without it); neither PruneTrain's paper nor its code stops it (default: every epoch)",
    )
    structural.add_argument(
        "--prune-multiple",
        type=positive_int,
        default=strategies.StrategySettings.prune_multiple,
        help="prunetrain: keep every width a multiple of N after pruning (the strongest zero channels kept "
        "back): odd widths run far from a CPU's or a tensor core's peak; not in PruneTrain (default: %(default)s)",
    )
    structural.add_argument(
        "--lasso-weights",
        choices=strategies.LASSO_WEIGHTS,
        default=strategies.StrategySettings.lasso_weights,
        help="prunetrain: how the group lasso weighs a layer's channels: all alike (PruneTrain), or by the "
        "multiply-adds each weight does per image (the layer's output positions), so that the penalty prices "
        "a channel by its FLOPs, not its weights; not in PruneTrain (default: %(default)s)",
    )
    structural.add_argument(
        "--start-width",
        type=_parsed(float, lambda v: 0 < v <= 1, "a fraction in (0, 1]"),
        default=strategies.StrategySettings.start_width,
        help="net2net: the starting fraction of every layer's channels (default: %(default)s)",
    )
    structural.add_argument(
        "--start-depth",
        type=_parsed(float, lambda v: 0 < v <= 1, "a fraction in (0, 1]"),
        default=strategies.StrategySettings.start_depth,
        help="net2net on a ResNet: the starting fraction of every stage's blocks; the rest are inserted as "
        "identity blocks at the grow epochs (Net2DeeperNet; default: %(default)s, width only)",
    )
    structural.add_argument(
        "--grow-epochs",
        type=_comma_list(positive_int, "epochs"),
        help="net2net: widen at the end of these epochs, evenly to the full width at the last (default: the "
        "epoch a third of the way through)",
    )
    structural.add_argument(
        "--widen-split",
        choices=structure.SPLITS,
        default=strategies.StrategySettings.widen_split,
        help="net2net: how a reader's weight of a widened channel is shared among its copies: evenly (Net2Net), "
        "or in random proportions that still sum to it, which keeps the function and makes the copies' gradients "
        "differ from the first step; fresh: no copies, the new channels drawn afresh and read with zero weights "
        "(default: %(default)s)",
    )
    structural.add_argument(
        "--keep-filter-norms",
        action="store_true",
        help="net2net: after each widening, scale every reader that feeds a batch norm back to the norms its "
        "filters had (the split halves them at doubling, which doubles their effective learning rate); the "
        "function is unchanged",
    )
    recipe = parser.add_argument_group("optimisation, the same for every format")
    recipe.add_argument(
        "--lr", type=positive_float, default=0.05, help="learning rate at --base-batch-size (default: %(default)s)"
    )
    recipe.add_argument(
        "--base-batch-size",
        type=positive_int,
        default=32,
        help="the rate is scaled by batch size / this (default: %(default)s)",
    )
    recipe.add_argument(
        "--warmup-epochs",
        type=non_negative_float,
        default=1.0,
        help="linear warm-up from --lr to the scaled rate, then cosine decay to zero (default: %(default)s)",
    )
    recipe.add_argument("--momentum", type=momentum_value, default=0.9, help="(default: %(default)s)")
    recipe.add_argument("--weight-decay", type=non_negative_float, default=5e-4, help="(default: %(default)s)")
    recipe.add_argument(
        "--swa-start",
        type=positive_int,
        help="swalp: the first epoch (1-based) averaged, after the warm-up; the rate is held from there on "
        "(default: the last quarter of the epochs, or the first epoch after the warm-up if that is later)",
    )
    recipe.add_argument(
        "--target-accuracy",
        type=fraction,
        help="for the time-to-target column, a fraction (default: 0.97 digits, 0.99 MNIST, 0.85 CIFAR-10)",
    )
    run = parser.add_argument_group("how to run")
    run.add_argument("--device", choices=("cpu", "cuda"), default="cpu", help="(default: %(default)s)")
    run.add_argument(
        "--threads",
        type=positive_int,
        help=f"torch threads per process (default: 1 for digits, whose 8x8 layers gain nothing from a second "
        f"thread; else torch's {torch.get_num_threads()})",
    )
    run.add_argument(
        "--compress",
        choices=(NO_COMPRESSION, *distributed.COMPRESSIONS),
        default=NO_COMPRESSION,
        help="gradient compression of DistributedDataParallel under torchrun (default: %(default)s)",
    )
    run.add_argument("--limit-train-batches", type=positive_int, help="at most this many steps per epoch (smoke tests)")
    run.add_argument("--out", default=DEFAULT_OUT, help="results directory, created (default: %(default)s)")
    run.add_argument(
        "--fresh", action="store_true", help="start a new results file; the old one is renamed aside, not deleted"
    )
    run.add_argument("--no-progress", action="store_true", help="no progress bars (none either when not on a terminal)")
    run.add_argument(
        "--system-malloc",
        action="store_true",
        help="leave glibc's malloc as it is; by default it keeps the memory a step frees for the next one "
        "(dfp.keep_freed_memory: no page faults in every step)",
    )
    return parser


def build_report_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="dfp-compare report", description="Regenerate report.md, pareto.png and curves.png from results.jsonl."
    )
    parser.add_argument("--out", default=DEFAULT_OUT, help="the results directory of the study")
    parser.add_argument("--target-accuracy", type=fraction, help="default: the target each run was trained with")
    return parser


def study_config(args: argparse.Namespace, parser: argparse.ArgumentParser) -> StudyConfig:
    """The study the parsed ``args`` describe; checks what argparse alone cannot (model
    name, option combinations, the device). The formats are probed later, on the device
    of each process (``_check_formats``)."""
    model = args.model or DEFAULT_MODEL[args.data]
    if model not in models.MODELS:
        parser.error(f"--model: unknown model {model!r}; choose from {', '.join(models.MODELS)}")
    _check_data_options(args, parser)
    if args.warmup_epochs > args.epochs:
        parser.error(f"--warmup-epochs {args.warmup_epochs:g} must not exceed --epochs {args.epochs}")
    # SWALP averages at a held rate, which must come after the warm-up: epoch s starts
    # after s - 1 epochs, so s >= warmup + 1.
    after_warmup = math.ceil(args.warmup_epochs) + 1
    swa_start = args.swa_start if args.swa_start is not None else max(math.ceil(0.75 * args.epochs), after_warmup)
    if "swalp" in args.formats:
        if swa_start - 1 < args.warmup_epochs:  # only a given --swa-start: the default is past the warm-up
            parser.error(
                f"--swa-start {swa_start} falls inside the warm-up of {args.warmup_epochs:g} epochs "
                f"(--warmup-epochs): swalp averages at a rate held from its first averaged epoch on, which must "
                f"come after the warm-up; choose --swa-start {after_warmup} or later, or a shorter warm-up"
            )
        if swa_start > args.epochs:
            given = "" if args.swa_start is not None else " (the default)"
            parser.error(
                f"--swa-start {swa_start}{given} is after the last epoch (--epochs {args.epochs}); swalp needs an epoch "
                f"after the warm-up of {args.warmup_epochs:g} epochs to average: give more --epochs, a shorter "
                "--warmup-epochs, or leave swalp out of --formats"
            )
    settings = _strategy_settings(args, parser)
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error(f"--device cuda: torch {torch.__version__} sees no CUDA device; use --device cpu (the default)")
    return StudyConfig(
        data=args.data,
        model=model,
        formats=args.formats,
        batch_sizes=args.batch_sizes,
        seeds=args.seeds,
        epochs=args.epochs,
        base_lr=args.lr,
        base_batch_size=args.base_batch_size,
        warmup_epochs=args.warmup_epochs,
        momentum=args.momentum,
        weight_decay=args.weight_decay,
        fp32_layers=args.fp32_layers,
        swa_start=swa_start,
        device=args.device,
        threads=args.threads if args.threads is not None else (1 if args.data == "digits" else torch.get_num_threads()),
        compress=args.compress,
        limit_train_batches=args.limit_train_batches,
        target_accuracy=args.target_accuracy if args.target_accuracy is not None else DEFAULT_TARGET[args.data],
        strategies=args.strategies,
        strategy_settings=settings,
    )


def _strategy_settings(args: argparse.Namespace, parser: argparse.ArgumentParser) -> strategies.StrategySettings:
    """The strategy options, checked against the epochs and each other."""
    grow_epochs = args.grow_epochs or (max(1, round(args.epochs / 3)),)
    growing = {strategies.NET2NET, strategies.GROW_THEN_PRUNE} & set(args.strategies)
    if growing and max(grow_epochs) >= args.epochs:
        parser.error(
            f"--grow-epochs {','.join(map(str, grow_epochs))}: {min(growing)} widens at the end of an epoch "
            f"before the last (--epochs {args.epochs}); choose earlier epochs or give more --epochs"
        )
    model = args.model or DEFAULT_MODEL[args.data]
    if growing and args.start_depth < 1 and model not in models.RESNETS:
        parser.error(
            f"--start-depth {args.start_depth}: deepening inserts residual blocks, which model {model!r} "
            f"has none of; choose one of {', '.join(models.RESNETS)} or leave --start-depth at 1"
        )
    if args.penalty_epochs is not None and args.penalty_epochs >= args.epochs:
        parser.error(
            f"--penalty-epochs {args.penalty_epochs}: the group lasso would act in every epoch of --epochs "
            f"{args.epochs}; choose fewer epochs or leave the option out"
        )
    if strategies.PRUNED_SCRATCH in args.strategies and strategies.PRUNETRAIN not in args.strategies:
        parser.error(
            "--strategies: pruned-scratch trains the final architecture of the prunetrain run with the same "
            "settings; add prunetrain to --strategies"
        )
    return strategies.StrategySettings(
        penalty_ratio=args.penalty_ratio,
        threshold=args.prune_threshold,
        grow_batch=args.grow_batch,
        proximal=args.proximal_lasso,
        penalty_epochs=args.penalty_epochs,
        prune_multiple=args.prune_multiple,
        lasso_weights=args.lasso_weights,
        prune_every=args.prune_every,
        start_width=args.start_width,
        start_depth=args.start_depth,
        grow_epochs=tuple(sorted(grow_epochs)),
        widen_split=args.widen_split,
        keep_filter_norms=args.keep_filter_norms,
    )


def _check_data_options(args: argparse.Namespace, parser: argparse.ArgumentParser) -> None:
    """--data-dir and --cache-dir where, and only where, the data set uses them."""
    layout = data.ROOT_LAYOUTS.get(args.data)
    if layout is None and args.data_dir is not None:
        parser.error(f"--data-dir is not used by --data {args.data}, whose data are {data.origin(args.data)}")
    if layout is not None and args.data_dir is None:
        parser.error(
            f"--data {args.data} needs --data-dir, the directory of a local copy: {layout}. dfp downloads "
            "nothing; fetch the files yourself and pass where they lie"
        )
    if args.cache_dir is not None and args.data != "cifar10":
        parser.error(
            f"--cache-dir applies only to --data cifar10 (image folders decoded once); --data {args.data} has no cache"
        )
    if args.cache_dir is not None:
        problem = _unwritable_directory(Path(args.cache_dir).expanduser())
        if problem:
            parser.error(f"--cache-dir {args.cache_dir}: {problem}; give a directory the cache can be written to")


def _unwritable_directory(path: Path) -> str | None:
    """Why files cannot be written in directory ``path`` (made if missing), or None: asked
    before training, since the cache and the results are written only after it."""
    if path.exists() and not path.is_dir():
        return "exists and is not a directory"
    try:
        path.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=path):
            pass
    except OSError as err:
        return f"cannot be written to ({err.strerror or err})"
    return None


def _results_store(out: str, parser: argparse.ArgumentParser) -> ResultStore:
    """The store in ``--out``, checked before anything trains: a study that could not
    save its results would otherwise fail after its first run, with a traceback."""
    problem = _unwritable_directory(Path(out))
    if problem is None:
        store = ResultStore(out)
        try:
            store.check_writable((REPORT_FILE, PARETO_FILE, CURVES_FILE))
        except OSError as err:
            problem = f"holds a file that cannot be written ({err.strerror or err}: {err.filename})"
    if problem:
        parser.error(f"--out {out}: {problem}; choose a directory dfp-compare can write its results to")
    return store


def _check_formats(study: StudyConfig, device: torch.device, parser: argparse.ArgumentParser) -> None:
    """Each format tried on ``device``, the device of this process (under torchrun, each
    rank probes its own GPU), after the backend that DFP_BACKEND names."""
    try:
        backends.active(device)
    except ValueError as err:
        parser.error(f"DFP_BACKEND: {err}")
    except (
        BackendUnavailableError
    ) as err:  # a compiled core missing or a bad DFP_CPU_ISA: formats that need none still run
        if any(formats.LAYER_FORMATS.get(name) for name in study.formats):
            parser.error(str(err))
    for name in study.formats:
        try:
            formats.check_available(name, device)
        except formats.FormatUnavailableError as err:
            parser.error(str(err))


def _load_data(args: argparse.Namespace, parser: argparse.ArgumentParser) -> data.Dataset:
    options = {"cache_dir": args.cache_dir} if args.cache_dir is not None else {}
    try:
        return data.load(args.data, args.data_dir, **options)
    except ImportError as err:
        parser.error(f"--data {args.data}: {err}; {EXTRAS_HINT}")
    except (OSError, ValueError, TypeError) as err:
        parser.error(f"--data {args.data}: {err}")


def _check_against_data(study: StudyConfig, dataset: data.Dataset, world_size: int, parser) -> None:
    """Checks that need the data set and the model: batch sizes, layer names, a test split."""
    try:
        check_test_split(dataset)
    except ValueError as err:
        parser.error(f"--data {study.data}: {err}")
    for batch_size in study.batch_sizes:
        try:
            check_batch_size(batch_size, dataset, world_size)
        except ValueError as err:
            parser.error(f"--batch-sizes: {err}")
    try:
        model = models.build(study.model, dataset.channels, dataset.num_classes, dataset.image_size)
    except ValueError as err:
        parser.error(f"--model {study.model}: {err}")
    try:
        formats.resolve_fp32_layers(model, study.fp32_layers)
    except ValueError as err:
        parser.error(str(err))


def main(argv: Sequence[str] | None = None) -> int:
    """Run a study (or, with ``report`` first, regenerate a report); returns the exit status."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["report"]:
        args = build_report_parser().parse_args(argv[1:])
        missing = _missing_packages({"matplotlib": "matplotlib"})
        if missing:
            print(f"error: {EXTRAS_HINT} (missing: {', '.join(missing)})", file=sys.stderr)
            return 2
        results = Path(args.out) / RESULTS_FILE
        if not results.is_file():
            print(f"error: {results} does not exist: run a study with --out {args.out} first", file=sys.stderr)
            return 2
        store = _results_store(args.out, build_report_parser())
        print(write_report(store, args.target_accuracy))
        return 0

    parser = build_parser()
    args = parser.parse_args(argv)
    missing = _missing_packages({**HARNESS_PACKAGES, **DATA_PACKAGES.get(args.data, {})})
    if missing:
        parser.error(f"{EXTRAS_HINT} (missing: {', '.join(missing)})")
    study = study_config(args, parser)
    torch.set_num_threads(study.threads)
    if not args.system_malloc:
        keep_freed_memory()
    try:
        ctx = distributed.setup(args.device)
    except (RuntimeError, ValueError) as err:
        parser.error(str(err))
    try:
        _check_formats(study, ctx.device, parser)
        store = _results_store(args.out, parser) if ctx.is_main else None
        dataset = _load_data(args, parser)
        _check_against_data(study, dataset, ctx.world_size, parser)
        if study.compress != NO_COMPRESSION and ctx.world_size == 1:
            print(
                f"note: --compress {study.compress} compresses gradients between processes; with one there is "
                "nothing to send (launch with torchrun --nproc_per_node=N)",
                file=sys.stderr,
            )
        if store is not None and args.fresh:
            for moved in store.start_fresh():
                print(f"--fresh: moved the earlier {moved.name.split('.')[0]} file aside to {moved}")
        progress = not args.no_progress and ctx.is_main and sys.stderr.isatty()
        try:
            records = run_study(study, dataset, ctx, store, progress=progress)
        except BaseException as err:
            # Whatever stopped the study, the report shows the runs it finished.
            if store is not None:
                write_report(store)
                print(
                    f"\n{'interrupted' if isinstance(err, KeyboardInterrupt) else 'stopped by an error'}: finished "
                    f"runs are in {store.results_path}; run the same command again to resume (finished runs are "
                    "skipped)",
                    file=sys.stderr,
                )
            if isinstance(err, KeyboardInterrupt):
                return 130
            raise
        if store is not None:
            write_report(store)
            for group in group_records(records):
                print("\n" + group_markdown(group))
            print(f"report: {Path(args.out) / 'report.md'}, pareto.png, curves.png; results: {store.results_path}")
        return 0
    finally:
        distributed.teardown(ctx)
