"""Ray Data edge: Parquet caption shards -> decoded, augmented batches for Ray Train workers.

Training reads a :class:`ShardStream`: the driver lists the split's files and row counts
once; each worker, every epoch, runs its own pipeline over its windows of the epoch's
deterministic order (:mod:`albef_ray.data.stream`)::

    from_items(the worker's windows from its resume position)   one item per window
    -> map_batches(ShardStream.decode)             tasks: read only the window's row groups,
                                                   decode, crop, flip, RandAugment (seeded per
                                                   row), clean and tokenise captions, drop and
                                                   count undecodable rows
    -> iter_torch_batches(collate_fn=StreamCollate, preserve_order)
                                                   cut token ids to the batch's longest,
                                                   normalise (on the GPU when training on one),
                                                   in stream order

The order is a function of (seed, epoch): no file shuffle, shuffle buffer or block
randomisation of Ray Data's (their orders differ run to run). A resumed worker starts at its
stream position (the row after its last trained one) without reading what lies before it.
Caption blocks hold numbers only (``uint8`` images, int32 token ids, int64 row ids; a
downstream task's own columns travel as they are), and the consumer, the training process,
does the least per row (measured per CPU-second: docs/benchmarks.md).

:func:`build_dataset` is the unordered pipeline (file shuffle, Ray's splits), kept for
benchmarks and evaluation-style reads.
"""

from __future__ import annotations

import copy
import json
import os
import time
from collections.abc import Iterator
from typing import Any

import numpy as np
import torch
from ray.data._internal.execution.execution_callback import ExecutionCallback
from ray.data.collate_fn import NumpyBatchCollateFn

from ..config import AlbefConfig, ConfigError
from ..data.collate import CaptionCollator, load_tokenizer, pretokenize
from ..data.manifest import shard_files
from ..data.stream import (
    READ_COLUMNS,
    EpochOrder,
    Window,
    file_row_counts,
    iter_window,
    list_parquet,
    task_columns_of,
)
from ..data.transforms import AugmentSpec, normalize, transform_batch


class IdleLoopPause(ExecutionCallback):
    """Paces Ray Data's scheduling loop while it has nothing to wait for.

    The streaming executor's loop (a thread of the process that iterates the dataset: here
    the training worker) blocks in ``ray.wait`` for up to 0.1 s while decode tasks run, but
    returns at once when none do, which is a training stream's usual state: the model
    consumes slower than the tasks decode, so every operator is backpressured. The loop then
    spins: measured on the demo (2 cores, two trials), ~45 % of a core per training worker,
    holding the GIL that the training thread needs: 0.33 s per step instead of 0.165. After
    a step that returned within ``BUSY_STEP_S`` this sleeps ``PAUSE_S``, so an idle loop wakes
    at most ~1 / PAUSE_S times a second and a task that completes meanwhile is collected at
    most PAUSE_S later (the consumer's prefetched batches cover far more than that). A step
    that waited (tasks running) is not delayed.
    """

    BUSY_STEP_S = 0.002
    PAUSE_S = 0.01

    def __init__(self) -> None:
        self._last = time.perf_counter()

    def before_execution_starts(self, executor) -> None:
        self._last = time.perf_counter()

    def on_execution_step(self, executor) -> None:
        now = time.perf_counter()
        if now - self._last < self.BUSY_STEP_S:
            time.sleep(self.PAUSE_S)
            now = time.perf_counter()
        self._last = now


def pace_idle_scheduling(context) -> None:
    """Registers :class:`IdleLoopPause` on a Ray ``DataContext`` (once); datasets built after it use it."""
    if IdleLoopPause not in context.custom_execution_callback_classes:
        context.custom_execution_callback_classes.append(IdleLoopPause)


_TASK_TOKENIZERS: dict[str, Any] = {}  # per process: the decode tasks a Ray worker runs share one copy


