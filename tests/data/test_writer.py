"""The shard writer: shard sizes, resuming an interrupted build, workers, refusing to clobber."""

from __future__ import annotations

import json
import os

import pyarrow.parquet as pq
import pytest

from albef_ray.data import writer
from albef_ray.data.manifest import (
    read_manifest,
    shard_paths,
    split_names,
    tokenizer_dir,
)
from albef_ray.data.schema import PROGRESS_DIR
from albef_ray.data.sources import Candidate, Img2DatasetSource, IterableSource
from albef_ray.data.writer import BuildError, write_dataset

from .samples import image_bytes, make_img2dataset_input


class Interrupted(Exception):
    pass


class StopsAfter(Img2DatasetSource):
    """The same source, but the read dies after ``limit`` candidates (a killed build)."""

    def __init__(self, *args, limit: int, **kwargs):
        super().__init__(*args, **kwargs)
        self.limit = limit

    def iter_candidates(self, skip=0):
        for n, candidate in enumerate(super().iter_candidates(skip)):
            if n == self.limit:
                raise Interrupted
            yield candidate


@pytest.fixture()
def inputs(tmp_path):
    """20 good images and the 5 bad ones, over 3 Parquet files."""
    folder, expected = make_img2dataset_input(tmp_path / "in", good=20, files=3)
    return folder, expected


def _state(root):
    """(inode, mtime) of every shard: a rewritten file changes both."""
    return {p.name: (p.stat().st_ino, p.stat().st_mtime_ns) for p in sorted((root / "train").glob("*.parquet"))}


def _contents(root):
    files = sorted((root / "train").glob("*.parquet"))
    return [p.read_bytes() for p in files], (root / "skipped.jsonl").read_text()


def _count_shard_writes(monkeypatch):
    written = []
    real = writer.write_shard

    def counting(path, rows, *args, **kwargs):
        written.append(path.name)
        return real(path, rows, *args, **kwargs)

    monkeypatch.setattr(writer, "write_shard", counting)
    return written


def test_shards_follow_the_row_and_byte_targets(tmp_path, inputs):
    folder, expected = inputs
    by_rows = write_dataset(tmp_path / "rows", [Img2DatasetSource("cc", folder)], shard_rows=6, progress=False)
    assert [s["rows"] for s in by_rows["splits"]["train"]["shards"]] == [6, 6, 6, 2]
    assert [s["path"] for s in by_rows["splits"]["train"]["shards"]][-1] == "train/part-00003.parquet"
    one_image = len(image_bytes(0))
    by_bytes = write_dataset(
        tmp_path / "bytes", [Img2DatasetSource("cc", folder)], shard_bytes=3 * one_image, progress=False
    )
    sizes = [s["rows"] for s in by_bytes["splits"]["train"]["shards"]]
    assert sum(sizes) == expected.rows and len(sizes) > 4 and max(sizes) <= 4
    for shard in by_bytes["splits"]["train"]["shards"]:
        path = tmp_path / "bytes" / shard["path"]
        assert pq.ParquetFile(path).metadata.num_rows == shard["rows"] and path.stat().st_size == shard["bytes"]


def test_an_interrupted_build_resumes_without_rewriting_finished_shards(tmp_path, inputs, monkeypatch):
    folder, expected = inputs
    reference = tmp_path / "reference"
    write_dataset(reference, [Img2DatasetSource("cc", folder)], shard_rows=4, progress=False)

    out = tmp_path / "out"
    # Dies reading the 21st of 25 candidates (10 good, 5 bad, 10 good): 3 shards of 4 rows are
    # done, the third holding the 5 skips; 3 rows read for the fourth are lost.
    with pytest.raises(Interrupted):
        write_dataset(out, [StopsAfter("cc", folder, limit=20)], shard_rows=4, progress=False)
    assert not (out / "manifest.json").exists()
    finished = _state(out)
    assert list(finished) == ["part-00000.parquet", "part-00001.parquet", "part-00002.parquet"]

    written = _count_shard_writes(monkeypatch)
    manifest = write_dataset(out, [Img2DatasetSource("cc", folder)], shard_rows=4, progress=False)
    assert written == ["part-00003.parquet", "part-00004.parquet"]
    assert {k: v for k, v in _state(out).items() if k in finished} == finished
    assert _contents(out) == _contents(reference)  # the same rows, byte for byte, and the same skips
    assert manifest["splits"] == read_manifest(reference)["splits"]
    assert manifest["skipped"]["total"] == expected.skipped_total
    assert not (out / PROGRESS_DIR).exists()


