"""``albef-ray pretrain``: ITC + ITM + MLM pretraining on Ray Train, or ``--local`` in one process."""

from __future__ import annotations

import argparse
import time

from ..config import AlbefConfig, ConfigError
from .common import add_config_args, add_resume_arg, load, show_progress


def register(commands: argparse._SubParsersAction) -> None:
    """Add ``pretrain``.

    Args:
        commands: The top-level subcommands of ``albef-ray``.
    """
    pretrain = commands.add_parser(
        "pretrain", help="pretrain ALBEF with Ray Train (or --local: one process)",
        description="Pretrain ALBEF with ITC, ITM and MLM (+ momentum distillation) as configured: "
        "a Ray Train TorchTrainer with train.num_workers workers, data streamed by Ray Data from "
        "data.shards (generated tensors when none), every step logged to MLflow. Connects to "
        "run.address / $RAY_ADDRESS (e.g. under `ray job submit`), else starts Ray locally. "
        "The whole config is validated before Ray starts.",
    )
    add_config_args(pretrain, required=True)
    pretrain.add_argument(
        "--local", action="store_true", help="single-process loop on generated tensors, no Ray (refuses data.shards)"
    )
    add_resume_arg(pretrain)
    pretrain.add_argument(
        "--no-progress", action="store_true", help="no progress bar (there is none anyway when stderr is not a terminal)"
    )
    pretrain.set_defaults(func=_pretrain)


def _pretrain(args: argparse.Namespace) -> int:
    cfg = load(args)
    if args.local:
        return _pretrain_local(cfg, args)
    from ..launch.train import run_pretrain

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
    """The ``--local`` loop: generated image-caption tensors, one process, no Ray."""
    from ..launch.common import check_local_paths
    from ..model.registry import get_arch
    from ..precision import resolve_device
    from ..synth.tensors import synthetic_batches
    from ..train.loop import run_local

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
    history = run_local(cfg, batches, progress=show_progress(args))
    elapsed = time.perf_counter() - start
    n = min(10, len(history))
    first = sum(h["loss"] for h in history[:n]) / n
    last = sum(h["loss"] for h in history[-n:]) / n
    skipped = int(sum(h["skipped"] for h in history))
    print(f"first loss {history[0]['loss']:.4f} (step 1) | last loss {history[-1]['loss']:.4f} (step {len(history)})")
    print(f"mean of the first {n} steps {first:.4f} -> mean of the last {n} steps {last:.4f}")
    print(f"{len(history)} steps in {elapsed:.1f} s; {skipped} skipped for a non-finite loss or gradient")
    return 0
