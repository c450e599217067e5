"""``albef-ray data build`` and ``albef-ray data synth``."""

from __future__ import annotations

import json
import os
import signal
import time

import pytest

from albef_ray.cli import build_parser, main
from albef_ray.cli.common import parse_size
from albef_ray.data.manifest import read_manifest

from .samples import make_json_input, make_webdataset_input


def test_data_synth_writes_shards_and_tokenizer_and_reports(tmp_path, capsys):
    out = tmp_path / "synth"
    argv = ["data", "synth", str(out), "--train", "12", "--val", "3", "--test", "3", "--captions", "2", "--seed", "7"]
    assert main(argv + ["--image-size", "32", "--noise", "0.25", "--no-progress"]) == 0
    printed = capsys.readouterr().out
    assert f"dataset in {out}" in printed
    assert "train: 12 rows (12 images) in 1 shard [synth 12]" in printed
    assert "test: 6 rows (3 images)" in printed
    assert "noisy training captions: 3 of 12" in printed
    assert f"tokenizer: {out / 'tokenizer'}" in printed
    manifest = read_manifest(out)
    assert manifest["synth"]["config"]["image_size"] == 32 and manifest["synth"]["config"]["seed"] == 7
    assert (out / "tokenizer" / "tokenizer.json").exists()


def test_data_build_from_specs_reports_skips(tmp_path, capsys):
    annotations, images, expected = make_json_input(tmp_path / "json")
    tars, tar_expected = make_webdataset_input(tmp_path / "tars")
    out = tmp_path / "out"
    argv = [
        "data",
        "build",
        str(out),
        "--workers",
        "0",
        "--shard-size",
        "1MB",
        "--no-progress",
        "--source",
        f"name=coco,format=json,path={annotations},image_root={images},split=val",
        "--source",
        f"name=web,format=webdataset,path={tars}",
    ]
    assert main(argv) == 0
    printed = capsys.readouterr().out
    assert f"val: {expected.rows} rows ({expected.images} images) in 1 shard [coco {expected.rows}]" in printed
    assert f"skipped inputs: {expected.skipped_total + tar_expected.skipped_total} (" in printed
    assert read_manifest(out)["build"]["shard_bytes"] == 10**6


def test_data_build_with_a_sources_file(tmp_path, capsys):
    tars, expected = make_webdataset_input(tmp_path / "tars")
    listing = tmp_path / "sources.yaml"
    listing.write_text(f"- name: web\n  format: webdataset\n  path: {tars}\n  split: train\n")
    assert main(["data", "build", str(tmp_path / "out"), "--sources", str(listing), "--workers", "0"]) == 0
    assert read_manifest(tmp_path / "out")["splits"]["train"]["rows"] == expected.rows


def test_data_errors_exit_2_with_one_line(tmp_path, capsys):
    assert main(["data", "build", str(tmp_path / "out"), "--source", "name=x,format=csv,path=a"]) == 2
    err = capsys.readouterr().err
    assert "data error: source 'x': unknown format 'csv'" in err and "Traceback" not in err
    assert main(["data", "build", str(tmp_path / "out")]) == 2
    assert "no inputs" in capsys.readouterr().err
    assert main(["data", "synth", str(tmp_path / "s"), "--noise", "2"]) == 2
    assert "noise: 2.0 is not a fraction" in capsys.readouterr().err


def test_help_lists_the_data_commands():
    text = build_parser().format_help()
    assert "data" in text and "pretrain" in text and "config" in text
    data_help = build_parser().parse_known_args(["data", "synth", "x"])[0]
    assert data_help.train == 10_000 and data_help.noise == 0.2 and data_help.image_size == 64


def test_sizes_read_with_units():
    assert parse_size("128MiB") == 128 * 2**20 and parse_size("64MB") == 64 * 10**6 and parse_size("4096") == 4096


def _build(out, *sources, extra=()):
    argv = ["data", "build", str(out), "--workers", "0", "--no-progress", *extra]
    for spec in sources:
        argv += ["--source", spec]
    return main(argv)


def _one_error_line(capsys, *fragments):
    err = capsys.readouterr().err
    assert "Traceback" not in err and err.count("\n") == 1, err
    assert all(fragment in err for fragment in fragments), err


def test_a_missing_input_is_an_error_before_any_work(tmp_path, capsys):
    annotations, images, _ = make_json_input(tmp_path / "json")
    out = tmp_path / "out"
    assert _build(out, f"name=coco,format=json,path={tmp_path / 'nope.json'},image_root={images}") == 2
    _one_error_line(capsys, "source 'coco'", "nope.json does not exist")
    assert _build(out, f"name=web,format=webdataset,path={tmp_path / 'nope.tar'}") == 2
    _one_error_line(capsys, "source 'web'", "nope.tar does not exist")
    assert not out.exists()


