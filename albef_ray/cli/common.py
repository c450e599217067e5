"""What several ``albef-ray`` commands share: config arguments, ``--resume``, sizes, signals.

Every command that reads an experiment config adds its arguments with :func:`add_config_args`
and reads it with :func:`load`; a command that continues a run adds :func:`add_resume_arg`,
and :func:`load` then applies ``--resume NAME`` as the ``run.name`` override, the same way for
every such command (``pretrain``, ``finetune TASK``).
"""

from __future__ import annotations

import argparse
import contextlib
import re
import sys
from collections.abc import Callable, Iterator

from ..config import AlbefConfig, load_config, with_overrides

OVERRIDES_HELP = "dotted overrides applied after the file, e.g. optim.lr=2e-4 train.max_steps=20"
RESUME_HELP = "continue run NAME (under run.storage_path) from its latest checkpoint, in the same MLflow run"


def add_config_args(parser: argparse.ArgumentParser, required: bool = False) -> None:
    """Add ``--config FILE`` and the positional dotted overrides.

    Args:
        parser: The subcommand's parser.
        required: Whether ``--config`` must be given (every command but ``config show|validate``).
    """
    parser.add_argument(
        "--config", "-c", metavar="FILE", required=required,
        help="experiment YAML holding only what differs from the defaults" + ("" if required else " (default: none)"),
    )
    parser.add_argument("overrides", nargs="*", metavar="a.b=c", help=OVERRIDES_HELP)


def add_resume_arg(parser: argparse.ArgumentParser) -> None:
    """Add ``--resume NAME``, which :func:`load` applies as the ``run.name`` override.

    Args:
        parser: The parser of a command that trains (``pretrain``, ``finetune TASK``).
    """
    parser.add_argument("--resume", metavar="NAME", help=RESUME_HELP)


def add_run_id_arg(parser: argparse.ArgumentParser) -> None:
    """Add ``--run-id ID`` to an eval command (the MLflow run its metrics go to)."""
    parser.add_argument("--run-id", metavar="ID", help="log into this MLflow run instead of the checkpoint's")


def log_eval_metrics(args: argparse.Namespace, cfg: AlbefConfig, metrics: dict, weights, kind: str,
                     prefix: str | None = None) -> None:
    """With ``tracking.enabled``: log an eval command's metrics to MLflow (the checkpoint's training
    run when its run directory names one, else ``--run-id`` or a run of their own) and say where."""
    if not cfg.tracking.enabled:
        return
    from ..eval.checkpoint import checkpoint_step
    from ..eval.tracking import log_eval

    step = checkpoint_step(weights) if weights is not None and weights.name == "state.pt" else None
    uri, run_id = log_eval(cfg, metrics, weights, getattr(args, "run_id", None), step, prefix, kind=kind)
    print(f"MLflow run {run_id} in {uri}" + (f" ({prefix})" if prefix else ""))


def load(args: argparse.Namespace) -> AlbefConfig:
    """The command's validated config: defaults <- ``--config`` <- overrides <- ``--resume``.

    Args:
        args: Parsed arguments of a command that called :func:`add_config_args` (and maybe
            :func:`add_resume_arg`).

    Returns:
        The config; with ``--resume NAME``, its ``run.name`` is ``NAME``, so the launcher finds
        the run folder (and its MLflow run) under ``run.storage_path`` again.

    Raises:
        ConfigError: The file or an override is invalid, naming the dotted path.
    """
    cfg = load_config(args.config, args.overrides)
    resume = getattr(args, "resume", None)  # only training commands have --resume
    return with_overrides(cfg, {"run.name": resume}) if resume else cfg


