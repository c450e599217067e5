"""Image-text retrieval: ``albef-ray finetune retrieval`` and ``albef-ray eval retrieval``.

A downstream task's CLI is one module like this: :func:`register` adds the task to the
``finetune`` and ``eval`` groups that :mod:`albef_ray.cli` creates.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from .common import add_config_args, add_resume_arg, eval_inputs, finetune_task, load


def register(finetune: argparse._SubParsersAction, evaluate: argparse._SubParsersAction) -> None:
    """Add ``finetune retrieval`` and ``eval retrieval``.

    Args:
        finetune: The tasks of ``albef-ray finetune``.
        evaluate: The tasks of ``albef-ray eval``.
    """
    tune = finetune.add_parser(
        "retrieval", help="image-text retrieval fine-tuning, evaluated every epoch, best checkpoint by r_mean",
        description="Fine-tune for image-text retrieval (config task: retrieval; see experiments/finetune_coco.yaml "
        "and finetune_flickr.yaml): ITC whose positives are every caption of the same image (batch and queue), "
        "ITM with hard negatives never taken from the same image, momentum distillation, on the TorchTrainer and "
        "Ray Data pipeline of `pretrain`. After every epoch rank 0 evaluates retrieval on eval.split; Ray keeps "
        "the best train.keep_checkpoints checkpoints by r_mean (and the latest, for resuming) and the best is "
        "tagged on the MLflow run. A 256-px checkpoint loads into a 384-px model by interpolating the ViT "
        "position embeddings.",
    )
    add_config_args(tune, required=True)
    tune.add_argument(
        "--checkpoint", metavar="PATH",
        help="weights to start from (sets model.checkpoint): an albef-ray checkpoint directory, a run "
        "directory (its latest checkpoint) or a .pth file (released ALBEF or albef-ray)",
    )
    add_resume_arg(tune)
    tune.set_defaults(func=_finetune)

    zero_shot = evaluate.add_parser(
        "retrieval", help="Recall@1/5/10 of text and image retrieval on eval.split",
        description="Embed every image and caption of eval.split (eval.shards, else data.shards), rank "
        "by ITC similarity, re-rank each query's top eval.k_test with the ITM head (eval.score: itm | "
        "itm_itc), and report Recall@1/5/10 of text retrieval (an image's best-ranked caption) and image "
        "retrieval. Prints a table, writes --out, and logs to MLflow (tracking.enabled): into the "
        "training run of the checkpoint when its run directory names one, else into --run-id or a new run.",
    )
    add_config_args(zero_shot, required=True)
    zero_shot.add_argument(
        "--checkpoint", metavar="PATH",
        help="checkpoint directory (state.pt), run directory (its latest checkpoint_*), or .pth file "
        "(default: model.checkpoint; none: the initial weights)",
    )
    zero_shot.add_argument("--out", metavar="FILE", help="write the metrics as JSON to FILE")
    zero_shot.add_argument("--run-id", metavar="ID", help="log into this MLflow run instead of the checkpoint's")
    zero_shot.set_defaults(func=_evaluate)


def recall_table(metrics: dict[str, float]) -> str:
    """Text and image retrieval Recall@1/5/10 and their means as a fixed-width table.

    Args:
        metrics: ``txt_r1`` ... ``img_r_mean`` and ``r_mean``, in percent.

    Returns:
        Four lines, without a trailing newline.
    """
    lines = [f"{'':>16}{'R@1':>8}{'R@5':>8}{'R@10':>8}{'mean':>8}"]
    for name, prefix in (("text retrieval", "txt"), ("image retrieval", "img")):
        values = [metrics[f"{prefix}_r{k}"] for k in (1, 5, 10)] + [metrics[f"{prefix}_r_mean"]]
        lines.append(f"{name:>16}" + "".join(f"{v:8.2f}" for v in values))
    lines.append(f"{'r_mean':>16}{metrics['r_mean']:8.2f}")
    return "\n".join(lines)


def _finetune(args: argparse.Namespace) -> int:
    return finetune_task(args, "retrieval", report=lambda cfg, best: recall_table(best))


def _evaluate(args: argparse.Namespace) -> int:
    cfg = load(args)  # a bad config is named before torch is imported
    from ..eval.checkpoint import checkpoint_step, evaluate_checkpoint, resolve_checkpoint
    from ..launch.common import check_local_paths
    from ..model.loading import CheckpointError

    check_local_paths(eval_inputs(cfg, args.checkpoint))  # before any model or tokenizer (a hub retry) loads
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
    print(recall_table(metrics))
    step = checkpoint_step(weights) if weights and weights.name == "state.pt" else None
    if args.out:
        record = {"split": cfg.eval.split, "checkpoint": str(weights) if weights else None, "step": step,
                  "k_test": cfg.eval.k_test, "score": cfg.eval.score, **metrics}
        Path(args.out).write_text(json.dumps(record, indent=2) + "\n")
        print(f"metrics: {args.out}")
    if cfg.tracking.enabled:
        from ..eval.tracking import log_retrieval

        uri, run_id = log_retrieval(cfg, metrics, weights, args.run_id, step)
        print(f"MLflow run {run_id} in {uri}")
    return 0
