"""Retrieval splits read from shards, and evaluating a saved checkpoint (no Ray)."""

import json

import pytest
import torch

from albef_ray.config import ConfigError
from albef_ray.data.build.sources import parse_source_spec
from albef_ray.synth.benchmark import SynthConfig, build_synth
from albef_ray.data.build.writer import write_dataset
from albef_ray.eval import evaluate, evaluate_checkpoint, load_split, resolve_checkpoint
from albef_ray.data.collate import load_tokenizer
from albef_ray.model.albef import build_model
from albef_ray.objectives.pretrain import PretrainTask
from albef_ray.train.checkpoint import TrainProgress, save_training_state
from albef_ray.train.optim import build_optimizer
from tests.conftest import tiny_cfg
from tests.data.samples import image_bytes
from tests.data.shard_fixtures import CORRUPT, encode, solid, write_rows


def test_a_karpathy_test_json_becomes_a_split_with_captions_grouped_by_image(tmp_path):
    images = tmp_path / "images"
    images.mkdir()
    for i in range(3):
        (images / f"{i}.jpg").write_bytes(image_bytes(i, size=(50, 40)))
    annotations = [
        {"image": "0.jpg", "caption": ["A dog, running.", "the DOG runs"]},
        {"image": "1.jpg", "caption": ["a cat"]},
        {"image": "2.jpg", "caption": ["two birds", "birds on a wire", "a pair of birds"]},
    ]
    (tmp_path / "test.json").write_text(json.dumps(annotations))
    spec = f"name=coco,format=json,path={tmp_path / 'test.json'},image_root={images},split=test"
    write_dataset(tmp_path / "ds", [parse_source_spec(spec)], progress=False, shuffle_seed=None)  # input order

    split = load_split([str(tmp_path / "ds")], "test", tiny_cfg())
    assert split.images.shape == (3, 3, 32, 32) and split.images.dtype == torch.uint8  # resized to albef_tiny's 32 px
    assert split.captions == ["a dog running", "the dog runs", "a cat", "two birds", "birds on a wire", "a pair of birds"]
    assert split.txt2img.tolist() == [0, 0, 1, 2, 2, 2]
    assert split.img2txt == [[0, 1], [2], [3, 4, 5]]
    assert split.image_ids == ["coco/0.jpg", "coco/1.jpg", "coco/2.jpg"]
    with pytest.raises(ConfigError, match="eval.split"):
        load_split([str(tmp_path / "ds")], "val", tiny_cfg())


def test_rows_group_by_source_and_image_id_undecodable_images_are_counted(tmp_path):
    rows = [
        {"image": encode(solid(10)), "caption": "first of a", "image_id": "a"},
        {"image": encode(solid(20)), "caption": "b alone", "image_id": "b"},
        {"image": CORRUPT, "caption": "broken", "image_id": "c"},
        {"image": encode(solid(10)), "caption": "second of a", "image_id": "a"},  # not next to its first row
        {"image": encode(solid(30)), "caption": "another source's a", "image_id": "a", "source": "other"},
    ]
    write_rows(tmp_path / "plain" / "test" / "part-00000.parquet", rows[:3])
    write_rows(tmp_path / "plain" / "test" / "part-00001.parquet", rows[3:])
    split = load_split([str(tmp_path / "plain")], "test", tiny_cfg())  # no manifest: the folder is read
    assert split.image_ids == ["test/a", "test/b", "other/a"]
    assert split.img2txt == [[0, 1], [2], [3]] and split.captions[:2] == ["first of a", "second of a"]
    assert split.num_skipped == 1
    assert int(split.images[0, 0].float().mean()) != int(split.images[2, 0].float().mean())  # two images "a"

    first_two = load_split([str(tmp_path / "plain")], "test", tiny_cfg(eval={"max_images": 2}))
    assert first_two.image_ids == ["test/a", "test/b"] and first_two.num_texts == 3
    with_broken = load_split([str(tmp_path / "plain")], "test", tiny_cfg(eval={"max_images": 3}))
    assert with_broken.num_images == 2 and with_broken.num_skipped == 1  # the third image did not decode


@pytest.fixture(scope="module")
def synth(tmp_path_factory):
    root = tmp_path_factory.mktemp("eval_synth") / "ds"
    build_synth(root, SynthConfig(seed=1, train=16, val=2, test=12, image_size=32, eval_captions=3), progress=False)
    return root


def test_evaluate_checkpoint_reads_a_training_checkpoint_and_a_run_directory(synth, tmp_path):
    cfg = tiny_cfg(
        data={"shards": [str(synth)], "tokenizer": str(synth)}, eval={"k_test": 4},
        train={"precision": "fp32", "use_gpu": False},
    )
    run = tmp_path / "run"
    for step in (1, 2):  # two checkpoints of different weights; the later one is evaluated
        torch.manual_seed(step)
        task = PretrainTask(build_model("albef_tiny"), cfg)
        save_training_state(run / f"checkpoint_00000{step}", task, build_optimizer(task, cfg.optim), TrainProgress(step), cfg)

    split = load_split([str(synth)], "test", cfg)
    assert split.num_images == 12 and split.num_texts == 36
    want = evaluate(task.model, split, load_tokenizer(str(synth)), cfg)
    assert resolve_checkpoint(run) == run / "checkpoint_000002" / "state.pt"
    recalls = [k for k in want if k.endswith(("_r1", "_r5", "_r10", "r_mean"))]
    for checkpoint in (run, run / "checkpoint_000002", run / "checkpoint_000002" / "state.pt"):
        got = evaluate_checkpoint(cfg, str(checkpoint), device="cpu")
        assert {k: got[k] for k in recalls} == {k: want[k] for k in recalls}
        assert (got["num_images"], got["num_texts"], got["skipped_images"]) == (12, 36, 0) and got["eval_seconds"] > 0
    with pytest.raises(FileNotFoundError, match="not a checkpoint"):
        evaluate_checkpoint(cfg, str(tmp_path / "nothing"))
