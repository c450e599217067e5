"""Driver-side path handling: Ray workers run in a session folder, so local paths go absolute."""

import pytest

from albef_ray.config import ConfigError, build_config
from albef_ray.launch.common import absolute_data_paths, run_paths


def test_local_data_paths_become_absolute_and_uris_stay(tmp_path, monkeypatch):
    (tmp_path / "synth" / "tokenizer").mkdir(parents=True)
    (tmp_path / "synth" / "manifest.json").write_text("{}")  # a dataset root (missing ones are refused)
    monkeypatch.chdir(tmp_path)
    cfg = build_config({"data": {"shards": ["synth", "s3://bucket/cc3m"], "tokenizer": "synth/tokenizer"}})
    out = absolute_data_paths(cfg)
    assert out.data.shards == [str(tmp_path / "synth"), "s3://bucket/cc3m"]
    assert out.data.tokenizer == str(tmp_path / "synth" / "tokenizer")
    assert absolute_data_paths(build_config({})).data.tokenizer == "bert-base-uncased"  # a hub name


def test_local_init_weights_become_absolute_and_hub_names_stay(tmp_path, monkeypatch):
    (tmp_path / "init" / "bert").mkdir(parents=True)
    (tmp_path / "init" / "vit.pth").write_bytes(b"")
    monkeypatch.chdir(tmp_path)
    out = absolute_data_paths(build_config({"model": {"vit_init": "init/vit.pth", "bert_init": "init/bert"}}))
    assert (out.model.vit_init, out.model.bert_init) == (str(tmp_path / "init" / "vit.pth"), str(tmp_path / "init" / "bert"))
    hub = absolute_data_paths(build_config({}))
    assert (hub.model.vit_init, hub.model.bert_init) == ("deit_base_patch16_224.fb_in1k", "bert-base-uncased")


def test_run_paths_are_absolute_and_named(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    paths = run_paths(build_config({"name": "exp", "run": {"storage_path": "runs"}}))
    assert paths.storage == tmp_path / "runs" and paths.name.startswith("exp-")
    assert run_paths(build_config({"run": {"name": "fixed"}})).name == "fixed"


@pytest.mark.parametrize("key, path", [("vit_init", "init/vit.pth"), ("bert_init", "./init/bert"), ("checkpoint", "/no/such/ALBEF.pth")])
def test_a_missing_local_weights_path_fails_before_ray(tmp_path, monkeypatch, key, path):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ConfigError, match=f"model.{key}: {path} does not exist"):
        absolute_data_paths(build_config({"model": {key: path}}))


def test_ray_data_progress_bars_only_on_a_terminal(monkeypatch):
    import io

    import ray.data

    from albef_ray.launch.data import quiet_progress_off_terminal

    ctx = ray.data.DataContext.get_current()
    monkeypatch.setattr(ctx, "enable_progress_bars", True)
    tty = io.StringIO()
    tty.isatty = lambda: True
    monkeypatch.setattr("sys.stderr", tty)
    quiet_progress_off_terminal()
    assert ctx.enable_progress_bars is True
    monkeypatch.setattr("sys.stderr", io.StringIO())  # a log file, a Tune trial, `ray job submit`
    quiet_progress_off_terminal()
    assert ctx.enable_progress_bars is False
