"""SNLI-VE (visual entailment): ``albef-ray finetune ve`` and ``albef-ray eval ve``."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from .common import add_config_args, add_resume_arg, add_run_id_arg, eval_inputs, finetune_task, load, log_eval_metrics


def register(finetune: argparse._SubParsersAction, evaluate: argparse._SubParsersAction) -> None:
    """Add ``finetune ve`` and ``eval ve``.

    Args:
        finetune: The tasks of ``albef-ray finetune``.
        evaluate: The tasks of ``albef-ray eval``.
    """
    tune = finetune.add_parser(
        "ve", help="SNLI-VE fine-tuning (3-way classifier), evaluated every epoch, best checkpoint by ve_acc",
        description="Fine-tune for visual entailment (config task: ve; see experiments/finetune_ve.yaml): the "
        "fusion encoder's [CLS] goes through a Linear-ReLU-Linear head to entailment / neutral / contradiction "
        "(label ids 2 / 1 / 0, as the official ve_dataset.py), cross-entropy with momentum distillation of the "
        "logits (ve.distill, mod.alpha), on the TorchTrainer and Ray Data pipeline of `pretrain`. The dataset "
        "is built with `albef-ray data build --source ...,format=ve_json,...` (or `data synth-task ve`). After "
        "every epoch rank 0 evaluates accuracy on eval.split; Ray keeps the best train.keep_checkpoints "
        "checkpoints by ve_acc (and the latest, for resuming) and the best is tagged on the MLflow run.",
    )
    add_config_args(tune, required=True)
    tune.add_argument(
        "--checkpoint", metavar="PATH",
        help="weights to start from (sets model.checkpoint): an albef-ray checkpoint directory, a run "
        "directory (its latest checkpoint) or a .pth file (released ALBEF or albef-ray)",
    )
    add_resume_arg(tune)
    tune.set_defaults(func=_finetune)

    accuracy = evaluate.add_parser(
        "ve", help="SNLI-VE accuracy on eval.split",
        description="Classify every (image, hypothesis) pair of eval.split (eval.shards, else data.shards) "
        "with the checkpoint's classifier and report the accuracy (percent) overall and per true label. "
        "Prints the metrics, writes --out, and logs to MLflow (tracking.enabled).",
    )
    add_config_args(accuracy, required=True)
    accuracy.add_argument(
        "--checkpoint", metavar="PATH",
        help="checkpoint directory (state.pt), run directory (its latest checkpoint_*), or .pth file such as "
        "the released ve.pth (default: model.checkpoint)",
    )
    accuracy.add_argument("--out", metavar="FILE", help="write the metrics as JSON to FILE")
    add_run_id_arg(accuracy)
    accuracy.set_defaults(func=_evaluate)


def accuracy_line(metrics: dict[str, float]) -> str:
    """``ve_acc 80.12 | entailment 85.0 | neutral 70.3 | contradiction 85.1 (17,858 examples)``."""
    from ..data.build.ve import VE_LABELS

    parts = [f"ve_acc {metrics['ve_acc']:.2f}"]
    parts += [f"{name} {metrics[f've_acc_{name}']:.2f}" for name in reversed(VE_LABELS) if f"ve_acc_{name}" in metrics]
    return " | ".join(parts) + f" ({int(metrics['num_examples']):,} examples)"


def _finetune(args: argparse.Namespace) -> int:
    return finetune_task(
        args, "ve", describe=lambda cfg: f" | distill {cfg.ve.distill}", report=lambda cfg, best: accuracy_line(best),
    )


def _evaluate(args: argparse.Namespace) -> int:
    cfg = load(args)  # a bad config is named before torch is imported
    from ..eval.checkpoint import checkpoint_step, resolve_checkpoint
    from ..eval.ve import ve_metrics
    from ..launch.common import check_local_paths
    from ..model.loading import CheckpointError

    check_local_paths(eval_inputs(cfg, args.checkpoint))  # before any model or tokenizer loads
    checkpoint = args.checkpoint or cfg.model.checkpoint
    try:
        weights = resolve_checkpoint(checkpoint) if checkpoint else None
        print(f"albef-ray eval ve: {cfg.model.size} from {weights or 'its initial weights'}")
        metrics = ve_metrics(cfg, weights)
    except (OSError, CheckpointError) as err:  # a missing checkpoint, shard or tokenizer; an unreadable checkpoint
        print(f"albef-ray: eval error: {err}", file=sys.stderr)
        return 2
    print(f"split {cfg.eval.split}: {accuracy_line(metrics)}, {int(metrics['skipped_examples'])} undecodable "
          f"skipped | {metrics['eval_seconds']:.1f} s")
    if args.out:
        step = checkpoint_step(weights) if weights and weights.name == "state.pt" else None
        record = {"split": cfg.eval.split, "checkpoint": str(weights) if weights else None, "step": step, **metrics}
        Path(args.out).write_text(json.dumps(record, indent=2) + "\n")
        print(f"metrics: {args.out}")
    log_eval_metrics(args, cfg, metrics, weights, "ve")
    return 0
