"""MLflow tracking shared by training, evaluation and sweeps: runs, metrics, tag names.

The layer both the Ray launchers and the Ray-free evaluation import (no Ray here).

The run is created by the driver before ``fit()`` and its id handed to the workers, so a
worker group restarted by Ray (or a run resumed by name) keeps logging into the same run.
"""

from __future__ import annotations

import json
import logging
import os
import tempfile
from pathlib import Path

from .config import AlbefConfig, dump_yaml, flatten

log = logging.getLogger(__name__)
RUN_ID_FILE = "mlflow_run_id.txt"  # in a run directory: the MLflow run it logs into

# Tags that tie a sweep's runs together (written by the sweep launcher, read by ``compare``).
PARENT_TAG = "mlflow.parentRunId"
TAG_SWEEP, TAG_ROLE, TAG_VARIANT, TAG_VARIANTS, TAG_TRIAL = "sweep", "sweep_role", "variant", "sweep_variants", "trial"
TAG_COLUMNS = "sweep_columns"  # parent-run tag: the sweep's table columns as JSON


def resolve_tracking_uri(cfg: AlbefConfig, storage_dir: Path) -> str:
    """``tracking.tracking_uri``, else ``$MLFLOW_TRACKING_URI``, else SQLite beside the results."""
    if cfg.tracking.tracking_uri or os.environ.get("MLFLOW_TRACKING_URI"):
        return cfg.tracking.tracking_uri or os.environ["MLFLOW_TRACKING_URI"]
    return f"sqlite:///{(storage_dir / 'mlflow.db').resolve()}"


def mlflow_client(uri: str):
    from mlflow.tracking import MlflowClient

    return MlflowClient(tracking_uri=uri)


def open_run(cfg: AlbefConfig, uri: str, run_dir: Path, run_name: str, tags: dict[str, str]) -> str:
    """Create the MLflow run (or reopen the one recorded in ``run_dir`` when resuming)."""
    client = mlflow_client(uri)
    marker = run_dir / RUN_ID_FILE
    if marker.exists():
        run_id = marker.read_text().strip()
        client.update_run(run_id, status="RUNNING")
        log.info("resuming MLflow run %s", run_id)
        return run_id
    exp = client.get_experiment_by_name(cfg.tracking.experiment)
    if exp is None:
        # With a local SQLite store MLflow would put artifacts in ./mlruns of whatever directory
        # the driver runs in; keep them beside the database instead.
        location = None
        if uri.startswith("sqlite:///"):
            location = (Path(uri[len("sqlite:///"):]).parent / "mlartifacts").resolve().as_uri()
        exp_id = client.create_experiment(cfg.tracking.experiment, artifact_location=location)
    else:
        exp_id = exp.experiment_id
    run = client.create_run(exp_id, run_name=run_name, tags=tags)
    run_id = run.info.run_id
    from mlflow.entities import Param

    params = [Param(k, json.dumps(v) if isinstance(v, (list, dict, tuple)) else str(v)) for k, v in flatten(cfg).items()]
    for i in range(0, len(params), 100):  # MLflow's batch limit
        client.log_batch(run_id, params=params[i : i + 100])
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "config.yaml"
        path.write_text(dump_yaml(cfg))
        client.log_artifact(run_id, str(path))
    run_dir.mkdir(parents=True, exist_ok=True)
    marker.write_text(run_id)
    return run_id


class MetricLogger:
    """Rank 0's handle: ``log(metrics, step)`` and ``log_artifact(path)`` into the run."""

    def __init__(self, uri: str, run_id: str, prefix: str = ""):
        self.client = mlflow_client(uri)
        self.run_id = run_id
        self.prefix = prefix  # tracking.metric_prefix

    def log(self, metrics: dict[str, float], step: int) -> None:
        import time

        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        batch = [Metric(self.prefix + k, float(v), now, step) for k, v in metrics.items()]
        self.client.log_batch(self.run_id, metrics=batch)

    def log_artifact(self, path: str | os.PathLike, artifact_path: str | None = None) -> None:
        """Upload the file ``path`` into the run's artifacts (under ``artifact_path``, e.g. ``heatmaps/step_000100``)."""
        self.client.log_artifact(self.run_id, str(path), artifact_path)


def close_run(uri: str, run_id: str, status: str, checkpoint_path: str | None, plot_dir: Path) -> None:
    """Log the loss-curve plot and the final checkpoint's location, then end the run."""
    client = mlflow_client(uri)
    if checkpoint_path:
        client.set_tag(run_id, "final_checkpoint", checkpoint_path)
    try:
        png = plot_losses(client, run_id, plot_dir)
        if png:
            client.log_artifact(run_id, str(png))
    except Exception as err:  # a plot must never fail a finished run
        log.warning("loss-curve plot failed: %s", err)
    client.set_terminated(run_id, status=status)


def plot_losses(client, run_id: str, out_dir: Path) -> Path | None:
    """``loss_curves.png``: every ``*_loss`` metric against step."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    keys = sorted(k for k in client.get_run(run_id).data.metrics if k == "loss" or k.endswith("_loss"))
    if not keys:
        return None
    fig, ax = plt.subplots(figsize=(7, 4))
    for key in keys:
        hist = sorted(client.get_metric_history(run_id, key), key=lambda m: m.step)
        ax.plot([m.step for m in hist], [m.value for m in hist], label=key)
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.legend()
    ax.grid(alpha=0.3)
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / "loss_curves.png"
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def ui_hint(uri: str) -> str:
    if uri.startswith("sqlite:///"):
        return f"mlflow ui --backend-store-uri {uri} --host 127.0.0.1 --port 5000"
    return f"open {uri} in a browser"

