"""Small caption shards, images and a tiny tokenizer for the streaming tests (written by hand)."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image

from albef_ray.data.schema import ROW_SCHEMA

WORDS = ["a", "red", "blue", "green", "small", "large", "circle", "square", "left", "of", "right", "the", "on"]
CORRUPT = b"\x89PNG\r\n\x1a\n not really a png"


def encode(array: np.ndarray, fmt: str = "PNG", **kwargs) -> bytes:
    """``uint8`` (H, W, 3) -> encoded bytes."""
    buf = io.BytesIO()
    Image.fromarray(array).save(buf, fmt, **kwargs)
    return buf.getvalue()


def solid(value: int, size: tuple[int, int] = (24, 32)) -> np.ndarray:
    """A one-colour (H, W, 3) image whose red channel carries ``value``."""
    out = np.zeros((*size, 3), np.uint8)
    out[..., 0] = value
    out[..., 1] = 255 - value
    return out


def write_rows(path: Path, rows: list[dict]) -> None:
    """Write rows (``image`` bytes, ``caption``, ``image_id``) as one Parquet shard."""
    path.parent.mkdir(parents=True, exist_ok=True)
    table = {name: [] for name in ROW_SCHEMA.names}
    for row in rows:
        table["image"].append(row["image"])
        table["caption"].append(row["caption"])
        table["image_id"].append(row["image_id"])
        table["source"].append(row.get("source", "test"))
        table["width"].append(row.get("width", 32))
        table["height"].append(row.get("height", 24))
    pq.write_table(pa.Table.from_pydict(table, schema=ROW_SCHEMA), path)


def make_tokenizer(directory: Path) -> str:
    """A tiny BERT WordPiece tokenizer saved as a Hugging Face directory; returns its path."""
    from transformers import BertTokenizerFast

    directory.mkdir(parents=True, exist_ok=True)
    vocab = directory / "vocab.txt"
    vocab.write_text("\n".join(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *WORDS]) + "\n")
    BertTokenizerFast(vocab_file=str(vocab)).save_pretrained(directory)
    return str(directory)
