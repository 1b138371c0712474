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
import math
import sys
from collections.abc import Callable, Sequence
from pathlib import Path

import torch

from .. import data, distributed, models
from . import formats
from .report import group_markdown, group_records, write_report
from .results import RESULTS_FILE, ResultStore
from .study import StudyConfig, run_study

DATA_SETS = ("digits", "mnist", "cifar10", "synthetic")
DEFAULT_MODEL = {"digits": "small_cnn", "mnist": "small_cnn", "cifar10": "resnet20", "synthetic": "resnet20"}
DEFAULT_TARGET = {"digits": 0.97, "mnist": 0.99, "cifar10": 0.85, "synthetic": None}
DEFAULT_FORMATS = "fp32,bf16,dfp16,dfp16-sr,swalp"
DEFAULT_OUT = "dfp-results"


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


def _format_name(text: str) -> str:
    if text not in formats.FORMATS:
        raise argparse.ArgumentTypeError(f"unknown format {text!r}; choose from {', '.join(formats.FORMATS)}")
    return text


def build_parser() -> argparse.ArgumentParser:
    """The options of a study (``dfp-compare --help``)."""
    parser = argparse.ArgumentParser(
        prog="dfp-compare",
        description="Train a CNN in several number formats (fp32, bf16, fp16, dfp16, dfp16-sr, swalp), batch "
        "sizes and seeds; report training time against test accuracy. A repeated command resumes, skipping "
        "finished runs. 'dfp-compare report --out DIR' regenerates the report of an earlier study.",
    )
    what = parser.add_argument_group("what to train")
    what.add_argument(
        "--data",
        choices=DATA_SETS,
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
        help="swalp: the first epoch (1-based) averaged; the rate is held from there on (default: the last "
        "quarter of the epochs)",
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
        choices=("none", "dfp16"),
        default="none",
        help="gradient compression of DistributedDataParallel under torchrun (default: %(default)s)",
    )
    run.add_argument("--limit-train-batches", type=positive_int, help="at most this many steps per epoch (smoke tests)")
    run.add_argument("--out", default=DEFAULT_OUT, help="results directory, created (default: %(default)s)")
    run.add_argument(
        "--fresh", action="store_true", help="start a new results file; the old one is renamed aside, not deleted"
    )
    run.add_argument("--no-progress", action="store_true", help="no progress bars (none either when not on a terminal)")
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
    name, option combinations, the device and the formats it can run)."""
    model = args.model or DEFAULT_MODEL[args.data]
    if model not in models.MODELS:
        parser.error(f"--model: unknown model {model!r}; choose from {', '.join(models.MODELS)}")
    if args.warmup_epochs > args.epochs:
        parser.error(f"--warmup-epochs {args.warmup_epochs:g} must not exceed --epochs {args.epochs}")
    swa_start = args.swa_start if args.swa_start is not None else max(1, math.ceil(0.75 * args.epochs))
    if swa_start > args.epochs:
        parser.error(f"--swa-start {swa_start} is after the last epoch (--epochs {args.epochs})")
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error(f"--device cuda: torch {torch.__version__} sees no CUDA device; use --device cpu (the default)")
    device = torch.device(args.device)
    for name in args.formats:
        try:
            formats.check_available(name, device)
        except formats.FormatUnavailableError as err:
            parser.error(str(err))
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
    )


def _load_data(args: argparse.Namespace, parser: argparse.ArgumentParser) -> data.Dataset:
    options = {"cache_dir": args.cache_dir} if args.cache_dir is not None else {}
    try:
        return data.load(args.data, args.data_dir, **options)
    except (OSError, ValueError, TypeError) as err:
        parser.error(f"--data {args.data}: {err}")


def _check_against_data(study: StudyConfig, dataset: data.Dataset, world_size: int, parser) -> None:
    """Checks that need the data set and the model: batch sizes, layer names."""
    for batch_size in study.batch_sizes:
        if batch_size % world_size:
            parser.error(f"--batch-sizes: {batch_size} is not divisible by the {world_size} processes")
        if batch_size // world_size > len(dataset.train.labels):
            parser.error(
                f"--batch-sizes: {batch_size} is larger than the {len(dataset.train.labels)} training images "
                f"of {study.data}"
            )
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
        results = Path(args.out) / RESULTS_FILE
        if not results.is_file():
            print(f"error: {results} does not exist: run a study with --out {args.out} first", file=sys.stderr)
            return 2
        print(write_report(ResultStore(args.out), args.target_accuracy))
        return 0

    parser = build_parser()
    args = parser.parse_args(argv)
    study = study_config(args, parser)
    torch.set_num_threads(study.threads)
    try:
        ctx = distributed.setup(args.device)
    except (RuntimeError, ValueError) as err:
        parser.error(str(err))
    try:
        dataset = _load_data(args, parser)
        _check_against_data(study, dataset, ctx.world_size, parser)
        store = ResultStore(args.out) if ctx.is_main else None
        if study.compress != "none" and ctx.world_size == 1:
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
                write_report(store, study.target_accuracy)
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
            write_report(store, study.target_accuracy)
            for group in group_records(records):
                print("\n" + group_markdown(group, study.target_accuracy))
            print(f"report: {Path(args.out) / 'report.md'}, pareto.png, curves.png; results: {store.results_path}")
        return 0
    finally:
        distributed.teardown(ctx)
