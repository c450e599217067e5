"""The on-disk format of an albef-ray caption dataset.

A dataset is a directory::

    <root>/manifest.json            schema version, splits, row counts per source, skipped inputs
    <root>/skipped.jsonl            one line per skipped input: {"source", "input", "image_id", "reason", "detail"}
    <root>/<split>/part-00000.parquet ...
    <root>/tokenizer/               optional: a Hugging Face tokenizer directory (synthetic data)
    <root>/_build/                  only while a build is unfinished: per-shard progress records

Each Parquet row is one image-caption pair (or, for a downstream task, one image-text example
with the task's columns of :data:`TASK_FIELDS`) (an image with several captions has several rows
sharing ``image_id``; retrieval ground truth groups by it). ``image_id`` is unique within a
``source``; ``(source, image_id)`` is unique within a dataset.

Shards of a split are numbered from 0; rows are in a seeded permutation across the split
(``build.shuffle_seed`` in the manifest), or in input order when it is ``null``.
``manifest.json`` lists the shards with their row counts, and is written last, so a
directory without it is an unfinished build. Readers
should take shard paths from the manifest (see :mod:`albef_ray.data.manifest`) rather than
listing the directory.

Skip reasons (the ``reason`` of a ``skipped.jsonl`` line and the keys of the manifest's
``skipped.by_reason``) are the names in :data:`SKIP_REASONS`. An image-level problem skips the
image with all its captions as one line; an empty caption skips that caption only.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable

import numpy as np
import pyarrow as pa

SCHEMA_VERSION = 1

ROW_SCHEMA = pa.schema(
    [
        pa.field("image", pa.binary(), nullable=False),  # encoded bytes as stored (JPEG/PNG/...)
        pa.field("caption", pa.string(), nullable=False),
        pa.field("image_id", pa.string(), nullable=False),
        pa.field("source", pa.string(), nullable=False),
        pa.field("width", pa.int32(), nullable=False),
        pa.field("height", pa.int32(), nullable=False),
    ]
)

# Downstream-task datasets (SNLI-VE, NLVR2, VQA, grounding) are caption datasets with extra columns: the
# text column ``caption`` holds the hypothesis / statement / question, and a row may carry
TASK_FIELDS = {
    "label": pa.int64(),  # class index (SNLI-VE: 0 contradiction, 1 neutral, 2 entailment, as the official ve_dataset.py; NLVR2: 1 true)
    "question_id": pa.string(),  # VQA: the id a result file answers
    "answers": pa.list_(pa.string()),  # VQA: distinct answers given by the annotators
    "answer_weights": pa.list_(pa.float32()),  # VQA: each answer's weight (its share of the annotators)
    "image2": pa.binary(),  # NLVR2: the second image's encoded bytes
    "image_id2": pa.string(),  # NLVR2: the second image's id
    "box": pa.list_(pa.float32()),  # grounding: the referred object's box [x, y, w, h] in image pixels
    "proposals": pa.list_(pa.list_(pa.float32())),  # grounding: candidate boxes [x, y, w, h] to choose from
    "ref_id": pa.string(),  # grounding: the referring expression's id (RefCOCO+ ref_id)
}
TASK_TEXT_FIELDS = tuple(k for k in TASK_FIELDS if k not in ("image2", "image_id2"))  # per-text fields


def row_schema(columns=()) -> pa.Schema:
    """:data:`ROW_SCHEMA` plus the task columns named in ``columns`` (in :data:`TASK_FIELDS` order).

    Raises:
        ValueError: a column that is neither a caption column nor a task field.
    """
    unknown = sorted(set(columns) - set(TASK_FIELDS) - set(ROW_SCHEMA.names))
    if unknown:
        raise ValueError(f"unknown dataset columns {unknown}; task columns are {', '.join(TASK_FIELDS)}")
    extra = [pa.field(name, kind, nullable=True) for name, kind in TASK_FIELDS.items() if name in columns]
    return pa.schema(list(ROW_SCHEMA) + extra)


MANIFEST = "manifest.json"
SKIPPED = "skipped.jsonl"
TOKENIZER_DIR = "tokenizer"
PROGRESS_DIR = "_build"

SKIP_REASONS = (
    "missing_image",  # no file, no bytes (e.g. an img2dataset row that failed to download)
    "empty_image",  # a 0-byte file or empty bytes (a download or copy that wrote nothing)
    "unreadable_image",  # not an image PIL can identify, or its header fails verify()
    "truncated_image",  # the header is fine but the pixel data does not load (cut short, corrupt)
    "empty_caption",  # no caption, or only whitespace
    "missing_caption",  # a WebDataset sample with an image but no .txt member
    "unreadable_input",  # a whole input file (annotation JSON, Parquet, tar) that cannot be read
)


def shard_name(index: int) -> str:
    """File name of shard ``index`` of a split, e.g. ``part-00003.parquet``."""
    return f"part-{index:05d}.parquet"


def image_indices(sources: Iterable[str], image_ids: Iterable[str]) -> np.ndarray:
    """A stable int64 per image: 8-byte BLAKE2b of ``source`` NUL ``image_id``, shifted to 63 bits.

    Retrieval fine-tuning treats pairs with equal indices as captions of one image. The value
    depends on the two strings only (not on the process, worker, shard or Python's hash
    seed), so every worker and every epoch agree; it is never negative, which leaves
    negative values free as "no image" markers (the ITC index queue starts at -1). Two
    distinct images collide with probability about n^2 / 2^64.
    """
    out = [
        int.from_bytes(hashlib.blake2b(f"{s}\0{i}".encode(), digest_size=8).digest(), "little") >> 1
        for s, i in zip(sources, image_ids, strict=True)
    ]
    return np.array(out, dtype=np.int64)
