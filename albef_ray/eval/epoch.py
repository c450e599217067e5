"""Evaluation during fine-tuning: rank 0 scores the online model at epoch ends (no Ray).

Registered per task in :mod:`albef_ray.tasks` (``TaskSpec.epoch_evaluator``); the Ray Train
worker loop calls it at every checkpoint and the metrics travel with that checkpoint's report
(Ray keeps the best checkpoints by the task's ``score``). The other ranks wait in
``ray.train.report``, a barrier without timeout, so no collective times out meanwhile.
"""

from __future__ import annotations

import logging
import math

import torch

from ..config import AlbefConfig

log = logging.getLogger(__name__)


class RetrievalEvaluator:
    """Image-text retrieval on the held-out split ``eval.split`` (loaded once, on first use).

    Args:
        cfg: reads ``eval`` (split, shards, k_test, ...), ``data`` (tokenizer, shards).
        device: where the model is.
        tracker: an MLflow :class:`~albef_ray.tracking.MetricLogger`, or None.
    """

    score = "r_mean"  # the official checkpoint_best.pth rule: mean of the six recalls

    def __init__(self, cfg: AlbefConfig, device: torch.device | str | None = None, tracker=None):
        self.cfg = cfg
        self.device = device
        self.tracker = tracker
        self._split = None
        self._tokenizer = None

    def _load(self) -> None:
        from ..data.collate import load_tokenizer
        from .split import load_split

        cfg = self.cfg
        self._split = load_split(cfg.eval.shards or cfg.data.shards, cfg.eval.split, cfg)
        self._tokenizer = load_tokenizer(cfg.data.tokenizer)
        log.info("evaluation split %r: %d images, %d captions", cfg.eval.split, self._split.num_images,
                 self._split.num_texts)

    def __call__(self, task: torch.nn.Module, step: int, run: bool = True) -> dict[str, float]:
        """Recall metrics of the task's online model (``r_mean`` = NaN when not ``run``).

        The metrics are also logged to MLflow at ``step``.
        """
        if not run:
            return {self.score: math.nan}
        from .retrieval import evaluate

        if self._split is None:
            self._load()
        metrics = evaluate(task, self._split, self._tokenizer, self.cfg, self.device, log_fn=log.info)
        log.info("step %d: %s %.2f (txt_r1 %.2f, img_r1 %.2f) on %s", step, self.score, metrics[self.score],
                 metrics.get("txt_r1", math.nan), metrics.get("img_r1", math.nan), self.cfg.eval.split)
        if self.tracker is not None:
            self.tracker.log(metrics, step)
        return {k: float(v) for k, v in metrics.items()}
