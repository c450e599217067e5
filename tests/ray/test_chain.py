"""A chained run (``launch_chain``: pretraining then retrieval fine-tuning in one TorchTrainer) on
a real local Ray cluster and MLflow store, with a worker lost in the second stage.

The guarantee: a restart continues in the stage of the last checkpoint; the finished stage is
neither trained nor evaluated again, and the second stage loses at most one checkpoint interval.
"""

from pathlib import Path

import pytest

pytestmark = pytest.mark.ray
DEMO = Path(__file__).resolve().parents[2] / "experiments" / "demo_cpu.yaml"
STEPS, FT_STEPS = 4, 3


@pytest.fixture(scope="module")
def chained(ray_cluster, tmp_path_factory):
    from mlflow.tracking import MlflowClient

    from albef_ray.cli import main
    from albef_ray.config import load_config, with_overrides
    from albef_ray.launch.common import absolute_data_paths, run_paths
    from albef_ray.launch.train import launch_chain
    from albef_ray.tasks import get_task
    from albef_ray.tracking import open_run, resolve_tracking_uri

    root = tmp_path_factory.mktemp("chain")
    data = root / "synth"
    assert main(["data", "synth", str(data), "--train", "96", "--val", "8", "--test", "12",
                 "--image-size", "32", "--no-progress"]) == 0
    common = {
        "run.storage_path": str(root / "runs"), "run.name": "chain", "run.max_failures": 1,
        "data.shards": [str(data)], "data.tokenizer": str(data / "tokenizer"), "data.shuffle_buffer": 32,
        "data.map_batch_size": 16, "train.steps_per_epoch": None, "train.log_every_steps": 1,
        "train.checkpoint_every_steps": 1, "train.batch_size": 8, "train.num_workers": 1,
        "momentum.queue_size": 32, "eval.max_images": 12, "eval.k_test": 4, "seed": 3,
    }
    pretrain = absolute_data_paths(with_overrides(load_config(DEMO), {**common, "train.max_steps": STEPS}))
    finetune = absolute_data_paths(with_overrides(load_config(DEMO), {
        **common, "task": "retrieval", "mlm.enabled": False, "mod.mlm": False, "data.train_split": "val",
        "train.max_steps": FT_STEPS, "eval.every_epoch": False, "tracking.metric_prefix": "retrieval/",
        "run.fail_at_step": 1,  # the worker dies once, after the first fine-tuning step
    }))
    paths = run_paths(pretrain)
    uri = resolve_tracking_uri(pretrain, paths.storage)
    run_id = open_run(pretrain, uri, paths.run_dir, "chain", {})
    stages = [(pretrain, get_task("pretrain").evaluate(), "zeroshot"),
              (finetune, get_task("retrieval").evaluate(), "retrieval")]
    result, evals, finals = launch_chain(stages, run_id=run_id)
    return paths.run_dir, result, evals, finals, MlflowClient(uri), run_id


def test_a_lost_worker_in_the_second_stage_does_not_redo_the_first(chained):
    run_dir, result, evals, finals, client, run_id = chained
    assert (run_dir / "fault_injected").exists()  # the fault fired (and only once)

    def steps(key):
        return sorted(m.step for m in client.get_metric_history(run_id, key))

    assert steps("loss") == list(range(1, STEPS + 1))  # pretraining ran once
    assert steps("zeroshot/r_mean") == [STEPS]  # and was evaluated once, at its last step
    # Fine-tuning continued from its step-1 checkpoint: step 2 may be logged twice, nothing lost.
    assert steps("retrieval/loss") in ([1, 2, 3], [1, 2, 2, 3]), steps("retrieval/loss")
    assert steps("retrieval/r_mean") == [FT_STEPS]
    assert result.metrics["step"] == FT_STEPS


def test_each_stage_reports_its_evaluation_and_keeps_its_final_checkpoint(chained):
    from albef_ray.launch.train import read_stage_marker

    run_dir, result, evals, finals, client, run_id = chained
    assert set(evals) == {"zeroshot", "retrieval"}
    metrics = client.get_run(run_id).data.metrics
    for prefix, values in evals.items():
        assert values["r_mean"] == pytest.approx(metrics[f"{prefix}/r_mean"])
        assert 0.0 <= values["r_mean"] <= 100.0 and values["num_images"] == 12
    assert 0.0 <= evals["zeroshot"]["itm_acc"] <= 1.0 and "itm_acc" not in evals["retrieval"]
    assert sorted(finals) == [0, 1]
    assert finals[0][1] == STEPS and finals[1][1] == FT_STEPS
    first = read_stage_marker(finals[0][0])
    assert first["stage"] == 0 and first["finished"] and set(first["evals"]) == {"zeroshot"}
    second = read_stage_marker(result.checkpoint.path)
    assert second["stage"] == 1 and second["finished"] and second["evals"]["zeroshot"] == first["evals"]["zeroshot"]
    # Retention (a checkpoint every step, 3 kept) kept pretraining's final checkpoint all the same.
    kept = [p for p in run_dir.glob("checkpoint_*") if p.is_dir()]
    assert len(kept) == 2 + 3 and Path(finals[0][0]) in kept
