"""The shard writer: candidate samples in, a dataset directory of Parquet shards out.

:func:`write_dataset` reads its sources split by split, validates every candidate (in a
process pool when ``workers > 1``; results stay in input order), and cuts each split's rows
into shards of a target size in rows or bytes. A bad input is skipped, counted and listed in
``skipped.jsonl``; it never stops the build.

Resume. Every shard is written to a temporary file and renamed into place, then a progress
record (its rows, its skips, and the input position where it ends) is written to
``<root>/_build/`` the same way. Shard contents depend only on input order, so a re-run of an
interrupted build keeps the finished shards untouched, restarts the sources after the last
record's end position (readers skip without decoding) and writes the remaining shards. The
manifest is written last; then the progress records are removed.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
from collections import Counter
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
from tqdm.auto import tqdm

from .candidates import Candidate, Source
from .manifest import Manifest, assemble_manifest
from .schema import (
    MANIFEST,
    PROGRESS_DIR,
    ROW_SCHEMA,
    SCHEMA_VERSION,
    SKIPPED,
    shard_name,
)
from .validate import Checked, check_stream

logger = logging.getLogger(__name__)

DEFAULT_SHARD_BYTES = 128 * 2**20  # Ray Data's Parquet reader packs files up to 128 MiB per block
ROW_GROUP_ROWS = 256  # a reader holds one row group of images in memory at a time
BUILD_SPEC = "build.json"


class BuildError(Exception):
    """The output directory holds something this build must not overwrite or resume."""


class _Shard:
    """Rows and skips gathered for the next shard of one split."""

    def __init__(self, split: str) -> None:
        self.split = split
        self.rows: list[dict[str, Any]] = []
        self.bytes = 0
        self.images = 0
        self.source_rows: Counter[str] = Counter()
        self.source_images: Counter[str] = Counter()
        self.skipped: list[dict[str, str]] = []

    def add(self, checked: Checked) -> None:
        self.rows += checked.rows
        self.skipped += checked.skipped
        for row in checked.rows:
            self.bytes += len(row["image"]) + len(row["caption"]) + len(row["image_id"]) + len(row["source"]) + 8
            self.source_rows[row["source"]] += 1
        if checked.rows:
            self.images += 1
            self.source_images[checked.rows[0]["source"]] += 1

    def full(self, shard_rows: int | None, shard_bytes: int | None) -> bool:
        return bool(self.rows) and (
            (shard_rows is not None and len(self.rows) >= shard_rows)
            or (shard_bytes is not None and self.bytes >= shard_bytes)
        )


class _RecordLog:
    """Finished shards and their progress records in ``<root>/_build/``, in build order."""

    def __init__(self, root: Path, records: list[dict[str, Any]]) -> None:
        self.root, self.records = root, records
        self.shard_counts = Counter(r["split"] for r in records if r["shard"] is not None)

    def resume_point(self) -> tuple[int, int]:
        """(source index, position in that source) of the first input not yet in a record."""
        return tuple(self.records[-1]["end"]) if self.records else (0, 0)

    def flush(self, shard: _Shard, end: tuple[int, int]) -> None:
        """Writes the shard (when it has rows), then its record: the record commits the shard."""
        path, size = None, 0
        if shard.rows:
            path = f"{shard.split}/{shard_name(self.shard_counts[shard.split])}"
            size = write_shard(self.root / path, shard.rows)
            self.shard_counts[shard.split] += 1
        record = {
            "split": shard.split,
            "shard": path,
            "rows": len(shard.rows),
            "bytes": size,
            "images": shard.images,
            "source_rows": dict(shard.source_rows),
            "source_images": dict(shard.source_images),
            "skipped": shard.skipped,
            "end": list(end),
        }
        _atomic_json(self.root / PROGRESS_DIR / f"record-{len(self.records):05d}.json", record)
        self.records.append(record)

    def totals(self, pending: _Shard | None) -> dict[str, int]:
        """Rows written and inputs skipped so far, for the progress bar."""
        rows = sum(r["rows"] for r in self.records) + (len(pending.rows) if pending else 0)
        skipped = sum(len(r["skipped"]) for r in self.records) + (len(pending.skipped) if pending else 0)
        return {"rows": rows, "skipped": skipped}


def _atomic_json(path: Path, value: Any) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(value, indent=1, sort_keys=False) + "\n", encoding="utf-8")
    os.replace(tmp, path)


def write_shard(path: Path, rows: list[dict[str, Any]], row_group_rows: int = ROW_GROUP_ROWS) -> int:
    """Writes rows as one Parquet file atomically (temporary file, then rename); returns its size.

    Image bytes are stored uncompressed (they already are compressed); the text columns use zstd.
    """
    table = pa.Table.from_pylist(rows, schema=ROW_SCHEMA)
    tmp = path.with_name(path.name + ".tmp")
    text_columns = ["caption", "image_id", "source"]
    pq.write_table(
        table,
        tmp,
        row_group_size=row_group_rows,
        compression={
            "image": "NONE",
            "caption": "ZSTD",
            "image_id": "ZSTD",
            "source": "ZSTD",
            "width": "ZSTD",
            "height": "ZSTD",
        },
        use_dictionary=text_columns,
        write_statistics=text_columns + ["width", "height"],
    )
    os.replace(tmp, path)
    return path.stat().st_size


def _clear(root: Path, splits: set[str]) -> None:
    """Removes a previous build's files (only names this writer creates)."""
    for name in (MANIFEST, SKIPPED):
        (root / name).unlink(missing_ok=True)
    shutil.rmtree(root / PROGRESS_DIR, ignore_errors=True)
    for split in splits:
        for part in (root / split).glob("part-*.parquet*"):
            part.unlink()


