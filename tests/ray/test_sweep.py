"""Ablation sweeps on a real local Ray cluster and a real MLflow store (CPU, albef_tiny).

One module-scoped sweep of two variants x one seed: the second variant's worker dies after step 3
(``run.fail_at_step``, a test-only switch that fires once; a checkpoint every step) with no retries, so the sweep ends
with one finished and one failed trial. Running it again resumes: only the failed trial runs,
from its last checkpoint, in the same MLflow child run. The second variant's stages run on one
worker each, so they chain in one Train run (``launch_chain``); the first pretrains on two
workers and fine-tunes on one: a Train run per stage.
"""

from pathlib import Path

import pytest
import yaml

pytestmark = pytest.mark.ray
DEMO = Path(__file__).resolve().parents[2] / "experiments" / "demo_cpu.yaml"
STEPS = 4
FT_STEPS = 2


def _write_sweep(root: Path, data: Path) -> Path:
    base = {
        "base": str(DEMO), "name": "sweep_test",
        "run": {"storage_path": str(root / "runs"), "max_failures": 0},
        "data": {"shards": [str(data)], "tokenizer": str(data / "tokenizer"), "shuffle_buffer": 32,
                 "map_batch_size": 16},  # 160 rows: 5 windows of 32, enough for 2 workers
        "train": {"steps_per_epoch": None, "max_steps": STEPS, "log_every_steps": 1, "checkpoint_every_steps": 1,
                  "batch_size": 8, "num_workers": 2},
        "momentum": {"queue_size": 64},
        "eval": {"max_images": 12, "k_test": 4},
    }
    (root / "base.yaml").write_text(yaml.safe_dump(base))
    finetune = {  # the downstream stage: retrieval fine-tuning on the val split, 1 worker
        **base, "task": "retrieval", "mlm": {"enabled": False}, "mod": {"mlm": False},
        "data": {**base["data"], "train_split": "val"},
        "train": {**base["train"], "max_steps": FT_STEPS, "num_workers": 1},
        "eval": {**base["eval"], "every_epoch": False},
    }
    (root / "ft.yaml").write_text(yaml.safe_dump(finetune))
    spec = {
        "name": "two_variants", "base": "base.yaml",
        "variants": {
            "ITC+MLM+ITM": {"itm.hard_negatives": False, "mod.itc": False, "mod.mlm": False},
            # One worker in both stages: pretraining and fine-tuning chain in one Train run. The
            # other variant pretrains on 2 workers: one Train run per stage, evaluations as tasks.
            "MLM+ITM": {"itc.enabled": False, "itm.hard_negatives": False, "mod.itc": False, "mod.mlm": False,
                        "run.fail_at_step": 3, "train.num_workers": 1},
        },
        "seeds": [7], "max_failures": 0,
        "downstream": [{"name": "retrieval", "experiment": "ft.yaml"}],
    }
    path = root / "two.yaml"
    path.write_text(yaml.safe_dump(spec, sort_keys=False))
    return path


@pytest.fixture(scope="module")
def swept(ray_cluster, tmp_path_factory):
    """(sweep, first outcome, resumed outcome, MLflow child runs after each)."""
    from mlflow.tracking import MlflowClient

    from albef_ray.cli import main
    from albef_ray.launch.sweep import run_sweep
    from albef_ray.sweep import load_sweep

    root = tmp_path_factory.mktemp("sweep")
    data = root / "synth"
    assert main(["data", "synth", str(data), "--train", "160", "--val", "8", "--test", "12",
                 "--image-size", "32", "--no-progress"]) == 0
    sweep = load_sweep(_write_sweep(root, data))
    first = run_sweep(sweep, echo=lambda *_: None)
    client = MlflowClient(first.tracking_uri)

    def children():
        exp = client.get_experiment_by_name("albef-ray").experiment_id
        return client.search_runs([exp], f"tags.`mlflow.parentRunId` = '{first.parent_run_id}'")

    before = {r.data.tags["trial"]: r for r in children()}
    resumed = run_sweep(load_sweep(sweep.path), echo=lambda *_: None)
    after = {r.data.tags["trial"]: r for r in children()}
    return sweep, first, resumed, before, after, client


def test_failed_trial_is_reported_and_the_other_finishes(swept):
    sweep, first, _, before, _, client = swept
    assert first.finished == ["ITC+MLM+ITM-seed7"]
    assert list(first.failed) == ["MLM+ITM-seed7"]
    assert before["ITC+MLM+ITM-seed7"].info.status == "FINISHED"
    parent = client.get_run(first.parent_run_id)
    assert parent.data.tags["sweep"] == "two_variants" and parent.data.tags["sweep_role"] == "parent"


def test_child_runs_have_params_per_step_metrics_and_retrieval(swept):
    _, first, _, _, after, client = swept
    assert set(after) == {"ITC+MLM+ITM-seed7", "MLM+ITM-seed7"}
    for key, run in after.items():
        params, metrics = run.data.params, run.data.metrics
        assert run.info.status == "FINISHED", key
        assert params["variant"] == run.data.tags["variant"] == key.removesuffix("-seed7")
        assert params["seed"] == "7" and params["sweep"] == "two_variants"
        assert params["model.size"] == "albef_tiny" and params["train.max_steps"] == str(STEPS)
        assert params["itc.enabled"] == str(key.startswith("ITC"))
        steps = sorted(m.step for m in client.get_metric_history(run.info.run_id, "loss"))
        assert sorted(set(steps)) == list(range(1, STEPS + 1)), key  # every step
        for stage in ("zeroshot", "retrieval"):  # after pretraining, and after fine-tuning
            for name in ("txt_r1", "txt_r5", "txt_r10", "img_r1", "img_r5", "img_r10", "r_mean"):
                assert 0.0 <= metrics[f"{stage}/{name}"] <= 100.0, (key, stage, name)
            assert metrics[f"{stage}/num_images"] == 12
        # Held-out ITM accuracy is a zero-shot column; the fine-tuning stage logs only its training itm_acc.
        assert 0.0 <= metrics["zeroshot/itm_acc"] <= 1.0 and "zeroshot/itm_acc_pos" in metrics
        assert "retrieval/itm_acc_pos" not in metrics and "retrieval/itm_acc" in metrics
        # The fine-tuning stage's per-step metrics are in the same run, prefixed.
        ft_steps = sorted(m.step for m in client.get_metric_history(run.info.run_id, "retrieval/loss"))
        assert sorted(set(ft_steps)) == list(range(1, FT_STEPS + 1)), key
        assert params["task"] == "pretrain"
    assert "itc_loss" in after["ITC+MLM+ITM-seed7"].data.metrics
    assert "itc_loss" not in after["MLM+ITM-seed7"].data.metrics


