"""Dataset-wide row shuffle for the shard writer: a spill file, a seeded permutation, a gather.

A COCO or Visual Genome image has five or more captions, and a reader yields them together;
written in input order they would sit next to each other in one shard, and a training batch
would hold several captions of one image (false in-batch and hard negatives). A shuffled build
therefore writes in two passes:

1. validated rows are appended, in input order, to one spill file per split
   (``<root>/_build/rows-<split>.bin``), each row framed as a fixed header and its bytes;
   the progress records hold the byte offsets, so an interrupted pass resumes exactly;
2. the split's rows are permuted by ``numpy.random.default_rng([seed, crc32(split)])`` over
   their count, cut into shards by the row and byte targets, and each shard's rows are read
   back from the spill (in file order) and written in permuted order.

The permutation depends on the seed and the number of rows only, and rows reach the spill in
input order, so the shards are a function of (seed, inputs): a resumed build, with any number
of workers, writes the same bytes. The spill takes as much disk space as the dataset until the
build finishes; reads of pass 2 are random within it (fine on SSDs and page cache).
"""

from __future__ import annotations

import json
import os
import struct
import zlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np

# image bytes, caption bytes, image_id bytes, source bytes, width, height, task fields (JSON)
# bytes, second image bytes
_HEADER = struct.Struct("<IIIIiiII")
_BASE = ("image", "caption", "image_id", "source", "width", "height", "image2")


def _task_fields(row: dict[str, Any]) -> bytes:
    """A row's downstream-task fields but the second image (label, answers, ...) as JSON; b"" if none."""
    fields = {k: v for k, v in row.items() if k not in _BASE}
    return json.dumps(fields, sort_keys=True).encode() if fields else b""


def row_size(row: dict[str, Any]) -> int:
    """A row's bytes as the shard writer counts them toward ``shard_bytes``."""
    texts = len(row["caption"]) + len(row["image_id"]) + len(row["source"])
    return len(row["image"]) + texts + 8 + len(_task_fields(row)) + len(row.get("image2") or b"")


def spill_path(progress_dir: Path, split: str) -> Path:
    """The spill file of one split inside the build's progress folder."""
    return progress_dir / f"rows-{split}.bin"


def append_rows(path: Path, rows: list[dict[str, Any]]) -> np.ndarray:
    """Appends rows to a spill file; returns the ``len(rows) + 1`` byte offsets bounding them."""
    bounds = np.empty(len(rows) + 1, dtype=np.int64)
    with open(path, "ab") as handle:
        bounds[0] = handle.tell()
        for i, row in enumerate(rows):
            texts = [row["caption"].encode(), row["image_id"].encode(), row["source"].encode()]
            fields, image2 = _task_fields(row), row.get("image2") or b""
            handle.write(_HEADER.pack(len(row["image"]), *map(len, texts), row["width"], row["height"],
                                      len(fields), len(image2)))
            handle.write(row["image"])
            for text in texts:
                handle.write(text)
            handle.write(fields)
            handle.write(image2)
            bounds[i + 1] = handle.tell()
    return bounds


def _decode(record: bytes) -> dict[str, Any]:
    n_image, n_caption, n_id, n_source, width, height, n_fields, n_image2 = _HEADER.unpack_from(record)
    at = _HEADER.size
    image = record[at : at + n_image]
    at += n_image
    caption = record[at : at + n_caption].decode()
    at += n_caption
    image_id = record[at : at + n_id].decode()
    at += n_id
    source = record[at : at + n_source].decode()
    at += n_source
    row = {
        "image": image, "caption": caption, "image_id": image_id, "source": source, "width": width, "height": height
    }
    if n_fields:
        row.update(json.loads(record[at : at + n_fields]))
    at += n_fields
    if n_image2:
        row["image2"] = record[at : at + n_image2]
    return row


def row_bytes(starts: np.ndarray, ends: np.ndarray) -> np.ndarray:
    """A row's size as the shard writer counts it (its bytes plus 8), from its spill extent."""
    return ends - starts - _HEADER.size + 8


def permutation(seed: int, split: str, n: int) -> np.ndarray:
    """The order rows of ``split`` are written in: a function of the seed, the split and ``n``."""
    return np.random.default_rng([seed, zlib.crc32(split.encode())]).permutation(n)


def cut(sizes: np.ndarray, shard_rows: int | None, shard_bytes: int | None) -> list[tuple[int, int]]:
    """``[start, end)`` ranges of consecutive rows: a shard ends once it reaches either target.

    Args:
        sizes: bytes of each row, in write order.
        shard_rows: rows per shard, or ``None``.
        shard_bytes: bytes per shard, or ``None``.
    """
    ranges, start, total = [], 0, 0
    for i, size in enumerate(sizes.tolist()):
        total += size
        rows_reached = shard_rows is not None and i + 1 - start >= shard_rows
        if rows_reached or (shard_bytes is not None and total >= shard_bytes):
            ranges.append((start, i + 1))
            start, total = i + 1, 0
    if start < len(sizes):
        ranges.append((start, len(sizes)))
    return ranges


def gather(path: Path, starts: np.ndarray, ends: np.ndarray, indices: np.ndarray) -> list[dict[str, Any]]:
    """Rows ``indices`` of a spill file, in the order given (read in file order)."""
    rows: list[dict[str, Any] | None] = [None] * len(indices)
    with open(path, "rb") as handle:
        for slot in np.argsort(starts[indices], kind="stable").tolist():
            index = indices[slot]
            handle.seek(int(starts[index]))
            rows[slot] = _decode(handle.read(int(ends[index] - starts[index])))
    return rows  # type: ignore[return-value]


def save_offsets(path: Path, bounds: np.ndarray) -> None:
    """Writes a record's row offsets atomically (a temporary file, then a rename)."""
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as handle:
        np.save(handle, bounds)
    os.replace(tmp, path)


def split_offsets(progress_dir: Path, records: list[dict[str, Any]], split: str) -> tuple[np.ndarray, np.ndarray]:
    """(starts, ends) of every spilled row of ``split``, in input order, from the progress records."""
    starts: list[np.ndarray] = []
    ends: list[np.ndarray] = []
    for record in _spilled(records, split):
        bounds = np.load(progress_dir / record["offsets"])
        starts.append(bounds[:-1])
        ends.append(bounds[1:])
    if not starts:
        return np.zeros(0, np.int64), np.zeros(0, np.int64)
    return np.concatenate(starts), np.concatenate(ends)


def _spilled(records: list[dict[str, Any]], split: str) -> Iterator[dict[str, Any]]:
    return (r for r in records if r["split"] == split and r.get("spill") is not None)