def test_a_json_that_is_not_a_list_is_an_error(tmp_path, capsys):
    coco_style = tmp_path / "captions_train2017.json"
    coco_style.write_text(json.dumps({"images": [], "annotations": [], "info": {}}))
    assert _build(tmp_path / "out", f"name=coco,format=json,path={coco_style}") == 2
    _one_error_line(capsys, "captions_train2017.json: expected a JSON list", "'images', 'annotations'")
    broken = tmp_path / "broken.json"
    broken.write_text('[{"image": "a.jpg", "caption": "cut sh')
    assert _build(tmp_path / "out", f"name=coco,format=json,path={broken}") == 2
    _one_error_line(capsys, "broken.json: not readable as JSON")
    assert not (tmp_path / "out").exists()


def test_a_json_list_with_a_byte_order_mark_is_read(tmp_path, capsys):
    annotations, images, expected = make_json_input(tmp_path / "json")
    with_bom = tmp_path / "bom.json"
    with_bom.write_bytes(b"\xef\xbb\xbf" + annotations.read_bytes())
    assert _build(tmp_path / "out", f"name=coco,format=json,path={with_bom},image_root={images}") == 0
    assert read_manifest(tmp_path / "out")["splits"]["train"]["rows"] == expected.rows


def test_an_output_that_is_a_file_is_an_error(tmp_path, capsys):
    tars, _ = make_webdataset_input(tmp_path / "tars")
    out = tmp_path / "out.parquet"
    out.write_bytes(b"precious")
    assert _build(out, f"name=web,format=webdataset,path={tars}") == 2
    _one_error_line(capsys, "out.parquet exists and is not a directory")
    assert out.read_bytes() == b"precious"


@pytest.mark.parametrize("overwrite", [[], ["--overwrite"]])
def test_an_output_holding_someone_elses_shards_is_refused(tmp_path, capsys, overwrite):
    tars, _ = make_webdataset_input(tmp_path / "tars")
    out = tmp_path / "mine"
    (out / "train").mkdir(parents=True)
    (out / "train" / "part-00000.parquet").write_bytes(b"the user's own shard")
    (out / "train" / "part-00007.parquet").write_bytes(b"another one")
    assert _build(out, f"name=web,format=webdataset,path={tars}", extra=overwrite) == 2
    _one_error_line(capsys, "train/part-00000.parquet and 1 more not written by albef-ray")
    assert (out / "train" / "part-00000.parquet").read_bytes() == b"the user's own shard"
    assert (out / "train" / "part-00007.parquet").read_bytes() == b"another one"
    assert sorted(p.name for p in out.rglob("*")) == ["part-00000.parquet", "part-00007.parquet", "train"]


def test_our_own_dataset_may_be_rebuilt_over(tmp_path, capsys):
    tars, expected = make_webdataset_input(tmp_path / "tars")
    out = tmp_path / "out"
    assert _build(out, f"name=web,format=webdataset,path={tars}") == 0
    assert _build(out, f"name=web,format=webdataset,path={tars}", extra=["--shard-rows", "1"]) == 2
    _one_error_line(capsys, "other inputs or settings (shard_rows None -> 1)", "--overwrite")
    assert _build(out, f"name=web,format=webdataset,path={tars}", extra=["--shard-rows", "1", "--overwrite"]) == 0
    assert len(read_manifest(out)["splits"]["train"]["shards"]) == expected.rows


@pytest.mark.parametrize("flag, value", [("--shard-rows", "0"), ("--shard-rows", "-3"), ("--shard-size", "0")])
def test_non_positive_shard_targets_are_refused(tmp_path, capsys, flag, value):
    tars, _ = make_webdataset_input(tmp_path / "tars")
    assert _build(tmp_path / "out", f"name=web,format=webdataset,path={tars}", extra=[flag, value]) == 2
    _one_error_line(capsys, f"{flag}: ", "not a positive")
    assert not (tmp_path / "out").exists()


def test_the_report_says_how_rows_are_ordered(tmp_path, capsys):
    tars, _ = make_webdataset_input(tmp_path / "tars")
    assert _build(tmp_path / "a", f"name=web,format=webdataset,path={tars}", extra=["--shuffle-seed", "3"]) == 0
    assert "row order: shuffled across each split (seed 3)" in capsys.readouterr().out
    assert read_manifest(tmp_path / "a")["build"]["shuffle_seed"] == 3
    assert _build(tmp_path / "b", f"name=web,format=webdataset,path={tars}", extra=["--no-shuffle"]) == 0
    assert "row order: input order" in capsys.readouterr().out


def test_sigterm_stops_a_build_as_ctrl_c_does(tmp_path, capsys, monkeypatch):
    import albef_ray.data.build.writer as writer_module

    tars, _ = make_webdataset_input(tmp_path / "tars")

    def terminated(*args, **kwargs):
        os.kill(os.getpid(), signal.SIGTERM)  # as `kill PID` or a scheduler's stop
        time.sleep(30)
        raise AssertionError("SIGTERM did not interrupt the build")

    monkeypatch.setattr(writer_module, "write_dataset", terminated)
    before = signal.getsignal(signal.SIGTERM)
    assert _build(tmp_path / "out", f"name=web,format=webdataset,path={tars}") == 130
    assert "interrupted; run the same command again to finish the build" in capsys.readouterr().err
    assert signal.getsignal(signal.SIGTERM) == before
