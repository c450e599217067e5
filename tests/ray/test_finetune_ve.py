"""SNLI-VE fine-tuning on a real local Ray cluster with a real MLflow store (CPU, albef_tiny).

A tiny generated VE set (``data synth-task ve``: 96 training pairs, 24 val, 24 test at 32 px)
trains on 2 workers (DDP: every trainable weight of the VE task must get a gradient); rank 1
dies once and the group restarts from the last checkpoint; the best checkpoint by val
``ve_acc`` is kept and tagged, evaluates on test with ``albef-ray eval ve``, and a relaunch by
name continues the run.
"""

import json
from pathlib import Path

import pytest
import torch

from albef_ray.config import load_config
from albef_ray.train.checkpoint import STATE_FILE

pytestmark = pytest.mark.ray
SYNTH = str(Path(__file__).resolve().parents[2] / "experiments" / "finetune_ve_synth.yaml")
STEPS_PER_EPOCH, EPOCHS = 3, 3  # of the 96 pairs: 48 per worker in 16-row blocks, 3 of its 6 batches of 8


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    from albef_ray.cli import main

    root = tmp_path_factory.mktemp("finetune_ve")
    assert main(["data", "synth", str(root / "synth"), "--train", "16", "--val", "8", "--test", "8",
                 "--image-size", "32", "--no-progress"]) == 0  # for its tokenizer
    assert main(["data", "synth-task", "ve", str(root / "ve"), "--from", str(root / "synth"), "--train", "96",
                 "--val", "24", "--test", "24", "--image-size", "32", "--no-progress"]) == 0
    return root / "ve"


def _overrides(dataset, storage):
    return [
        f"run.storage_path={storage}", f"data.shards=[{dataset}]", f"data.tokenizer={dataset / 'tokenizer'}",
        "model.size=albef_tiny", "model.vit_init=null", "model.bert_init=null",
        "train.batch_size=8", "train.num_workers=2", "train.cpus_per_worker=0.5",
        f"train.steps_per_epoch={STEPS_PER_EPOCH}", "train.checkpoint_every_steps=2", "train.keep_checkpoints=1",
        "train.log_every_steps=1", "data.shuffle_buffer=16", "data.map_batch_size=16",
    ]


def _history(client, run_id, key):
    return {m.step: m.value for m in client.get_metric_history(run_id, key)}


def test_finetune_ve_survives_a_lost_worker_keeps_the_best_and_evaluates(ray_cluster, dataset, tmp_path):
    from mlflow.tracking import MlflowClient

    from albef_ray.cli import main
    from albef_ray.launch.faults import FAULT_MARKER
    from albef_ray.launch.finetune import run_finetune

    # ---- 3 epochs on 2 workers; rank 1 dies before step 6, the group restarts from step 4
    # (checkpoints at steps 2, 3 = epoch end, 4; the fault waits until Ray registered step 4).
    cfg = load_config(SYNTH, [*_overrides(dataset, tmp_path), f"train.epochs={EPOCHS}", "run.name=ve",
                              "run.fail_at_step=5", "run.max_failures=1"])
    result, best = run_finetune(cfg, "ve", echo=lambda *_: None)
    assert (tmp_path / "ve" / FAULT_MARKER).exists()
    assert result.return_value["start_step"] == 4
    assert result.metrics["step"] == EPOCHS * STEPS_PER_EPOCH and result.metrics["epoch"] == EPOCHS

    client = MlflowClient(f"sqlite:///{tmp_path}/mlflow.db")
    (run,) = client.search_runs([client.get_experiment_by_name("albef-ray").experiment_id])
    accuracy = _history(client, run.info.run_id, "ve_acc")
    assert sorted(accuracy) == [3, 6, 9]  # once per epoch, not repeated by the restart
    assert all(0 <= v <= 100 for v in accuracy.values())
    for key in ("ve_loss", "ve_batch_acc", "ve_acc_entailment", "num_examples"):
        assert key in run.data.metrics, key
    assert not {"itc_loss", "itm_loss", "mlm_loss"} & set(run.data.metrics)

    # ---- the best checkpoint by val ve_acc is kept (besides the latest) and tagged
    tags = run.data.tags
    best_step = int(tags["best_step"])
    assert accuracy[best_step] == max(accuracy.values())
    assert best is not None and Path(best[0]) == Path(tags["best_checkpoint"])
    kept = {p.name for p in (tmp_path / "ve").glob("checkpoint_*") if p.is_dir()}
    assert kept == {Path(tags["best_checkpoint"]).name, Path(result.checkpoint.path).name}
    state = torch.load(Path(tags["best_checkpoint"]) / STATE_FILE, weights_only=True)
    assert state["progress"]["step"] == best_step
    assert "head.2.weight" in state["model"] and "momentum_head.2.weight" in state["model"]
    assert not any(k.startswith("model.itm_head") for k in state["model"])

    # ---- the best checkpoint evaluates on the held-out test split
    out = tmp_path / "test.json"
    assert main(["eval", "ve", "--config", SYNTH, "--checkpoint", tags["best_checkpoint"], "--out", str(out),
                 *_overrides(dataset, tmp_path), "eval.split=test"]) == 0
    record = json.loads(out.read_text())
    assert record["num_examples"] == 24 and 0 <= record["ve_acc"] <= 100 and record["step"] == best_step

    # ---- relaunched by name (CLI --resume): continues at step 9 in the same MLflow run
    assert main(["finetune", "ve", "--config", SYNTH, "--resume", "ve", *_overrides(dataset, tmp_path),
                 f"train.epochs={EPOCHS + 1}"]) == 0
    (again,) = client.search_runs([client.get_experiment_by_name("albef-ray").experiment_id])
    assert again.info.run_id == run.info.run_id and again.info.status == "FINISHED"
    assert sorted(_history(client, run.info.run_id, "ve_acc")) == [3, 6, 9, 12]
