"""Caption shards streamed by Ray Data into Ray Train workers, on a real local cluster (CPU)."""

import json
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from albef_ray.config import build_config
from albef_ray.launch.data import ShardStream, StreamCollate, build_pretrain_inputs

from ..data.shard_fixtures import CORRUPT, encode, make_tokenizer, solid, write_rows

pytestmark = pytest.mark.ray
ROWS, CORRUPT_ROW, EPOCHS = 41, 7, 2


@pytest.fixture(scope="module", autouse=True)
def _pickle_this_module_by_value():
    import ray.cloudpickle

    # The loop and collate below travel by value: workers need not import the tests package.
    ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])


def _dataset(root: Path) -> None:
    rows = [
        {"image": CORRUPT if i == CORRUPT_ROW else encode(solid(i * 6)), "caption": f"A red circle, {i}!",
         "image_id": f"img-{i:03d}"}
        for i in range(ROWS)
    ]
    for part, start in enumerate(range(0, ROWS, 14)):  # three files
        write_rows(root / "train" / f"part-{part:05d}.parquet", rows[start:start + 14])


class _RowCollate(StreamCollate):
    """The real collate, plus each row's global id (tests only)."""

    def __call__(self, batch):
        out = super().__call__(batch)
        out["row"] = torch.as_tensor(batch["row"])
        return out


def _record_loop(config):
    import ray.train

    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    stream = config["stream"]
    for epoch in range(config["epochs"]):
        seen = []
        for batch in stream.epoch_batches(epoch, rank, world, 0, 4):
            assert batch["image"].dtype == torch.float32 and tuple(batch["image"].shape[1:]) == (3, 32, 32)
            assert batch["input_ids"].dtype == torch.int64 and batch["input_ids"].shape[0] == 4
            seen += batch["row"].tolist()
        (Path(config["out"]) / f"rank{rank}-epoch{epoch}.json").write_text(json.dumps(seen))


def test_two_workers_read_the_epoch_order_of_seed_and_epoch(ray_cluster, tmp_path):
    import ray.train
    from ray.train.torch import TorchTrainer

    _dataset(tmp_path / "ds")
    cfg = build_config({
        "model": {"size": "albef_tiny", "vit_init": None, "bert_init": None},
        "momentum": {"queue_size": 32},
        "train": {"batch_size": 4, "num_workers": 2, "cpus_per_worker": 0.5, "use_gpu": False},
        "data": {"shards": [str(tmp_path / "ds")], "tokenizer": make_tokenizer(tmp_path / "tok"),
                 "map_batch_size": 4, "shuffle_buffer": 8},
    })
    datasets, steps_per_epoch, collate, special = build_pretrain_inputs(cfg)
    stream = datasets["train"]
    assert isinstance(stream, ShardStream) and isinstance(collate, StreamCollate) and special.cls == 2
    assert steps_per_epoch == ROWS // 8 and stream.order.total_rows == ROWS
    stream.collate.__class__ = _RowCollate

    out = tmp_path / "seen"
    out.mkdir()
    trainer = TorchTrainer(
        _record_loop,
        train_loop_config={"out": str(out), "epochs": EPOCHS, "stream": stream},
        scaling_config=ray.train.ScalingConfig(num_workers=2, resources_per_worker={"CPU": 0.5}),
        run_config=ray.train.RunConfig(name="streaming", storage_path=str(tmp_path / "runs")),
    )
    trainer.fit()

    seen = {(r, e): json.loads((out / f"rank{r}-epoch{e}.json").read_text()) for r in (0, 1) for e in range(EPOCHS)}
    for epoch in range(EPOCHS):
        for rank in (0, 1):
            expected = [i for i in stream.order.worker_rows(epoch, rank, 2).tolist() if i != CORRUPT_ROW]
            full = len(expected) // 4 * 4
            assert seen[rank, epoch] == expected[:full]  # the order function's rows, in its order, full batches
        assert not set(seen[0, epoch]) & set(seen[1, epoch])  # no row on both workers
        assert len(seen[0, epoch]) + len(seen[1, epoch]) > ROWS - 1 - 2 * 4  # at most a partial batch left per worker
    orders = [seen[0, e] + seen[1, e] for e in range(EPOCHS)]
    assert orders[0] != orders[1]
    assert np.mean([a == b for a, b in zip(*orders)]) < 0.5  # reshuffled, not a rotation of one row


def test_every_epoch_ends_with_its_checkpoint_when_undecodable_rows_shorten_it(ray_cluster, tmp_path):
    from mlflow.tracking import MlflowClient

    from albef_ray.launch.train import run_pretrain

    corrupt = {2, 9, 16}
    rows = [  # 18 rows count as 4 batches of 4, but 15 decode: each epoch's stream runs out after 3
        {"image": CORRUPT if i in corrupt else encode(solid(i * 10)), "caption": "a red circle", "image_id": str(i)}
        for i in range(18)
    ]
    write_rows(tmp_path / "ds" / "train" / "part-00000.parquet", rows)
    cfg = build_config({
        "model": {"size": "albef_tiny", "vit_init": None, "bert_init": None},
        "momentum": {"queue_size": 32},
        "train": {"batch_size": 4, "num_workers": 1, "cpus_per_worker": 0.5, "use_gpu": False, "epochs": 2,
                  "log_every_steps": 1, "precision": "fp32", "keep_checkpoints": 10},
        "data": {"shards": [str(tmp_path / "ds")], "tokenizer": make_tokenizer(tmp_path / "tok"),
                 "map_batch_size": 8},
        "run": {"storage_path": str(tmp_path), "name": "shards"},
    })
    result = run_pretrain(cfg, echo=lambda *_: None)
    assert result.metrics["step"] == 6 and result.metrics["epoch"] == 2
    ends = sorted((m["epoch"], m["step"]) for _, m in result.best_checkpoints)
    assert ends == [(1, 3), (2, 6)]  # a checkpoint (and report) at each epoch's end

    client = MlflowClient(f"sqlite:///{tmp_path}/mlflow.db")
    run = client.search_runs([client.get_experiment_by_name("albef-ray").experiment_id])[0]
    assert run.info.status == "FINISHED"
    dropped = client.get_metric_history(run.info.run_id, "dropped_rows")
    assert len(dropped) == 6 and sum(m.value for m in dropped) == 6  # the corrupt rows reached the metrics
