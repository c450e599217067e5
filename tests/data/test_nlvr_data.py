"""NLVR2 data: the official JSON read into pair rows (bad images and empty statements skipped and
counted), the embedded generator's statements decided by the scenes, and a few training steps
plus an evaluation on a tiny generated set."""

from __future__ import annotations

import json
import math

import pyarrow.parquet as pq
import pytest

from albef_ray.config import build_config
from albef_ray.data.build.nlvr import NLVRJsonSource, nlvr_label
from albef_ray.data.build.sources import TASK_SOURCE_MODULES
from albef_ray.data.build.writer import write_dataset
from albef_ray.data.manifest import shard_paths
from albef_ray.data.tokenizer import load_tokenizer
from albef_ray.eval.examples import iter_examples
from albef_ray.eval.nlvr import evaluate
from albef_ray.synth.nlvr import Description, Statement, plan
from albef_ray.synth.scenes import Scene, Thing
from albef_ray.synth.tasks import SynthTaskSettings
from albef_ray.tasks import build_task, get_task
from albef_ray.train.loop import Schedule, train_step
from albef_ray.train.optim import build_optimizer

from .samples import garbage, image_bytes
from .shard_fixtures import make_tokenizer


def test_official_json_pairs_become_rows_and_bad_inputs_are_counted(tmp_path):
    root = tmp_path / "NLVR2"
    (root / "dev").mkdir(parents=True)
    for i in range(4):
        (root / "dev" / f"dev-{i}-img0.png").write_bytes(image_bytes(i, "PNG"))
        (root / "dev" / f"dev-{i}-img1.png").write_bytes(image_bytes(10 + i, "PNG"))
    (root / "dev" / "dev-2-img1.png").write_bytes(garbage(2))  # a bad right image skips its pair
    pair = lambda i: [f"dev/dev-{i}-img0.png", f"dev/dev-{i}-img1.png"]
    entries = [
        {"images": pair(0), "sentence": "both images show a dog", "label": "True", "identifier": "dev-0-0"},
        {"images": pair(1), "sentence": "the left image has two cats", "label": "False", "identifier": "dev-1-0"},
        {"images": pair(0), "sentence": "  ", "label": "False", "identifier": "dev-0-1"},  # empty: skipped
        {"images": pair(2), "sentence": "there is a bird", "label": "True", "identifier": "dev-2-0"},
        {"images": pair(0), "sentence": "one image has a ball", "label": "False", "identifier": "dev-0-2"},
        {"images": pair(3), "sentence": "a red car", "label": "True"},
    ]
    (tmp_path / "nlvr_dev.json").write_text(json.dumps(entries))
    source = NLVRJsonSource("nlvr2_dev", str(tmp_path / "nlvr_dev.json"), image_root=str(root), split="val")
    source.check()
    assert source.count() == 4  # statements of one pair are one candidate: its images are read once
    manifest = write_dataset(tmp_path / "ds", [source], shuffle_seed=None, progress=False)
    rows = [r for p in shard_paths(tmp_path / "ds", "val") for r in pq.read_table(p).to_pylist()]
    got = {r["caption"]: (r["label"], r["question_id"], r["image_id"], r["image_id2"]) for r in rows}
    assert got == {
        "both images show a dog": (1, "dev-0-0", "dev/dev-0-img0", "dev/dev-0-img1"),
        "one image has a ball": (0, "dev-0-2", "dev/dev-0-img0", "dev/dev-0-img1"),
        "the left image has two cats": (0, "dev-1-0", "dev/dev-1-img0", "dev/dev-1-img1"),
        "a red car": (1, None, "dev/dev-3-img0", "dev/dev-3-img1"),
    }
    row = next(r for r in rows if r["caption"] == "a red car")
    assert row["image"] == image_bytes(3, "PNG") and row["image2"] == image_bytes(13, "PNG")
    assert manifest["skipped"]["by_reason"] == {"unreadable_image": 1, "empty_caption": 1}
    assert "albef_ray.data.build.nlvr" in TASK_SOURCE_MODULES and NLVRJsonSource.format == "nlvr_json"


def test_unknown_label_is_an_input_error_naming_the_row(tmp_path):
    (tmp_path / "bad.json").write_text(json.dumps([{"images": ["a.png", "b.png"], "sentence": "x", "label": "maybe"}]))
    with pytest.raises(ValueError, match="entry 0: label 'maybe'"):
        NLVRJsonSource("bad", str(tmp_path / "bad.json")).check()
    assert [nlvr_label(v) for v in ("True", "false", True, 0, 1, "yes", 2)] == [1, 0, 1, 0, 1, None, None]


