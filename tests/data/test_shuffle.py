"""The dataset-wide row shuffle: captions of one image spread out, every row once, exact resume."""

from __future__ import annotations

from collections import Counter

import numpy as np
import pyarrow.parquet as pq
import pytest

from albef_ray.data.build import shuffle, writer
from albef_ray.data.manifest import read_manifest, shard_paths
from albef_ray.data.schema import PROGRESS_DIR
from albef_ray.data.build.sources import Candidate, IterableSource
from albef_ray.data.build.writer import write_dataset

from .samples import image_bytes

IMAGES, CAPTIONS = 40, 5


class Interrupted(Exception):
    pass


def _coco_like(limit=None):
    """40 images with 5 captions each, the captions of an image read together (as COCO's)."""

    def candidates():
        for i in range(IMAGES):
            if i == limit:
                raise Interrupted
            captions = [f"caption {k} of image {i}" for k in range(CAPTIONS)]
            yield Candidate("coco", f"img{i}.jpg", f"img{i}", captions, image=image_bytes(i, size=(8, 8)))

    return IterableSource("coco", candidates, split="test", description="coco-like")


def _rows(root):
    return [row for path in shard_paths(root, "test") for row in pq.read_table(path).to_pylist()]


def _adjacent_same_image(root):
    """Fraction of neighbouring rows (within a shard) that are captions of one image."""
    pairs = same = 0
    for path in shard_paths(root, "test"):
        ids = pq.read_table(path, columns=["image_id"])["image_id"].to_pylist()
        pairs += len(ids) - 1
        same += sum(a == b for a, b in zip(ids, ids[1:]))
    return same / pairs


def _bytes(root):
    return [open(p, "rb").read() for p in shard_paths(root, "test")]


def test_captions_of_one_image_are_spread_and_every_row_is_written_once(tmp_path):
    ordered = write_dataset(tmp_path / "ordered", [_coco_like()], shard_rows=16, shuffle_seed=None, progress=False)
    shuffled = write_dataset(tmp_path / "shuffled", [_coco_like()], shard_rows=16, progress=False)
    assert _adjacent_same_image(tmp_path / "ordered") == 160 / 190  # 10 shards of 4 whole images
    assert _adjacent_same_image(tmp_path / "shuffled") < 0.1  # about 4 / 199 by chance
    expected = Counter((f"img{i}", f"caption {k} of image {i}") for i in range(IMAGES) for k in range(CAPTIONS))
    for root in ("ordered", "shuffled"):
        assert Counter((r["image_id"], r["caption"]) for r in _rows(tmp_path / root)) == expected
    assert [s["rows"] for s in shuffled["splits"]["test"]["shards"]] == [16] * 12 + [8]
    assert shuffled["splits"]["test"]["images"] == IMAGES and shuffled["splits"]["test"]["rows"] == 200
    assert shuffled["build"]["shuffle_seed"] == 0 and ordered["build"]["shuffle_seed"] is None
    assert not (tmp_path / "shuffled" / PROGRESS_DIR).exists()  # the spill is removed


def test_the_order_is_a_function_of_the_seed(tmp_path):
    write_dataset(tmp_path / "a", [_coco_like()], shard_rows=16, progress=False)
    write_dataset(tmp_path / "b", [_coco_like()], shard_rows=16, workers=2, progress=False)
    write_dataset(tmp_path / "c", [_coco_like()], shard_rows=16, shuffle_seed=1, progress=False)
    assert _bytes(tmp_path / "a") == _bytes(tmp_path / "b")
    assert [r["caption"] for r in _rows(tmp_path / "a")] != [r["caption"] for r in _rows(tmp_path / "c")]


def test_an_interruption_while_reading_resumes_to_the_same_shards(tmp_path, monkeypatch):
    write_dataset(tmp_path / "reference", [_coco_like()], shard_rows=16, progress=False)
    out = tmp_path / "out"
    with pytest.raises(Interrupted):  # dies reading image 27: chunks of 16 rows up to image 24 are kept
        write_dataset(out, [_coco_like(limit=27)], shard_rows=16, progress=False)
    assert not list((out / "test").glob("part-*")) and (out / PROGRESS_DIR / "rows-test.bin").exists()
    read = []
    real = writer.check_stream

    def counting(items, workers=0):
        for meta, checked in real(items, workers):
            read.append(meta)
            yield meta, checked

    monkeypatch.setattr(writer, "check_stream", counting)
    write_dataset(out, [_coco_like()], shard_rows=16, progress=False)
    assert read[0] == (0, 24) and len(read) == IMAGES - 24  # finished chunks are not read again
    assert _bytes(out) == _bytes(tmp_path / "reference")
    assert read_manifest(out)["splits"] == read_manifest(tmp_path / "reference")["splits"]


def test_an_interruption_while_writing_shuffled_shards_keeps_the_finished_ones(tmp_path, monkeypatch):
    write_dataset(tmp_path / "reference", [_coco_like()], shard_rows=16, progress=False)
    out = tmp_path / "out"
    real = writer.write_shard

    def dies_on_the_fourth(path, rows, *args, **kwargs):
        if path.name == "part-00003.parquet":
            raise Interrupted
        return real(path, rows, *args, **kwargs)

    monkeypatch.setattr(writer, "write_shard", dies_on_the_fourth)
    with pytest.raises(Interrupted):
        write_dataset(out, [_coco_like()], shard_rows=16, progress=False)
    written = []

    def counting(path, rows, *args, **kwargs):
        written.append(path.name)
        return real(path, rows, *args, **kwargs)

    monkeypatch.setattr(writer, "write_shard", counting)
    write_dataset(out, [_coco_like()], shard_rows=16, progress=False)
    assert written == [f"part-{i:05d}.parquet" for i in range(3, 13)]
    assert _bytes(out) == _bytes(tmp_path / "reference")


def test_rows_survive_the_spill_format(tmp_path):
    rows = [
        {"image": image_bytes(1), "caption": "un café", "image_id": "7", "source": "s", "width": 40, "height": 30},
        {"image": b"\x00" * 3, "caption": "", "image_id": "", "source": "t", "width": 1, "height": 2},
    ]
    path = tmp_path / "rows.bin"
    first = shuffle.append_rows(path, rows)
    second = shuffle.append_rows(path, rows[:1])
    starts = np.concatenate([first[:-1], second[:-1]])
    ends = np.concatenate([first[1:], second[1:]])
    assert shuffle.gather(path, starts, ends, np.array([2, 1, 0])) == [rows[0], rows[1], rows[0]]
    assert shuffle.cut(np.array([5, 5, 5, 5, 5]), None, 10) == [(0, 2), (2, 4), (4, 5)]
    assert shuffle.cut(np.array([5, 5, 5]), 2, 100) == [(0, 2), (2, 3)]
