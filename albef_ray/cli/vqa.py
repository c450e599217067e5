"""VQA: ``albef-ray finetune vqa`` and ``albef-ray eval vqa`` (answers, result file, VQA accuracy)."""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

from .common import add_config_args, add_resume_arg, add_run_id_arg, finetune_task, load, log_eval_metrics

CHECKPOINT_HELP = (
    "an albef-ray checkpoint directory, a run directory (its latest checkpoint) or a .pth file "
    "(released ALBEF.pth / vqa.pth, or albef-ray)"
)


def register(finetune: argparse._SubParsersAction, evaluate: argparse._SubParsersAction) -> None:
    """Add ``finetune vqa`` and ``eval vqa``.

    Args:
        finetune: The tasks of ``albef-ray finetune``.
        evaluate: The tasks of ``albef-ray eval``.
    """
    tune = finetune.add_parser(
        "vqa", help="VQA fine-tuning: an answer decoder on the fused question, best checkpoint by vqa_acc",
        description="Fine-tune for VQA (config task: vqa; see experiments/finetune_vqa.yaml): image and "
        "question through the encoders, a 6-layer causal answer decoder (initialised from the fusion encoder) "
        "trained on each question's annotator answers weighted by agreement, with momentum distillation "
        "(vqa.distill). After every epoch rank 0 answers eval.split by ranking the answer list (vqa.k_test) "
        "and, where the split is labelled, Ray keeps the best checkpoints by VQA accuracy.",
    )
    add_config_args(tune, required=True)
    tune.add_argument("--checkpoint", metavar="PATH", help="weights to start from (sets model.checkpoint): " + CHECKPOINT_HELP)
    add_resume_arg(tune)
    tune.set_defaults(func=_finetune)

    ev = evaluate.add_parser(
        "vqa", help="answer eval.split from the answer list; result file and VQA accuracy",
        description="Answer every question of eval.split (eval.shards, else data.shards): the decoder's "
        "vqa.k_test most likely answers of the list (vqa.answer_list, else answer_list.json of the dataset) "
        "by first token are scored in full and the best is the answer. Writes the official result file "
        "[{question_id, answer}] (for the VQA test server) and, on a labelled split, prints VQA accuracy "
        "(vqa.accuracy: leave_one_out = official 10-choose-9 averaging, or min3).",
    )
    add_config_args(ev, required=True)
    ev.add_argument("--checkpoint", metavar="PATH", help="default: model.checkpoint; " + CHECKPOINT_HELP)
    ev.add_argument("--results", metavar="FILE", help="result file (default: vqa_result_<split>.json)")
    ev.add_argument("--out", metavar="FILE", help="also write the metrics as JSON to FILE")
    add_run_id_arg(ev)
    ev.set_defaults(func=_evaluate)


def _finetune(args: argparse.Namespace) -> int:
    return finetune_task(
        args, "vqa", describe=lambda cfg: f" | distill {cfg.vqa.distill}",
        report=lambda cfg, best: f"best vqa_acc {best['vqa_acc']:.2f}",
    )


def _evaluate(args: argparse.Namespace) -> int:
    cfg = load(args)
    from ..eval.checkpoint import resolve_checkpoint
    from ..eval.vqa import evaluate_checkpoint, write_results
    from ..model.loading import CheckpointError

    checkpoint = args.checkpoint or cfg.model.checkpoint
    try:
        weights = resolve_checkpoint(checkpoint) if checkpoint else None
        print(f"albef-ray eval vqa: {cfg.model.size} from {weights or 'its initial weights'}")
        metrics, results = evaluate_checkpoint(cfg, weights)
    except (OSError, CheckpointError) as err:
        print(f"albef-ray: eval error: {err}", file=sys.stderr)
        return 2
    acc = metrics["vqa_acc"]
    print(
        f"split {cfg.eval.split}: {int(metrics['num_questions'])} questions ({int(metrics['num_labelled'])} labelled)"
        f" | {int(metrics['num_answers'])} candidate answers, k_test {cfg.vqa.k_test} | {metrics['eval_seconds']:.1f} s"
    )
    print(f"VQA accuracy ({cfg.vqa.accuracy}): " + ("n/a (no labelled questions)" if math.isnan(acc) else f"{acc:.2f}"))
    path = write_results(results, args.results or f"vqa_result_{cfg.eval.split}.json")
    print(f"results: {path}")
    if args.out:
        record = {"split": cfg.eval.split, "checkpoint": str(weights) if weights else None, **metrics}
        Path(args.out).write_text(json.dumps(record, indent=2) + "\n")
        print(f"metrics: {args.out}")
    log_eval_metrics(args, cfg, metrics, weights, "vqa")
    return 0