def _task_tokenizer(name: str):
    if name not in _TASK_TOKENIZERS:
        _TASK_TOKENIZERS[name] = load_tokenizer(name)
    return _TASK_TOKENIZERS[name]


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
    loaded from ``data.tokenizer`` on first use in the process that collates (not at all when
    the decode tasks tokenised).

    Args:
        tokenizer: hub name or local directory.
        max_text_len: token limit.
        max_words: clean captions here too (``None``: :func:`build_dataset` already did).
        append_sep: ``data.append_sep`` (captions ``[CLS] text [SEP]`` instead of ``[CLS] text``).
        device: normalise images on this device (they travel there as uint8, a quarter of the
            bytes, and the consumer's CPU does no per-pixel work); ``None``: on the CPU.
    """

    def __init__(
        self, tokenizer: str, max_text_len: int = 25, max_words: int | None = None, append_sep: bool = False,
        device: torch.device | str | None = None,
    ):
        super().__init__()
        self.device = None if device is None else torch.device(device)
        self.collator = CaptionCollator(tokenizer, max_text_len, max_words, append_sep, normalized=self.device is None)

    @classmethod
    def from_config(cls, cfg: AlbefConfig) -> CaptionCollate:
        return cls(cfg.data.tokenizer, cfg.data.max_text_len, append_sep=cfg.data.append_sep)

    def on_device(self, device: torch.device | str | None) -> CaptionCollate:
        """A copy that normalises on ``device`` (``None``: on the CPU)."""
        other = copy.copy(self)
        other.device = None if device is None else torch.device(device)
        other.collator = copy.copy(self.collator)
        other.collator.normalized = other.device is None
        return other

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, torch.Tensor]:
        out = self.collator(batch)
        if self.device is not None:
            for key in ("image", "image2"):
                if key in out and out[key].dtype == torch.uint8:
                    out[key] = normalize(out[key].to(self.device, non_blocking=True))
        return out


class StreamCollate(CaptionCollate):
    """:class:`CaptionCollate` plus ``position`` (int64 (B,)): each row's worker-stream position."""

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, torch.Tensor]:
        out = super().__call__(batch)
        out["position"] = torch.as_tensor(np.asarray(batch["position"], dtype=np.int64))
        return out


class ShardStream:
    """The training split as a deterministic stream per (epoch, rank); built on the driver.

    Picklable (it travels in ``train_loop_config``); :meth:`epoch_batches` runs in a worker.

    Args:
        order: the split's :class:`~albef_ray.data.stream.EpochOrder`.
        spec: the pretraining transform.
        max_words: caption word limit.
        collate: tokenises and normalises (a :class:`StreamCollate`).
        normalize_on_device: on a GPU, normalise images there (``data.normalize_on_device``).
    """

    def __init__(
        self, order: EpochOrder, spec: AugmentSpec, max_words: int, collate: StreamCollate,
        normalize_on_device: bool = True,
    ):
        self.order = order
        self.spec = spec
        self.max_words = max_words
        self.collate = collate
        self.normalize_on_device = normalize_on_device

    def decode(self, batch: dict[str, np.ndarray], epoch: int) -> Iterator[dict[str, np.ndarray]]:
        """``map_batches`` body: one item, a window as JSON -> its decoded rows, a block at a time.

        Captions leave as token ids (:func:`~albef_ray.data.collate.pretokenize`), the
        ``caption`` and ``image_id`` strings not at all (the collate reads neither).
        """
        (item,) = batch["window"]
        index, ranges, skip, position = json.loads(str(item))
        window = Window(index, tuple(tuple(r) for r in ranges), skip, position)
        collator = self.collate.collator
        tokenizer = _task_tokenizer(collator.tokenizer_name)
        for chunk in iter_window(self.order, epoch, window, self.spec, self.max_words, self.order.block_rows):
            captions = [str(c) for c in chunk.pop("caption")]
            del chunk["image_id"]
            chunk["input_ids"], chunk["num_tokens"] = pretokenize(
                tokenizer, captions, collator.max_text_len, collator.append_sep
            )
            yield chunk

    def epoch_batches(self, epoch: int, rank: int, world: int, position: int, batch_size: int, device=None):
        """Full batches of rank ``rank``'s rows of ``epoch`` from stream ``position`` on.

        Each batch holds ``position`` (see :class:`StreamCollate`); the last row's + 1 is where
        a resumed worker continues. On a GPU ``device`` images are normalised there
        (``data.normalize_on_device``).
        """
        import ray.data

        windows = self.order.worker_windows(epoch, rank, world, position)
        if not windows:
            return iter(())
        context = ray.data.DataContext.get_current()
        context.execution_options.preserve_order = True  # the stream's order is the row order
        context.enable_progress_bars = False  # a worker's log is no terminal
        pace_idle_scheduling(context)  # no busy loop beside the training thread
        items = [{"window": json.dumps([w.index, [list(r) for r in w.ranges], w.skip, w.position])} for w in windows]
        ds = ray.data.from_items(items, override_num_blocks=len(items)).map_batches(
            self.decode, fn_kwargs={"epoch": epoch}, batch_size=1, batch_format="numpy"
        )
        on = {} if device is None else {"device": device}  # None: Ray's default (the Train worker's device)
        gpu = device is not None and torch.device(device).type != "cpu" and self.normalize_on_device
        collate = self.collate.on_device(device) if gpu else self.collate
        return ds.iter_torch_batches(batch_size=batch_size, drop_last=True, collate_fn=collate, **on)


