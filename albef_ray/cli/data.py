"""``albef-ray data build|synth|synth-init|synth-task``: datasets as Parquet shards + manifest.

Bad arguments and inputs (an unknown source format, an output holding another dataset, a
missing file) exit 2 with one ``data error`` line; Ctrl-C or SIGTERM exits 130, and running the
same command again finishes the build.
"""

from __future__ import annotations

import argparse
import functools
import os
import sys
from collections.abc import Callable

from .common import parse_size, show_progress, sigterm_interrupts

SOURCE_HELP = (
    "an input as comma-separated key=value pairs: name=NAME,format=json|img2dataset|webdataset,"
    "path=FILE|DIR|GLOB[,split=train]; json also takes image_root=DIR (default: the annotation "
    "file's directory); img2dataset takes image_column= (jpg), caption_column= (caption), "
    "id_column= (key, else url). Repeat for several sources."
)


def register(commands: argparse._SubParsersAction) -> None:
    """Add ``data`` and its actions ``build``, ``synth`` and ``synth-init``.

    Args:
        commands: The top-level subcommands of ``albef-ray``.
    """
    from ..data.tokenizer import DEFAULT_VOCAB_SIZE
    from ..synth.benchmark import SynthConfig
    from ..synth.unimodal import InitSettings

    data = commands.add_parser("data", help="build caption datasets: Parquet shards + manifest")
    actions = data.add_subparsers(dest="data_command", required=True, metavar="ACTION")
    build = actions.add_parser(
        "build", help="validate image-caption inputs and write them as Parquet shards",
        description="Read ALBEF JSON annotations, img2dataset Parquet or WebDataset tars; skip (count "
        "and list in OUT/skipped.jsonl) missing, empty, truncated or undecodable images and empty captions; "
        "write OUT/<split>/part-NNNNN.parquet and OUT/manifest.json, rows shuffled across each split "
        "(seeded). Run the same command again to finish an interrupted build: finished work is kept. "
        "Inputs are checked before any work; an OUT holding files of another tool is refused.",
    )
    build.add_argument("out", metavar="OUT", help="output dataset directory")
    build.add_argument("--source", action="append", default=[], metavar="SPEC", help=SOURCE_HELP)
    build.add_argument("--sources", metavar="FILE", help="YAML list of sources with the same keys as --source")
    build.add_argument(
        "--shard-size", default="128MiB", metavar="SIZE", help="target shard size, e.g. 64MB, 1GiB (default: 128MiB)"
    )
    build.add_argument("--shard-rows", type=int, metavar="N", help="also cut a shard at N rows (N >= 1)")
    build.add_argument(
        "--shuffle-seed", type=int, default=0, metavar="N",
        help="seed of the row shuffle across each split (default: 0; same seed and inputs: same shards)",
    )
    build.add_argument(
        "--no-shuffle", action="store_true",
        help="keep input order (all captions of an image adjacent in one shard)",
    )
    build.add_argument(
        "--workers", type=int, default=os.cpu_count() or 1, metavar="N",
        help="processes decoding images (default: all cores; 0: in this process)",
    )
    _add_build_flags(build)
    build.set_defaults(func=_build)

    defaults = SynthConfig()
    synth = actions.add_parser(
        "synth", help="generate the embedded benchmark: shape scenes, captions, tokenizer",
        description="Render scenes of 2-3 shapes (size, colour, relation) with captions; train/val/test "
        "disjoint by scene; several paraphrases per val/test image; a fraction of wrong training "
        "captions. Writes shards + manifest like `data build` (source 'synth'), the noisy captions to "
        "OUT/synth_noise.jsonl and a WordPiece tokenizer to OUT/tokenizer/.",
    )
    synth.add_argument("out", metavar="OUT", help="output dataset directory")
    for flag, name, kind, metavar, text in (
        ("--seed", "seed", int, "N", "random seed: the same seed gives identical shards"),
        ("--image-size", "image_size", int, "PX", "image side in pixels"),
        ("--train", "train", int, "N", "training images (one caption each)"),
        ("--val", "val", int, "N", "validation images"),
        ("--test", "test", int, "N", "test images"),
        ("--noise", "noise", float, "FRACTION", "fraction of training captions made wrong"),
        ("--captions", "eval_captions", int, "N", "captions per val/test image"),
    ):
        default = getattr(defaults, name)
        synth.add_argument(flag, dest=name, type=kind, default=default, metavar=metavar, help=f"{text} (default: {default})")
    synth.add_argument(
        "--format", dest="image_format", choices=("png", "jpeg"), default=defaults.image_format,
        help=f"image encoding (default: {defaults.image_format})",
    )
    synth.add_argument("--shard-rows", type=int, default=2048, metavar="N", help="rows per shard (default: 2048)")
    synth.add_argument(
        "--vocab-size", type=int, default=DEFAULT_VOCAB_SIZE, metavar="N",
        help=f"WordPiece vocabulary bound (default: {DEFAULT_VOCAB_SIZE}; albef_tiny has 1000 ids)",
    )
    synth.add_argument("--workers", type=int, default=0, metavar="N", help="processes validating images (default: 0)")
    _add_build_flags(synth)
    synth.set_defaults(func=_synth)

    init_defaults = InitSettings()
    init = actions.add_parser(
        "synth-init", help="unimodal initial weights for the synthetic benchmark (its DeiT and BERT)",
        description="ALBEF starts from DeiT and bert-base, never from random weights. For a synthetic "
        "benchmark dataset this trains the same kind of start from its training split: the model size's "
        "ViT on multi-label object recognition (labels from the generator's scenes) saved as timm weights "
        "(OUT/vit.pth, for model.vit_init), and a BertForMaskedLM of its text + fusion depth by MLM on the "
        "captions, saved with save_pretrained (OUT/bert, for model.bert_init). Neither sees a pair.",
    )
    init.add_argument("dataset", metavar="DATASET", help="a dataset written by `albef-ray data synth`")
    init.add_argument("--out", metavar="DIR", help="output directory (default: DATASET/init)")
    for flag, name, kind, metavar, text in (
        ("--size", "size", str, "NAME", "model size whose encoders are trained"),
        ("--vision-steps", "vision_steps", int, "N", "object-recognition steps"),
        ("--text-steps", "text_steps", int, "N", "MLM steps"),
        ("--batch-size", "batch_size", int, "N", "batch size of both"),
        ("--lr", "lr", float, "LR", "AdamW learning rate of both"),
        ("--seed", "seed", int, "N", "random seed"),
    ):
        default = getattr(init_defaults, name)
        init.add_argument(flag, dest=name, type=kind, default=default, metavar=metavar, help=f"{text} (default: {default})")
    init.set_defaults(func=_synth_init)

    task = actions.add_parser(
        "synth-task", help="generate a downstream task's embedded version (ve, nlvr, vqa, ...)",
        description="Scenes drawn like `data synth`'s, with the registered task's examples (SNLI-VE "
        "hypotheses, NLVR2 statements about two scenes, VQA questions with answers) following from the "
        "scene's ground truth; written as a dataset with the task's columns and the caption dataset's "
        "tokenizer.",
    )
    task.add_argument("task", metavar="TASK", help="a registered task with an embedded version")
    task.add_argument("out", metavar="OUT", help="output dataset directory")
    task.add_argument("--from", dest="tokenizer_from", required=True, metavar="DATASET",
                      help="a dataset written by `albef-ray data synth` (its tokenizer is copied)")
    for flag, name, default, text in (
        ("--train", "train", 4000, "training examples"), ("--val", "val", 500, "validation examples"),
        ("--test", "test", 1000, "test examples"), ("--image-size", "image_size", 64, "image size in pixels"),
        ("--seed", "seed", 0, "generator seed"),
    ):
        task.add_argument(flag, dest=name, type=int, default=default, metavar="N", help=f"{text} (default: {default})")
    _add_build_flags(task)
    task.set_defaults(func=_synth_task)


