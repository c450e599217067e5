"""The training checkpoint: everything needed to continue a run exactly, in plain PyTorch.

A checkpoint is a directory holding ``state.pt`` (model, momentum model, queues, optimizer,
step, epoch, RNG states) and ``config.yaml`` (the resolved config). The model part is the
:class:`~albef_ray.objectives.pretrain.PretrainTask` state dict, so
:func:`~albef_ray.model.loading.load_albef_checkpoint` also reads ``state.pt`` for
fine-tuning or evaluation.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

from ..config import AlbefConfig, dump_yaml
from ..model.weights_file import CheckpointError, read_weights_file

STATE_FILE = "state.pt"
CONFIG_FILE = "config.yaml"


@dataclass
class TrainProgress:
    """Where a run stands: ``step`` optimizer steps done, ``batches_done`` of ``epoch``."""

    step: int = 0
    epoch: int = 0
    batches_done: int = 0
    nonfinite_in_row: int = 0


def _unwrap(task: nn.Module) -> nn.Module:
    return task.module if hasattr(task, "module") else task  # DDP


def _numpy_state_to_tensors(state: tuple) -> tuple:
    # weights_only loading accepts tensors but not numpy arrays
    name, keys, pos, has_gauss, cached = state
    return (name, torch.from_numpy(keys.astype(np.int64)), int(pos), int(has_gauss), float(cached))


def rng_state(generator: torch.Generator | None) -> dict:
    state = {
        "torch": torch.get_rng_state(),
        "numpy": _numpy_state_to_tensors(np.random.get_state()),
        "python": random.getstate(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    if generator is not None:
        state["generator"] = generator.get_state()
    return state


def set_rng_state(state: dict, generator: torch.Generator | None) -> None:
    torch.set_rng_state(state["torch"])
    name, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), pos, has_gauss, cached))
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
    if generator is not None and "generator" in state:
        generator.set_state(state["generator"])


def save_training_state(
    directory: str | Path,
    task: nn.Module,
    optimizer: torch.optim.Optimizer,
    progress: TrainProgress,
    cfg: AlbefConfig,
    generator: torch.Generator | None = None,
) -> Path:
    """Write ``state.pt`` and ``config.yaml`` into ``directory`` (created) and return it."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    state = {
        "model": {k: v.detach().cpu() for k, v in _unwrap(task).state_dict().items()},
        "optimizer": optimizer.state_dict(),
        "progress": vars(progress).copy(),
        "rng": rng_state(generator),
    }
    torch.save(state, directory / STATE_FILE)
    (directory / CONFIG_FILE).write_text(dump_yaml(cfg))
    return directory


def load_training_state(
    directory: str | Path,
    task: nn.Module,
    optimizer: torch.optim.Optimizer | None = None,
    generator: torch.Generator | None = None,
    restore_rng: bool = True,
) -> TrainProgress:
    """Restore what :func:`save_training_state` wrote; returns the progress to continue from."""
    path = Path(directory) / STATE_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{directory}: no {STATE_FILE}; not an albef-ray checkpoint")
    state = read_weights_file(path)  # CheckpointError for an empty, corrupt or unsafe file
    if not isinstance(state, dict) or not {"model", "optimizer", "progress", "rng"} <= state.keys():
        raise CheckpointError(f"{path}: not an albef-ray training checkpoint (no model, optimizer, progress and rng sections)")
    _unwrap(task).load_state_dict(state["model"])
    if optimizer is not None:
        optimizer.load_state_dict(state["optimizer"])
    if restore_rng:
        set_rng_state(state["rng"], generator)
    return TrainProgress(**state["progress"])
