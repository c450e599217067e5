"""The worker loop's resume position and epoch-end pieces (no Ray started)."""

import json
import logging

import pytest

from albef_ray.config import ConfigError, build_config
from albef_ray.launch.train import STREAM_FILE, _agreed, _stream_position, run_pretrain
from albef_ray.train.checkpoint import TrainProgress


def _write(directory, rank, epoch, position, world):
    (directory / STREAM_FILE.format(rank=rank)).write_text(json.dumps({"epoch": epoch, "position": position, "world": world}))


def test_stream_position_is_the_saved_one_for_the_same_workers(tmp_path):
    _write(tmp_path, 0, 1, 37, 2)
    _write(tmp_path, 1, 1, 41, 2)
    progress = TrainProgress(step=12, epoch=1, batches_done=9)
    assert _stream_position(tmp_path, 0, 2, progress, batch_size=4) == 37
    assert _stream_position(tmp_path, 1, 2, progress, batch_size=4) == 41


def test_stream_position_is_zero_at_an_epoch_boundary(tmp_path):
    _write(tmp_path, 0, 1, 37, 2)  # written as epoch 1 started over: batches_done 0 wins
    assert _stream_position(tmp_path, 0, 2, TrainProgress(step=20, epoch=2, batches_done=0), 4) == 0


def test_stream_position_with_other_workers_is_an_estimate_with_a_warning(tmp_path, caplog):
    _write(tmp_path, 0, 1, 37, 2)
    _write(tmp_path, 1, 1, 41, 2)
    progress = TrainProgress(step=12, epoch=1, batches_done=9)
    with caplog.at_level(logging.WARNING):
        assert _stream_position(tmp_path, 0, 4, progress, 4) == (37 + 41) // 4
    assert "estimate" in caplog.text
    caplog.clear()
    with caplog.at_level(logging.WARNING):  # an older checkpoint without stream files
        assert _stream_position(tmp_path / "none", 0, 1, progress, 4) == 36
    assert "estimate" in caplog.text


def test_agreed_batches_on_one_worker_end_with_the_stream():
    assert list(_agreed(iter([1, 2, 3]), world=1)) == [1, 2, 3]
    assert list(_agreed(iter([]), world=1)) == []


def test_generated_tensors_need_steps_per_epoch():
    cfg = build_config({
        "model": {"size": "albef_tiny", "vit_init": None, "bert_init": None},
        "train": {"num_workers": 1, "steps_per_epoch": None, "use_gpu": False},
    })
    with pytest.raises(ConfigError, match="train.steps_per_epoch"):
        run_pretrain(cfg, echo=lambda *_: None)