def test_resume_runs_only_the_failed_trial_from_its_checkpoint(swept):
    _, first, resumed, before, after, client = swept
    assert resumed.resumed and resumed.parent_run_id == first.parent_run_id
    assert sorted(resumed.finished) == ["ITC+MLM+ITM-seed7", "MLM+ITM-seed7"] and not resumed.failed
    done = "ITC+MLM+ITM-seed7"
    assert after[done].info.run_id == before[done].info.run_id  # not re-created ...
    assert after[done].info.end_time == before[done].info.end_time  # ... nor touched again
    failed = "MLM+ITM-seed7"
    assert after[failed].info.run_id == before[failed].info.run_id  # the retry logs into the same run
    # Steps 1-3 were logged before the worker died; the retry continued from a checkpoint (step 2
    # or 3: Ray may not have registered the last one before it saw the failure), not from scratch.
    steps = sorted(m.step for m in client.get_metric_history(after[failed].info.run_id, "loss"))
    assert steps in ([1, 2, 3, 4], [1, 2, 3, 3, 4]), steps
    done_steps = sorted(m.step for m in client.get_metric_history(after[done].info.run_id, "loss"))
    assert done_steps == [1, 2, 3, 4]  # the finished trial did not train again
    assert client.get_run(first.parent_run_id).info.status == "FINISHED"


def test_stages_on_equal_workers_chain_in_one_train_run(swept):
    from albef_ray.launch.train import read_stage_marker

    sweep, first, _, _, after, _ = swept
    trials = first.sweep_dir / "trials"
    assert not (trials / "MLM+ITM-seed7-retrieval").exists()  # chained: one Train run
    assert (trials / "ITC+MLM+ITM-seed7-retrieval").is_dir()  # 2 workers, then 1: a run per stage
    last = sorted(p for p in trials.glob("MLM+ITM-seed7/checkpoint_*") if p.is_dir())[-1]
    marker = read_stage_marker(last)
    assert marker["stage"] == 1 and marker["finished"]  # the fine-tuning stage, ended
    metrics = after["MLM+ITM-seed7"].data.metrics
    for prefix in ("zeroshot", "retrieval"):  # each stage's evaluation, carried in the checkpoint
        assert marker["evals"][prefix]["r_mean"] == pytest.approx(metrics[f"{prefix}/r_mean"])
    assert marker["evals"]["zeroshot"]["itm_acc"] == pytest.approx(metrics["zeroshot/itm_acc"])
    # Pretraining's final checkpoint outlives retention (a checkpoint every step, 3 kept) and is
    # recorded where a per-stage trial records it.
    import json

    done = json.loads((trials / "MLM+ITM-seed7" / "stages.json").read_text())
    pretrained = Path(done["train:pretrain"]["checkpoint"])
    assert pretrained.is_file() and done["train:pretrain"]["step"] == STEPS
    assert read_stage_marker(pretrained.parent) == {**read_stage_marker(pretrained.parent), "stage": 0, "finished": True}
    assert done["eval:zeroshot"]["r_mean"] == pytest.approx(metrics["zeroshot/r_mean"])
    tags = after["MLM+ITM-seed7"].data.tags
    assert "step 4, the end of stage 0" in tags["eval.zeroshot.checkpoint"]
    assert f"step {FT_STEPS}, the end of stage 1" in tags["eval.retrieval.checkpoint"]


def test_compare_reads_the_sweep_back(swept, tmp_path):
    from albef_ray.compare import compare_sweep

    _, first, _, _, after, client = swept
    lines = []
    result = compare_sweep(first.tracking_uri, tmp_path, sweep="two_variants", echo=lines.append)
    assert result.parent_run_id == first.parent_run_id
    assert [row.variant for row in result.rows] == ["ITC+MLM+ITM", "MLM+ITM"]  # the sweep file's order
    for row in result.rows:
        run = after[f"{row.variant}-seed7"]
        for key in ("retrieval/txt_r_mean", "retrieval/img_r_mean", "zeroshot/itm_acc"):
            assert row.stats[key].mean == pytest.approx(run.data.metrics[key])
            assert row.stats[key].std is None and row.seeds == [7]
    assert "| ITC+MLM+ITM | 1 |" in result.markdown and "retrieval TR" in "\n".join(lines)
    assert "MLM+ITM vs ITC+MLM+ITM, retrieval TR" in "\n".join(lines)  # one seed: stated, not judged
    for name in ("table.md", "table.csv", "recalls.png", "loss_curves.png"):
        assert (tmp_path / name).stat().st_size > 0
    logged = {a.path for a in client.list_artifacts(first.parent_run_id, "comparison")}
    assert {"comparison/table.md", "comparison/table.csv", "comparison/recalls.png", "comparison/loss_curves.png"} <= logged