def test_statements_are_decided_by_the_scenes():
    red_circle, blue_square = Thing("small", "red", "circle"), Thing("large", "blue", "square")
    green_star = Thing("small", "green", "star")
    left = Scene("horizontal", (red_circle, blue_square))  # red circle left of blue square
    right = Scene("vertical", (green_star, red_circle, blue_square))  # top to bottom
    red, circle, square = Description(colour="red"), Description(shape="circle"), Description(shape="square")
    cases = [
        (Statement("both", Description(colour="red", shape="circle")), True),
        (Statement("both", Description(shape="star")), False),
        (Statement("only", Description(shape="star"), "right"), True),
        (Statement("only", Description(shape="star"), "left"), False),
        (Statement("neither", Description(colour="yellow")), True),
        (Statement("neither", Description("large", "blue", "square")), False),
        (Statement("more", Description(size="small"), "right"), True),  # 2 small objects vs 1
        (Statement("more", Description(size="small"), "left"), False),
        (Statement("same", square), True),
        (Statement("same", Description()), False),  # 2 objects vs 3
        (Statement("total", circle, number=2), True),
        (Statement("total", circle, number=3), False),
        (Statement("relation", red, "left", relation="left of", other=square), True),
        (Statement("relation", red, "left", relation="right of", other=square), False),
        (Statement("relation", red, "left", relation="above", other=square), False),  # left is horizontal
        (Statement("relation", square, "right", relation="below", other=Description(shape="star")), True),
        (Statement("relation", circle, "right", relation="above", other=circle), False),  # needs two circles
    ]
    for statement, truth in cases:
        assert statement.truth(left, right) is truth, statement.text
    assert cases[6][0].text == "there are more small objects in the right image than in the left image"
    assert cases[10][0].text == "there are exactly two circles in the two images"
    assert cases[12][0].text == "in the left image a red object is left of a square"


def test_plan_is_balanced_true_to_its_scenes_and_holds_out_its_pairs():
    splits = plan(SynthTaskSettings("unused", seed=3, train=40, val=10, test=11))
    assert {s: len(e) for s, e in splits.items()} == {"test": 11, "val": 10, "train": 40}
    for examples in splits.values():
        assert sum(e.label for e in examples) == math.ceil(len(examples) / 2)
        assert all(e.statement.truth(e.left, e.right) == e.label for e in examples)
    held_out = {(e.left, e.right) for s in ("val", "test") for e in splits[s]}
    assert not held_out & {(e.left, e.right) for e in splits["train"]}
    assert plan(SynthTaskSettings("unused", seed=3, train=40, val=10, test=11)) == splits  # a function of the seed


def test_generated_set_trains_a_few_steps_and_evaluates(tmp_path):
    make_tokenizer(tmp_path / "synth" / "tokenizer")
    settings = SynthTaskSettings(str(tmp_path / "synth"), seed=0, train=16, val=6, test=6, image_size=32)
    get_task("nlvr").synth_builder()(tmp_path / "nlvr", settings, progress=False)
    cfg = build_config({
        "task": "nlvr", "model": {"size": "albef_tiny", "vit_init": None, "bert_init": None},
        "momentum": {"queue_size": 32}, "train": {"batch_size": 8, "num_workers": 1, "precision": "fp32"},
        "data": {"shards": [str(tmp_path / "nlvr")], "tokenizer": str(tmp_path / "nlvr" / "tokenizer"),
                 "max_text_len": 24},
        "optim": {"warmup_steps": 1},
    })
    tokenizer = load_tokenizer(cfg.data.tokenizer)
    task = build_task(cfg).train()
    optimizer = build_optimizer(task, cfg.optim)
    batches = [b.tensors for b in iter_examples(cfg.data.shards, "train", cfg, tokenizer, batch_size=8)]
    assert batches[0]["image2"].shape == batches[0]["image"].shape == (8, 3, 32, 32)
    for step, batch in enumerate(batches * 2):
        metrics = train_step(task, optimizer, batch, step, cfg, Schedule(4, 2))
        assert math.isfinite(metrics["loss"]) and not metrics["skipped"]
    result = evaluate(task, iter_examples(cfg.data.shards, "test", cfg, tokenizer, batch_size=4), predictions=(p := []))
    assert result["num_pairs"] == 6 and 0 <= result["nlvr_acc"] <= 100 and len(p) == 6
    assert task.training  # evaluation restores the mode
    assert {r["label"] for r in p} <= {0, 1} and sorted(r["id"] for r in p) == [f"test-{i:06d}" for i in range(6)]
