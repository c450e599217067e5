"""Driver-side path handling: Ray workers run in a session folder, so local paths go absolute."""

from albef_ray.config import build_config
from albef_ray.launch.train import absolute_data_paths, run_paths


def test_local_data_paths_become_absolute_and_uris_stay(tmp_path, monkeypatch):
    (tmp_path / "synth" / "tokenizer").mkdir(parents=True)
    monkeypatch.chdir(tmp_path)
    cfg = build_config({"data": {"shards": ["synth", "s3://bucket/cc3m"], "tokenizer": "synth/tokenizer"}})
    out = absolute_data_paths(cfg)
    assert out.data.shards == [str(tmp_path / "synth"), "s3://bucket/cc3m"]
    assert out.data.tokenizer == str(tmp_path / "synth" / "tokenizer")
    assert absolute_data_paths(build_config({})).data.tokenizer == "bert-base-uncased"  # a hub name


def test_run_paths_are_absolute_and_named(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    paths = run_paths(build_config({"name": "exp", "run": {"storage_path": "runs"}}))
    assert paths.storage == tmp_path / "runs" and paths.name.startswith("exp-")
    assert run_paths(build_config({"run": {"name": "fixed"}})).name == "fixed"
