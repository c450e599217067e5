"""What storing a VQA image in every row of its questions costs, and what dictionary encoding saves.

A VQA dataset has ~5 questions per image; the shard writer stores the image bytes in each
question's row. This reads a built dataset's split and reports:

* ``rows_image_bytes``: image bytes as stored (one copy per row) and ``unique_image_bytes`` (one
  copy per image), their ratio;
* the split rewritten to Parquet (same row groups of 256, images uncompressed) four ways: shuffled
  or grouped by image (rows of an image adjacent, as a candidate yields them when the build keeps
  input order), each with the image column plain or dictionary-encoded; file sizes.

    .venv/bin/python benchmarks/vqa_storage.py runs/synth_vqa [--split train]

Prints one JSON line.
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from albef_ray.data.manifest import shard_paths

ROW_GROUP = 256  # the writer's ROW_GROUP_ROWS


def _write(table: pa.Table, path: Path, dictionary: bool) -> int:
    text = [c for c in table.column_names if c not in ("image", "width", "height")]
    pq.write_table(table, path, row_group_size=ROW_GROUP,
                   compression={c: "NONE" if c == "image" else "ZSTD" for c in table.column_names},
                   use_dictionary=text + (["image"] if dictionary else []))
    return path.stat().st_size


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("dataset")
    parser.add_argument("--split", default="train")
    args = parser.parse_args()
    files = shard_paths(args.dataset, args.split)
    table = pa.concat_tables([pq.read_table(f) for f in files])
    images = table.column("image").to_pylist()
    ids = table.column("image_id").to_pylist()
    unique = {i: len(b) for i, b in zip(ids, images)}
    stored = sum(len(b) for b in images)
    grouped = table.take(np.argsort(np.array(ids), kind="stable"))
    shuffled = table.take(np.random.default_rng(0).permutation(table.num_rows))
    sizes = {}
    with tempfile.TemporaryDirectory() as tmp:
        for name, t in (("shuffled", shuffled), ("grouped", grouped)):
            for dictionary in (False, True):
                sizes[f"{name}_{'dictionary' if dictionary else 'plain'}_bytes"] = _write(
                    t, Path(tmp) / f"{name}{dictionary}.parquet", dictionary)
    print(json.dumps({
        "dataset": args.dataset, "split": args.split, "rows": table.num_rows, "images": len(unique),
        "rows_per_image": round(table.num_rows / len(unique), 2),
        "shards_bytes": sum(Path(f).stat().st_size for f in files),
        "rows_image_bytes": stored, "unique_image_bytes": sum(unique.values()),
        "image_bytes_ratio": round(stored / sum(unique.values()), 2), **sizes,
    }))


if __name__ == "__main__":
    main()
