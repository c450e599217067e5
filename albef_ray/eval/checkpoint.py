"""Evaluate a checkpoint: build the model from the config, load weights, read the split, score.

A checkpoint is any of

* an albef-ray checkpoint directory holding ``state.pt`` (a Ray Train checkpoint of a
  pretraining or fine-tuning run: the task's state dict, keys ``model.*`` / ``momentum.*``);
* a run directory holding ``checkpoint_*`` directories: the latest is taken;
* a ``.pth`` / ``.pt`` file: a released ALBEF checkpoint or an albef-ray ``state.pt``.

Only the online model is evaluated (the official ``evaluation()`` does the same).
"""

from __future__ import annotations

import logging
import time
from pathlib import Path

import torch

from ..config import AlbefConfig, ConfigError
from ..model.albef import ALBEF
from ..train.checkpoint import STATE_FILE
from .retrieval import evaluate
from .split import RetrievalSplit, load_split

log = logging.getLogger(__name__)


def resolve_checkpoint(path: str | Path) -> Path:
    """The weights file behind ``path`` (see the module doc); raises ``FileNotFoundError``."""
    path = Path(path).expanduser()
    if path.is_file():
        return path
    if (path / STATE_FILE).is_file():
        return path / STATE_FILE
    if path.is_dir():
        found = sorted(p for p in path.glob("checkpoint_*") if (p / STATE_FILE).is_file())
        if found:
            return found[-1] / STATE_FILE  # Ray numbers checkpoints checkpoint_000000, 000001, ...
    raise FileNotFoundError(f"{path}: not a checkpoint file, a directory with {STATE_FILE}, or a run directory")


def checkpoint_step(weights: str | Path) -> int | None:
    """The optimizer step an albef-ray ``state.pt`` was saved at (``None`` for other files)."""
    from ..model.weights_file import read_weights_file

    state = read_weights_file(weights)
    progress = state.get("progress") if isinstance(state, dict) else None
    return int(progress["step"]) if isinstance(progress, dict) and "step" in progress else None


def load_eval_model(cfg: AlbefConfig, checkpoint: str | Path | None = None) -> ALBEF:
    """``cfg.model.size`` with the checkpoint's weights (``checkpoint`` or ``model.checkpoint``).

    With a checkpoint the ViT / BERT initial weights are not loaded first: the checkpoint
    holds every weight, and this saves a hub download. Without one, the model keeps the
    configured inits (a zero-shot baseline of the initial weights).
    """
    from ..model.loading import build_model_from_config, load_albef_checkpoint

    checkpoint = checkpoint or cfg.model.checkpoint
    if checkpoint is None:
        log.warning("no checkpoint given: evaluating the model as initialised by model.vit_init / model.bert_init")
        return build_model_from_config(cfg)
    weights = resolve_checkpoint(checkpoint)
    bare = cfg.model.model_copy(update={"vit_init": None, "bert_init": None})
    model = build_model_from_config(cfg.model_copy(update={"model": bare}))
    report = load_albef_checkpoint(model, str(weights))
    if not report.loaded:
        raise ValueError(f"{weights}: no weight of the checkpoint fits model.size={cfg.model.size}")
    if report.missing:
        log.warning("%s", report)
    else:
        log.info("%s", report)
    return model


def eval_paths(cfg: AlbefConfig) -> list[str]:
    """``eval.shards``, else ``data.shards``."""
    paths = list(cfg.eval.shards or cfg.data.shards)
    if not paths:
        raise ConfigError("eval.shards: no dataset to evaluate on (set eval.shards or data.shards)")
    return paths


def evaluate_checkpoint(
    cfg: AlbefConfig,
    checkpoint: str | Path | None = None,
    device: torch.device | str | None = None,
    split: RetrievalSplit | None = None,
) -> dict[str, float]:
    """Zero-shot retrieval of a checkpoint on ``eval.split`` of ``eval.shards`` (or ``data.shards``).

    Args:
        cfg: the config tree (model size, tokenizer, ``eval.*``, ``train.precision``).
        checkpoint: see the module doc; default ``model.checkpoint``, else the initial weights.
        device: default CUDA when ``train.use_gpu`` and a GPU is visible, else CPU.
        split: an already loaded split, to evaluate several checkpoints on one read.

    Returns:
        ``txt_r1 ... r_mean`` (percent), ``num_images``, ``num_texts``, ``eval_seconds``
        (the whole call: loading the model and the split included) and ``skipped_images``.
    """
    from ..data.collate import load_tokenizer
    from ..precision import resolve_device

    start = time.perf_counter()
    paths = eval_paths(cfg) if split is None else []  # a config error before any loading
    device = torch.device(device) if device is not None else resolve_device(cfg)
    model = load_eval_model(cfg, checkpoint).to(device)
    tokenizer = load_tokenizer(cfg.data.tokenizer)
    if split is None:
        split = load_split(paths, cfg.eval.split, cfg)
    metrics = evaluate(model, split, tokenizer, cfg, device)
    metrics["eval_seconds"] = time.perf_counter() - start
    metrics["skipped_images"] = split.num_skipped
    return metrics
