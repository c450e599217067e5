"""Pretraining on a real local Ray cluster with a real MLflow store (CPU, albef_tiny)."""

from pathlib import Path

import pytest
import torch

from albef_ray.config import load_config
from albef_ray.train.checkpoint import STATE_FILE

pytestmark = pytest.mark.ray
DEMO = str(Path(__file__).resolve().parents[2] / "experiments" / "demo_cpu.yaml")


def _cfg(tmp_path, *overrides):
    return load_config(DEMO, [
        f"run.storage_path={tmp_path}", "train.cpus_per_worker=0.5", "momentum.queue_size=64",
        "train.batch_size=8", "train.log_every_steps=1", *overrides,
    ])


def _final_state(result):
    return torch.load(Path(result.checkpoint.path) / STATE_FILE, weights_only=True)


def test_two_worker_run_loss_falls_and_mlflow_has_everything(ray_cluster, tmp_path):
    from mlflow.tracking import MlflowClient

    from albef_ray.launch.train import run_pretrain

    cfg = _cfg(tmp_path, "train.num_workers=2", "train.steps_per_epoch=20", "train.max_steps=40",
               "train.checkpoint_every_steps=20", "run.name=two_workers")
    result = run_pretrain(cfg, echo=lambda *_: None)
    assert result.metrics["step"] == 40

    client = MlflowClient(f"sqlite:///{tmp_path}/mlflow.db")
    run = client.search_runs([client.get_experiment_by_name("albef-ray").experiment_id])[0]
    assert run.info.status == "FINISHED"
    assert run.data.params["optim.lr"] == "0.002" and run.data.params["model.size"] == "albef_tiny"
    assert run.data.tags["model.size"] == "albef_tiny" and "final_checkpoint" in run.data.tags
    loss = [m.value for m in sorted(client.get_metric_history(run.info.run_id, "loss"), key=lambda m: m.step)]
    assert len(loss) == 40  # one point per step
    assert sum(loss[-5:]) / 5 < sum(loss[:5]) / 5 - 0.3, loss
    for key in ("itc_loss", "itm_loss", "mlm_loss", "lr", "alpha", "temp", "samples_per_s", "data_wait_frac", "dropped_rows"):
        assert key in run.data.metrics, key
    artifacts = {a.path for a in client.list_artifacts(run.info.run_id)}
    assert {"config.yaml", "loss_curves.png"} <= artifacts
    assert (tmp_path / "mlartifacts").is_dir()  # beside the store, not in the working directory


def test_resume_equals_straight_run(ray_cluster, tmp_path):
    from albef_ray.launch.train import run_pretrain

    common = ["train.num_workers=1", "train.steps_per_epoch=4", "train.checkpoint_every_steps=4", "tracking.enabled=false"]
    straight = run_pretrain(_cfg(tmp_path, *common, "train.max_steps=8", "run.name=straight"), echo=lambda *_: None)
    run_pretrain(_cfg(tmp_path, *common, "train.max_steps=4", "run.name=resumed"), echo=lambda *_: None)
    resumed = run_pretrain(_cfg(tmp_path, *common, "train.max_steps=8", "run.name=resumed"), echo=lambda *_: None)
    assert resumed.return_value["start_step"] == 4  # it continued from the checkpoint
    a, b = _final_state(straight), _final_state(resumed)
    assert a["progress"]["step"] == b["progress"]["step"] == 8
    for key, value in a["model"].items():  # parameters, momentum parameters, queues, pointer
        torch.testing.assert_close(b["model"][key], value, atol=1e-6, rtol=1e-5, msg=key)


def test_killed_worker_run_completes_from_checkpoint(ray_cluster, tmp_path):
    from albef_ray.launch.train import FAULT_MARKER, run_pretrain

    cfg = _cfg(tmp_path, "train.num_workers=2", "train.steps_per_epoch=10", "train.max_steps=8",
               "train.checkpoint_every_steps=3", "run.fail_at_step=5", "run.max_failures=1",
               "tracking.enabled=false", "run.name=faulty")
    result = run_pretrain(cfg, echo=lambda *_: None)
    assert (tmp_path / "faulty" / FAULT_MARKER).exists()  # the fault really fired
    assert result.metrics["step"] == 8
    assert result.return_value["start_step"] == 3  # the restarted group began at the last checkpoint
    assert _final_state(result)["progress"]["step"] == 8


def test_two_workers_stream_synthetic_shards_and_loss_falls(ray_cluster, tmp_path):
    from mlflow.tracking import MlflowClient

    from albef_ray.cli import main
    from albef_ray.launch.train import run_pretrain

    data = tmp_path / "synth"
    assert main(["data", "synth", str(data), "--train", "480", "--val", "16", "--test", "16",
                 "--image-size", "32", "--no-progress"]) == 0
    cfg = _cfg(tmp_path, "train.num_workers=2", f"data.shards=[{data}]", f"data.tokenizer={data}/tokenizer",
               "train.steps_per_epoch=null", "train.max_steps=40", "train.checkpoint_every_steps=40",
               "data.shuffle_buffer=64", "run.name=shards")
    result = run_pretrain(cfg, echo=lambda *_: None)
    assert result.metrics["step"] == 40 and result.metrics["epoch"] >= 1  # 480 rows / 16 = 30 steps per epoch
    client = MlflowClient(f"sqlite:///{tmp_path}/mlflow.db")
    run = client.search_runs([client.get_experiment_by_name("albef-ray").experiment_id])[0]
    assert run.data.tags["dataset"] == str(data)
    hist = sorted(client.get_metric_history(run.info.run_id, "mlm_loss"), key=lambda m: m.step)
    mlm = [m.value for m in hist]
    assert sum(mlm[-5:]) / 5 < sum(mlm[:5]) / 5 - 0.5, mlm
    assert sum(m.value for m in client.get_metric_history(run.info.run_id, "dropped_rows")) == 0
