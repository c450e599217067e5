"""The ``albef-ray`` command (also ``python -m albef_ray``).

Subcommands::

    albef-ray config show     [--config F] [a.b=c ...]   print the resolved config as YAML
    albef-ray config validate [--config F] [a.b=c ...]   check it, list what differs from defaults
    albef-ray pretrain         --config F  [a.b=c ...]   pretrain on Ray Train (--local: one process)
    albef-ray data build OUT --source SPEC [...]         image-caption inputs -> Parquet shards + manifest
    albef-ray data synth OUT [--train N ...]             generate the embedded benchmark and its tokenizer
    albef-ray sweep SPEC [a.b=c ...]                     run an ablation sweep (Ray Tune); again: resume
    albef-ray compare (--sweep NAME | --run-id ID)       a sweep's table and figures, from MLflow
    albef-ray eval retrieval --config F [--checkpoint P]  zero-shot image-text retrieval, Recall@1/5/10
    albef-ray finetune retrieval --config F [--checkpoint P] [--resume NAME]
                                                         fine-tune for retrieval on Ray Train, best by r_mean

Config problems exit with status 2 and one line naming the dotted path, never a traceback;
so do bad data-build arguments (an unknown source format, an output holding another dataset).
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import os
import re
import sys
import time
from collections.abc import Iterator, Sequence

from . import __version__
from .config import AlbefConfig, ConfigError, dump_yaml, flatten, load_config

OVERRIDES_HELP = "dotted overrides applied after the file, e.g. optim.lr=2e-4 train.max_steps=20"


def _add_config_args(parser: argparse.ArgumentParser, required: bool = False) -> None:
    parser.add_argument(
        "--config", "-c", metavar="FILE", required=required,
        help="experiment YAML holding only what differs from the defaults" + ("" if required else " (default: none)"),
    )
    parser.add_argument("overrides", nargs="*", metavar="a.b=c", help=OVERRIDES_HELP)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="albef-ray",
        description="ALBEF vision-language pretraining (Li et al., NeurIPS 2021) on Ray.",
        epilog="Settings are one typed config tree; every field has a dotted name (optim.lr, "
        "train.batch_size) used in YAML, overrides and error messages.",
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    config = commands.add_parser("config", help="show or validate a resolved config")
    config_commands = config.add_subparsers(dest="config_command", required=True, metavar="ACTION")
    show = config_commands.add_parser(
        "show", help="print the resolved config (defaults <- file <- overrides) as YAML",
        description="Print the resolved config (defaults <- file <- overrides) as YAML.",
    )
    _add_config_args(show)
    validate = config_commands.add_parser(
        "validate", help="check a config and list the settings that differ from the defaults",
        description="Check a config; exit 2 naming the dotted path of the first problem.",
    )
    _add_config_args(validate)

    pretrain = commands.add_parser(
        "pretrain", help="pretrain ALBEF with Ray Train (or --local: one process)",
        description="Pretrain ALBEF with ITC, ITM and MLM (+ momentum distillation) as configured: "
        "a Ray Train TorchTrainer with train.num_workers workers, data streamed by Ray Data from "
        "data.shards (generated tensors when none), every step logged to MLflow. Connects to "
        "run.address / $RAY_ADDRESS (e.g. under `ray job submit`), else starts Ray locally. "
        "The whole config is validated before Ray starts.",
    )
    _add_config_args(pretrain, required=True)
    pretrain.add_argument(
        "--local", action="store_true", help="single-process loop on generated tensors, no Ray (refuses data.shards)"
    )
    pretrain.add_argument(
        "--resume", metavar="NAME",
        help="continue run NAME (under run.storage_path) from its latest checkpoint, in the same MLflow run",
    )
    pretrain.add_argument(
        "--no-progress", action="store_true", help="no progress bar (there is none anyway when stderr is not a terminal)"
    )
    _add_data_commands(commands)
    _add_sweep_commands(commands)
    _add_eval_commands(commands)
    _add_finetune_commands(commands)
    return parser


SOURCE_HELP = (
    "an input as comma-separated key=value pairs: name=NAME,format=json|img2dataset|webdataset,"
    "path=FILE|DIR|GLOB[,split=train]; json also takes image_root=DIR (default: the annotation "
    "file's directory); img2dataset takes image_column= (jpg), caption_column= (caption), "
    "id_column= (key, else url). Repeat for several sources."
)


def _add_data_commands(commands: argparse._SubParsersAction) -> None:
    from .data.synth import SynthConfig
    from .data.tokenizer import DEFAULT_VOCAB_SIZE
    from .train.unimodal import InitSettings

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
        described = f"{text} (default: {default})"
        synth.add_argument(flag, dest=name, type=kind, default=default, metavar=metavar, help=described)
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


def _add_build_flags(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--overwrite", action="store_true", help="replace a dataset of other inputs in OUT")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar (none anyway off a terminal)")


def parse_size(text: str) -> int:
    """Bytes in ``"128MiB"``, ``"64MB"``, ``"1e6"``, ``"4096"``."""
    units = {"": 1, "b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "kib": 2**10, "mib": 2**20, "gib": 2**30}
    match = re.fullmatch(r"\s*([0-9.e+]+)\s*([a-z]*)\s*", text.lower())
    if not match or match.group(2) not in units:
        raise ValueError(f"--shard-size: cannot read {text!r} (e.g. 64MB, 128MiB, 1GiB)")
    try:
        size = int(float(match.group(1)) * units[match.group(2)])
    except (ValueError, OverflowError):
        raise ValueError(f"--shard-size: cannot read {text!r} (e.g. 64MB, 128MiB, 1GiB)") from None
    if size < 1:
        raise ValueError(f"--shard-size: {text!r} is not a positive size")
    return size


def changed_settings(cfg: AlbefConfig) -> dict[str, object]:
    """Dotted settings whose value differs from the defaults."""
    defaults = flatten(AlbefConfig())
    return {k: v for k, v in flatten(cfg).items() if defaults.get(k) != v}


def _config_show(cfg: AlbefConfig, args: argparse.Namespace) -> int:
    print(dump_yaml(cfg), end="")
    return 0


def _config_validate(cfg: AlbefConfig, args: argparse.Namespace) -> int:
    changed = changed_settings(cfg)
    counted = "1 setting differs" if len(changed) == 1 else f"{len(changed)} settings differ"
    print(f"{args.config or 'defaults'}: valid; {counted} from the defaults")
    for key, value in changed.items():
        print(f"  {key} = {value!r}")
    return 0


def _pretrain(cfg: AlbefConfig, args: argparse.Namespace) -> int:
    if args.local:
        return _pretrain_local(cfg, args)
    from .launch.train import run_pretrain

    if args.resume:
        cfg = cfg.model_copy(update={"run": cfg.run.model_copy(update={"name": args.resume})})
    print(
        f"albef-ray pretrain: {cfg.model.size} on Ray Train, {cfg.train.num_workers} worker(s) x batch "
        f"{cfg.train.batch_size}, {'GPU' if cfg.train.use_gpu else 'CPU'}, precision {cfg.train.precision}"
    )
    result = run_pretrain(cfg)
    metrics = result.metrics or {}
    if metrics:
        print(f"finished at step {metrics.get('step')} | loss {metrics.get('loss', float('nan')):.4f}")
    return 0


def _pretrain_local(cfg: AlbefConfig, args: argparse.Namespace) -> int:
    from .launch.train import check_local_paths
    from .model.registry import get_arch
    from .train.loop import resolve_device, run_local
    from .train.synthetic import synthetic_batches

    check_local_paths(cfg)  # a missing path is named as such, before the refusal below
    if cfg.data.shards:
        raise ConfigError(
            "data.shards: pretrain --local trains on generated tensors only and would ignore "
            f"{', '.join(cfg.data.shards)}; drop --local to stream them on Ray, or unset data.shards"
        )
    if cfg.train.steps_per_epoch is None:
        raise ConfigError("train.steps_per_epoch: required for generated batches (they have no natural epoch)")
    arch = get_arch(cfg.model.size, cfg.model.image_res)
    total = cfg.train.epochs * cfg.train.steps_per_epoch
    steps = min(total, cfg.train.max_steps or total)
    print("albef-ray pretrain --local: single-process loop on generated image-caption tensors (no Ray)")
    print(
        f"  config {args.config} | model {cfg.model.size} @ {arch.image_res}px | batch {cfg.train.batch_size}"
        f" x grad_accum {cfg.optim.grad_accum} | {steps} of {total} scheduled steps"
        f" | device {resolve_device(cfg)} | precision {cfg.train.precision}"
    )
    if cfg.train.num_workers > 1:
        print(f"  note: train.num_workers={cfg.train.num_workers} is ignored by the local loop (one process)")
    start = time.perf_counter()
    batches = synthetic_batches(cfg, cfg.train.steps_per_epoch)
    # A bar only on a terminal: in CI logs its carriage returns would bury the metric lines.
    history = run_local(cfg, batches, progress=sys.stderr.isatty() and not args.no_progress)
    elapsed = time.perf_counter() - start
    n = min(10, len(history))
    first = sum(h["loss"] for h in history[:n]) / n
    last = sum(h["loss"] for h in history[-n:]) / n
    skipped = int(sum(h["skipped"] for h in history))
    print(f"first loss {history[0]['loss']:.4f} (step 1) | last loss {history[-1]['loss']:.4f} (step {len(history)})")
    print(f"mean of the first {n} steps {first:.4f} -> mean of the last {n} steps {last:.4f}")
    print(f"{len(history)} steps in {elapsed:.1f} s; {skipped} skipped for a non-finite loss or gradient")
    return 0


def _data_build(args: argparse.Namespace) -> int:
    import yaml

    from .data.sources import parse_source_spec, source_from_dict
    from .data.writer import write_dataset

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
    with _sigterm_interrupts():  # workers and the pool are shut down as on Ctrl-C
        manifest = write_dataset(
            args.out, sources, shard_bytes=shard_bytes, shard_rows=args.shard_rows,
            shuffle_seed=None if args.no_shuffle else args.shuffle_seed, workers=args.workers,
            progress=sys.stderr.isatty() and not args.no_progress, overwrite=args.overwrite,
        )
    _report(args.out, manifest)
    return 0


@contextlib.contextmanager
def _sigterm_interrupts() -> Iterator[None]:
    """SIGTERM (``kill``, a scheduler's stop) unwinds the build as Ctrl-C does, then exits 130."""
    import signal
    import threading

    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def interrupt(signum: int, frame: object) -> None:
        raise KeyboardInterrupt

    previous = signal.signal(signal.SIGTERM, interrupt)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def _data_synth(args: argparse.Namespace) -> int:
    from .data.synth import NOISE_FILE, SynthConfig, build_synth

    config = SynthConfig(
        seed=args.seed, image_size=args.image_size, train=args.train, val=args.val, test=args.test,
        noise=args.noise, eval_captions=args.eval_captions, image_format=args.image_format,
    )
    manifest = build_synth(
        args.out, config, shard_rows=args.shard_rows, vocab_size=args.vocab_size, workers=args.workers,
        progress=sys.stderr.isatty() and not args.no_progress, overwrite=args.overwrite,
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


def _data_synth_init(args: argparse.Namespace) -> int:
    from .model.registry import get_arch
    from .train.unimodal import InitSettings, build_synth_init

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


def _data(args: argparse.Namespace) -> int:
    from .data.writer import BuildError

    handler = {"build": _data_build, "synth": _data_synth, "synth-init": _data_synth_init}[args.data_command]
    try:
        return handler(args)
    except (ValueError, BuildError, FileNotFoundError) as err:
        print(f"albef-ray: data error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("albef-ray: interrupted; run the same command again to finish the build", file=sys.stderr)
        return 130


def _add_eval_commands(commands: argparse._SubParsersAction) -> None:
    evaluate = commands.add_parser("eval", help="evaluate a checkpoint: zero-shot image-text retrieval")
    actions = evaluate.add_subparsers(dest="eval_command", required=True, metavar="TASK")
    retrieval = actions.add_parser(
        "retrieval", help="Recall@1/5/10 of text and image retrieval on eval.split",
        description="Embed every image and caption of eval.split (eval.shards, else data.shards), rank "
        "by ITC similarity, re-rank each query's top eval.k_test with the ITM head (eval.score: itm | "
        "itm_itc), and report Recall@1/5/10 of text retrieval (an image's best-ranked caption) and image "
        "retrieval. Prints a table, writes --out, and logs to MLflow (tracking.enabled): into the "
        "training run of the checkpoint when its run directory names one, else into --run-id or a new run.",
    )
    _add_config_args(retrieval, required=True)
    retrieval.add_argument(
        "--checkpoint", metavar="PATH",
        help="checkpoint directory (state.pt), run directory (its latest checkpoint_*), or .pth file "
        "(default: model.checkpoint; none: the initial weights)",
    )
    retrieval.add_argument("--out", metavar="FILE", help="write the metrics as JSON to FILE")
    retrieval.add_argument("--run-id", metavar="ID", help="log into this MLflow run instead of the checkpoint's")


def _recall_table(metrics: dict[str, float]) -> str:
    lines = [f"{'':>16}{'R@1':>8}{'R@5':>8}{'R@10':>8}{'mean':>8}"]
    for name, prefix in (("text retrieval", "txt"), ("image retrieval", "img")):
        values = [metrics[f"{prefix}_r{k}"] for k in (1, 5, 10)] + [metrics[f"{prefix}_r_mean"]]
        lines.append(f"{name:>16}" + "".join(f"{v:8.2f}" for v in values))
    lines.append(f"{'r_mean':>16}{metrics['r_mean']:8.2f}")
    return "\n".join(lines)


def _eval_inputs(cfg: AlbefConfig, checkpoint: str | None) -> AlbefConfig:
    """The part of ``cfg`` that `eval` reads: its shards only, no initial weights under a checkpoint."""
    from .eval.checkpoint import eval_paths

    eval_paths(cfg)  # eval.shards or data.shards must name something
    data = cfg.data.model_copy(update={"shards": [] if cfg.eval.shards else cfg.data.shards})
    unused = {"vit_init": None, "bert_init": None} if checkpoint or cfg.model.checkpoint else {}
    model = cfg.model.model_copy(update={**unused, **({"checkpoint": None} if checkpoint else {})})
    return cfg.model_copy(update={"data": data, "model": model})


def _eval_retrieval(cfg: AlbefConfig, args: argparse.Namespace) -> int:
    import json
    from pathlib import Path

    from .eval.checkpoint import checkpoint_step, evaluate_checkpoint, resolve_checkpoint
    from .launch.train import check_local_paths
    from .model.loading import CheckpointError

    check_local_paths(_eval_inputs(cfg, args.checkpoint))  # before any model or tokenizer (a hub retry) loads
    checkpoint = args.checkpoint or cfg.model.checkpoint
    try:
        weights = resolve_checkpoint(checkpoint) if checkpoint else None
        print(f"albef-ray eval retrieval: {cfg.model.size} from {weights or 'its initial weights'}")
        metrics = evaluate_checkpoint(cfg, weights)
    except (OSError, CheckpointError) as err:  # a missing checkpoint, shard or tokenizer; an unreadable checkpoint
        print(f"albef-ray: eval error: {err}", file=sys.stderr)
        return 2
    print(
        f"split {cfg.eval.split}: {metrics['num_images']} images, {metrics['num_texts']} captions"
        f" ({metrics['skipped_images']} undecodable skipped) | k_test {cfg.eval.k_test} | score {cfg.eval.score}"
        f" | {metrics['eval_seconds']:.1f} s"
    )
    print(_recall_table(metrics))
    step = checkpoint_step(weights) if weights and weights.name == "state.pt" else None
    if args.out:
        record = {"split": cfg.eval.split, "checkpoint": str(weights) if weights else None, "step": step,
                  "k_test": cfg.eval.k_test, "score": cfg.eval.score, **metrics}
        Path(args.out).write_text(json.dumps(record, indent=2) + "\n")
        print(f"metrics: {args.out}")
    if cfg.tracking.enabled:
        from .eval.tracking import log_retrieval

        uri, run_id = log_retrieval(cfg, metrics, weights, args.run_id, step)
        print(f"MLflow run {run_id} in {uri}")
    return 0


def _add_finetune_commands(commands: argparse._SubParsersAction) -> None:
    finetune = commands.add_parser("finetune", help="fine-tune a pretrained ALBEF on a downstream task (Ray Train)")
    tasks = finetune.add_subparsers(dest="finetune_task", required=True, metavar="TASK")
    retrieval = tasks.add_parser(
        "retrieval", help="image-text retrieval fine-tuning, evaluated every epoch, best checkpoint by r_mean",
        description="Fine-tune for image-text retrieval (config task: retrieval; see experiments/finetune_coco.yaml "
        "and finetune_flickr.yaml): ITC whose positives are every caption of the same image (batch and queue), "
        "ITM with hard negatives never taken from the same image, momentum distillation, on the TorchTrainer and "
        "Ray Data pipeline of `pretrain`. After every epoch rank 0 evaluates retrieval on eval.split; Ray keeps "
        "the best train.keep_checkpoints checkpoints by r_mean (and the latest, for resuming) and the best is "
        "tagged on the MLflow run. A 256-px checkpoint loads into a 384-px model by interpolating the ViT "
        "position embeddings.",
    )
    _add_config_args(retrieval, required=True)
    retrieval.add_argument(
        "--checkpoint", metavar="PATH",
        help="weights to start from (sets model.checkpoint): an albef-ray checkpoint directory, a run "
        "directory (its latest checkpoint) or a .pth file (released ALBEF or albef-ray)",
    )
    retrieval.add_argument(
        "--resume", metavar="NAME",
        help="continue run NAME (under run.storage_path) from its latest checkpoint, in the same MLflow run",
    )


def _finetune_retrieval(cfg: AlbefConfig, args: argparse.Namespace) -> int:
    from .config import with_overrides
    from .eval.checkpoint import resolve_checkpoint
    from .launch.finetune import best_checkpoint, run_finetune
    from .model.registry import get_arch

    overrides = {"run.name": args.resume} if args.resume else {}
    if args.checkpoint:
        try:
            overrides["model.checkpoint"] = str(resolve_checkpoint(args.checkpoint))
        except OSError as err:
            print(f"albef-ray: finetune error: {err}", file=sys.stderr)
            return 2
    cfg = with_overrides(cfg, overrides) if overrides else cfg
    res = get_arch(cfg.model.size, cfg.model.image_res).image_res
    print(
        f"albef-ray finetune retrieval: {cfg.model.size} @ {res}px from {cfg.model.checkpoint or 'the initial weights'}"
        f" | {cfg.train.num_workers} worker(s) x batch {cfg.train.batch_size} | {cfg.train.epochs} epochs"
        f" | evaluated on {cfg.eval.split} {'every epoch' if cfg.eval.every_epoch else 'never (eval.every_epoch=false)'}"
    )
    result = run_finetune(cfg)
    best = best_checkpoint(result)
    if best is not None:
        print(_recall_table(best[1]))
    return 0


def _add_sweep_commands(commands: argparse._SubParsersAction) -> None:
    sweep = commands.add_parser(
        "sweep", help="run an ablation sweep (ablations/*.yaml) on Ray Tune, tracked in MLflow",
        description="Expand a sweep file (a base experiment, variants as dotted overrides, an optional grid, "
        "seeds) into trials and validate every trial's config; then run each trial on Ray Tune as a Ray Train "
        "pretraining run followed by zero-shot retrieval on eval.split, max_concurrent_trials at a time. One "
        "MLflow parent run per sweep, one child run per trial. Running the same command again resumes the "
        "sweep: finished trials are kept, unfinished and failed ones run again from their last checkpoint. "
        "Ends with the comparison table (as `albef-ray compare`).",
    )
    sweep.add_argument("spec", metavar="SPEC", help="sweep file, e.g. ablations/table1.yaml")
    sweep.add_argument("overrides", nargs="*", metavar="a.b=c", help="dotted overrides applied to every trial")
    sweep.add_argument("--dry-run", action="store_true", help="list the trials and their overrides, run nothing")
    compare = commands.add_parser(
        "compare", help="a sweep's comparison table and figures, read back from MLflow",
        description="Read a sweep's trial runs from MLflow; print variant x TR@1/5/10, IR@1/5/10, mean (mean "
        "± std over seeds); write table.md, table.csv, recalls.png and loss_curves.png to --out and log them "
        "as artifacts (comparison/) of the sweep's parent run.",
    )
    which = compare.add_mutually_exclusive_group(required=True)
    which.add_argument("--sweep", metavar="NAME", help="the latest sweep of this name")
    which.add_argument("--run-id", metavar="ID", help="the sweep's MLflow parent run id")
    compare.add_argument(
        "--tracking-uri", metavar="URI",
        help="MLflow store (default: $MLFLOW_TRACKING_URI, else sqlite:///runs/mlflow.db as the sweeps write it)",
    )
    compare.add_argument("--out", metavar="DIR", help="output folder (default: runs/<sweep>/compare)")


def _sweep(args: argparse.Namespace) -> int:
    from .sweep import load_sweep

    sweep = load_sweep(args.spec, args.overrides)  # every trial validated before Ray starts
    print(f"albef-ray sweep: {sweep.spec.name}, {len(sweep.trials)} trial(s) from {args.spec}")
    for trial in sweep.trials:
        print(f"  {trial.key}: " + " ".join(f"{k}={v}" for k, v in trial.overrides.items()))
    if args.dry_run:
        return 0
    from .compare import compare_sweep
    from .launch.sweep import run_sweep

    outcome = run_sweep(sweep)
    print(f"finished: {len(outcome.finished)} of {len(sweep.trials)} trial(s)")
    for key, error in outcome.failed.items():
        print(f"  FAILED {key}: {error}")
    if outcome.finished:
        compare_sweep(outcome.tracking_uri, outcome.sweep_dir / "compare", run_id=outcome.parent_run_id)
    from .launch.tracking import ui_hint

    print(f"MLflow UI: {ui_hint(outcome.tracking_uri)}")
    if outcome.failed:
        print("run the same command again to retry the failed trials (finished ones are kept)")
        return 1
    return 0


def _compare(args: argparse.Namespace) -> int:
    from pathlib import Path

    from .compare import compare_sweep
    from .launch.tracking import resolve_tracking_uri, ui_hint

    defaults = AlbefConfig()
    storage = Path(defaults.run.storage_path).resolve()
    uri = args.tracking_uri or resolve_tracking_uri(defaults, storage)
    out = args.out or storage / (args.sweep or args.run_id) / "compare"
    try:
        compare_sweep(uri, out, sweep=args.sweep, run_id=args.run_id)
    except LookupError as err:
        print(f"albef-ray: compare error: {err.args[0]}", file=sys.stderr)
        return 2
    print(f"MLflow UI: {ui_hint(uri)}")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``albef-ray``; returns the exit status."""
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    if args.command == "data":
        return _data(args)
    if args.command in ("sweep", "compare"):
        try:
            return {"sweep": _sweep, "compare": _compare}[args.command](args)
        except ConfigError as err:
            print(f"albef-ray: config error: {err}", file=sys.stderr)
            return 2
    handler = {"show": _config_show, "validate": _config_validate}.get(getattr(args, "config_command", None))
    if args.command == "pretrain":
        handler = _pretrain
    if args.command == "eval":
        handler = {"retrieval": _eval_retrieval}[args.eval_command]
    if args.command == "finetune":
        handler = {"retrieval": _finetune_retrieval}[args.finetune_task]
    try:
        cfg = load_config(args.config, args.overrides)
        return handler(cfg, args)
    except ConfigError as err:
        print(f"albef-ray: config error: {err}", file=sys.stderr)
        return 2
    except ValueError as err:
        from .model.loading import CheckpointError  # imported already when one was raised

        if not isinstance(err, CheckpointError):
            raise
        print(f"albef-ray: checkpoint error: {err}", file=sys.stderr)  # empty, corrupt or unsafe weights file
        return 2
    except KeyboardInterrupt:
        print("albef-ray: interrupted", file=sys.stderr)
        return 130
