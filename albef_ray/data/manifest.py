"""The dataset manifest: assembled from a build's shard records, read by the streaming side.

Example ``manifest.json`` (abridged)::

    {
      "schema_version": 1,
      "complete": true,
      "splits": {
        "train": {"rows": 7, "images": 6, "sources": {"coco": 4, "cc": 3},
                  "shards": [{"path": "train/part-00000.parquet", "rows": 4, "bytes": 9123}, ...]},
        "test": {...}
      },
      "sources": {"coco": {"rows": 4, "images": 3, "skipped": 2}, "cc": {...}},
      "skipped": {"total": 3, "by_reason": {"truncated_image": 1, "empty_caption": 2},
                  "by_source": {"coco": {"truncated_image": 1, "empty_caption": 1}, ...}},
      "build": {"fingerprint": "4f1c...", "shard_bytes": 134217728, "shard_rows": null,
                "sources": [{"name": "coco", "split": "train", "format": "json", ...}, ...]},
      "tokenizer": "tokenizer",          (synthetic data only, like the "synth" section)
      "synth": {...}
    }

``rows`` counts image-caption rows, ``images`` the distinct ``(source, image_id)`` pairs among
them (an annotation file listing an image once per caption counts it once).
Paths inside the manifest are relative to the dataset root.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from .schema import MANIFEST, PROGRESS_DIR, SCHEMA_VERSION

Manifest = dict[str, Any]


def _empty_split() -> dict[str, Any]:
    return {"rows": 0, "images": 0, "sources": {}, "shards": []}


def assemble_manifest(
    build: dict[str, Any],
    records: list[dict[str, Any]],
    extra: dict[str, Any] | None = None,
    images: dict[str, dict[str, int]] | None = None,
    shards: dict[str, list[dict[str, Any]]] | None = None,
) -> Manifest:
    """Builds the manifest of a finished build from its shard records.

    Args:
        build: the build spec (``fingerprint``, ``sources`` descriptions, shard targets).
        records: the build's progress records in order; each has ``split``, ``shard`` (a path
            relative to the root, or ``None`` for a record of skips only), ``rows``, ``bytes``,
            ``images``, ``source_rows`` (name -> rows) and ``skipped`` (skip records).
        extra: further top-level sections (e.g. ``synth``, ``tokenizer``).
        images: distinct images ``{"splits": {split: n}, "sources": {name: n}}``, replacing
            the records' counts of input entries.
        shards: the shard list of each split when the shards are not the records' own (a
            shuffled build writes them after the records).

    Returns:
        The manifest as a JSON-able dict.
    """
    splits: dict[str, dict[str, Any]] = {}
    sources: dict[str, dict[str, int]] = {}
    for described in build["sources"]:  # every declared split and source appears, even if empty
        splits.setdefault(described["split"], _empty_split())["sources"].setdefault(described["name"], 0)
        sources.setdefault(described["name"], {"rows": 0, "images": 0, "skipped": 0})
    by_reason: dict[str, int] = {}
    by_source: dict[str, dict[str, int]] = {}
    for record in records:
        split = splits.setdefault(record["split"], _empty_split())
        split["rows"] += record["rows"]
        split["images"] += record["images"]
        if record["shard"] is not None:
            split["shards"].append({"path": record["shard"], "rows": record["rows"], "bytes": record["bytes"]})
        for name, rows in record["source_rows"].items():
            split["sources"][name] = split["sources"].get(name, 0) + rows
            sources.setdefault(name, {"rows": 0, "images": 0, "skipped": 0})["rows"] += rows
        for name, entries in record.get("source_images", {}).items():
            sources[name]["images"] += entries
        for skip in record["skipped"]:
            by_reason[skip["reason"]] = by_reason.get(skip["reason"], 0) + 1
            per_source = by_source.setdefault(skip["source"], {})
            per_source[skip["reason"]] = per_source.get(skip["reason"], 0) + 1
            sources.setdefault(skip["source"], {"rows": 0, "images": 0, "skipped": 0})["skipped"] += 1
    if images is not None:
        for split_name, split_entry in splits.items():
            split_entry["images"] = images["splits"].get(split_name, 0)
        for source_name, source_entry in sources.items():
            source_entry["images"] = images["sources"].get(source_name, 0)
    for split_name, listed in (shards or {}).items():
        splits.setdefault(split_name, _empty_split())["shards"] = list(listed)
    manifest: Manifest = {
        "schema_version": SCHEMA_VERSION,
        "complete": True,
        "splits": splits,
        "sources": sources,
        "skipped": {"total": sum(by_reason.values()), "by_reason": by_reason, "by_source": by_source},
        "build": build,
    }
    for key, value in (extra or {}).items():
        if key in manifest:
            raise ValueError(f"manifest section {key!r} is reserved")
        manifest[key] = value
    return manifest


def _is_uri(root: str) -> bool:
    return "://" in root


def _join(root: str | os.PathLike, relative: str) -> str:
    root = str(root)
    if _is_uri(root):
        return f"{root.rstrip('/')}/{relative}"
    return str(Path(root).resolve() / relative)


def read_manifest(root: str | os.PathLike) -> Manifest:
    """Reads ``<root>/manifest.json`` from a local directory or a URI pyarrow can open (s3://, gs://).

    Raises:
        FileNotFoundError: when there is no manifest (not a dataset, or an unfinished build).
        ValueError: when its schema version is not the one this code reads.
    """
    path = _join(root, MANIFEST)
    if _is_uri(path):
        from pyarrow import fs

        filesystem, inner = fs.FileSystem.from_uri(path)
        with filesystem.open_input_stream(inner) as handle:
            manifest = json.loads(handle.read().decode("utf-8"))
    else:
        if not os.path.exists(path):
            raise FileNotFoundError(f"{root}: no {MANIFEST} (not a dataset, or its build did not finish)")
        with open(path, encoding="utf-8") as handle:
            manifest = json.load(handle)
    if manifest.get("schema_version") != SCHEMA_VERSION:
        raise ValueError(f"{root}: schema version {manifest.get('schema_version')}, expected {SCHEMA_VERSION}")
    return manifest


def dataset_problem(root: str | os.PathLike) -> str | None:
    """Why a local dataset root cannot be read, or ``None`` (URIs are not checked here).

    A root without ``manifest.json`` is refused when it holds a build's progress folder (an
    unfinished build: its shards are only part of the data) or no Parquet file at all; a plain
    folder of Parquet files is accepted.
    """
    if _is_uri(str(root)):
        return None
    path = Path(root).expanduser()
    if not path.exists():
        return f"{root} does not exist"
    if path.is_dir() and not (path / MANIFEST).is_file():
        if (path / PROGRESS_DIR).is_dir():
            return f"{root}: no {MANIFEST}: its build did not finish (run the same `albef-ray data build` again)"
        if next(path.rglob("*.parquet"), None) is None:
            return f"{root}: no {MANIFEST} and no Parquet files (not a dataset)"
    return None


def split_names(root: str | os.PathLike, manifest: Manifest | None = None) -> list[str]:
    """The dataset's splits in build order, e.g. ``["train", "val", "test"]``."""
    return list((manifest or read_manifest(root))["splits"])


