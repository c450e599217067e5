"""Retrieval fine-tuning on Ray Train: the pretraining launcher plus per-epoch evaluation.

``albef-ray finetune retrieval`` runs the same ``TorchTrainer`` and worker loop as
pretraining (:mod:`albef_ray.launch.train`); ``cfg.task = retrieval`` makes ``build_task``
return the :class:`~albef_ray.objectives.retrieval.RetrievalTask`, and the shard batches
carry each pair's ``image_idx``. What this module adds:

* :class:`EpochEvaluator`: at every epoch end (and at the last step) rank 0 evaluates
  image-text retrieval on the held-out split ``eval.split`` (loaded once, on first use) and
  the recalls travel with that step's checkpoint report and into MLflow. The other ranks
  wait in ``ray.train.report``, which is a barrier without timeout, so no collective
  times out while rank 0 evaluates.
* :func:`checkpoint_config`: Ray keeps the ``train.keep_checkpoints`` best checkpoints by
  ``r_mean`` (the official ``checkpoint_best.pth`` rule: mean of the six recalls) and always
  the latest, so a restart or ``--resume`` still continues from the last step. Checkpoints
  written between evaluations report ``r_mean = NaN``, which Ray ranks lowest.
* :func:`run_finetune`: the driver job; it checks the inputs, fits, and tags the MLflow run
  with the best checkpoint.
"""

from __future__ import annotations

import logging
import math

import torch

from ..config import AlbefConfig, ConfigError

log = logging.getLogger(__name__)
SCORE = "r_mean"


def evaluates_every_epoch(cfg: AlbefConfig) -> bool:
    return cfg.task == "retrieval" and cfg.eval.every_epoch


class EpochEvaluator:
    """Rank 0's retrieval evaluation at checkpoints; plain PyTorch (no Ray).

    Args:
        cfg: reads ``eval`` (split, shards, k_test, ...), ``data`` (tokenizer, shards).
        device: where the model is.
        tracker: an MLflow :class:`~albef_ray.launch.tracking.MetricLogger`, or None.
    """

    def __init__(self, cfg: AlbefConfig, device: torch.device | str | None = None, tracker=None):
        self.cfg = cfg
        self.device = device
        self.tracker = tracker
        self._split = None
        self._tokenizer = None

    def _load(self) -> None:
        from ..data.collate import load_tokenizer
        from ..eval.split import load_split

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
            return {SCORE: math.nan}
        from ..eval.retrieval import evaluate

        if self._split is None:
            self._load()
        metrics = evaluate(task, self._split, self._tokenizer, self.cfg, self.device, log_fn=log.info)
        log.info("step %d: %s %.2f (txt_r1 %.2f, img_r1 %.2f) on %s", step, SCORE, metrics[SCORE],
                 metrics.get("txt_r1", math.nan), metrics.get("img_r1", math.nan), self.cfg.eval.split)
        if self.tracker is not None:
            self.tracker.log(metrics, step)
        return {k: float(v) for k, v in metrics.items()}


def checkpoint_config(cfg: AlbefConfig):
    """Ray's retention: the last K checkpoints, or with per-epoch evaluation the best K by ``r_mean``."""
    import ray.train

    if evaluates_every_epoch(cfg):
        return ray.train.CheckpointConfig(
            num_to_keep=cfg.train.keep_checkpoints, checkpoint_score_attribute=SCORE, checkpoint_score_order="max"
        )
    return ray.train.CheckpointConfig(num_to_keep=cfg.train.keep_checkpoints)


def best_checkpoint(result) -> tuple[str, dict] | None:
    """(path, metrics) of the reported checkpoint with the highest finite ``r_mean``, if any."""
    scored = [
        (ckpt.path, metrics) for ckpt, metrics in (result.best_checkpoints or [])
        if isinstance(metrics.get(SCORE), (int, float)) and math.isfinite(metrics[SCORE])
    ]
    return max(scored, key=lambda item: item[1][SCORE]) if scored else None


def _check_inputs(cfg: AlbefConfig) -> None:
    from ..data.manifest import shard_files

    if cfg.task != "retrieval":
        raise ConfigError(f"task: `finetune retrieval` needs task=retrieval, got {cfg.task!r}")
    if not cfg.data.shards:
        raise ConfigError("data.shards: retrieval fine-tuning reads captions with image ids from caption shards")
    if cfg.eval.every_epoch:
        paths = cfg.eval.shards or cfg.data.shards
        try:
            files, _ = shard_files(paths, cfg.eval.split)
        except (KeyError, FileNotFoundError, OSError) as err:
            raise ConfigError(f"eval.split: no split {cfg.eval.split!r} in {', '.join(paths)} ({err})") from None
        if not files:
            raise ConfigError(f"eval.split: no shards of split {cfg.eval.split!r} in {', '.join(paths)}")


def _tag_best(cfg: AlbefConfig, best: tuple[str, dict]) -> None:
    from mlflow.tracking import MlflowClient

    from .tracking import RUN_ID_FILE, resolve_tracking_uri
    from .train import run_paths

    paths = run_paths(cfg)
    marker = paths.run_dir / RUN_ID_FILE
    if not cfg.tracking.enabled or not marker.exists():
        return
    path, metrics = best
    client = MlflowClient(tracking_uri=resolve_tracking_uri(cfg, paths.storage))
    run_id = marker.read_text().strip()
    for key, value in {"best_checkpoint": path, f"best_{SCORE}": f"{metrics[SCORE]:.4f}",
                       "best_epoch": metrics.get("epoch"), "best_step": metrics.get("step")}.items():
        client.set_tag(run_id, key, str(value))


def run_finetune(cfg: AlbefConfig, echo=print):
    """The ``albef-ray finetune retrieval`` job: fit, then name the best checkpoint; returns the Ray Result.

    The best checkpoint by ``r_mean`` is echoed and tagged on the MLflow run
    (``best_checkpoint``, ``best_r_mean``, ``best_epoch``, ``best_step``).
    """
    from datetime import datetime

    from .train import absolute_data_paths, run_pretrain

    cfg = absolute_data_paths(cfg)
    if cfg.run.name is None:  # fixed once, so the driver finds the run folder (and MLflow run) again
        cfg = cfg.model_copy(update={"run": cfg.run.model_copy(update={"name": f"{cfg.name}-{datetime.now():%Y%m%d-%H%M%S}"})})
    _check_inputs(cfg)
    result = run_pretrain(cfg, echo=echo)
    best = best_checkpoint(result)
    if best is not None:
        path, metrics = best
        echo(f"best checkpoint: {SCORE} {metrics[SCORE]:.2f} on {cfg.eval.split} after epoch {metrics.get('epoch')}"
             f" (step {metrics.get('step')}): {path}")
        _tag_best(cfg, best)
    return result