def test_a_lost_shard_and_a_half_written_one_are_redone(tmp_path, inputs, monkeypatch):
    folder, _ = inputs
    reference = tmp_path / "reference"
    write_dataset(reference, [Img2DatasetSource("cc", folder)], shard_rows=4, progress=False)

    out = tmp_path / "out"
    real = writer.write_shard

    def dies_on_the_fourth(path, rows, *args, **kwargs):
        if path.name == "part-00003.parquet":
            path.with_name(path.name + ".tmp").write_bytes(b"half a parquet file")
            raise Interrupted
        return real(path, rows, *args, **kwargs)

    monkeypatch.setattr(writer, "write_shard", dies_on_the_fourth)
    with pytest.raises(Interrupted):
        write_dataset(out, [Img2DatasetSource("cc", folder)], shard_rows=4, progress=False)
    monkeypatch.setattr(writer, "write_shard", real)
    (out / "train" / "part-00002.parquet").unlink()  # its progress record stays: it must be distrusted
    finished = {k: v for k, v in _state(out).items() if k in ("part-00000.parquet", "part-00001.parquet")}

    written = _count_shard_writes(monkeypatch)
    write_dataset(out, [Img2DatasetSource("cc", folder)], shard_rows=4, progress=False)
    assert written == ["part-00002.parquet", "part-00003.parquet", "part-00004.parquet"]
    assert {k: v for k, v in _state(out).items() if k in finished} == finished
    assert not list((out / "train").glob("*.tmp"))
    assert _contents(out) == _contents(reference)


def test_worker_processes_write_the_same_shards(tmp_path, inputs):
    folder, _ = inputs
    write_dataset(tmp_path / "serial", [Img2DatasetSource("cc", folder)], shard_rows=7, progress=False)
    write_dataset(tmp_path / "parallel", [Img2DatasetSource("cc", folder)], shard_rows=7, workers=2, progress=False)
    assert _contents(tmp_path / "parallel") == _contents(tmp_path / "serial")


def test_a_finished_build_is_kept_and_other_inputs_are_refused(tmp_path, inputs, monkeypatch):
    folder, _ = inputs
    out = tmp_path / "out"
    first = write_dataset(out, [Img2DatasetSource("cc", folder)], shard_rows=8, progress=False)
    before = _state(out)
    written = _count_shard_writes(monkeypatch)
    assert write_dataset(out, [Img2DatasetSource("cc", folder)], shard_rows=8, progress=False) == first
    assert written == [] and _state(out) == before
    with pytest.raises(BuildError, match="other inputs"):
        write_dataset(out, [Img2DatasetSource("cc", folder)], shard_rows=5, progress=False)
    replaced = write_dataset(out, [Img2DatasetSource("cc", folder)], shard_rows=5, overwrite=True, progress=False)
    assert len(replaced["splits"]["train"]["shards"]) == 4
    assert sorted(p.name for p in (out / "train").iterdir()) == [f"part-0000{i}.parquet" for i in range(4)]


def test_any_iterable_of_candidates_can_be_written(tmp_path):
    def candidates():
        for i in range(5):
            yield Candidate("ignored", f"gen:{i}", f"img{i}", [f"caption {i}", f"other {i}"], image=image_bytes(i))

    sources = [IterableSource("gen", candidates, split="val"), IterableSource("gen", candidates, split="train")]
    manifest = write_dataset(tmp_path / "out", sources, shard_rows=4, progress=False)
    assert split_names(tmp_path / "out") == ["val", "train"]
    assert manifest["splits"]["val"]["rows"] == 10 and manifest["splits"]["val"]["images"] == 5
    assert manifest["sources"]["gen"] == {"rows": 20, "images": 10, "skipped": 0}
    paths = shard_paths(tmp_path / "out", "val")
    assert len(paths) == 3 and all(os.path.isabs(p) and os.path.exists(p) for p in paths)
    assert tokenizer_dir(tmp_path / "out") is None
    with pytest.raises(KeyError, match="splits: val, train"):
        shard_paths(tmp_path / "out", "test")
    assert json.loads((tmp_path / "out" / "manifest.json").read_text())["schema_version"] == 1


def test_reading_a_directory_without_a_manifest_says_so(tmp_path):
    with pytest.raises(FileNotFoundError, match="no manifest.json"):
        read_manifest(tmp_path)
