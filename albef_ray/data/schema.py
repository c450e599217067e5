"""The on-disk format of an albef-ray caption dataset.

A dataset is a directory::

    <root>/manifest.json            schema version, splits, row counts per source, skipped inputs
    <root>/skipped.jsonl            one line per skipped input: {"source", "input", "reason"}
    <root>/<split>/part-00000.parquet ...

Each Parquet row is one image-caption pair (an image with several captions has several rows
sharing ``image_id``; retrieval ground truth groups by it).
"""

from __future__ import annotations

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

MANIFEST = "manifest.json"
SKIPPED = "skipped.jsonl"
