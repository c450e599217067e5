"""``albef-ray data build`` and ``albef-ray data synth``."""

from __future__ import annotations

from albef_ray.cli import build_parser, main, parse_size
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