def build_stream(paths: list[str], split: str, cfg: AlbefConfig) -> ShardStream:
    """The :class:`ShardStream` of ``split``: lists its files and reads their footers (no rows)."""
    if not paths:
        raise ConfigError("data.shards: no dataset paths given")
    entries, _ = shard_files(paths, split)
    files = [f for entry in entries for f in list_parquet(entry)]
    if not files:
        raise ConfigError(f"data.shards: no Parquet files of split {split!r} in {', '.join(paths)}")
    block = cfg.data.map_batch_size
    order = EpochOrder(
        tuple(files), tuple(file_row_counts(files)), cfg.seed, block_rows=block,
        window_blocks=max(1, -(-cfg.data.shuffle_buffer // block)), task_columns=task_columns_of(files[0]),
    )
    return ShardStream(
        order, AugmentSpec.from_config(cfg), cfg.data.max_words, StreamCollate.from_config(cfg),
        cfg.data.normalize_on_device,
    )


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
        ``({"train": ShardStream}, steps_per_epoch, collate, special_tokens)``; steps per epoch
        is ``train.steps_per_epoch`` or full global batches in the split's row count (an upper
        bound: an epoch also ends when a worker's stream runs out, undecodable rows dropped).
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
    stream = build_stream(cfg.data.shards, cfg.data.train_split, cfg)
    rows = stream.order.total_rows
    if rows // global_batch == 0:
        raise ConfigError(
            f"data.shards: {rows} rows of split {cfg.data.train_split!r} make no global batch of "
            f"train.batch_size x train.num_workers = {global_batch}"
        )
    steps = cfg.train.steps_per_epoch or rows // global_batch
    # Workers stop together when one runs out (launch/train.py), so the worker with the fewest
    # rows of the epoch decides its length: with fewer windows than workers that is zero steps.
    world = cfg.train.num_workers
    fewest = min(sum(w.rows for w in stream.order.worker_windows(0, rank, world)) for rank in range(world))
    if fewest < cfg.train.batch_size:
        raise ConfigError(
            f"data.map_batch_size: the {rows} rows of split {cfg.data.train_split!r} split into too few blocks "
            f"for {cfg.train.num_workers} workers (one gets {fewest} rows, less than a batch of "
            f"{cfg.train.batch_size}); lower data.map_batch_size or data.shuffle_buffer"
        )
    quiet_progress_off_terminal()
    return {"train": stream}, steps, stream.collate, SpecialTokens.from_tokenizer(tokenizer)


def quiet_progress_off_terminal() -> None:
    """Ray Data's progress bars only when a person watches (stderr is a terminal).

    Under a Tune trial, ``ray job submit`` or a redirected log they print a screenful per
    second between the training lines. The setting travels with the datasets built after it.
    """
    import sys

    import ray.data

    if not sys.stderr.isatty():
        ray.data.DataContext.get_current().enable_progress_bars = False
