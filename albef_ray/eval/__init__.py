"""Evaluation in plain PyTorch (no Ray): zero-shot image-text retrieval with ITM re-ranking.

    split = load_split(["data/synth"], "test", cfg)            # images, captions, ground truth
    metrics = evaluate(model, split, tokenizer, cfg)          # txt_r1 ... img_r10, r_mean
    metrics = evaluate_checkpoint(cfg, "runs/name/checkpoint_000003")
"""

from .checkpoint import evaluate_checkpoint, load_eval_model, resolve_checkpoint
from .metrics import recall_metrics
from .retrieval import evaluate, fill_outside_topk, itm_scores, retrieval_scores
from .split import RetrievalSplit, load_split

__all__ = [
    "RetrievalSplit",
    "evaluate",
    "evaluate_checkpoint",
    "fill_outside_topk",
    "itm_scores",
    "load_eval_model",
    "load_split",
    "recall_metrics",
    "resolve_checkpoint",
    "retrieval_scores",
]
