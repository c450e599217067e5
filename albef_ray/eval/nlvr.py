"""NLVR2 evaluation: accuracy of the true/false prediction on ``eval.split`` (official ``NLVR.py``).

The online model is evaluated (official ``eval_ema: False``), each pair once with the
evaluation transform (resize, no crop). Three entry points, all plain PyTorch:

* :func:`evaluate` scores a task on batches of :func:`~albef_ray.eval.examples.iter_examples`;
* :class:`NLVREvaluator`: the epoch-end evaluator of ``finetune nlvr`` (score ``nlvr_acc``);
* :func:`nlvr_metrics` / :func:`ta_metrics`: what a sweep stage reports for a checkpoint of
  ``nlvr`` / ``nlvr_pretrain`` (text-assignment accuracy on held-out captions).
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Iterable
from pathlib import Path

import torch
from torch import nn

from ..config import AlbefConfig
from ..precision import autocast_context, resolve_device
from ..train.loop import to_device
from .checkpoint import eval_paths, resolve_checkpoint
from .examples import ExampleBatch, iter_examples

log = logging.getLogger(__name__)

SCORE = "nlvr_acc"  # percent of pairs whose statement is judged right (the paper's dev / test-P accuracy)


def load_task(cfg: AlbefConfig, checkpoint: str | Path | None = None, task: str = "nlvr") -> nn.Module:
    """The ``task`` model (``nlvr`` or ``nlvr_pretrain``) with a checkpoint's weights, in eval mode.

    No initial ViT / BERT weights are loaded first and no momentum model is built: the checkpoint
    holds every weight evaluation uses (its momentum weights are left unused).

    Raises:
        FileNotFoundError: no checkpoint at ``checkpoint`` (or ``model.checkpoint``).
        ValueError: no weight of the checkpoint fits the model.
    """
    from ..model.loading import load_albef_checkpoint
    from ..tasks import build_task

    checkpoint = checkpoint or cfg.model.checkpoint
    if checkpoint is None:
        raise FileNotFoundError(f"eval {task}: no checkpoint (pass --checkpoint or set model.checkpoint)")
    weights = resolve_checkpoint(checkpoint)
    bare = cfg.model.model_copy(update={"vit_init": None, "bert_init": None, "checkpoint": None})
    nlvr = cfg.nlvr.model_copy(update={"distill": False})
    model = build_task(cfg.model_copy(update={"task": task, "model": bare, "nlvr": nlvr}))
    report = load_albef_checkpoint(model, str(weights))
    if not report.loaded:
        raise ValueError(f"{weights}: no weight of the checkpoint fits model.size={cfg.model.size}")
    (log.warning if report.missing else log.info)("%s", report)
    return model.eval()


@torch.no_grad()
def evaluate(
    task: nn.Module,
    batches: Iterable[ExampleBatch],
    device: torch.device | str | None = None,
    precision: str = "fp32",
    predictions: list[dict] | None = None,
) -> dict[str, float]:
    """Accuracy of an NLVR2 task on evaluation batches.

    Args:
        task: an :class:`~albef_ray.objectives.nlvr.NLVRTask` (or a DDP wrapper of one).
        batches: :class:`ExampleBatch` es with ``image``, ``image2``, ``label``.
        device: default: the task's.
        precision: ``"bf16"`` autocasts the forward.
        predictions: if given, one ``{"id", "sentence", "label", "prediction", "p_true"}`` per pair
            is appended (``label`` / ``prediction`` 1 = true).

    Returns:
        ``nlvr_acc`` (percent), ``num_pairs``, ``eval_seconds`` and ``ms_per_pair`` (the forward
        passes only: decoding excluded).
    """
    task = getattr(task, "module", task)
    device = torch.device(device) if device is not None else next(task.parameters()).device
    was_training = task.training
    task.eval()
    correct = total = 0
    forward_s = 0.0
    start = time.perf_counter()
    try:
        for batch in batches:
            t = to_device(batch.tensors, device)
            tick = time.perf_counter()
            with autocast_context(precision, device):
                logits = task.logits(t["image"], t["input_ids"], t["attention_mask"], t["image2"]).float()  # (B, 2)
            pred = logits.argmax(dim=1)
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            forward_s += time.perf_counter() - tick
            correct += int((pred == t["label"]).sum())
            total += int(pred.numel())
            if predictions is not None:
                p_true = logits.softmax(dim=1)[:, 1].tolist()
                for k, (row, text) in enumerate(zip(batch.question_id, batch.text)):
                    predictions.append({"id": row, "sentence": text, "label": int(t["label"][k]),
                                        "prediction": int(pred[k]), "p_true": p_true[k]})
    finally:
        task.train(was_training)
    return {
        SCORE: 100.0 * correct / max(total, 1),
        "num_pairs": float(total),
        "eval_seconds": time.perf_counter() - start,
        "ms_per_pair": 1000.0 * forward_s / max(total, 1),
    }


def evaluate_split(
    task: nn.Module, cfg: AlbefConfig, device: torch.device | str | None = None, predictions: list[dict] | None = None
) -> dict[str, float]:
    """:func:`evaluate` on ``eval.split`` of ``eval.shards`` (else ``data.shards``), batches of ``eval.batch_size``."""
    from ..data.collate import load_tokenizer

    batches = iter_examples(eval_paths(cfg), cfg.eval.split, cfg, load_tokenizer(cfg.data.tokenizer))
    return evaluate(task, batches, device, cfg.train.precision, predictions)


class NLVREvaluator:
    """NLVR2 accuracy on ``eval.split`` at epoch ends (the official picks its best epoch by dev accuracy).

    Args:
        cfg: reads ``eval`` (split, shards, batch size), ``data`` (tokenizer, text limits).
        device: where the model is.
        tracker: an MLflow :class:`~albef_ray.tracking.MetricLogger`, or None.
    """

    score = SCORE

    def __init__(self, cfg: AlbefConfig, device: torch.device | str | None = None, tracker=None):
        self.cfg, self.device, self.tracker = cfg, device, tracker

    def __call__(self, task: nn.Module, step: int, run: bool = True) -> dict[str, float]:
        """``nlvr_acc`` and timing of the task's online model (``nlvr_acc`` = NaN when not ``run``)."""
        if not run:
            return {self.score: math.nan}
        metrics = evaluate_split(task, self.cfg, self.device)
        log.info("step %d: %s %.2f on %s (%d pairs)", step, self.score, metrics[self.score], self.cfg.eval.split,
                 metrics["num_pairs"])
        if self.tracker is not None:
            self.tracker.log(metrics, step)
        return metrics


