"""Retrieval fine-tuning on a real local Ray cluster with a real MLflow store (CPU, albef_tiny).

The training split has five captions per image (the synthetic benchmark's val split), so
batches and the ITC queue really hold several captions of one image; the synthetic test
split is held out as ``val`` for the per-epoch evaluation.
"""

import shutil
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import torch

from albef_ray.config import load_config
from albef_ray.data.schema import image_indices
from albef_ray.train.checkpoint import STATE_FILE

pytestmark = pytest.mark.ray
SYNTH = str(Path(__file__).resolve().parents[2] / "experiments" / "finetune_synth.yaml")
STEPS_PER_EPOCH, EPOCHS = 3, 3  # ~2 s per step here: Ray Data feeds 2 workers on 2 cores slowly


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    from albef_ray.cli import main

    root = tmp_path_factory.mktemp("finetune")
    synth = root / "synth"
    assert main(["data", "synth", str(synth), "--train", "16", "--val", "96", "--test", "32",
                 "--image-size", "32", "--no-progress"]) == 0
    shutil.copytree(synth / "val", root / "ds" / "train")  # 96 images x 5 captions
    shutil.copytree(synth / "test", root / "ds" / "val")  # 32 images x 5 captions, held out
    return root


def _overrides(dataset, storage):
    return [
        f"run.storage_path={storage}", f"data.shards=[{dataset / 'ds'}]", f"data.tokenizer={dataset / 'synth' / 'tokenizer'}",
        "train.batch_size=8", "momentum.queue_size=64", f"train.steps_per_epoch={STEPS_PER_EPOCH}",
        "train.checkpoint_every_steps=2", "train.keep_checkpoints=1", "train.log_every_steps=1", "data.shuffle_buffer=64",
    ]


def _history(client, run_id, key):
    return {m.step: m.value for m in client.get_metric_history(run_id, key)}


def test_finetune_evaluates_each_epoch_keeps_the_best_and_resumes(ray_cluster, dataset, tmp_path):
    from mlflow.tracking import MlflowClient

    from albef_ray.cli import main
    from albef_ray.launch.finetune import run_finetune
    from albef_ray.launch.faults import FAULT_MARKER

    # ---- 3 epochs on 2 workers; rank 1 dies before step 6, the group restarts from step 4.
    # Checkpoints at steps 2, 3 (epoch end) and 4. The injected fault waits until Ray has
    # registered the step-4 checkpoint (on a busy machine its controller can lag a step or more
    # behind the workers' reports), so the restart point is the last checkpoint, not a race.
    cfg = load_config(SYNTH, [*_overrides(dataset, tmp_path), f"train.epochs={EPOCHS}", "run.name=ft",
                              "run.fail_at_step=5", "run.max_failures=1"])
    result, _ = run_finetune(cfg, echo=lambda *_: None)
    assert (tmp_path / "ft" / FAULT_MARKER).exists()
    assert result.return_value["start_step"] == 4  # the last checkpoint, mid-epoch 2 (not evaluated)
    assert result.metrics["step"] == EPOCHS * STEPS_PER_EPOCH and result.metrics["epoch"] == EPOCHS

    client = MlflowClient(f"sqlite:///{tmp_path}/mlflow.db")
    (run,) = client.search_runs([client.get_experiment_by_name("albef-ray").experiment_id])
    r_mean = _history(client, run.info.run_id, "r_mean")
    assert sorted(r_mean) == [3, 6, 9]  # once per epoch, not repeated by the restart
    for key in ("txt_r1", "img_r10", "txt_r_mean", "img_r_mean", "itc_loss", "itm_loss"):
        assert key in run.data.metrics, key
    assert "mlm_loss" not in run.data.metrics

    # ---- the best checkpoint by r_mean is kept (besides the latest) and tagged
    tags = run.data.tags
    best_step = int(tags["best_step"])
    assert r_mean[best_step] == max(r_mean.values()) and float(tags["best_r_mean"]) == pytest.approx(r_mean[best_step], abs=1e-3)
    best = torch.load(Path(tags["best_checkpoint"]) / STATE_FILE, weights_only=True)
    assert best["progress"]["step"] == best_step
    kept = {p.name for p in (tmp_path / "ft").glob("checkpoint_*") if p.is_dir()}
    assert kept == {Path(tags["best_checkpoint"]).name, Path(result.checkpoint.path).name}

    # ---- the queue holds image indices of the training rows, several captions per image
    final = torch.load(Path(result.checkpoint.path) / STATE_FILE, weights_only=True)
    queued = final["model"]["momentum.index_queue"].tolist()
    table = pq.read_table(dataset / "ds" / "train")
    train_idx = set(image_indices(table["source"].to_pylist(), table["image_id"].to_pylist()).tolist())
    assert set(queued) <= train_idx and len(set(queued)) < len(queued)

    # ---- relaunched by name (CLI --resume): continues at step 9 in the same MLflow run
    assert main(["finetune", "retrieval", "--config", SYNTH, "--resume", "ft", *_overrides(dataset, tmp_path),
                 f"train.epochs={EPOCHS + 1}"]) == 0
    (again,) = client.search_runs([client.get_experiment_by_name("albef-ray").experiment_id])
    assert again.info.run_id == run.info.run_id and again.info.status == "FINISHED"
    assert sorted(_history(client, run.info.run_id, "r_mean")) == [3, 6, 9, 12]
    assert sorted(_history(client, run.info.run_id, "loss")) == list(range(1, 13))
