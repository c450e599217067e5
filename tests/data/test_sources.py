"""Building from each input format, with corrupt images and empty captions: exact counts."""

from __future__ import annotations

import json

import pyarrow.parquet as pq
import pytest

from albef_ray.data.manifest import read_manifest, shard_paths
from albef_ray.data.schema import ROW_SCHEMA, SKIP_REASONS
from albef_ray.data.build.sources import (
    Img2DatasetSource,
    JsonSource,
    WebDatasetSource,
    parse_source_spec,
)
from albef_ray.data.build.writer import write_dataset

from .samples import (
    Expected,
    make_img2dataset_input,
    make_json_input,
    make_webdataset_input,
)


# Tests of a reader's row order build with shuffle_seed=None (input order); the shuffle is
# tested in test_shuffle.py.


def _rows(root, split="train"):
    return [row for path in shard_paths(root, split) for row in pq.read_table(path).to_pylist()]


def _check_counts(root, source: str, expected: Expected):
    manifest = read_manifest(root)
    assert manifest["splits"]["train"]["rows"] == expected.rows
    assert manifest["splits"]["train"]["images"] == expected.images
    assert manifest["sources"][source] == {
        "rows": expected.rows,
        "images": expected.images,
        "skipped": expected.skipped_total,
    }
    assert manifest["skipped"]["by_reason"] == expected.skipped
    assert manifest["skipped"]["total"] == expected.skipped_total
    lines = [json.loads(line) for line in (root / "skipped.jsonl").read_text().splitlines()]
    assert len(lines) == expected.skipped_total
    assert {line["source"] for line in lines} == {source}
    assert all(line["reason"] in SKIP_REASONS and line["input"] for line in lines)
    rows = _rows(root)
    assert len(rows) == expected.rows
    assert all(row["caption"] == row["caption"].strip() and row["caption"] for row in rows)
    assert all(row["width"] > 0 and row["height"] > 0 and row["source"] == source for row in rows)
    return rows, lines


def test_albef_json_annotations(tmp_path):
    annotations, image_root, expected = make_json_input(tmp_path / "in")
    source = JsonSource("coco", annotations, image_root=image_root)
    write_dataset(tmp_path / "out", [source], progress=False, shuffle_seed=None)
    rows, lines = _check_counts(tmp_path / "out", "coco", expected)
    # A list caption gives one row per caption sharing the image id; the blank one is skipped.
    assert [(r["caption"], r["image_id"]) for r in rows] == [
        ("a red ball", "coco_1"),
        ("A dog on grass.", "coco_1"),
        ("a png picture", "good.png"),
    ]
    assert (rows[0]["width"], rows[0]["height"]) == (40, 30)
    by_input = {line["input"]: line["reason"] for line in lines}
    assert by_input["good.jpg#caption1"] == "empty_caption"
    assert by_input["cut.jpg"] == "truncated_image"
    assert by_input["noise.jpg"] == "unreadable_image"
    assert by_input["absent.jpg"] == "missing_image"


def test_img2dataset_parquet(tmp_path):
    folder, expected = make_img2dataset_input(tmp_path / "in", files=2)
    write_dataset(tmp_path / "out", [Img2DatasetSource("cc3m", folder)], progress=False, shuffle_seed=None)
    rows, _ = _check_counts(tmp_path / "out", "cc3m", expected)
    assert [r["caption"] for r in rows] == ["photo 0", "photo 1", "photo 2"]
    assert rows[0]["image_id"] == "0000000"  # the key column
    assert pq.read_schema(shard_paths(tmp_path / "out", "train")[0]).equals(ROW_SCHEMA)


def test_img2dataset_column_names_are_configurable(tmp_path):
    folder, expected = make_img2dataset_input(tmp_path / "in", image_column="image", caption_column="text")
    source = Img2DatasetSource("laion", folder, image_column="image", caption_column="text", id_column="url")
    write_dataset(tmp_path / "out", [source], progress=False)
    rows, _ = _check_counts(tmp_path / "out", "laion", expected)
    assert rows[0]["image_id"] == "http://example.com/0000000.jpg"
    with pytest.raises(ValueError, match="no column"):
        write_dataset(tmp_path / "out2", [Img2DatasetSource("laion", folder)], progress=False)