def _load_records(root: Path, splits: set[str]) -> list[dict[str, Any]]:
    """Progress records of finished shards, dropping any whose shard is missing and all after it."""
    progress = root / PROGRESS_DIR
    records = []
    while (path := progress / f"record-{len(records):05d}.json").exists():
        try:
            record = json.loads(path.read_text(encoding="utf-8"))
        except ValueError:
            break
        shard = record["shard"]
        if shard is not None and (not (root / shard).exists() or (root / shard).stat().st_size != record["bytes"]):
            break
        records.append(record)
    for stale in progress.glob("record-*.json"):
        if int(stale.stem.split("-")[1]) >= len(records):
            stale.unlink()
    for split in splits:  # a shard or record interrupted mid-write
        for tmp in (root / split).glob("*.tmp"):
            tmp.unlink()
    return records


def _prepare(root: Path, build: dict[str, Any], overwrite: bool) -> list[dict[str, Any]] | Manifest:
    """Checks what ``root`` holds; returns a finished manifest, or the records to resume from."""
    splits = {s["split"] for s in build["sources"]}
    manifest_path, spec_path = root / MANIFEST, root / PROGRESS_DIR / BUILD_SPEC
    if manifest_path.exists():
        old = json.loads(manifest_path.read_text(encoding="utf-8"))
        if old.get("build", {}).get("fingerprint") == build["fingerprint"] and not overwrite:
            shutil.rmtree(root / PROGRESS_DIR, ignore_errors=True)
            return old
        if not overwrite:
            raise BuildError(f"{root} already holds a dataset built from other inputs; overwrite to replace it")
        _clear(root, splits | set(old.get("splits", {})))
    elif spec_path.exists():
        old_build = json.loads(spec_path.read_text(encoding="utf-8"))
        if old_build.get("fingerprint") != build["fingerprint"] or overwrite:
            if not overwrite:
                raise BuildError(f"{root} holds an unfinished build of other inputs; overwrite to replace it")
            _clear(root, splits | {s["split"] for s in old_build.get("sources", [])})
    (root / PROGRESS_DIR).mkdir(parents=True, exist_ok=True)
    for split in splits:
        (root / split).mkdir(exist_ok=True)
    _atomic_json(spec_path, build)
    return _load_records(root, splits)


def _ordered(sources: Sequence[Source]) -> list[Source]:
    """Sources grouped by split (splits in order of first appearance), stable within a split."""
    first = {}
    for source in sources:
        first.setdefault(source.split, len(first))
    return sorted(sources, key=lambda s: first[s.split])


def build_spec(sources: Sequence[Source], shard_bytes: int | None, shard_rows: int | None) -> dict[str, Any]:
    """What identifies a build: its sources in order and shard targets, with their fingerprint."""
    spec = {
        "schema_version": SCHEMA_VERSION,
        "sources": [s.describe() for s in _ordered(sources)],
        "shard_bytes": shard_bytes,
        "shard_rows": shard_rows,
    }
    digest = hashlib.sha256(json.dumps(spec, sort_keys=True, default=str).encode()).hexdigest()
    return {"fingerprint": digest, **spec}


