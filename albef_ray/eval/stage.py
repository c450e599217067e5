"""What a trained checkpoint reports as a sweep stage, by the task it was trained for.

Registered per task in :mod:`albef_ray.tasks` (``TaskSpec.evaluation``); plain PyTorch, run by
the sweep launcher in a Ray task. Both evaluate on ``eval.split`` of ``eval.shards`` (else
``data.shards``).
"""

from __future__ import annotations

from ..config import AlbefConfig


def retrieval_metrics(cfg: AlbefConfig, checkpoint: str) -> dict[str, float]:
    """Image-text retrieval recalls (ITC top ``eval.k_test`` re-ranked by ITM) of ``checkpoint``."""
    return _evaluate(cfg, checkpoint, with_itm_accuracy=False)


def pretrained_metrics(cfg: AlbefConfig, checkpoint: str) -> dict[str, float]:
    """A pretrained checkpoint's zero-shot retrieval recalls plus its held-out ITM accuracy
    (:func:`~albef_ray.eval.itm.itm_accuracy`: each caption with its image and two mismatches)."""
    return _evaluate(cfg, checkpoint, with_itm_accuracy=True)


def _evaluate(cfg: AlbefConfig, checkpoint: str, with_itm_accuracy: bool) -> dict[str, float]:
    from ..data.collate import load_tokenizer
    from .checkpoint import eval_paths, load_eval_model
    from .itm import itm_accuracy
    from .retrieval import evaluate
    from .split import load_split

    split = load_split(eval_paths(cfg), cfg.eval.split, cfg)
    model = load_eval_model(cfg, checkpoint)
    tokenizer = load_tokenizer(cfg.data.tokenizer)
    metrics = evaluate(model, split, tokenizer, cfg)
    if with_itm_accuracy:
        metrics.update(itm_accuracy(model, split, tokenizer, cfg, seed=cfg.seed))
    return metrics
