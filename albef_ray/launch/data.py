"""Ray Data edge: Parquet caption shards -> decoded, augmented batches for Ray Train workers.

The pipeline only chains the plain functions of :mod:`albef_ray.data`::

    read_parquet(shards of <split>, shuffle="files") a new file order every epoch
    -> repartition(target_num_rows_per_block=M)      streaming: blocks of M rows, so decode
                                                     work spreads over every free CPU
    -> map_batches(transform_batch)                  tasks: decode, crop, flip, RandAugment,
                                                     clean captions, shuffle rows, drop and
                                                     count undecodable rows
    trainer side: iter_torch_batches(collate_fn=CaptionCollate(...), **iter_kwargs(cfg))
                                                     local shuffle, tokenise, normalise

Images cross the object store as ``uint8`` and are normalised in the collate (4x fewer bytes
than ``float32``). Ray Train splits the dataset across workers with ``streaming_split``, so
each worker reads a disjoint shard, and every epoch re-executes the pipeline: new file
order, new row order, new augmentations.
"""

from __future__ import annotations

import os
from typing import Any

import numpy as np
import torch
from ray.data.collate_fn import NumpyBatchCollateFn

from ..config import AlbefConfig, ConfigError
from ..data.collate import CaptionCollator, load_tokenizer
from ..data.manifest import shard_files
from ..data.transforms import AugmentSpec, transform_batch

READ_COLUMNS = ["image", "caption", "image_id", "source"]


def count_rows(paths: list[str], split: str) -> int:
    """Rows of a split: from the manifests, else from the Parquet footers (no data read)."""
    import pyarrow.dataset as pads

    files, rows = shard_files(paths, split)
    if rows is not None:
        return rows
    return sum(pads.dataset(f, format="parquet").count_rows() for f in files)


def _decode_task(batch: dict[str, np.ndarray], spec: AugmentSpec, training: bool, max_words: int) -> dict:
    # Fresh OS entropy per task: augmentations differ across tasks, workers and epochs.
    generator = torch.Generator().manual_seed(int.from_bytes(os.urandom(8), "little") >> 1)
    return transform_batch(batch, spec, training, max_words, generator)


def build_dataset(paths: list[str], split: str, cfg: AlbefConfig, training: bool):
    """The streaming dataset of one split of caption shards.

    Args:
        paths: dataset roots (local dirs or cloud URIs), read as :func:`shard_files` says.
        split: ``train``, ``val`` or ``test``.
        cfg: ``data.*`` sets the transform and batching; ``model`` the resolution.
        training: pretraining transform, file and row shuffles; else the evaluation transform
            and no shuffles (blocks may still arrive out of order unless Ray Data's
            ``execution_options.preserve_order`` is set).

    Returns:
        A ``ray.data.Dataset`` of rows ``image`` uint8 (3, R, R), ``caption`` (cleaned),
        ``image_id``, ``image_idx`` (int64), ``num_dropped`` (see
        :func:`albef_ray.data.transforms.transform_batch`).
    """
    import ray.data

    if not paths:
        raise ConfigError("data.shards: no dataset paths given")
    files, _ = shard_files(paths, split)
    ds = ray.data.read_parquet(files, shuffle="files" if training else None).select_columns(READ_COLUMNS)
    ds = ds.repartition(target_num_rows_per_block=cfg.data.map_batch_size)
    return ds.map_batches(
        _decode_task,
        fn_kwargs={"spec": AugmentSpec.from_config(cfg), "training": training, "max_words": cfg.data.max_words},
        batch_size=cfg.data.map_batch_size,
        batch_format="numpy",
    )


class CaptionCollate(NumpyBatchCollateFn):
    """``iter_torch_batches(collate_fn=...)``: tokenise, normalise, sum ``num_dropped``.

    Returns tensors only (``image``, ``input_ids``, ``attention_mask``, ``num_dropped``,
    ``image_idx``), so Ray moves the whole batch to the worker's device. The tokenizer is
    loaded from ``data.tokenizer`` on first use in the process that collates.

    Args:
        tokenizer: hub name or local directory.
        max_text_len: token limit.
        max_words: clean captions here too (``None``: :func:`build_dataset` already did).
    """

    def __init__(self, tokenizer: str, max_text_len: int = 25, max_words: int | None = None):
        super().__init__()
        self.collator = CaptionCollator(tokenizer, max_text_len, max_words)

    @classmethod
    def from_config(cls, cfg: AlbefConfig) -> "CaptionCollate":
        return cls(cfg.data.tokenizer, cfg.data.max_text_len)

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, torch.Tensor]:
        return self.collator(batch)


def iter_kwargs(cfg: AlbefConfig, training: bool = True) -> dict[str, Any]:
    """Keyword arguments for ``shard.iter_torch_batches`` (everything but ``collate_fn``/``device``).

    Full batches only when training (equal global batches for the ITC queue and gathers) and
    a local shuffle buffer of ``data.shuffle_buffer`` rows, which mixes rows across files.
    """
    buffer = cfg.data.shuffle_buffer if training and cfg.data.shuffle_buffer > 0 else None
    return {"batch_size": cfg.train.batch_size, "drop_last": training, "local_shuffle_buffer_size": buffer}


def build_pretrain_inputs(cfg: AlbefConfig):
    """Everything ``run_pretrain`` needs from ``data.shards``.

    Returns:
        ``({"train": dataset}, steps_per_epoch, collate, special_tokens)``; steps per epoch is
        ``train.steps_per_epoch`` or full global batches in the split's row count.
    """
    from ..model.registry import get_arch
    from ..objectives.mlm import SpecialTokens

    tokenizer = load_tokenizer(cfg.data.tokenizer)
    vocab = get_arch(cfg.model.size, cfg.model.image_res).vocab_size
    if len(tokenizer) > vocab:
        raise ConfigError(
            f"data.tokenizer: {cfg.data.tokenizer} has {len(tokenizer)} tokens, more than "
            f"model.size={cfg.model.size}'s vocabulary of {vocab}"
        )
    global_batch = cfg.train.batch_size * cfg.train.num_workers
    steps = cfg.train.steps_per_epoch
    if steps is None:
        rows = count_rows(cfg.data.shards, "train")
        steps = rows // global_batch
        if steps == 0:
            raise ConfigError(
                f"data.shards: {rows} training rows make no global batch of "
                f"train.batch_size x train.num_workers = {global_batch}"
            )
    quiet_progress_off_terminal()
    dataset = build_dataset(cfg.data.shards, "train", cfg, training=True)
    return {"train": dataset}, steps, CaptionCollate.from_config(cfg), SpecialTokens.from_tokenizer(tokenizer)


def quiet_progress_off_terminal() -> None:
    """Ray Data's progress bars only when a person watches (stderr is a terminal).

    Under a Tune trial, ``ray job submit`` or a redirected log they print a screenful per
    second between the training lines. The setting travels with the datasets built after it.
    """
    import sys

    import ray.data

    if not sys.stderr.isatty():
        ray.data.DataContext.get_current().enable_progress_bars = False
