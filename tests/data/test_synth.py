"""The embedded benchmark: deterministic, disjoint splits, paraphrases, noise as configured."""

from __future__ import annotations

import io
import json
from collections import defaultdict

import numpy as np
import pyarrow.parquet as pq
import pytest
from PIL import Image

from albef_ray.data.manifest import read_manifest, shard_paths
from albef_ray.synth.scenes import COLOURS, Scene, Thing, caption, template_count
from albef_ray.synth.benchmark import SynthConfig, SynthSource, build_synth, plan, render

SMALL = SynthConfig(seed=3, train=40, val=8, test=8, noise=0.25, eval_captions=4)


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    root = tmp_path_factory.mktemp("synth") / "ds"
    build_synth(root, SMALL, shard_rows=16, progress=False)
    return root


def _rows(root, split):
    return [row for path in shard_paths(root, split) for row in pq.read_table(path).to_pylist()]


def _shard_bytes(root):
    manifest = read_manifest(root)
    return [(root / s["path"]).read_bytes() for split in manifest["splits"].values() for s in split["shards"]]


def test_the_same_seed_gives_identical_bytes_and_another_seed_differs(built, tmp_path):
    again = tmp_path / "again"
    build_synth(again, SMALL, shard_rows=16, progress=False)
    assert _shard_bytes(again) == _shard_bytes(built)
    assert (again / "synth_noise.jsonl").read_bytes() == (built / "synth_noise.jsonl").read_bytes()
    other = plan(SynthConfig(seed=4, train=40, val=8, test=8, noise=0.25, eval_captions=4))
    same = plan(SMALL)
    assert [i.captions for i in other.splits["train"]] != [i.captions for i in same.splits["train"]]
    assert [i.scene for i in other.splits["test"]] != [i.scene for i in same.splits["test"]]


def test_rows_images_and_manifest(built):
    manifest = read_manifest(built)
    counts = {split: entry["rows"] for split, entry in manifest["splits"].items()}
    assert counts == {"train": 40, "val": 8 * 4, "test": 8 * 4}
    assert manifest["sources"]["synth"]["images"] == 56 and manifest["skipped"]["total"] == 0
    assert [s["rows"] for s in manifest["splits"]["train"]["shards"]] == [16, 16, 8]
    assert manifest["synth"]["config"]["seed"] == 3 and manifest["tokenizer"] == "tokenizer"
    row = _rows(built, "test")[0]
    image = Image.open(io.BytesIO(row["image"]))
    assert image.format == "PNG" and image.size == (64, 64) == (row["width"], row["height"]) and image.mode == "RGB"


def test_splits_are_disjoint_by_scene_and_by_caption(built):
    synth_plan = plan(SMALL)
    scenes = {split: {i.scene for i in images} for split, images in synth_plan.splits.items()}
    assert (
        not scenes["train"] & scenes["val"]
        and not scenes["train"] & scenes["test"]
        and not scenes["val"] & scenes["test"]
    )
    assert len(scenes["test"]) == 8 and len(scenes["val"]) == 8  # unique within held-out splits
    captions = {split: {r["caption"] for r in _rows(built, split)} for split in ("train", "val", "test")}
    assert not captions["train"] & captions["test"] and not captions["train"] & captions["val"]
    assert not captions["val"] & captions["test"]


def test_each_test_image_has_several_distinct_captions_that_match_only_it(built):
    by_image = defaultdict(list)
    for row in _rows(built, "test"):
        by_image[row["image_id"]].append(row["caption"])
    assert len(by_image) == 8
    assert all(len(set(captions)) == 4 for captions in by_image.values())
    owners = defaultdict(set)
    for image_id, captions in by_image.items():
        for text in captions:
            owners[text].add(image_id)
    assert all(len(ids) == 1 for ids in owners.values())


def test_paraphrases_swap_the_objects_with_the_relation():
    scene = Scene("horizontal", (Thing("small", "red", "circle"), Thing("large", "blue", "square")))
    texts = {caption(scene, t) for t in range(template_count(scene))}
    assert "a small red circle left of a large blue square" in texts
    assert "a large blue square to the right of a small red circle" in texts
    vertical = Scene("vertical", scene.things)
    assert "a large blue square below a small red circle" in {caption(vertical, t) for t in range(7)}


@pytest.mark.parametrize("fraction", [0.0, 0.2, 0.5])
def test_the_noise_fraction_is_as_configured(fraction):
    synth_plan = plan(SynthConfig(seed=1, train=400, val=20, test=20, noise=fraction))
    noisy = [image for image in synth_plan.splits["train"] if image.noise]
    assert abs(len(noisy) / 400 - fraction) <= 0.01
    assert all(image.captions[0] != image.true_caption for image in noisy)
    if fraction:
        assert {image.noise for image in noisy} == {"attribute", "relation", "unrelated"}
    assert not any(image.noise for split in ("val", "test") for image in synth_plan.splits[split])


def test_noise_is_recorded_in_the_manifest_and_listed(built):
    noise = read_manifest(built)["synth"]["noise"]
    assert noise["fraction"] == 0.25 and noise["rows"] == 10 and sum(noise["by_kind"].values()) == 10
    listed = [json.loads(line) for line in (built / noise["file"]).read_text().splitlines()]
    assert len(listed) == 10
    rows = {r["image_id"]: r["caption"] for r in _rows(built, "train")}
    assert all(rows[entry["image_id"]] == entry["caption"] != entry["true_caption"] for entry in listed)


def test_objects_are_drawn_in_the_described_order():
    rng = np.random.default_rng(0)
    for axis, coordinate in (("horizontal", 1), ("vertical", 0)):
        scene = Scene(
            axis, (Thing("large", "red", "circle"), Thing("small", "blue", "star"), Thing("small", "yellow", "square"))
        )
        pixels = np.asarray(render(scene, 64, rng)).astype(int)
        centres = []
        for thing in scene.things:
            mask = np.abs(pixels - np.array(COLOURS[thing.colour])).sum(-1) < 60
            assert mask.sum() > 4
            centres.append(np.argwhere(mask)[:, coordinate].mean())
        assert centres == sorted(centres)  # left to right / top to bottom


def test_jpeg_images_and_other_sizes(tmp_path):
    config = SynthConfig(seed=0, train=4, val=1, test=1, image_size=96, image_format="jpeg", eval_captions=2)
    build_synth(tmp_path / "ds", config, progress=False)
    row = _rows(tmp_path / "ds", "train")[0]
    assert row["image"][:2] == b"\xff\xd8" and (row["width"], row["height"]) == (96, 96)


@pytest.mark.parametrize(
    "kwargs, field",
    [({"noise": 1.5}, "noise"), ({"eval_captions": 9}, "eval_captions"), ({"image_format": "gif"}, "image_format")],
)
def test_bad_configs_name_the_field(kwargs, field):
    with pytest.raises(ValueError, match=field):
        SynthConfig(**kwargs)


def test_a_resumed_read_renders_the_same_images():
    synth_plan = plan(SMALL)
    source = SynthSource(SMALL, "train", synth_plan.splits["train"])
    whole = list(source.iter_candidates())
    resumed = list(source.iter_candidates(skip=30))
    assert [c.position for c in resumed] == list(range(30, 40))
    assert [(c.image, c.captions) for c in resumed] == [(c.image, c.captions) for c in whole[30:]]