def _add_build_flags(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--overwrite", action="store_true", help="replace a dataset of other inputs in OUT")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar (none anyway off a terminal)")


def _data_errors(action: Callable[[argparse.Namespace], int]) -> Callable[[argparse.Namespace], int]:
    """``action`` with bad inputs reported as one line (exit 2) and interruptions as exit 130."""

    @functools.wraps(action)
    def run(args: argparse.Namespace) -> int:
        from ..data.build.writer import BuildError

        try:
            return action(args)
        except (ValueError, BuildError, FileNotFoundError) as err:
            print(f"albef-ray: data error: {err}", file=sys.stderr)
            return 2
        except KeyboardInterrupt:
            print("albef-ray: interrupted; run the same command again to finish the build", file=sys.stderr)
            return 130

    return run


@_data_errors
def _build(args: argparse.Namespace) -> int:
    import yaml

    from ..data.build.sources import parse_source_spec, source_from_dict
    from ..data.build.writer import write_dataset

    sources = [parse_source_spec(spec) for spec in args.source]
    if args.sources:
        with open(args.sources, encoding="utf-8") as handle:
            listed = yaml.safe_load(handle) or []
        if not isinstance(listed, list):
            raise ValueError(f"{args.sources}: expected a YAML list of sources")
        sources += [source_from_dict(spec) for spec in listed]
    if not sources:
        raise ValueError("no inputs: give --source SPEC (repeatable) or --sources FILE")
    if args.shard_rows is not None and args.shard_rows < 1:
        raise ValueError(f"--shard-rows: {args.shard_rows} is not a positive number of rows")
    if args.shuffle_seed < 0:
        raise ValueError(f"--shuffle-seed: {args.shuffle_seed} is negative")
    shard_bytes = parse_size(args.shard_size)
    with sigterm_interrupts():  # workers and the pool are shut down as on Ctrl-C
        manifest = write_dataset(
            args.out, sources, shard_bytes=shard_bytes, shard_rows=args.shard_rows,
            shuffle_seed=None if args.no_shuffle else args.shuffle_seed, workers=args.workers,
            progress=show_progress(args), overwrite=args.overwrite,
        )
    _report(args.out, manifest)
    return 0


