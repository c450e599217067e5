"""NLVR2: ``albef-ray finetune nlvr_pretrain`` (text assignment), ``finetune nlvr`` and ``eval nlvr``.

The paper's recipe is two commands: text assignment on the pretraining captions (one epoch,
experiments/pretrain_nlvr.yaml) from a pretrained ALBEF, then NLVR2 fine-tuning
(experiments/finetune_nlvr.yaml) from that run's checkpoint.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from .common import add_config_args, add_resume_arg, add_run_id_arg, eval_inputs, finetune_task, load, log_eval_metrics

CHECKPOINT_HELP = (
    "weights to start from (sets model.checkpoint): an albef-ray checkpoint directory, a run directory "
    "(its latest checkpoint) or a .pth file (released ALBEF, NLVR2 or text-assignment checkpoint, or albef-ray)"
)


def register(finetune: argparse._SubParsersAction, evaluate: argparse._SubParsersAction) -> None:
    """Add ``finetune nlvr_pretrain``, ``finetune nlvr`` and ``eval nlvr``.

    Args:
        finetune: The tasks of ``albef-ray finetune``.
        evaluate: The tasks of ``albef-ray eval``.
    """
    ta = finetune.add_parser(
        "nlvr_pretrain", help="NLVR2's text-assignment pre-step on caption data (before `finetune nlvr`)",
        description="Text assignment (config task: nlvr_pretrain; see experiments/pretrain_nlvr.yaml): the "
        "two-image model (every fusion layer doubled, layer i -> 2i for image 1 and 2i+1 for image 2, "
        "cross-attention key/value shared) learns on caption shards whether a caption describes image 1, "
        "image 2 or neither; each caption's image is paired with another image of the batch drawn by "
        "image-image similarity. One epoch from a pretrained ALBEF (--checkpoint); its checkpoint starts "
        "`finetune nlvr`.",
    )
    add_config_args(ta, required=True)
    ta.add_argument("--checkpoint", metavar="PATH", help=CHECKPOINT_HELP)
    add_resume_arg(ta)
    ta.set_defaults(func=_finetune, task="nlvr_pretrain")

    tune = finetune.add_parser(
        "nlvr", help="NLVR2 fine-tuning (true/false about two images), evaluated every epoch, best by nlvr_acc",
        description="Fine-tune for NLVR2 (config task: nlvr; see experiments/finetune_nlvr.yaml): the statement "
        "and both images go through the two-image fusion encoder, whose [CLS] feeds a Linear-ReLU-Linear head "
        "(true / false), cross-entropy with momentum distillation of the logits (nlvr.distill, mod.alpha), on "
        "the TorchTrainer and Ray Data pipeline of `pretrain`. Start from a text-assignment checkpoint "
        "(`finetune nlvr_pretrain`) or, skipping that step, a pretrained ALBEF (its fusion layers are doubled "
        "on load). Build the data with `albef-ray data build --source ...,format=nlvr_json,...` (or `data "
        "synth-task nlvr`). After every epoch rank 0 evaluates accuracy on eval.split; Ray keeps the best "
        "train.keep_checkpoints checkpoints by nlvr_acc and the best is tagged on the MLflow run.",
    )
    add_config_args(tune, required=True)
    tune.add_argument("--checkpoint", metavar="PATH", help=CHECKPOINT_HELP)
    add_resume_arg(tune)
    tune.set_defaults(func=_finetune, task="nlvr")

    accuracy = evaluate.add_parser(
        "nlvr", help="NLVR2 accuracy on eval.split",
        description="Judge every (statement, left image, right image) of eval.split (eval.shards, else "
        "data.shards) with the checkpoint's classifier; report the accuracy (percent) and the forward time "
        "per pair. Prints the metrics, writes --out and, with --predictions, one JSON line per statement; logs to "
        "MLflow (tracking.enabled).",
    )
    add_config_args(accuracy, required=True)
    accuracy.add_argument(
        "--checkpoint", metavar="PATH",
        help="checkpoint directory (state.pt), run directory (its latest checkpoint_*), or .pth file such as the "
        "released nlvr.pth (default: model.checkpoint)",
    )
    accuracy.add_argument("--out", metavar="FILE", help="write the metrics as JSON to FILE")
    accuracy.add_argument("--predictions", metavar="FILE", help="write each statement's prediction as JSON lines")
    add_run_id_arg(accuracy)
    accuracy.set_defaults(func=_evaluate)


def accuracy_line(metrics: dict[str, float]) -> str:
    """``nlvr_acc 82.55 (6,967 pairs, 12.3 ms per pair)``."""
    return (f"nlvr_acc {metrics['nlvr_acc']:.2f} ({int(metrics['num_pairs']):,} pairs, "
            f"{metrics['ms_per_pair']:.1f} ms per pair)")


def _finetune(args: argparse.Namespace) -> int:
    def describe(cfg) -> str:
        return f" | distill {cfg.nlvr.distill}" if args.task == "nlvr" else " | text assignment"

    return finetune_task(args, args.task, describe=describe, report=lambda cfg, best: accuracy_line(best))


def _evaluate(args: argparse.Namespace) -> int:
    cfg = load(args)  # a bad config is named before torch is imported
    from ..eval.checkpoint import checkpoint_step, resolve_checkpoint
    from ..eval.nlvr import evaluate_split, load_task
    from ..launch.common import check_local_paths
    from ..model.loading import CheckpointError
    from ..precision import resolve_device

    if not (args.checkpoint or cfg.model.checkpoint):
        print("albef-ray: eval error: eval nlvr needs a fine-tuned checkpoint (--checkpoint or model.checkpoint)",
              file=sys.stderr)
        return 2
    check_local_paths(eval_inputs(cfg, args.checkpoint))  # before any model or tokenizer loads
    predictions: list[dict] | None = [] if args.predictions else None
    try:
        weights = resolve_checkpoint(args.checkpoint or cfg.model.checkpoint)
        print(f"albef-ray eval nlvr: {cfg.model.size} from {weights}")
        task = load_task(cfg, weights).to(resolve_device(cfg))
        metrics = evaluate_split(task, cfg, predictions=predictions)
    except (OSError, CheckpointError) as err:  # a missing checkpoint, shard or tokenizer; an unreadable checkpoint
        print(f"albef-ray: eval error: {err}", file=sys.stderr)
        return 2
    print(f"split {cfg.eval.split}: {accuracy_line(metrics)} | {metrics['eval_seconds']:.1f} s")
    if args.out:
        step = checkpoint_step(weights) if weights.name == "state.pt" else None
        record = {"split": cfg.eval.split, "checkpoint": str(weights), "step": step, **metrics}
        Path(args.out).write_text(json.dumps(record, indent=2) + "\n")
        print(f"metrics: {args.out}")
    if predictions is not None:
        Path(args.predictions).write_text("".join(json.dumps(p) + "\n" for p in predictions))
        print(f"predictions: {args.predictions}")
    log_eval_metrics(args, cfg, metrics, weights, "nlvr")
    return 0
