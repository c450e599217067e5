"""SNLI-VE evaluation: classification accuracy of (image, hypothesis) pairs on a split (no Ray).

The official ``VE.py evaluate()``: every pair of the split is classified by the online model
(``argmax`` of the classifier head) and the accuracy reported; ``checkpoint_best.pth`` is the
checkpoint of the best validation accuracy. Here:

* :func:`ve_accuracy`: accuracy of a task over batches (``ve_acc``, percent, as the paper
  reports it) and per true class (``ve_acc_<label>``: each class's recall);
* :class:`VEEvaluator`: the epoch-end evaluator of fine-tuning (``eval.split``; Ray keeps the
  best checkpoints by ``ve_acc``);
* :func:`ve_metrics`: a checkpoint's accuracy on ``eval.split``, what a sweep stage and
  ``albef-ray eval ve`` report.

Rows are read in order by :func:`~albef_ray.eval.examples.iter_examples` (resize, no crop);
``eval.max_images`` limits the examples read (an example is one image-hypothesis row).
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path

import torch
from torch import nn

from ..config import AlbefConfig, ConfigError
from ..data.build.ve import VE_LABELS
from ..precision import autocast_context

log = logging.getLogger(__name__)


def _unwrap(task: nn.Module) -> nn.Module:
    while hasattr(task, "module"):  # DDP
        task = task.module
    if not callable(getattr(task, "logits", None)):
        raise TypeError(f"expected a VE task (with .logits), got {type(task).__name__}")
    return task


@torch.no_grad()
def ve_accuracy(
    task: nn.Module,
    batches: Iterable[Mapping[str, torch.Tensor]],
    device: torch.device | str | None = None,
    precision: str = "fp32",
) -> dict[str, float]:
    """Accuracy of ``task``'s online classifier over ``batches``.

    Args:
        task: a :class:`~albef_ray.objectives.ve.VETask` (or a DDP wrapper of one).
        batches: dicts with ``image`` (B, 3, R, R) normalised, ``input_ids`` / ``attention_mask``
            (B, T), ``label`` (B,); an optional ``num_dropped`` is summed.
        device: where to compute (default: the task's).
        precision: ``bf16`` autocasts the encoders; the head's logits are fp32.

    Returns:
        ``ve_acc`` and ``ve_acc_<label>`` per class present (percent), ``num_examples``,
        ``skipped_examples`` (rows that did not decode). The task's train/eval mode is restored.
    """
    ve = _unwrap(task)
    device = torch.device(device) if device is not None else next(ve.parameters()).device
    was_training = ve.training
    ve.eval()
    correct = torch.zeros(len(VE_LABELS), dtype=torch.long)
    total = torch.zeros(len(VE_LABELS), dtype=torch.long)
    skipped = 0
    try:
        for batch in batches:
            skipped += int(batch.get("num_dropped", torch.zeros(())).sum())
            label = batch["label"].to(device)
            if label.numel() == 0:
                continue
            with autocast_context(precision, device):
                logits = ve.logits(batch["image"].to(device), batch["input_ids"].to(device),
                                   batch["attention_mask"].to(device))  # (B, 3)
            label = label.cpu()
            hit = label[(logits.argmax(dim=1).cpu() == label)]
            total += torch.bincount(label, minlength=len(VE_LABELS))
            correct += torch.bincount(hit, minlength=len(VE_LABELS))
    finally:
        ve.train(was_training)
    n = int(total.sum())
    metrics = {"ve_acc": 100.0 * int(correct.sum()) / n if n else math.nan}
    for k, name in enumerate(VE_LABELS):
        if total[k]:
            metrics[f"ve_acc_{name}"] = 100.0 * int(correct[k]) / int(total[k])
    return {**metrics, "num_examples": n, "skipped_examples": skipped}


def split_batches(cfg: AlbefConfig, tokenizer, paths: list[str] | None = None, split: str | None = None,
                  transform: Callable[[dict], dict] | None = None):
    """The tensors of ``split`` (default ``eval.split``) of ``paths`` (default ``eval.shards``
    or ``data.shards``), ``eval.batch_size`` rows at a time, at most ``eval.max_images`` rows."""
    from .checkpoint import eval_paths
    from .examples import iter_examples

    for batch in iter_examples(paths or eval_paths(cfg), split or cfg.eval.split, cfg, tokenizer,
                               max_rows=cfg.eval.max_images):
        yield batch.tensors if transform is None else transform(batch.tensors)


def evaluate_ve(
    task: nn.Module, cfg: AlbefConfig, tokenizer=None, device: torch.device | str | None = None,
    paths: list[str] | None = None, split: str | None = None,
) -> dict[str, float]:
    """:func:`ve_accuracy` on ``split`` (default ``eval.split``), with ``eval_seconds``.

    Raises:
        ConfigError: the tokenizer has more tokens than the model's vocabulary, or no split.
    """
    from ..data.collate import load_tokenizer

    tokenizer = tokenizer or load_tokenizer(cfg.data.tokenizer)
    vocab = _unwrap(task).model.arch.vocab_size
    if len(tokenizer) > vocab:
        raise ConfigError(f"data.tokenizer: {len(tokenizer)} tokens, more than the model's vocabulary of {vocab}")
    start = time.perf_counter()
    metrics = ve_accuracy(task, split_batches(cfg, tokenizer, paths, split), device, cfg.train.precision)
    metrics["eval_seconds"] = time.perf_counter() - start
    return metrics


class VEEvaluator:
    """SNLI-VE accuracy on ``eval.split`` at fine-tuning epoch ends (rank 0).

    Args:
        cfg: reads ``eval`` (split, shards, batch_size, max_images), ``data`` (tokenizer).
        device: where the model is.
        tracker: an MLflow :class:`~albef_ray.tracking.MetricLogger`, or None.
    """

    score = "ve_acc"  # the official checkpoint_best.pth rule: best validation accuracy

    def __init__(self, cfg: AlbefConfig, device: torch.device | str | None = None, tracker=None):
        self.cfg = cfg
        self.device = device
        self.tracker = tracker
        self._tokenizer = None

    def __call__(self, task: nn.Module, step: int, run: bool = True) -> dict[str, float]:
        """Accuracy metrics of the task's online model (``ve_acc`` = NaN when not ``run``), logged at ``step``."""
        if not run:
            return {self.score: math.nan}
        if self._tokenizer is None:
            from ..data.collate import load_tokenizer

            self._tokenizer = load_tokenizer(self.cfg.data.tokenizer)
        metrics = evaluate_ve(task, self.cfg, self._tokenizer, self.device)
        log.info("step %d: ve_acc %.2f on %d %s examples (%.1f s)", step, metrics["ve_acc"], metrics["num_examples"],
                 self.cfg.eval.split, metrics["eval_seconds"])
        if self.tracker is not None:
            self.tracker.log(metrics, step)
        return {k: float(v) for k, v in metrics.items()}


def load_ve_task(cfg: AlbefConfig, checkpoint: str | Path | None = None) -> nn.Module:
    """A VE task of ``cfg.model.size`` with the weights of ``checkpoint`` (default ``model.checkpoint``).

    ``checkpoint``: an albef-ray checkpoint directory, run directory or ``state.pt``, or a
    released ``ve.pth``. With one, the ViT / BERT inits are not loaded first (it holds every
    weight); without one the task keeps the configured inits (and an untrained head).
    """
    from ..model.loading import load_albef_checkpoint
    from ..tasks import build_task
    from .checkpoint import resolve_checkpoint

    checkpoint = checkpoint or cfg.model.checkpoint
    if checkpoint is None:
        log.warning("no checkpoint given: evaluating the initial weights with an untrained classifier head")
        return build_task(cfg.model_copy(update={"task": "ve"}))
    weights = resolve_checkpoint(checkpoint)
    bare = cfg.model.model_copy(update={"vit_init": None, "bert_init": None, "checkpoint": None})
    task = build_task(cfg.model_copy(update={"model": bare, "task": "ve"}))
    report = load_albef_checkpoint(task, str(weights))
    if not report.loaded:
        raise ValueError(f"{weights}: no weight of the checkpoint fits model.size={cfg.model.size}")
    if not any(k.startswith("head.") for k in report.loaded):
        log.warning("%s: no SNLI-VE classifier head in the checkpoint; it stays untrained", weights)
    log.info("%s", report)
    return task


def ve_metrics(cfg: AlbefConfig, checkpoint: str | Path | None = None) -> dict[str, float]:
    """A checkpoint's SNLI-VE accuracy on ``eval.split`` (a sweep stage's and ``eval ve``'s report)."""
    from ..precision import resolve_device

    start = time.perf_counter()
    device = resolve_device(cfg)
    task = load_ve_task(cfg, checkpoint).to(device)
    metrics = evaluate_ve(task, cfg, device=device)
    metrics["eval_seconds"] = time.perf_counter() - start
    return metrics