def nlvr_metrics(cfg: AlbefConfig, checkpoint: str) -> dict[str, float]:
    """NLVR2 accuracy of a fine-tuned checkpoint on ``eval.split`` (a sweep stage's report)."""
    return evaluate_split(load_task(cfg, checkpoint).to(resolve_device(cfg)), cfg)


@torch.no_grad()
def ta_metrics(cfg: AlbefConfig, checkpoint: str, max_rows: int | None = 2048) -> dict[str, float]:
    """Text-assignment accuracy of an ``nlvr_pretrain`` checkpoint on held-out captions.

    Caption rows of ``eval.split`` (the first ``max_rows``) in batches of ``eval.batch_size``,
    each batch's images drawn as in training with a generator seeded by ``cfg.seed``; captions
    of one image (equal image bytes) are not each other's "other" image.
    """
    from ..data.collate import load_tokenizer

    device = resolve_device(cfg)
    task = load_task(cfg, checkpoint, task="nlvr_pretrain").to(device)
    generator = torch.Generator(device=device).manual_seed(cfg.seed)
    correct = total = 0
    batches = iter_examples(eval_paths(cfg), cfg.eval.split, cfg, load_tokenizer(cfg.data.tokenizer), max_rows=max_rows)
    for batch in batches:
        t = to_device(batch.tensors, device)
        if t["input_ids"].shape[0] < 2:
            continue
        stored = getattr(batch, "columns", {}).get("image")  # rows of one image are not "other" images
        image_idx = None if stored is None else torch.tensor([hash(bytes(b)) for b in stored], device=device)
        with autocast_context(cfg.train.precision, device):
            out = task(t["image"], t["input_ids"], t["attention_mask"], generator=generator, image_idx=image_idx)
        n = t["input_ids"].shape[0]
        correct += float(out["ta_batch_acc"]) * n
        total += n
    return {"ta_acc": 100.0 * correct / max(total, 1), "num_captions": float(total)}
