"""Every weights file is read by one safe loader: bad files give one clear error, never unsafe advice."""

import pytest
import torch

from albef_ray.config import build_config
from albef_ray.model.albef import build_model
from albef_ray.model.loading import CheckpointError, load_albef_checkpoint, read_hf_bert_state, read_weights_file
from albef_ray.model.vision import read_timm_vit_state
from albef_ray.objectives.pretrain import PretrainTask
from albef_ray.train.checkpoint import STATE_FILE, load_training_state

RANDOM_BYTES = bytes(range(1, 256)) * 4  # starts with 0x01: neither a zip archive nor a pickle


class NotATensor:
    """A class a weights-only load must refuse to import."""


class RunsCode:
    def __reduce__(self):  # unpickling would call open() on a marker path
        return (open, (str(RunsCode.marker), "w"))


def _write(path, kind):
    if kind == "empty":
        path.write_bytes(b"")
    elif kind == "random":
        path.write_bytes(RANDOM_BYTES)
    elif kind == "custom":
        torch.save({"model": {"w": torch.ones(2)}, "extra": NotATensor()}, path)
    elif kind == "truncated":
        torch.save({"w": torch.ones(100)}, path)
        path.write_bytes(path.read_bytes()[:200])
    return path


@pytest.mark.parametrize("kind, message", [
    ("empty", "{path}: empty"),
    ("random", "{path}: not a PyTorch checkpoint ("),
    ("truncated", "{path}: not a PyTorch checkpoint ("),
    ("custom", f"{{path}}: not a weights-only checkpoint (it pickles {__name__}.NotATensor,"),
])
def test_bad_files_raise_one_clear_error_without_unsafe_advice(tmp_path, kind, message):
    path = _write(tmp_path / "ckpt.pth", kind)
    with pytest.raises(CheckpointError) as caught:
        read_weights_file(path)
    text = str(caught.value)
    assert text.startswith(message.format(path=path)) and "\n" not in text
    assert "weights_only" not in text and "safe_globals" not in text and "trust" not in text
    error = caught.value
    assert error.__cause__ is None and (error.__context__ is None or error.__suppress_context__)  # no chained torch hint


def test_a_pickle_that_would_run_code_is_refused_and_does_not_run(tmp_path):
    RunsCode.marker = tmp_path / "ran"
    path = tmp_path / "evil.pt"
    torch.save({"w": RunsCode()}, path)
    legacy = tmp_path / "evil_legacy.pt"
    torch.save({"w": RunsCode()}, legacy, _use_new_zipfile_serialization=False)
    for file in (path, legacy):
        with pytest.raises(CheckpointError, match=r"not a weights-only checkpoint \(it pickles .*open"):
            read_weights_file(file)
    assert not RunsCode.marker.exists()


def test_good_files_and_safetensors(tmp_path):
    from safetensors.torch import save_file

    torch.save({"w": torch.arange(3)}, tmp_path / "a.pt")
    assert torch.equal(read_weights_file(tmp_path / "a.pt")["w"], torch.arange(3))
    save_file({"w": torch.ones(2)}, str(tmp_path / "b.safetensors"))
    assert torch.equal(read_weights_file(tmp_path / "b.safetensors")["w"], torch.ones(2))
    (tmp_path / "c.safetensors").write_bytes(RANDOM_BYTES)
    with pytest.raises(CheckpointError, match="c.safetensors: not a safetensors file"):
        read_weights_file(tmp_path / "c.safetensors")
    with pytest.raises(FileNotFoundError):
        read_weights_file(tmp_path / "missing.pt")


def test_every_loader_goes_through_the_safe_reader(tmp_path):
    bad = _write(tmp_path / "vit.pth", "custom")
    with pytest.raises(CheckpointError, match="not a weights-only checkpoint"):
        read_timm_vit_state(str(bad))  # model.vit_init
    bert = tmp_path / "bert"
    bert.mkdir()
    _write(bert / "pytorch_model.bin", "random")
    with pytest.raises(CheckpointError, match="pytorch_model.bin: not a PyTorch checkpoint"):
        read_hf_bert_state(str(bert))  # model.bert_init
    with pytest.raises(CheckpointError, match="ckpt.pth: empty"):
        load_albef_checkpoint(build_model("albef_tiny"), str(_write(tmp_path / "ckpt.pth", "empty")))  # model.checkpoint
    cfg = build_config({"model": {"size": "albef_tiny", "vit_init": None, "bert_init": None}})
    task = PretrainTask(build_model("albef_tiny"), cfg)
    run = tmp_path / "checkpoint_000000"
    run.mkdir()
    _write(run / STATE_FILE, "custom")
    with pytest.raises(CheckpointError, match="not a weights-only checkpoint"):
        load_training_state(run, task)  # resuming a run
    torch.save({"model": task.state_dict()}, run / STATE_FILE)  # weights only, no training state
    with pytest.raises(CheckpointError, match="not an albef-ray training checkpoint"):
        load_training_state(run, task)
