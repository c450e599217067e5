"""The shard writer: shard sizes, resuming an interrupted build, workers, refusing to clobber."""

from __future__ import annotations

import json
import os

import pyarrow.parquet as pq
import pytest

from albef_ray.data.build import writer
from albef_ray.data.manifest import (
    read_manifest,
    shard_paths,
    split_names,
    tokenizer_dir,
)
from albef_ray.data.schema import PROGRESS_DIR
from albef_ray.data.build.sources import Candidate, Img2DatasetSource, IterableSource, JsonSource
from albef_ray.data.build.writer import BuildError, write_dataset

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
    # Input order (shuffle_seed=None): shards are written as the inputs are read; the shuffled
    # build's resume is tested in test_shuffle.py.
    folder, expected = inputs
    reference = tmp_path / "reference"
    write_dataset(reference, [Img2DatasetSource("cc", folder)], shard_rows=4, progress=False, shuffle_seed=None)

    out = tmp_path / "out"
    # Dies reading the 21st of 25 candidates (10 good, 5 bad, 10 good): 3 shards of 4 rows are
    # done, the third holding the 5 skips; 3 rows read for the fourth are lost.
    with pytest.raises(Interrupted):
        write_dataset(out, [StopsAfter("cc", folder, limit=20)], shard_rows=4, progress=False, shuffle_seed=None)
    assert not (out / "manifest.json").exists()
    finished = _state(out)
    assert list(finished) == ["part-00000.parquet", "part-00001.parquet", "part-00002.parquet"]

    written = _count_shard_writes(monkeypatch)
    manifest = write_dataset(out, [Img2DatasetSource("cc", folder)], shard_rows=4, progress=False, shuffle_seed=None)
    assert written == ["part-00003.parquet", "part-00004.parquet"]
    assert {k: v for k, v in _state(out).items() if k in finished} == finished
    assert _contents(out) == _contents(reference)  # the same rows, byte for byte, and the same skips
    assert manifest["splits"] == read_manifest(reference)["splits"]
    assert manifest["skipped"]["total"] == expected.skipped_total
    assert not (out / PROGRESS_DIR).exists()


def test_a_lost_shard_and_a_half_written_one_are_redone(tmp_path, inputs, monkeypatch):
    folder, _ = inputs
    reference = tmp_path / "reference"
    write_dataset(reference, [Img2DatasetSource("cc", folder)], shard_rows=4, progress=False, shuffle_seed=None)

    out = tmp_path / "out"
    real = writer.write_shard

    def dies_on_the_fourth(path, rows, *args, **kwargs):
        if path.name == "part-00003.parquet":
            path.with_name(path.name + ".tmp").write_bytes(b"half a parquet file")
            raise Interrupted
        return real(path, rows, *args, **kwargs)

    monkeypatch.setattr(writer, "write_shard", dies_on_the_fourth)
    with pytest.raises(Interrupted):
        write_dataset(out, [Img2DatasetSource("cc", folder)], shard_rows=4, progress=False, shuffle_seed=None)
    monkeypatch.setattr(writer, "write_shard", real)
    (out / "train" / "part-00002.parquet").unlink()  # its progress record stays: it must be distrusted
    finished = {k: v for k, v in _state(out).items() if k in ("part-00000.parquet", "part-00001.parquet")}

    written = _count_shard_writes(monkeypatch)
    write_dataset(out, [Img2DatasetSource("cc", folder)], shard_rows=4, progress=False, shuffle_seed=None)
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


def test_an_edited_input_is_not_taken_for_the_built_one(tmp_path, inputs):
    folder, _ = inputs
    out = tmp_path / "out"
    write_dataset(out, [Img2DatasetSource("cc", folder)], shard_rows=8, progress=False)
    edited = folder / "00001.parquet"
    table = pq.read_table(edited)
    pq.write_table(table.slice(0, table.num_rows - 1), edited)  # one row fewer
    with pytest.raises(BuildError, match=r"other inputs or settings \(.*00001\.parquet changed since"):
        write_dataset(out, [Img2DatasetSource("cc", folder)], shard_rows=8, progress=False)
    rebuilt = write_dataset(out, [Img2DatasetSource("cc", folder)], shard_rows=8, overwrite=True, progress=False)
    assert rebuilt["splits"]["train"]["rows"] + rebuilt["skipped"]["total"] == 24