def finetune_task(
    args: argparse.Namespace,
    task: str,
    describe: Callable[[AlbefConfig], str] | None = None,
    report: Callable[[AlbefConfig, dict[str, float]], str] | None = None,
) -> int:
    """The body of ``albef-ray finetune TASK``: config, ``--checkpoint``, run line, fine-tuning, best metrics.

    ``--checkpoint`` (resolved to a checkpoint file) becomes ``model.checkpoint``; one that
    cannot be resolved is a ``finetune error`` (exit 2) before Ray starts.

    Args:
        args: Parsed arguments of the ``finetune TASK`` parser (``--config``, overrides,
            ``--checkpoint``, ``--resume``).
        task: The registered task name handed to :func:`~albef_ray.launch.finetune.run_finetune`.
        describe: The task's own part of the run line (e.g. ``" | distill True"``), put before
            ``" | evaluated on ..."``; None adds nothing.
        report: The line(s) printed for the best checkpoint's metrics; None prints nothing.

    Returns:
        The exit code: 0, or 2 for an unresolvable ``--checkpoint``.
    """
    cfg = load(args)  # a bad config is named before Ray or torch is imported
    from ..eval.checkpoint import resolve_checkpoint
    from ..launch.finetune import run_finetune
    from ..model.registry import get_arch

    if args.checkpoint:
        try:
            checkpoint = str(resolve_checkpoint(args.checkpoint))
        except OSError as err:
            print(f"albef-ray: finetune error: {err}", file=sys.stderr)
            return 2
        cfg = with_overrides(cfg, {"model.checkpoint": checkpoint})
    res = get_arch(cfg.model.size, cfg.model.image_res).image_res
    print(
        f"albef-ray finetune {task}: {cfg.model.size} @ {res}px from {cfg.model.checkpoint or 'the initial weights'}"
        f" | {cfg.train.num_workers} worker(s) x batch {cfg.train.batch_size} | {cfg.train.epochs} epochs"
        f"{describe(cfg) if describe else ''}"
        f" | evaluated on {cfg.eval.split} {'every epoch' if cfg.eval.every_epoch else 'never (eval.every_epoch=false)'}"
    )
    _, best = run_finetune(cfg, task)
    if best is not None and report is not None:
        print(report(cfg, best[1]))
    return 0


def eval_inputs(cfg: AlbefConfig, checkpoint: str | None) -> AlbefConfig:
    """The part of ``cfg`` that an ``eval TASK`` reads: its shards only, no initial weights under a checkpoint.

    What :func:`~albef_ray.launch.common.check_local_paths` should check before any model or
    tokenizer loads.

    Args:
        cfg: The command's config.
        checkpoint: The ``--checkpoint`` argument, or None.

    Raises:
        ConfigError: Neither ``eval.shards`` nor ``data.shards`` names anything.
    """
    from ..eval.checkpoint import eval_paths

    eval_paths(cfg)  # eval.shards or data.shards must name something
    data = cfg.data.model_copy(update={"shards": [] if cfg.eval.shards else cfg.data.shards})
    unused = {"vit_init": None, "bert_init": None} if checkpoint or cfg.model.checkpoint else {}
    model = cfg.model.model_copy(update={**unused, **({"checkpoint": None} if checkpoint else {})})
    return cfg.model_copy(update={"data": data, "model": model})


def show_progress(args: argparse.Namespace) -> bool:
    """Whether to draw a progress bar: only on a terminal (in CI logs it buries the metric lines)."""
    return sys.stderr.isatty() and not args.no_progress


def parse_size(text: str) -> int:
    """Bytes in ``"128MiB"``, ``"64MB"``, ``"1e6"``, ``"4096"``.

    Args:
        text: A number with an optional decimal (kB, MB, GB) or binary (KiB, MiB, GiB) unit.

    Returns:
        The size in bytes, at least 1.

    Raises:
        ValueError: ``text`` is not a size, or not a positive one (the message names ``--shard-size``).
    """
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


@contextlib.contextmanager
def sigterm_interrupts() -> Iterator[None]:
    """SIGTERM (``kill``, a scheduler's stop) unwinds the block as Ctrl-C does.

    Inside the block SIGTERM raises :class:`KeyboardInterrupt`, so workers and pools shut down
    as on Ctrl-C and the command exits 130; the previous handler is restored afterwards. Off the
    main thread (where handlers cannot be set) the block runs unchanged.
    """
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