@_data_errors
def _synth(args: argparse.Namespace) -> int:
    from ..synth.benchmark import NOISE_FILE, SynthConfig, build_synth

    config = SynthConfig(
        seed=args.seed, image_size=args.image_size, train=args.train, val=args.val, test=args.test,
        noise=args.noise, eval_captions=args.eval_captions, image_format=args.image_format,
    )
    manifest = build_synth(
        args.out, config, shard_rows=args.shard_rows, vocab_size=args.vocab_size, workers=args.workers,
        progress=show_progress(args), overwrite=args.overwrite,
    )
    _report(args.out, manifest)
    noise = manifest["synth"]["noise"]
    kinds = ", ".join(f"{k} {n}" for k, n in sorted(noise["by_kind"].items())) or "none"
    listed = os.path.join(args.out, NOISE_FILE)
    print(f"  noisy training captions: {noise['rows']} of {config.train} ({kinds}) -> {listed}")
    tokenizer = os.path.join(args.out, manifest["tokenizer"])
    with open(os.path.join(tokenizer, "vocab.txt"), encoding="utf-8") as handle:
        vocab = sum(1 for _ in handle)
    print(f"  tokenizer: {tokenizer} (WordPiece, {vocab} tokens; load with AutoTokenizer.from_pretrained)")
    return 0


@_data_errors
def _synth_task(args: argparse.Namespace) -> int:
    from ..synth.tasks import SynthTaskSettings
    from ..tasks import get_task

    try:
        build = get_task(args.task).synth_builder()
    except KeyError as err:
        print(f"albef-ray: data error: {err.args[0]}", file=sys.stderr)
        return 2
    settings = SynthTaskSettings(
        tokenizer_from=args.tokenizer_from, seed=args.seed, train=args.train, val=args.val, test=args.test,
        image_size=args.image_size,
    )
    manifest = build(args.out, settings, progress=show_progress(args), overwrite=args.overwrite)
    _report(args.out, manifest)
    return 0


@_data_errors
def _synth_init(args: argparse.Namespace) -> int:
    from ..model.registry import get_arch
    from ..synth.unimodal import InitSettings, build_synth_init

    try:
        get_arch(args.size)  # an unknown size fails here, before any data is read
    except KeyError as err:
        raise ValueError(f"--size: {err.args[0]}") from None
    settings = InitSettings(
        size=args.size, vision_steps=args.vision_steps, text_steps=args.text_steps,
        batch_size=args.batch_size, lr=args.lr, seed=args.seed,
    )
    report = build_synth_init(args.dataset, settings, args.out)
    held_out = next(k for k in report if k.startswith("vision_") and k != "vision_loss")
    vision, text = report[held_out], report["text_" + held_out.split("_", 1)[1]]
    print(f"albef-ray data synth-init: {args.size} encoders in {report['seconds']} s")
    print(f"  image encoder -> {report['vit_init']}  (object recall on {held_out[7:]}: {vision['object_recall']:.3f})")
    print(f"  text encoder  -> {report['bert_init']}  (MLM accuracy on {held_out[7:]}: {text['mlm_accuracy']:.3f})")
    print(f"  use: model.vit_init={report['vit_init']} model.bert_init={report['bert_init']}")
    return 0


def _report(out: str, manifest: dict) -> None:
    """Print a built dataset's splits, skipped inputs, row order and manifest path."""
    print(f"albef-ray data: dataset in {out}")
    for split, entry in manifest["splits"].items():
        sources = ", ".join(f"{name} {rows}" for name, rows in entry["sources"].items())
        shards = f"{len(entry['shards'])} shard" + "s" * (len(entry["shards"]) != 1)
        print(f"  {split}: {entry['rows']} rows ({entry['images']} images) in {shards} [{sources}]")
    skipped = manifest["skipped"]
    reasons = ", ".join(f"{reason} {n}" for reason, n in sorted(skipped["by_reason"].items()))
    listed = f" ({reasons}) -> {os.path.join(out, 'skipped.jsonl')}" if reasons else ""
    print(f"  skipped inputs: {skipped['total']}{listed}")
    seed = manifest.get("build", {}).get("shuffle_seed")
    print(f"  row order: {'input order' if seed is None else f'shuffled across each split (seed {seed})'}")
    print(f"  manifest: {os.path.join(out, 'manifest.json')}")