def test_webdataset_tars(tmp_path):
    folder, expected = make_webdataset_input(tmp_path / "in")
    write_dataset(tmp_path / "out", [WebDatasetSource("wds", folder)], progress=False, shuffle_seed=None)
    rows, lines = _check_counts(tmp_path / "out", "wds", expected)
    assert [(r["image_id"], r["caption"]) for r in rows] == [
        ("000", "a cat on a mat"),
        ("sub/006", "un caf\u00e9 au lait"),
        ("007", "a jpeg"),
    ]
    assert {line["image_id"]: line["reason"] for line in lines}["004"] == "missing_caption"


def test_an_unreadable_input_file_is_one_skip(tmp_path):
    folder, expected = make_webdataset_input(tmp_path / "in")
    (folder / "shard-002.tar").write_bytes(b"this is not a tar archive" * 40)
    write_dataset(tmp_path / "out", [WebDatasetSource("wds", folder)], progress=False)
    manifest = read_manifest(tmp_path / "out")
    assert manifest["splits"]["train"]["rows"] == expected.rows
    assert manifest["skipped"]["by_reason"]["unreadable_input"] == 1


def test_combined_sources_fill_the_source_column(tmp_path):
    annotations, image_root, json_expected = make_json_input(tmp_path / "json")
    folder, parquet_expected = make_img2dataset_input(tmp_path / "parquet")
    tars, tar_expected = make_webdataset_input(tmp_path / "tar")
    sources = [
        parse_source_spec(f"name=coco,format=json,path={annotations},image_root={image_root},split=test"),
        parse_source_spec(f"name=cc3m,format=img2dataset,path={folder}"),
        parse_source_spec(f"name=wds,format=webdataset,path={tars}/*.tar"),
    ]
    manifest = write_dataset(tmp_path / "out", sources, shard_rows=2, progress=False, shuffle_seed=None)
    train_rows = parquet_expected.rows + tar_expected.rows
    assert manifest["splits"]["test"]["rows"] == json_expected.rows
    assert manifest["splits"]["train"]["rows"] == train_rows
    assert manifest["splits"]["train"]["sources"] == {"cc3m": parquet_expected.rows, "wds": tar_expected.rows}
    assert [s["rows"] for s in manifest["splits"]["train"]["shards"]] == [2, 2, 2]
    assert [r["source"] for r in _rows(tmp_path / "out")] == ["cc3m"] * 3 + ["wds"] * 3
    assert {r["source"] for r in _rows(tmp_path / "out", "test")} == {"coco"}
    total = json_expected.skipped_total + parquet_expected.skipped_total + tar_expected.skipped_total
    assert manifest["skipped"]["total"] == total
    assert manifest["skipped"]["by_source"]["coco"] == json_expected.skipped
    assert len((tmp_path / "out" / "skipped.jsonl").read_text().splitlines()) == total


@pytest.mark.parametrize(
    "spec, message",
    [
        ("name=x,format=csv,path=a", "unknown format 'csv'"),
        ("name=x,format=json", "missing 'path'"),
        ("name=x,format=webdataset,path=a,image_root=b", "unknown key(s) ['image_root']"),
        ("name=x,format=json,path", "expected key=value"),
    ],
)
def test_bad_source_specs_are_named(spec, message):
    with pytest.raises(ValueError) as err:
        parse_source_spec(spec)
    assert message in str(err.value)


def test_a_source_without_files_is_refused_before_writing(tmp_path):
    with pytest.raises(ValueError, match="no Parquet files"):
        write_dataset(tmp_path / "out", [Img2DatasetSource("cc", tmp_path / "nothing-*.parquet")], progress=False)
    assert not (tmp_path / "out").exists()
