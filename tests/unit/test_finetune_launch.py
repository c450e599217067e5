"""The fine-tuning launcher's Ray-free parts: input checks, best checkpoint, paths, the CLI."""

import math
from pathlib import Path
from types import SimpleNamespace

import pytest

from albef_ray.cli import main
from albef_ray.config import ConfigError, load_config
from albef_ray.launch.common import absolute_data_paths
from albef_ray.launch.finetune import check_inputs
from albef_ray.launch.train import best_checkpoint
from albef_ray.tasks import get_task

EXPERIMENTS = Path(__file__).resolve().parents[2] / "experiments"
COCO, FLICKR, SYNTH = (str(EXPERIMENTS / f"finetune_{n}.yaml") for n in ("coco", "flickr", "synth"))


def test_config_files_follow_the_official_retrieval_settings():
    coco, flickr = load_config(COCO), load_config(FLICKR)
    for cfg in (coco, flickr):
        assert cfg.task == "retrieval" and not cfg.mlm.enabled and cfg.itc.enabled and cfg.itm.enabled
        assert cfg.model.image_res == 384 and cfg.optim.lr == 1e-5 and cfg.optim.min_lr == 1e-6
        assert cfg.optim.warmup_lr == cfg.optim.lr  # official warm-up from 1e-5 to 1e-5: a constant first epoch
        assert (cfg.train.batch_size, cfg.train.num_workers) == (32, 8) and cfg.data.crop_scale == (0.5, 1.0)
        assert cfg.momentum.queue_size == 65536 and cfg.mod.alpha == 0.4 and cfg.mod.itc
        assert cfg.eval.split == "val" and get_task(cfg.task).evaluates_every_epoch(cfg)
    assert (coco.train.epochs, coco.eval.k_test) == (5, 256)
    assert (flickr.train.epochs, flickr.eval.k_test) == (10, 128)
    assert load_config(SYNTH).model.size == "albef_tiny"


def test_inputs_are_checked_before_ray_starts(tmp_path):
    (tmp_path / "ds" / "train").mkdir(parents=True)
    ok = load_config(SYNTH, [f"data.shards=[{tmp_path / 'ds'}]", "eval.every_epoch=false"])
    check_inputs(ok)
    with pytest.raises(ConfigError, match=r"^data\.shards: "):
        check_inputs(load_config(SYNTH, ["data.shards=[]"]))
    with pytest.raises(ConfigError, match=r"^task: "):
        check_inputs(load_config(None, [f"data.shards=[{tmp_path / 'ds'}]"]))


def test_best_checkpoint_skips_unevaluated_ones():
    def ckpt(path):
        return SimpleNamespace(path=path)

    result = SimpleNamespace(best_checkpoints=[
        (ckpt("a"), {"r_mean": math.nan, "step": 4}),  # mid-epoch: not evaluated
        (ckpt("b"), {"r_mean": 40.0, "step": 6}),
        (ckpt("c"), {"r_mean": 55.5, "step": 12}),
        (ckpt("d"), {"step": 14}),
    ])
    assert best_checkpoint(result, "r_mean") == ("c", {"r_mean": 55.5, "step": 12})
    assert best_checkpoint(SimpleNamespace(best_checkpoints=[(ckpt("a"), {"r_mean": math.nan})]), "r_mean") is None
    assert best_checkpoint(SimpleNamespace(best_checkpoints=None), "r_mean") is None


def test_eval_shards_and_checkpoint_become_absolute(tmp_path, monkeypatch):
    (tmp_path / "data" / "synth" / "tokenizer").mkdir(parents=True)
    for dataset in ("coco", "data/coco", "data/synth"):  # the configs' data.shards: missing ones are refused
        (tmp_path / dataset).mkdir(parents=True, exist_ok=True)
        (tmp_path / dataset / "manifest.json").write_text("{}")
    (tmp_path / "pre.pth").write_bytes(b"")
    monkeypatch.chdir(tmp_path)
    cfg = load_config(COCO, ["eval.shards=[coco]", "model.checkpoint=pre.pth"])
    out = absolute_data_paths(cfg)
    assert out.eval.shards == [str(tmp_path / "coco")] and out.model.checkpoint == str(tmp_path / "pre.pth")
    assert absolute_data_paths(load_config(SYNTH)).model.checkpoint is None


def test_cli_finetune_help_and_errors(capsys, tmp_path):
    with pytest.raises(SystemExit) as exit_:
        main(["finetune", "retrieval", "--help"])
    assert exit_.value.code == 0
    out = capsys.readouterr().out
    assert "--checkpoint" in out and "--resume" in out and "r_mean" in out
    assert main(["finetune", "retrieval", "--config", SYNTH, "mlm.enabled=true"]) == 2
    assert capsys.readouterr().err.startswith("albef-ray: config error: mlm.enabled: ")
    assert main(["finetune", "retrieval", "--config", SYNTH, "--checkpoint", str(tmp_path / "none")]) == 2
    assert "finetune error" in capsys.readouterr().err
