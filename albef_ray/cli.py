"""The ``albef-ray`` command (also ``python -m albef_ray``).

Subcommands::

    albef-ray config show     [--config F] [a.b=c ...]   print the resolved config as YAML
    albef-ray config validate [--config F] [a.b=c ...]   check it, list what differs from defaults
    albef-ray pretrain         --config F  [a.b=c ...]   pretrain on Ray Train (--local: one process)

Config problems exit with status 2 and one line naming the dotted path, never a traceback.
"""

from __future__ import annotations

import argparse
import logging
import sys
import time
from collections.abc import Sequence

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
    pretrain.add_argument("--local", action="store_true", help="single-process loop on generated tensors, no Ray")
    pretrain.add_argument(
        "--resume", metavar="NAME",
        help="continue run NAME (under run.storage_path) from its latest checkpoint, in the same MLflow run",
    )
    pretrain.add_argument(
        "--no-progress", action="store_true", help="no progress bar (there is none anyway when stderr is not a terminal)"
    )
    return parser


def check_config(cfg: AlbefConfig) -> None:
    """Checks the config module does not make (yet): the size registry, micro-batch split."""
    from .model.registry import list_sizes

    if cfg.model.size not in list_sizes():
        raise ConfigError(f"model.size: unknown size {cfg.model.size!r}; registered: {', '.join(list_sizes())}")
    if cfg.train.batch_size % cfg.optim.grad_accum:
        raise ConfigError(
            f"optim.grad_accum: train.batch_size={cfg.train.batch_size} does not split into "
            f"{cfg.optim.grad_accum} equal micro-batches"
        )


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
    from .model.registry import get_arch
    from .train.loop import resolve_device, run_local
    from .train.synthetic import synthetic_batches

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


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``albef-ray``; returns the exit status."""
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    handler = {"show": _config_show, "validate": _config_validate}.get(getattr(args, "config_command", None))
    if args.command == "pretrain":
        handler = _pretrain
    try:
        cfg = load_config(args.config, args.overrides)
        check_config(cfg)
        return handler(cfg, args)
    except ConfigError as err:
        print(f"albef-ray: config error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("albef-ray: interrupted", file=sys.stderr)
        return 130
