"""Caption shards streamed by Ray Data into Ray Train workers, on a real local cluster (CPU)."""

import json
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from albef_ray.config import build_config
from albef_ray.launch.data import CaptionCollate, build_pretrain_inputs

from ..data.shard_fixtures import CORRUPT, encode, make_tokenizer, solid, write_rows

pytestmark = pytest.mark.ray
ROWS, CORRUPT_ROW, EPOCHS = 41, 7, 2  # 40 decodable rows: an equal split over 2 workers


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


class _IdCollate(CaptionCollate):
    """The real collate, plus each row's image_id as an int (tests only: ids are strings)."""

    def __call__(self, batch):
        out = super().__call__(batch)
        out["row"] = torch.tensor([int(i.split("-")[1]) for i in batch["image_id"]])
        return out


def _record_loop(config):
    import ray.train

    rank = ray.train.get_context().get_world_rank()
    shard = ray.train.get_dataset_shard("train")
    for epoch in range(config["epochs"]):
        seen, dropped = [], 0
        for batch in shard.iter_torch_batches(collate_fn=config["collate"], **config["iter"]):
            assert batch["image"].dtype == torch.float32 and tuple(batch["image"].shape[1:]) == (3, 32, 32)
            assert batch["input_ids"].dtype == torch.int64 and batch["input_ids"].shape[0] == batch["image"].shape[0]
            seen += batch["row"].tolist()
            dropped += int(batch["num_dropped"])
        path = Path(config["out"]) / f"rank{rank}-epoch{epoch}.json"
        path.write_text(json.dumps({"seen": seen, "dropped": dropped}))


def test_two_workers_see_every_row_once_per_epoch_in_new_orders(ray_cluster, tmp_path):
    import ray.train
    from ray.train.torch import TorchTrainer

    _dataset(tmp_path / "ds")
    cfg = build_config({
        "model": {"size": "albef_tiny", "vit_init": None, "bert_init": None},
        "momentum": {"queue_size": 32},
        "train": {"batch_size": 4, "num_workers": 2, "cpus_per_worker": 0.5, "use_gpu": False},
        "data": {"shards": [str(tmp_path / "ds")], "tokenizer": make_tokenizer(tmp_path / "tok"),
                 "map_batch_size": 8, "shuffle_buffer": 8},
    })
    datasets, steps_per_epoch, collate, special = build_pretrain_inputs(cfg)
    assert steps_per_epoch == ROWS // 8 and special.cls == 2 and isinstance(collate, CaptionCollate)

    out = tmp_path / "seen"
    out.mkdir()
    trainer = TorchTrainer(
        _record_loop,
        train_loop_config={
            "out": str(out), "epochs": EPOCHS,
            "collate": _IdCollate(cfg.data.tokenizer, cfg.data.max_text_len),
            "iter": {"batch_size": 4, "drop_last": False, "local_shuffle_buffer_size": 8},
        },
        scaling_config=ray.train.ScalingConfig(num_workers=2, resources_per_worker={"CPU": 0.5}),
        run_config=ray.train.RunConfig(name="streaming", storage_path=str(tmp_path / "runs")),
        datasets=datasets,
    )
    trainer.fit()

    valid = sorted(i for i in range(ROWS) if i != CORRUPT_ROW)
    records = {(r, e): json.loads((out / f"rank{r}-epoch{e}.json").read_text()) for r in (0, 1) for e in range(EPOCHS)}
    for epoch in range(EPOCHS):
        per_rank = [records[r, epoch]["seen"] for r in (0, 1)]
        assert sorted(per_rank[0] + per_rank[1]) == valid  # every row exactly once, across workers
        assert len(per_rank[0]) == len(per_rank[1]) == len(valid) // 2
        assert records[0, epoch]["dropped"] + records[1, epoch]["dropped"] == 1  # the corrupt row, counted
    orders = [records[0, e]["seen"] + records[1, e]["seen"] for e in range(EPOCHS)]
    assert orders[0] != orders[1]
    assert np.mean([a == b for a, b in zip(*orders)]) < 0.5  # reshuffled, not a rotation of one row


def test_pretraining_on_shards_logs_dropped_rows(ray_cluster, tmp_path):
    from mlflow.tracking import MlflowClient

    from albef_ray.launch.train import run_pretrain

    rows = [  # 16 decodable rows + 1 corrupt: 4 full batches of 4, none left over
        {"image": CORRUPT if i == 5 else encode(solid(i * 10)), "caption": "a red circle", "image_id": str(i)}
        for i in range(17)
    ]
    write_rows(tmp_path / "ds" / "train" / "part-00000.parquet", rows)
    cfg = build_config({
        "model": {"size": "albef_tiny", "vit_init": None, "bert_init": None},
        "momentum": {"queue_size": 32},
        "train": {"batch_size": 4, "num_workers": 1, "cpus_per_worker": 0.5, "use_gpu": False, "epochs": 1,
                  "log_every_steps": 1, "precision": "fp32"},
        "data": {"shards": [str(tmp_path / "ds")], "tokenizer": make_tokenizer(tmp_path / "tok"),
                 "map_batch_size": 8},
        "run": {"storage_path": str(tmp_path), "name": "shards"},
    })
    result = run_pretrain(cfg, echo=lambda *_: None)
    assert result.metrics["step"] == 4

    client = MlflowClient(f"sqlite:///{tmp_path}/mlflow.db")
    run = client.search_runs([client.get_experiment_by_name("albef-ray").experiment_id])[0]
    dropped = client.get_metric_history(run.info.run_id, "dropped_rows")
    assert len(dropped) == 4 and sum(m.value for m in dropped) == 1  # the corrupt row reached the metrics
