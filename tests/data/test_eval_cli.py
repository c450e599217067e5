"""`albef-ray eval retrieval`: table, JSON, MLflow (the training run's, or one of its own), exit codes."""

import json
from pathlib import Path

import pytest

from albef_ray.cli import main
from albef_ray.config import load_config
from albef_ray.synth.benchmark import SynthConfig, build_synth
from albef_ray.tracking import open_run
from albef_ray.model.albef import build_model
from albef_ray.objectives.pretrain import PretrainTask
from albef_ray.train.checkpoint import TrainProgress, save_training_state
from albef_ray.train.optim import build_optimizer

DEMO = str(Path(__file__).resolve().parents[2] / "experiments" / "demo_cpu.yaml")


@pytest.fixture(scope="module")
def synth(tmp_path_factory):
    root = tmp_path_factory.mktemp("cli_synth") / "ds"
    build_synth(root, SynthConfig(seed=2, train=8, val=2, test=10, image_size=32, eval_captions=3), progress=False)
    return root


def _overrides(synth, storage):
    return [f"data.shards=[{synth}]", f"data.tokenizer={synth}", "eval.k_test=4", f"run.storage_path={storage}"]


def _client(storage):
    from mlflow.tracking import MlflowClient

    client = MlflowClient(f"sqlite:///{storage}/mlflow.db")
    return client, client.get_experiment_by_name("albef-ray").experiment_id


def test_a_checkpoint_of_a_training_run_is_logged_into_that_run(synth, tmp_path, capsys):
    storage = tmp_path / "runs"
    overrides = _overrides(synth, storage)
    cfg = load_config(DEMO, overrides)
    run_dir = storage / "pretrain-1"
    run_id = open_run(cfg, f"sqlite:///{storage}/mlflow.db", run_dir, "pretrain-1", {})  # as `albef-ray pretrain` does
    task = PretrainTask(build_model("albef_tiny"), cfg)
    save_training_state(run_dir / "checkpoint_000000", task, build_optimizer(task, cfg.optim), TrainProgress(step=7), cfg)

    out = tmp_path / "results.json"
    assert main(["eval", "retrieval", "--config", DEMO, "--checkpoint", str(run_dir), "--out", str(out), *overrides]) == 0
    printed = capsys.readouterr().out
    assert "split test: 10 images, 30 captions" in printed and "text retrieval" in printed and "image retrieval" in printed
    assert f"MLflow run {run_id}" in printed
    record = json.loads(out.read_text())
    assert record["step"] == 7 and record["checkpoint"] == str(run_dir / "checkpoint_000000" / "state.pt")
    assert record["num_images"] == 10 and 0 <= record["txt_r1"] <= record["txt_r5"] <= record["txt_r10"] <= 100

    client, experiment = _client(storage)
    assert len(client.search_runs([experiment])) == 1  # no run of its own
    history = client.get_metric_history(run_id, "test/r_mean")
    assert [(m.step, m.value) for m in history] == [(7, pytest.approx(record["r_mean"]))]
    run = client.get_run(run_id)
    assert run.data.tags["eval.test.k_test"] == "4" and run.data.tags["eval.test.score"] == "itm"
    assert "retrieval_test.json" in {a.path for a in client.list_artifacts(run_id)}


def test_initial_weights_are_logged_into_a_run_of_their_own(synth, tmp_path, capsys):
    storage = tmp_path / "runs"
    assert main(["eval", "retrieval", "--config", DEMO, *_overrides(synth, storage), "eval.score=itm_itc"]) == 0
    client, experiment = _client(storage)
    (run,) = client.search_runs([experiment])
    assert run.info.status == "FINISHED" and run.data.tags["kind"] == "eval"
    assert run.data.params["eval.score"] == "itm_itc" and "test/img_r10" in run.data.metrics
    assert f"MLflow run {run.info.run_id}" in capsys.readouterr().out


def test_errors_exit_2_with_one_line(synth, tmp_path, capsys):
    storage = tmp_path / "runs"
    base = ["eval", "retrieval", "--config", DEMO, *_overrides(synth, storage)]
    assert main([*base, "eval.k_test=0"]) == 2
    assert capsys.readouterr().err.strip().splitlines() == [
        "albef-ray: config error: eval.k_test: Input should be greater than or equal to 1"
    ]
    assert main([*base, "--checkpoint", str(tmp_path / "missing")]) == 2
    assert "eval error" in capsys.readouterr().err
    assert main([*base, "eval.split=nosuch"]) == 2
    assert "eval.split" in capsys.readouterr().err
    assert not (storage / "mlflow.db").exists()  # nothing was logged
    with pytest.raises(SystemExit):
        main(["eval", "retrieval"])  # --config is required