def write_dataset(
    root: str | os.PathLike,
    sources: Sequence[Source],
    *,
    shard_bytes: int | None = DEFAULT_SHARD_BYTES,
    shard_rows: int | None = None,
    workers: int = 0,
    progress: bool = True,
    overwrite: bool = False,
    extra: dict[str, Any] | None = None,
) -> Manifest:
    """Builds (or finishes building) a dataset directory from candidate sources.

    Args:
        root: output directory (created if needed).
        sources: the inputs; each names its split. Splits are written one after another, in
            order of first appearance; a split's sources in the given order.
        shard_bytes: start a new shard once a shard's images and text reach this many bytes.
        shard_rows: start a new shard once it has this many rows (with ``shard_bytes``,
            whichever comes first).
        workers: processes that decode and validate images; 0 or 1 works in this process.
        progress: show a tqdm bar.
        overwrite: replace a dataset or unfinished build of other inputs instead of refusing.
        extra: further manifest sections (e.g. ``{"synth": {...}}``).

    Returns:
        The manifest (also written to ``<root>/manifest.json``).

    Raises:
        BuildError: ``root`` holds a dataset or unfinished build of other inputs.
        ValueError: a misconfigured source, or no shard target at all.
    """
    if shard_bytes is None and shard_rows is None:
        raise ValueError("give shard_bytes or shard_rows")
    for source in sources:
        source.check()
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    build = build_spec(sources, shard_bytes, shard_rows)
    state = _prepare(root, build, overwrite)
    if isinstance(state, dict):  # already finished: refresh the extra sections only
        if extra and any(state.get(k) != v for k, v in extra.items()):
            state.update(extra)
            _atomic_json(root / MANIFEST, state)
        logger.info("%s: already built (%d rows)", root, sum(s["rows"] for s in state["splits"].values()))
        return state
    ordered = _ordered(sources)
    log = _RecordLog(root, state)
    if log.records:
        logger.info("%s: resuming after %d finished shard record(s)", root, len(log.records))
    start_source, start_position = log.resume_point()

    def items() -> Iterator[tuple[tuple[int, int], Candidate]]:
        for index in range(start_source, len(ordered)):
            skip = start_position if index == start_source else 0
            for candidate in ordered[index].iter_candidates(skip):
                yield (index, candidate.position), candidate

    counts = [s.count() for s in ordered]
    total = None if None in counts else sum(counts)
    done = sum(counts[:start_source]) + start_position if total is not None else 0
    bar = tqdm(total=total, initial=done, unit="img", desc=f"building {root.name}", disable=not progress)
    shard: _Shard | None = None
    for (index, position), checked in check_stream(items(), workers):
        if shard is not None and shard.split != ordered[index].split:  # a split ends where the next begins
            log.flush(shard, (index, 0))
            shard = None
        shard = shard or _Shard(ordered[index].split)
        shard.add(checked)
        if shard.full(shard_rows, shard_bytes):
            log.flush(shard, (index, position + 1))
            shard = None
        bar.update(1)
        if bar.n % 256 == 0:
            bar.set_postfix(log.totals(shard), refresh=False)
    bar.set_postfix(log.totals(shard))
    bar.close()
    if shard is not None:
        log.flush(shard, (len(ordered), 0))
    return _finish(root, build, log.records, extra)


def _finish(root: Path, build: dict[str, Any], records: list[dict[str, Any]], extra: dict[str, Any] | None) -> Manifest:
    manifest = assemble_manifest(build, records, extra)
    tmp = root / (SKIPPED + ".tmp")
    with open(tmp, "w", encoding="utf-8") as handle:
        for record in records:
            for skip in record["skipped"]:
                handle.write(json.dumps(skip) + "\n")
    os.replace(tmp, root / SKIPPED)
    for split, entry in manifest["splits"].items():  # shards of an earlier, longer attempt
        keep = {Path(s["path"]).name for s in entry["shards"]}
        for part in (root / split).glob("part-*.parquet"):
            if part.name not in keep:
                part.unlink()
    _atomic_json(root / MANIFEST, manifest)
    shutil.rmtree(root / PROGRESS_DIR, ignore_errors=True)
    logger.info(
        "%s: %d rows in %d shards, %d inputs skipped",
        root,
        sum(s["rows"] for s in manifest["splits"].values()),
        sum(len(s["shards"]) for s in manifest["splits"].values()),
        manifest["skipped"]["total"],
    )
    return manifest