def test_an_input_edited_during_an_interrupted_build_is_refused(tmp_path, inputs):
    folder, _ = inputs
    out = tmp_path / "out"
    with pytest.raises(Interrupted):
        write_dataset(out, [StopsAfter("cc", folder, limit=20)], shard_rows=4, progress=False)
    edited = folder / "00000.parquet"
    stat = edited.stat()
    os.utime(edited, ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**9))  # rewritten with the same size
    with pytest.raises(BuildError, match=r"unfinished build of other inputs.*00000\.parquet changed since"):
        write_dataset(out, [Img2DatasetSource("cc", folder)], shard_rows=4, progress=False)


def test_the_same_input_by_a_relative_or_an_absolute_path_is_the_same_build(tmp_path, inputs, monkeypatch):
    folder, _ = inputs
    out = tmp_path / "out"
    monkeypatch.chdir(folder.parent)
    first = write_dataset(out, [Img2DatasetSource("cc", folder.name)], shard_rows=8, progress=False)
    written = _count_shard_writes(monkeypatch)
    again = write_dataset(out, [Img2DatasetSource("cc", str(folder.resolve()))], shard_rows=8, progress=False)
    assert again == first and written == []
    assert first["build"]["sources"][0]["files"][0]["path"] == str(folder.resolve() / "00000.parquet")


def test_non_positive_shard_targets_are_refused(tmp_path, inputs):
    folder, _ = inputs
    for targets in ({"shard_rows": 0}, {"shard_rows": -1, "shard_bytes": None}, {"shard_bytes": 0}):
        with pytest.raises(ValueError, match="must be a positive integer"):
            write_dataset(tmp_path / "out", [Img2DatasetSource("cc", folder)], progress=False, **targets)
    assert not (tmp_path / "out").exists()


def test_images_count_distinct_images_not_annotation_entries(tmp_path):
    # ALBEF's COCO JSON lists an image once per caption: 2 images x 3 entries, one blank caption.
    (tmp_path / "images").mkdir()
    for name, seed in (("a.jpg", 1), ("b.jpg", 2)):
        (tmp_path / "images" / name).write_bytes(image_bytes(seed))
    entries = [
        {"image": name, "caption": f"caption {k} of {name}", "image_id": name[0]}
        for name in ("a.jpg", "b.jpg")
        for k in range(3)
    ]
    entries[-1]["caption"] = " "
    (tmp_path / "ann.json").write_text(json.dumps(entries))
    source = JsonSource("coco", tmp_path / "ann.json", image_root=tmp_path / "images", split="test")
    manifest = write_dataset(tmp_path / "out", [source], shard_rows=2, progress=False)
    assert manifest["splits"]["test"]["rows"] == 5 and manifest["splits"]["test"]["images"] == 2
    assert manifest["sources"]["coco"] == {"rows": 5, "images": 2, "skipped": 1}


def test_a_zero_byte_image_file_is_an_empty_image_not_a_missing_one(tmp_path):
    (tmp_path / "images").mkdir()
    (tmp_path / "images" / "empty.jpg").write_bytes(b"")
    entries = [{"image": "empty.jpg", "caption": "nothing"}, {"image": "absent.jpg", "caption": "no file"}]
    (tmp_path / "ann.json").write_text(json.dumps(entries))
    source = JsonSource("coco", tmp_path / "ann.json", image_root=tmp_path / "images")
    manifest = write_dataset(tmp_path / "out", [source], progress=False)
    assert manifest["skipped"]["by_reason"] == {"empty_image": 1, "missing_image": 1}
    lines = [json.loads(line) for line in (tmp_path / "out" / "skipped.jsonl").read_text().splitlines()]
    assert [(line["reason"], line["detail"]) for line in lines][0] == ("empty_image", "0-byte file")


def test_a_manifest_of_another_tool_is_not_touched(tmp_path, inputs):
    folder, _ = inputs
    out = tmp_path / "out"
    out.mkdir()
    (out / "manifest.json").write_text('{"files": ["a.parquet"]}')
    for overwrite in (False, True):
        with pytest.raises(BuildError, match="manifest.json was not written by albef-ray data build"):
            write_dataset(out, [Img2DatasetSource("cc", folder)], overwrite=overwrite, progress=False)
    assert (out / "manifest.json").read_text() == '{"files": ["a.parquet"]}'
    assert sorted(p.name for p in out.iterdir()) == ["manifest.json"]
