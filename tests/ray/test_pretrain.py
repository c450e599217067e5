"""Pretraining on a real local Ray cluster with a real MLflow store (CPU, albef_tiny)."""

import copy
import json
import sys
import uuid
from pathlib import Path

import numpy as np
import pytest
import torch

from albef_ray.config import load_config
from albef_ray.launch.data import ShardStream, StreamCollate
from albef_ray.train.checkpoint import STATE_FILE

from ..data.shard_fixtures import CORRUPT, WORDS, encode, make_tokenizer, write_rows

pytestmark = pytest.mark.ray
DEMO = str(Path(__file__).resolve().parents[2] / "experiments" / "demo_cpu.yaml")


@pytest.fixture(scope="module", autouse=True)
def _pickle_this_module_by_value():
    import ray.cloudpickle

    # The recording stream below travels by value: workers need not import the tests package.
    ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])


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


class _RowCollate(StreamCollate):
    """The real collate, plus each row's global id (tests only)."""

    def __call__(self, batch):
        out = super().__call__(batch)
        out["row"] = torch.as_tensor(batch["row"])
        return out


class _RecordingStream(ShardStream):
    """The real stream; records the rows each worker trains on and every row decoded (tests only)."""

    def __init__(self, stream: ShardStream, out: Path):
        collate = copy.copy(stream.collate)
        collate.__class__ = _RowCollate
        super().__init__(stream.order, stream.spec, stream.max_words, collate)
        self.out = str(out)

    def decode(self, batch, epoch):
        for decoded in super().decode(batch, epoch):
            # one file per chunk: decode tasks run in several processes
            record = {"epoch": epoch, "rows": decoded["row"].tolist()}
            (Path(self.out) / f"decoded-{uuid.uuid4().hex}.json").write_text(json.dumps(record))
            yield decoded

    def epoch_batches(self, epoch, rank, world, position, batch_size, device=None):
        batches = []
        try:
            for batch in super().epoch_batches(epoch, rank, world, position, batch_size, device):
                batches.append((batch, batch.pop("row").tolist()))
                yield batch
        finally:  # the loop pops "position" from each batch it trains on; the others were fetched only
            trained = [rows for batch, rows in batches if "position" not in batch]
            name = f"trained-e{epoch}-r{rank}-p{position}.json"
            (Path(self.out) / name).write_text(json.dumps(sum(trained, [])))


def _resume_data(root: Path) -> None:
    """72 rows in three files, textured images, three undecodable."""
    rows = [
        {"image": CORRUPT if i in (5, 30, 61) else encode(np.random.default_rng(i).integers(0, 256, (24, 32, 3), np.uint8)),
         "caption": f"a {WORDS[i % 6]} {WORDS[6 + i % 4]}", "image_id": f"{i}"}
        for i in range(72)
    ]
    for part, start in enumerate(range(0, 72, 24)):
        write_rows(root / "train" / f"part-{part:05d}.parquet", rows[start:start + 24])


def _fit_recorded(cfg, out: Path):
    from albef_ray.launch.data import build_pretrain_inputs
    from albef_ray.launch.common import absolute_data_paths, init_ray
    from albef_ray.launch.train import launch_pretrain

    out.mkdir(parents=True)
    cfg = absolute_data_paths(cfg)
    init_ray(cfg)
    datasets, steps, _, special = build_pretrain_inputs(cfg)
    stream = _RecordingStream(datasets["train"], out)
    result, *_ = launch_pretrain(cfg, {"train": stream}, steps, stream.collate, special)
    return result, stream.order


def _trained(out: Path, epoch: int, rank: int) -> list[int]:
    parts = sorted(out.glob(f"trained-e{epoch}-r{rank}-p*.json"), key=lambda p: int(p.stem.rsplit("-p", 1)[1]))
    return sum((json.loads(p.read_text()) for p in parts), [])


def test_resume_mid_epoch_trains_exactly_the_rows_of_a_straight_run(ray_cluster, tmp_path):
    _resume_data(tmp_path / "ds")
    common = ["train.num_workers=2", "train.batch_size=4", "train.epochs=2", "train.steps_per_epoch=null",
              "train.max_steps=null", "train.checkpoint_every_steps=1000", "tracking.enabled=false",
              f"data.shards=[{tmp_path / 'ds'}]", f"data.tokenizer={make_tokenizer(tmp_path / 'tok')}",
              "data.map_batch_size=4", "data.shuffle_buffer=12"]  # windows of 3 blocks: rows mixed across blocks
    straight, order = _fit_recorded(_cfg(tmp_path, *common, "run.name=straight"), tmp_path / "straight")
    first, _ = _fit_recorded(_cfg(tmp_path, *common, "train.max_steps=5", "run.name=resumed"), tmp_path / "first")
    resumed, _ = _fit_recorded(_cfg(tmp_path, *common, "run.name=resumed"), tmp_path / "second")
    assert first.metrics["step"] == 5 and resumed.return_value["start_step"] == 5  # continued mid-epoch 0

    for rank in (0, 1):
        # every worker trained on the straight run's rows, in its order, across the interruption
        assert _trained(tmp_path / "first", 0, rank) + _trained(tmp_path / "second", 0, rank) == \
            _trained(tmp_path / "straight", 0, rank)
        assert _trained(tmp_path / "second", 1, rank) == _trained(tmp_path / "straight", 1, rank)
        assert len(_trained(tmp_path / "first", 0, rank)) == 5 * 4
    straight_rows = [_trained(tmp_path / "straight", 0, r) for r in (0, 1)]
    assert not set(straight_rows[0]) & set(straight_rows[1])
    assert straight_rows[0] != sorted(straight_rows[0])  # shuffled rows, not file order
    # the epoch ended by a stream running out (3 undecodable rows), not by the row count's 9 steps
    steps_epoch0 = len(straight_rows[0]) // 4
    assert steps_epoch0 < 72 // 8 and straight.metrics["epoch"] == 2

    # nothing before a worker's resume point was decoded again
    trained_before = set(_trained(tmp_path / "first", 0, 0) + _trained(tmp_path / "first", 0, 1))
    decoded = [json.loads(p.read_text()) for p in (tmp_path / "second").glob("decoded-*.json")]
    assert decoded and not trained_before & {r for d in decoded if d["epoch"] == 0 for r in d["rows"]}

    a, b = _final_state(straight), _final_state(resumed)
    assert a["progress"]["step"] == b["progress"]["step"] == straight.metrics["step"]
    for key, value in a["model"].items():  # parameters, momentum parameters, queues, pointer
        torch.testing.assert_close(b["model"][key], value, atol=1e-6, rtol=1e-5, msg=key)


def test_killed_worker_run_completes_from_checkpoint(ray_cluster, tmp_path):
    from albef_ray.launch.faults import FAULT_MARKER
    from albef_ray.launch.train import run_pretrain

    cfg = _cfg(tmp_path, "train.num_workers=2", "train.steps_per_epoch=10", "train.max_steps=8",
               "train.checkpoint_every_steps=3", "run.fail_at_step=5", "run.max_failures=1",
               "tracking.enabled=false", "run.name=faulty")
    result = run_pretrain(cfg, echo=lambda *_: None)
    assert (tmp_path / "faulty" / FAULT_MARKER).exists()  # the fault really fired
    assert result.metrics["step"] == 8
    # the restarted group began at the last checkpoint (the fault waits until Ray has registered it)
    assert result.return_value["start_step"] == 3
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
