"""Fine-tuning on Ray Train: the pretraining launcher, run for a registered downstream task.

``albef-ray finetune <task>`` runs the same ``TorchTrainer`` and worker loop as pretraining
(:mod:`albef_ray.launch.train`); ``cfg.task`` picks the task module from the registry
(:mod:`albef_ray.tasks`), which also names the task's epoch-end evaluator and the metric Ray
keeps the best checkpoints by (retrieval: ``r_mean``, the official ``checkpoint_best.pth``
rule). What this module adds: the input checks before Ray starts, and after the fit the best
checkpoint, echoed and tagged on the MLflow run. Nothing here names a task.
"""

from __future__ import annotations

import logging
from datetime import datetime

from ..config import AlbefConfig, ConfigError
from ..tasks import TASKS, get_task
from .common import absolute_data_paths, run_paths
from .train import best_checkpoint, run_pretrain

log = logging.getLogger(__name__)


def check_inputs(cfg: AlbefConfig, task: str | None = None) -> None:
    """Fine-tuning inputs, checked before Ray starts.

    Args:
        cfg: the resolved config.
        task: the task the command fine-tunes (``finetune <task>``); None: any but pretraining.

    Raises:
        ConfigError: ``task`` differs from ``cfg.task`` (or is pretraining), no ``data.shards``,
            or the task evaluates every epoch and ``eval.split`` has no shards.
    """
    from ..data.manifest import shard_files

    downstream = [name for name in TASKS if name != "pretrain"]
    if cfg.task == "pretrain" or (task is not None and cfg.task != task):
        wanted = task or " or ".join(downstream)
        raise ConfigError(f"task: fine-tuning {wanted} needs task={wanted}, got {cfg.task!r}")
    if not cfg.data.shards:
        raise ConfigError(f"data.shards: {cfg.task} fine-tuning reads its training split from caption shards")
    if get_task(cfg.task).evaluates_every_epoch(cfg):
        paths = cfg.eval.shards or cfg.data.shards
        try:
            files, _ = shard_files(paths, cfg.eval.split)
        except (KeyError, FileNotFoundError, OSError) as err:
            raise ConfigError(f"eval.split: no split {cfg.eval.split!r} in {', '.join(paths)} ({err})") from None
        if not files:
            raise ConfigError(f"eval.split: no shards of split {cfg.eval.split!r} in {', '.join(paths)}")


def _tag_best(cfg: AlbefConfig, score: str, best: tuple[str, dict]) -> None:
    from mlflow.tracking import MlflowClient

    from ..tracking import RUN_ID_FILE, resolve_tracking_uri

    paths = run_paths(cfg)
    marker = paths.run_dir / RUN_ID_FILE
    if not cfg.tracking.enabled or not marker.exists():
        return
    path, metrics = best
    client = MlflowClient(tracking_uri=resolve_tracking_uri(cfg, paths.storage))
    run_id = marker.read_text().strip()
    for key, value in {"best_checkpoint": path, f"best_{score}": f"{metrics[score]:.4f}",
                       "best_epoch": metrics.get("epoch"), "best_step": metrics.get("step")}.items():
        client.set_tag(run_id, key, str(value))


def run_finetune(cfg: AlbefConfig, task: str | None = None, echo=print):
    """The ``albef-ray finetune <task>`` job: fit; returns (Ray Result, best checkpoint or None).

    When the task evaluates every epoch, the best checkpoint by its score is echoed and tagged
    on the MLflow run (``best_checkpoint``, ``best_<score>``, ``best_epoch``, ``best_step``);
    it is ``(path, reported metrics)``.
    """
    cfg = absolute_data_paths(cfg)
    if cfg.run.name is None:  # fixed once, so the driver finds the run folder (and MLflow run) again
        cfg = cfg.model_copy(update={"run": cfg.run.model_copy(update={"name": f"{cfg.name}-{datetime.now():%Y%m%d-%H%M%S}"})})
    check_inputs(cfg, task)
    result = run_pretrain(cfg, echo=echo)
    score = get_task(cfg.task).score
    best = best_checkpoint(result, score) if score else None
    if best is not None:
        path, metrics = best
        echo(f"best checkpoint: {score} {metrics[score]:.2f} on {cfg.eval.split} after epoch {metrics.get('epoch')}"
             f" (step {metrics.get('step')}): {path}")
        _tag_best(cfg, score, best)
    return result, best
