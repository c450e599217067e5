"""Small input collections in each supported format, with deliberately bad inputs.

Each ``make_*`` function writes one collection under a directory and returns where it is and
what a build must make of it (:class:`Expected`), so the tests can check exact counts.
"""

from __future__ import annotations

import io
import json
import tarfile
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image


@dataclass
class Expected:
    """What a build of a collection must produce."""

    rows: int
    images: int
    skipped: dict[str, int] = field(default_factory=dict)

    @property
    def skipped_total(self) -> int:
        return sum(self.skipped.values())


def image_bytes(seed: int, fmt: str = "JPEG", size: tuple[int, int] = (40, 30)) -> bytes:
    """A noisy RGB image (noise, so that cutting the file in half cuts pixel data)."""
    pixels = np.random.default_rng(seed).integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, fmt)
    return buffer.getvalue()


def truncated(data: bytes) -> bytes:
    """An image file cut short half-way, as an interrupted download leaves it."""
    return data[: len(data) // 2]


def garbage(seed: int) -> bytes:
    """Bytes that are no image at all."""
    return b"<html>not found</html>" + np.random.default_rng(seed).bytes(200)


def make_json_input(root: Path) -> tuple[Path, Path, Expected]:
    """ALBEF JSON annotations over an image folder: returns (annotation file, image root, expected)."""
    images = root / "images"
    images.mkdir(parents=True)
    (images / "good.jpg").write_bytes(image_bytes(1))
    (images / "good.png").write_bytes(image_bytes(2, "PNG"))
    (images / "cut.jpg").write_bytes(truncated(image_bytes(3)))
    (images / "noise.jpg").write_bytes(garbage(4))
    annotations = [
        {"image": "good.jpg", "caption": ["a red ball", "  ", "A dog on grass."], "image_id": "coco_1"},
        {"image": "good.png", "caption": "a png picture"},
        {"image": "cut.jpg", "caption": "truncated"},
        {"image": "noise.jpg", "caption": "random bytes"},
        {"image": "absent.jpg", "caption": "missing file"},
        {"image": "good.png", "caption": ""},
    ]
    annotation_file = root / "ann.json"
    annotation_file.write_text(json.dumps(annotations))
    expected = Expected(
        rows=3,  # 2 captions of good.jpg + 1 of good.png
        images=2,
        skipped={"empty_caption": 2, "truncated_image": 1, "unreadable_image": 1, "missing_image": 1},
    )
    return annotation_file, images, expected


def make_img2dataset_input(
    root: Path, image_column: str = "jpg", caption_column: str = "caption", good: int = 3, files: int = 1
) -> tuple[Path, Expected]:
    """img2dataset-like Parquet files (key, url, status, caption, image bytes): returns (folder, expected).

    The bad rows sit after the first half of the good ones, so that shards of a resumed build
    straddle them.
    """
    root.mkdir(parents=True, exist_ok=True)
    rows = [(image_bytes(10 + i), f"photo {i}", "success") for i in range(good)]
    rows[good // 2 : good // 2] = [
        (None, "failed download", "failed_to_download"),
        (truncated(image_bytes(20)), "cut short", "success"),
        (garbage(21), "garbage", "success"),
        (image_bytes(22), "   ", "success"),
        (image_bytes(23), None, "success"),
    ]
    per_file = -(-len(rows) // files)
    for f in range(files):
        chunk = rows[f * per_file : (f + 1) * per_file]
        keys = [f"{f:03d}{i:04d}" for i in range(len(chunk))]
        table = pa.table(
            {
                "key": keys,
                "url": [f"http://example.com/{k}.jpg" for k in keys],
                caption_column: [r[1] for r in chunk],
                image_column: pa.array([r[0] for r in chunk], pa.binary()),
                "status": [r[2] for r in chunk],
            }
        )
        pq.write_table(table, root / f"{f:05d}.parquet", row_group_size=4)
    expected = Expected(
        rows=good,
        images=good,
        skipped={"missing_image": 1, "truncated_image": 1, "unreadable_image": 1, "empty_caption": 2},
    )
    return root, expected


def _add(archive: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    archive.addfile(info, io.BytesIO(data))


def make_webdataset_input(root: Path) -> tuple[Path, Expected]:
    """Two WebDataset tar shards: returns (folder, expected)."""
    root.mkdir(parents=True, exist_ok=True)
    with tarfile.open(root / "shard-000.tar", "w") as archive:
        _add(archive, "000.jpg", image_bytes(30))
        _add(archive, "000.txt", b"a cat on a mat\n")
        _add(archive, "000.json", b"{}")
        _add(archive, "001.jpg", truncated(image_bytes(31)))
        _add(archive, "001.txt", b"cut")
        _add(archive, "002.png", garbage(32))
        _add(archive, "002.txt", b"garbage")
        _add(archive, "003.txt", b"caption without image")
    with tarfile.open(root / "shard-001.tar", "w") as archive:
        _add(archive, "004.jpg", image_bytes(34))  # image without caption
        _add(archive, "005.jpg", image_bytes(35))
        _add(archive, "005.txt", b"\n  \n")
        _add(archive, "sub/006.png", image_bytes(36, "PNG"))
        _add(archive, "sub/006.txt", "un caf\u00e9 au lait".encode())
        _add(archive, "007.jpeg", image_bytes(37))
        _add(archive, "007.txt", b"a jpeg")
    expected = Expected(
        rows=3,  # 000, sub/006, 007
        images=3,
        skipped={
            "truncated_image": 1,
            "unreadable_image": 1,
            "missing_image": 1,
            "missing_caption": 1,
            "empty_caption": 1,
        },
    )
    return root, expected
