"""The order of an epoch over caption shards, as a function of (seed, epoch) (no Ray).

Every row of a split has a global id: files in order (manifest order, else sorted names),
rows in file order. An epoch's order is built in three steps, each from its own seed::

    blocks   contiguous rows of one file, block_rows long (aligned to the file's start, so
             with block_rows a multiple of the shards' 256-row groups a block reads whole groups)
    windows  the blocks permuted by rng(seed, epoch), then taken window_blocks at a time
    rows     the rows of window w permuted together by rng(seed, epoch, w)

Windows go to workers round-robin (window j to rank j mod world), so each worker reads
blocks no other worker reads. A worker's *position* counts the rows of its windows it has
passed, in order. Resuming at a position skips whole windows and the first rows of the window
it falls in by index arithmetic: nothing before the position is read or decoded.

Augmentation is seeded per row by (seed, epoch, global row id), so a row's crop, flip and
RandAugment ops do not depend on which task, worker or resume decoded it: a resumed stream
is the uninterrupted stream's tail, bit for bit.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from .schema import TASK_FIELDS, image_indices
from .transforms import AugmentSpec, pre_caption, pretrain_image

log = logging.getLogger(__name__)
READ_COLUMNS = ["image", "caption", "image_id", "source"]
_MASK63 = (1 << 63) - 1


def _rng(*keys: int) -> np.random.Generator:
    return np.random.default_rng([int(k) & _MASK63 for k in keys])


def row_seed(seed: int, epoch: int, row: int) -> int:
    """The augmentation seed of global row ``row`` in ``epoch`` (63 bits, platform independent)."""
    state = np.random.SeedSequence([seed & _MASK63, epoch, row]).generate_state(1, np.uint64)
    return int(state[0]) >> 1


@dataclass(frozen=True)
class Window:
    """One window of a worker's epoch: global row ranges, their joint permutation's seed key.

    Attributes:
        index: the window's place in the epoch's global order (keys its row permutation).
        ranges: ``(start, stop)`` global row ranges of its blocks, in order.
        skip: rows of its permuted order already passed (resume); they are not read.
        position: the worker-stream position of its first (unskipped) row.
    """

    index: int
    ranges: tuple[tuple[int, int], ...]
    skip: int = 0
    position: int = 0

    @property
    def rows(self) -> int:
        return sum(stop - start for start, stop in self.ranges)


@dataclass(frozen=True)
class EpochOrder:
    """The deterministic order of a split's rows for any epoch, rank and resume position.

    Args:
        files: the split's Parquet files (paths or URIs) in id order.
        file_rows: rows of each file.
        seed: ``cfg.seed``.
        block_rows: rows per read block (``data.map_batch_size``).
        window_blocks: blocks whose rows are permuted together.
        task_columns: the files' downstream-task columns (:func:`task_columns_of`).
    """

    files: tuple[str, ...]
    file_rows: tuple[int, ...]
    seed: int
    block_rows: int = 256
    window_blocks: int = 4
    task_columns: tuple[str, ...] = ()  # downstream-task columns read with the rows (schema.TASK_FIELDS)

    def __post_init__(self):
        if len(self.files) != len(self.file_rows):
            raise ValueError("files and file_rows differ in length")
        if self.block_rows < 1 or self.window_blocks < 1:
            raise ValueError("block_rows and window_blocks must be >= 1")

    @property
    def total_rows(self) -> int:
        return int(sum(self.file_rows))

    @property
    def file_offsets(self) -> np.ndarray:
        """Global id of each file's first row, plus the total at the end."""
        return np.concatenate([[0], np.cumsum(self.file_rows, dtype=np.int64)])

    def blocks(self) -> list[tuple[int, int]]:
        """Global ``(start, stop)`` of every block, file by file."""
        out = []
        for first, rows in zip(self.file_offsets[:-1].tolist(), self.file_rows):
            out += [(first + s, first + min(s + self.block_rows, rows)) for s in range(0, rows, self.block_rows)]
        return out

    def windows(self, epoch: int) -> list[Window]:
        """The epoch's windows in global order."""
        blocks = self.blocks()
        perm = _rng(self.seed, epoch).permutation(len(blocks))
        step = self.window_blocks
        return [
            Window(j, tuple(blocks[b] for b in perm[i:i + step].tolist()))
            for j, i in enumerate(range(0, len(blocks), step))
        ]

    def worker_windows(self, epoch: int, rank: int, world: int, position: int = 0) -> list[Window]:
        """Rank ``rank``'s windows of ``epoch`` from stream position ``position`` on.

        The window holding ``position`` comes first with ``skip`` set; earlier ones are left out.
        """
        out, passed = [], 0
        for window in self.windows(epoch)[rank::world]:
            rows = window.rows
            if passed + rows > position:
                skip = max(0, position - passed)
                out.append(Window(window.index, window.ranges, skip, passed + skip))
            passed += rows
        return out

    def window_order(self, epoch: int, window: Window) -> np.ndarray:
        """Global row ids of ``window`` in its permuted order, its first ``skip`` left out."""
        ids = np.concatenate([np.arange(a, b, dtype=np.int64) for a, b in window.ranges])
        return ids[_rng(self.seed, epoch, window.index).permutation(len(ids))][window.skip:]

    def worker_rows(self, epoch: int, rank: int, world: int, position: int = 0) -> np.ndarray:
        """The whole sequence of global row ids a worker reads (tests and small splits)."""
        parts = [self.window_order(epoch, w) for w in self.worker_windows(epoch, rank, world, position)]
        return np.concatenate(parts) if parts else np.zeros(0, np.int64)

    def locate(self, ids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(file index, row in file) of global row ids."""
        offsets = self.file_offsets
        files = np.searchsorted(offsets, ids, side="right") - 1
        return files, ids - offsets[files]


# ----------------------------------------------------------------------------- reading


def _open_parquet(path: str):
    import pyarrow.parquet as pq

    if "://" in path:
        from pyarrow import fs

        filesystem, inner = fs.FileSystem.from_uri(path)
        return pq.ParquetFile(filesystem.open_input_file(inner))
    return pq.ParquetFile(path)


def list_parquet(entry: str) -> list[str]:
    """A Parquet file itself, or the ``*.parquet`` files under a folder (or URI), sorted."""
    if "://" in entry:
        from pyarrow import fs

        filesystem, inner = fs.FileSystem.from_uri(entry)
        info = filesystem.get_file_info(inner)
        if info.type == fs.FileType.File:
            return [entry]
        scheme = entry.split("://", 1)[0]
        found = filesystem.get_file_info(fs.FileSelector(inner, recursive=True))
        return sorted(f"{scheme}://{f.path}" for f in found if f.type == fs.FileType.File and f.path.endswith(".parquet"))
    path = Path(entry)
    if path.is_file():
        return [str(path)]
    return sorted(str(p) for p in path.rglob("*.parquet"))


def file_row_counts(files: Sequence[str]) -> list[int]:
    """Rows of each Parquet file, from its footer (no data read)."""
    return [_open_parquet(f).metadata.num_rows for f in files]


def read_rows(path: str, rows: np.ndarray, columns: Sequence[str] = READ_COLUMNS):
    """Rows ``rows`` (in that order) of one Parquet file; only the row groups holding them are read."""
    import pyarrow as pa

    parquet = _open_parquet(path)
    meta = parquet.metadata
    starts = np.cumsum([0] + [meta.row_group(g).num_rows for g in range(meta.num_row_groups)])
    groups = np.unique(np.searchsorted(starts, rows, side="right") - 1)
    table = parquet.read_row_groups(groups.tolist(), columns=list(columns))
    # Row r sits at r - starts[g] + (rows of the groups read before g).
    read_before = np.concatenate([[0], np.cumsum([starts[g + 1] - starts[g] for g in groups])])
    group_of = np.searchsorted(starts, rows, side="right") - 1
    local = rows - starts[group_of] + read_before[np.searchsorted(groups, group_of)]
    return table.take(pa.array(local, type=pa.int64()))


# ----------------------------------------------------------------------------- decoding


def task_columns_of(path: str) -> tuple[str, ...]:
    """The downstream-task columns (:data:`~albef_ray.data.schema.TASK_FIELDS`) a shard file has."""
    names = set(_open_parquet(path).schema_arrow.names)
    return tuple(c for c in TASK_FIELDS if c in names)


def _read_window(order: EpochOrder, ids: np.ndarray) -> dict[str, list]:
    """The stored columns of global rows ``ids``, in that order (each file read once)."""
    file_of, row_of = order.locate(ids)
    wanted = READ_COLUMNS + list(order.task_columns)
    columns: dict[str, list] = {c: [None] * len(ids) for c in wanted}
    for f in np.unique(file_of).tolist():
        where = np.flatnonzero(file_of == f)
        table = read_rows(order.files[f], row_of[where], wanted).to_pydict()
        for c in wanted:
            for k, value in zip(where.tolist(), table[c]):
                columns[c][k] = value
    return columns


def _decode_rows(columns: dict[str, list], ids: np.ndarray, first: int, seed: int, epoch: int, spec: AugmentSpec,
                 max_words: int, position: int) -> dict[str, np.ndarray]:
    # Rows first .. first + len(ids) of the window's (unskipped) order.
    images, images2, kept = [], [], []
    two = "image2" in columns
    for k, row in enumerate(ids.tolist()):
        generator = torch.Generator().manual_seed(row_seed(seed, epoch, row))
        img = pretrain_image(columns["image"][first + k], spec, generator)
        img2 = pretrain_image(columns["image2"][first + k], spec, generator) if two and img is not None else None
        if img is not None and (img2 is not None or not two):
            images.append(img)
            images2.append(img2)
            kept.append(k)
    dropped = len(ids) - len(kept)
    if dropped and not kept:
        log.warning("all %d rows of a chunk failed to decode; their count is lost to the metrics", dropped)
    num_dropped = np.zeros(len(kept), np.int64)
    if kept:
        num_dropped[0] = dropped
    res = spec.image_res
    column = {c: [columns[c][first + k] for k in kept] for c in ("caption", "image_id", "source")}
    out = {
        "image": torch.stack(images).numpy() if images else np.zeros((0, 3, res, res), np.uint8),
        "caption": np.array([pre_caption(str(c), max_words) for c in column["caption"]], dtype=object),
        "image_id": np.array([str(i) for i in column["image_id"]], dtype=object),
        "image_idx": image_indices([str(s) for s in column["source"]], [str(i) for i in column["image_id"]]),
        "num_dropped": num_dropped,
        "row": ids[np.asarray(kept, dtype=np.int64)],
        "position": position + first + np.asarray(kept, dtype=np.int64),
    }
    out.update(task_arrays(columns, [first + k for k in kept]))
    if two:
        out["image2"] = torch.stack(images2).numpy() if images2 else np.zeros((0, 3, res, res), np.uint8)
    return out


def task_arrays(columns: dict[str, list], rows: Sequence[int]) -> dict[str, np.ndarray]:
    """The downstream-task columns (but ``image2``, decoded apart) of ``rows`` as numpy arrays.

    ``label`` int64; ``question_id``, ``image_id2``, ``ref_id`` strings; list columns
    (``answers``, ``answer_weights``, ``box``, ``proposals``) object arrays holding one list per row.
    """
    import pyarrow as pa

    out: dict[str, np.ndarray] = {}
    for name in TASK_FIELDS:
        if name not in columns or name == "image2":
            continue
        values = [columns[name][k] for k in rows]
        if name == "label":
            out[name] = np.array([-1 if v is None else int(v) for v in values], dtype=np.int64)
        elif pa.types.is_list(TASK_FIELDS[name]):
            out[name] = np.empty(len(values), dtype=object)
            out[name][:] = [list(v or []) for v in values]
        else:
            out[name] = np.array(["" if v is None else str(v) for v in values], dtype=object)
    return out


def iter_window(
    order: EpochOrder, epoch: int, window: Window, spec: AugmentSpec, max_words: int, chunk_rows: int | None = None
) -> Iterator[dict[str, np.ndarray]]:
    """Read the rows of one window and decode them in its order from ``window.skip`` on.

    Yields chunks of ``chunk_rows`` rows (``None``: one chunk), so a decode task hands over
    object-store blocks of bounded size.

    Yields:
        ``image`` uint8 (n, 3, R, R), ``caption`` (cleaned), ``image_id``, ``image_idx``,
        ``num_dropped`` (the chunk's count of undecodable rows, on its first kept row), ``row``
        (global id) and ``position`` (worker-stream position) of the chunk's n decodable rows;
        plus the order's task columns (:func:`task_arrays`; ``image2`` decoded like ``image``,
        with the row's generator after it: a row with either image undecodable is dropped).
    """
    ids = order.window_order(epoch, window)
    columns = _read_window(order, ids)
    step = chunk_rows or max(1, len(ids))
    for first in range(0, len(ids), step):
        yield _decode_rows(columns, ids[first:first + step], first, order.seed, epoch, spec, max_words, window.position)


def decode_window(
    order: EpochOrder, epoch: int, window: Window, spec: AugmentSpec, max_words: int
) -> dict[str, np.ndarray]:
    """:func:`iter_window` in one chunk: the window's decodable rows from ``window.skip`` on."""
    return next(iter_window(order, epoch, window, spec, max_words))