def shard_paths(root: str | os.PathLike, split: str, manifest: Manifest | None = None) -> list[str]:
    """Absolute paths (or URIs, for a URI root) of a split's shards, in order.

    Args:
        root: the dataset directory or URI.
        split: e.g. ``"train"``.
        manifest: an already read manifest of ``root``, to save a read.

    Raises:
        KeyError: naming the available splits when ``split`` is not one of them.
    """
    manifest = manifest or read_manifest(root)
    if split not in manifest["splits"]:
        raise KeyError(f"{root}: no split {split!r}; splits: {', '.join(manifest['splits'])}")
    return [_join(root, shard["path"]) for shard in manifest["splits"][split]["shards"]]


def tokenizer_dir(root: str | os.PathLike, manifest: Manifest | None = None) -> str | None:
    """The dataset's own tokenizer directory (synthetic data), or ``None`` when it has none."""
    relative = (manifest or read_manifest(root)).get("tokenizer")
    return None if relative is None else _join(root, relative)


def shard_files(paths: list[str], split: str) -> tuple[list[str], int | None]:
    """The Parquet files of ``split`` under each dataset root, and their total rows if known.

    A root with a ``manifest.json`` lists its shards (an unfinished build has none and is
    read as a plain directory); otherwise ``<root>/<split>/`` (or the path itself when it
    has no such folder) is read, and the row count comes from the Parquet footers.
    """
    files: list[str] = []
    rows: int | None = 0
    for path in paths:
        try:
            manifest = read_manifest(path)
        except FileNotFoundError:
            manifest = None
        if manifest is not None:
            files += shard_paths(path, split, manifest)
            rows = None if rows is None else rows + manifest["splits"][split]["rows"]
        elif "://" in path:
            files.append(f"{path.rstrip('/')}/{split}")
            rows = None
        else:
            root = Path(path).expanduser().resolve()
            files.append(str(root / split) if (root / split).is_dir() else str(root))
            rows = None
    return files, rows
