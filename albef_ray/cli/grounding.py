"""Weakly-supervised visual grounding: ``albef-ray finetune grounding`` and ``albef-ray eval grounding``."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from .common import add_config_args, add_resume_arg, add_run_id_arg, eval_inputs, finetune_task, load, log_eval_metrics

CHECKPOINT_HELP = (
    "an albef-ray checkpoint directory (state.pt), a run directory (its latest checkpoint_*) or a .pth file "
    "(released ALBEF, e.g. refcoco.pth, or albef-ray)"
)


def register(finetune: argparse._SubParsersAction, evaluate: argparse._SubParsersAction) -> None:
    """Add ``finetune grounding`` and ``eval grounding``.

    Args:
        finetune: The tasks of ``albef-ray finetune``.
        evaluate: The tasks of ``albef-ray eval``.
    """
    tune = finetune.add_parser(
        "grounding", help="grounding fine-tuning on image-expression pairs, best checkpoint by grounding_acc",
        description="Fine-tune for weakly-supervised visual grounding (config task: grounding; see "
        "experiments/finetune_grounding.yaml), as the official Grounding.py: the retrieval objective (ITC whose "
        "positives are every expression of the same image, ITM with hard negatives, momentum distillation) on "
        "(image, referring expression) pairs; no box is seen in training. After every epoch rank 0 ranks each "
        "eval.split expression's proposal boxes by its Grad-CAM heat map and logs the accuracies and "
        "grounding.heatmaps figures (MLflow artifacts heatmaps/step_N/); Ray keeps the best checkpoints by "
        "grounding_acc (ALBEF_itm accuracy by default).",
    )
    add_config_args(tune, required=True)
    tune.add_argument("--checkpoint", metavar="PATH", help=f"weights to start from (sets model.checkpoint): {CHECKPOINT_HELP}")
    add_resume_arg(tune)
    tune.set_defaults(func=_finetune)

    accuracy = evaluate.add_parser(
        "grounding", help="grounding accuracy of ALBEF_itm, ALBEF_itc and two baselines per split",
        description="For every expression of each split of grounding.splits (eval.shards, else data.shards), "
        "compute its Grad-CAM heat map (grounding.variants: itm, itc), score each proposal box by the map's sum "
        "inside it over area**grounding.box_alpha, and count the best box correct at IoU >= "
        "grounding.iou_threshold with the referred box. Prints accuracy (percent) per split beside a random "
        "proposal (expected accuracy) and the largest proposal; writes --out and, with --heatmaps, figures; "
        "logs each split's accuracies to MLflow (tracking.enabled).",
    )
    add_config_args(accuracy, required=True)
    accuracy.add_argument("--checkpoint", metavar="PATH", help=f"{CHECKPOINT_HELP} (default: model.checkpoint)")
    accuracy.add_argument("--out", metavar="FILE", help="write the metrics of every split as JSON to FILE")
    accuracy.add_argument(
        "--heatmaps", metavar="DIR",
        help="write the figures of each split's first grounding.heatmaps expressions to DIR/<split>/ (PNG)",
    )
    add_run_id_arg(accuracy)
    accuracy.set_defaults(func=_evaluate)


def accuracy_table(results: dict[str, dict[str, float]], variants) -> str:
    """One row per split: expressions, each variant's and each baseline's accuracy, the ceiling.

    Args:
        results: split -> metrics of :func:`~albef_ray.eval.grounding.evaluate_split`.
        variants: the evaluated Grad-CAM variants.

    Returns:
        The table's lines joined, without a trailing newline.
    """
    names = [(f"acc_{v}", f"ALBEF_{v}") for v in variants] + [("acc_random", "random"), ("acc_largest", "largest"),
                                                             ("acc_upper", "any box")]
    lines = [f"{'split':<8}{'refs':>8}" + "".join(f"{title:>11}" for _, title in names)]
    for split, m in results.items():
        lines.append(f"{split:<8}{int(m['num_refs']):>8}" + "".join(f"{m[key]:>11.2f}" for key, _ in names))
    return "\n".join(lines)


def _finetune(args: argparse.Namespace) -> int:
    return finetune_task(
        args, "grounding", report=lambda cfg, best: accuracy_table({cfg.eval.split: best}, cfg.grounding.variants),
    )


def _evaluate(args: argparse.Namespace) -> int:
    cfg = load(args)  # a bad config is named before torch is imported
    from ..data.collate import load_tokenizer
    from ..eval.checkpoint import eval_paths, load_eval_model, resolve_checkpoint
    from ..eval.grounding import evaluate_split
    from ..eval.grounding_figure import save_grounding_figure
    from ..launch.common import check_local_paths
    from ..model.loading import CheckpointError
    from ..precision import resolve_device

    # The config `eval` reads (its shards; no initial weights under a checkpoint), before any model loads.
    check_local_paths(eval_inputs(cfg, args.checkpoint))
    checkpoint = args.checkpoint or cfg.model.checkpoint
    device = resolve_device(cfg)
    try:
        weights = resolve_checkpoint(checkpoint) if checkpoint else None
        print(f"albef-ray eval grounding: {cfg.model.size} from {weights or 'its initial weights'} on {device}")
        model = load_eval_model(cfg, weights).to(device)
        tokenizer = load_tokenizer(cfg.data.tokenizer)
        results = {}
        for split in cfg.grounding.splits:
            keep = cfg.grounding.heatmaps if args.heatmaps else 0
            results[split], kept = evaluate_split(model, eval_paths(cfg), split, cfg, tokenizer, device, keep=keep)
            for n, example in enumerate(kept):
                save_grounding_figure(Path(args.heatmaps) / split / f"{n:02d}_ref{example.ref_id}.png", example)
    except (OSError, CheckpointError) as err:  # a missing checkpoint, shard or tokenizer; an unreadable checkpoint
        print(f"albef-ray: eval error: {err}", file=sys.stderr)
        return 2
    print(accuracy_table(results, cfg.grounding.variants))
    if args.heatmaps:
        print(f"heat maps: {args.heatmaps}/<split>/")
    if args.out:
        record = {"checkpoint": str(weights) if weights else None, "box_alpha": cfg.grounding.box_alpha,
                  "iou_threshold": cfg.grounding.iou_threshold, "splits": results}
        Path(args.out).write_text(json.dumps(record, indent=2) + "\n")
        print(f"metrics: {args.out}")
    for split, metrics in results.items():
        log_eval_metrics(args, cfg, metrics, weights, "grounding", prefix=split)
    return 0
