"""Evaluation results to MLflow: into the run that trained the checkpoint, else a run of their own.

A training run's id is recovered from its run directory: ``albef-ray pretrain`` (and
``finetune``) write ``<run dir>/mlflow_run_id.txt`` when they open the MLflow run, and Ray
Train puts checkpoints in ``<run dir>/checkpoint_*``. The store is the training run's: its
``tracking.tracking_uri``, ``$MLFLOW_TRACKING_URI``, or ``<run dir>/../mlflow.db``.

Metrics are named ``<split>/<key>`` (``test/txt_r1``, ``test/r_mean``) and logged at the
checkpoint's optimizer step, so a run can hold several splits and checkpoints side by side.
"""

from __future__ import annotations

import json
import tempfile
import time
from pathlib import Path

from ..config import AlbefConfig
from ..tracking import RUN_ID_FILE, open_run, resolve_tracking_uri


def find_run_dir(checkpoint: str | Path | None) -> Path | None:
    """The training run directory above ``checkpoint`` (the first holding ``mlflow_run_id.txt``)."""
    if checkpoint is None:
        return None
    path = Path(checkpoint).expanduser().resolve()
    for folder in [path, *path.parents][:4]:  # state.pt -> checkpoint_N -> run dir
        if (folder / RUN_ID_FILE).is_file():
            return folder
    return None


def log_eval(
    cfg: AlbefConfig,
    metrics: dict[str, float],
    checkpoint: str | Path | None = None,
    run_id: str | None = None,
    step: int | None = None,
    prefix: str | None = None,
    kind: str = "retrieval",
) -> tuple[str, str]:
    """Log an evaluation's ``metrics`` to MLflow; returns (tracking URI, run id).

    Args:
        cfg: ``tracking.*`` (URI, experiment) and ``eval.*`` (logged as tags).
        metrics: name -> number (non-numbers are kept in the JSON artifact only).
        checkpoint: the evaluated checkpoint; its run directory names the training run.
        run_id: log into this run instead of the checkpoint's (e.g. ``--run-id``).
        step: the checkpoint's optimizer step (default 0).
        prefix: metric prefix (default ``eval.split``: ``test/txt_r1``); a sweep's stages use theirs.
        kind: the evaluation (``retrieval``, ``ve``, ``nlvr``, ``vqa``, ``grounding``): names the
            JSON artifact ``<kind>_<prefix>.json``; retrieval also tags ``k_test`` and ``score``.
    """
    from mlflow.entities import Metric
    from mlflow.tracking import MlflowClient

    run_dir = find_run_dir(checkpoint)
    storage = run_dir.parent if run_dir is not None else Path(cfg.run.storage_path).expanduser().resolve()
    uri = resolve_tracking_uri(cfg, storage)
    client = MlflowClient(tracking_uri=uri)
    if run_id is None and run_dir is not None:
        run_id = (run_dir / RUN_ID_FILE).read_text().strip()
    own_run = run_id is None
    split = prefix or cfg.eval.split
    if own_run:
        tags = {"kind": "eval", "model.size": cfg.model.size, **cfg.tracking.tags}
        with tempfile.TemporaryDirectory() as scratch:  # open_run's resume marker is not wanted here
            run_id = open_run(cfg, uri, Path(scratch), f"{cfg.name}-eval-{split}", tags)
    now = int(time.time() * 1000)
    numbers = {k: float(v) for k, v in metrics.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}
    client.log_batch(run_id, metrics=[Metric(f"{split}/{k}", v, now, step or 0) for k, v in numbers.items()])
    tags = {f"eval.{split}.checkpoint": str(checkpoint) if checkpoint else "initial weights"}
    if kind == "retrieval":
        tags.update({f"eval.{split}.k_test": str(cfg.eval.k_test), f"eval.{split}.score": cfg.eval.score})
    for key, value in tags.items():
        client.set_tag(run_id, key, value)
    with tempfile.TemporaryDirectory() as scratch:
        path = Path(scratch) / f"{kind}_{split}.json"
        path.write_text(json.dumps({"split": split, "checkpoint": str(checkpoint), "step": step, **metrics}, indent=2))
        client.log_artifact(run_id, str(path))
    if own_run:
        client.set_terminated(run_id, status="FINISHED")
    return uri, run_id


def log_retrieval(cfg, metrics, checkpoint=None, run_id=None, step=None, prefix=None) -> tuple[str, str]:
    """:func:`log_eval` of retrieval metrics (the tags ``k_test`` and ``score`` included)."""
    return log_eval(cfg, metrics, checkpoint, run_id, step, prefix, kind="retrieval")
