"""The shard writer: candidate samples in, a dataset directory of Parquet shards out.

:func:`write_dataset` reads its sources split by split, validates every candidate (in a
process pool when ``workers > 1``; results stay in input order), and cuts each split's rows
into shards of a target size in rows or bytes. A bad input is skipped, counted and listed in
``skipped.jsonl``; it never stops the build.

Shuffle. By default (``shuffle_seed=0``) rows are shuffled across each split, so the captions
of one image do not sit together: they first go to a spill file in input order, then are
written as shards in a seeded permutation (:mod:`albef_ray.data.build.shuffle`). With
``shuffle_seed=None`` shards keep input order and are written directly.

Resume. Every shard (or spilled chunk) is written to a temporary file and renamed into place,
then a progress record (its rows, its skips, and the input position where it ends) is written to
``<root>/_build/`` the same way. What a record holds depends only on input order, so a re-run
of an interrupted build keeps what the records commit, restarts the sources after the last
record's end position (readers skip without decoding) and writes the rest; the shuffle pass
recomputes the same permutation and keeps the shards it finished. The manifest is written
last; then the progress folder is removed.

Identity. A build is identified by its fingerprint: the sources with their input files'
resolved paths, sizes and modification times, the shard targets and the shuffle seed. A
re-run with the same fingerprint keeps the dataset ("already built") or resumes; a changed
input is refused (naming the file) unless ``overwrite``. Files in the output folder that no
build of ours wrote (another tool's ``part-*.parquet``) are never overwritten or deleted.
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
import pyarrow.compute as pc
import pyarrow.parquet as pq
from tqdm.auto import tqdm

from . import shuffle
from .candidates import Candidate, Source
from ..manifest import Manifest, assemble_manifest
from ..schema import (
    MANIFEST,
    PROGRESS_DIR,
    row_schema,
    SCHEMA_VERSION,
    SKIPPED,
    shard_name,
)
from .validate import Checked, check_stream

logger = logging.getLogger(__name__)

DEFAULT_SHARD_BYTES = 128 * 2**20  # Ray Data's Parquet reader packs files up to 128 MiB per block
DEFAULT_SHUFFLE_SEED = 0  # rows shuffled across each split unless a build asks for input order
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
            self.bytes += shuffle.row_size(row)
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

    def __init__(self, root: Path, records: list[dict[str, Any]], spill: bool = False) -> None:
        self.root, self.records, self.spill = root, records, spill
        self.shard_counts = Counter(r["split"] for r in records if r["shard"] is not None)

    def resume_point(self) -> tuple[int, int]:
        """(source index, position in that source) of the first input not yet in a record."""
        return tuple(self.records[-1]["end"]) if self.records else (0, 0)

    def flush(self, shard: _Shard, end: tuple[int, int]) -> None:
        """Writes the shard (or spills its rows), then its record: the record commits them."""
        path, size, spilled, offsets = None, 0, None, None
        number = len(self.records)
        if shard.rows and self.spill:
            bounds = shuffle.append_rows(shuffle.spill_path(self.root / PROGRESS_DIR, shard.split), shard.rows)
            offsets = f"record-{number:05d}.npy"
            shuffle.save_offsets(self.root / PROGRESS_DIR / offsets, bounds)
            spilled = [int(bounds[0]), int(bounds[-1])]
        elif shard.rows:
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
            "spill": spilled,
            "offsets": offsets,
        }
        _atomic_json(self.root / PROGRESS_DIR / f"record-{number:05d}.json", record)
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
    schema = row_schema(rows[0].keys() if rows else ())
    table = pa.Table.from_pylist(rows, schema=schema)
    tmp = path.with_name(path.name + ".tmp")
    text_columns = ["caption", "image_id", "source"] + [c for c in ("question_id", "image_id2") if c in schema.names]
    pq.write_table(
        table,
        tmp,
        row_group_size=row_group_rows,
        compression={name: "NONE" if name in ("image", "image2") else "ZSTD" for name in schema.names},
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
    """Progress records of finished shards, dropping any whose shard is missing and all after it.

    Spill files are cut back to what the kept records commit (rows appended by an attempt
    that died before writing its record are dropped).
    """
    progress = root / PROGRESS_DIR
    records = []
    while (path := progress / f"record-{len(records):05d}.json").exists():
        try:
            record = json.loads(path.read_text(encoding="utf-8"))
        except ValueError:
            break
        shard, spilled = record["shard"], record.get("spill")
        if shard is not None and (not (root / shard).exists() or (root / shard).stat().st_size != record["bytes"]):
            break
        if spilled is not None:
            spill = shuffle.spill_path(progress, record["split"])
            if not spill.exists() or spill.stat().st_size < spilled[1] or not (progress / record["offsets"]).exists():
                break
        records.append(record)
    for stale in progress.glob("record-*"):
        number = stale.name.split(".")[0].split("-")[1]
        if not number.isdigit() or int(number) >= len(records) or stale.name.endswith(".tmp"):
            stale.unlink()
    for split in splits:
        committed = [r["spill"][1] for r in records if r["split"] == split and r.get("spill") is not None]
        spill = shuffle.spill_path(progress, split)
        if spill.exists():
            os.truncate(spill, max(committed, default=0))
    for split in splits:  # a shard or record interrupted mid-write
        for tmp in (root / split).glob("*.tmp"):
            tmp.unlink()
    return records


def _read_ours(path: Path) -> dict[str, Any] | None:
    """A manifest or build spec this writer wrote (it has a fingerprint), ``None`` when absent.

    Raises:
        BuildError: the file exists but is not ours (unreadable, or without a fingerprint).
    """
    if not path.exists():
        return None
    try:
        value = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        value = None
    if not isinstance(value, dict) or not isinstance(value.get("build", value).get("fingerprint"), str):
        raise BuildError(
            f"{path} was not written by albef-ray data build; refusing to touch this folder "
            "(choose another output folder)"
        )
    return value


def _refuse_foreign_files(root: Path, splits: set[str], manifest: dict | None, spec: dict | None) -> None:
    """Refuses an output folder holding shard-like files that no build of ours wrote."""
    ours = set()
    if manifest is not None:
        ours = {s["path"] for entry in manifest.get("splits", {}).values() for s in entry.get("shards", [])}
        splits = splits | set(manifest.get("splits", {}))
    unfinished = {s["split"] for s in spec.get("sources", [])} if spec is not None else set()
    foreign = [
        part.relative_to(root).as_posix()
        for split in sorted(splits)
        for part in sorted((root / split).glob("part-*.parquet*"))
        if split not in unfinished and part.relative_to(root).as_posix() not in ours
    ]
    if manifest is None and spec is None and (root / SKIPPED).exists():
        foreign.insert(0, SKIPPED)
    if foreign:
        more = f" and {len(foreign) - 1} more" if len(foreign) > 1 else ""
        raise BuildError(
            f"{root}: {foreign[0]}{more} not written by albef-ray data build (no manifest or unfinished "
            "build of ours names it); refusing to overwrite or delete it: choose an empty output folder"
        )


def _what_changed(old: dict[str, Any], new: dict[str, Any]) -> str:
    """A short account of how an earlier build's spec differs from this one."""
    for key in ("schema_version", "shard_bytes", "shard_rows", "shuffle_seed"):
        if old.get(key) != new.get(key):
            return f"{key} {old.get(key)} -> {new.get(key)}"
    old_sources, new_sources = old.get("sources", []), new.get("sources", [])
    if len(old_sources) != len(new_sources):
        return f"{len(old_sources)} source(s) -> {len(new_sources)}"
    for before, after in zip(old_sources, new_sources):
        paths = [[f.get("path") if isinstance(f, dict) else f for f in s.get("files", [])] for s in (before, after)]
        if paths[0] == paths[1]:
            for file_before, file_after in zip(before.get("files", []), after.get("files", [])):
                if file_before != file_after:
                    return f"{file_after['path']} changed since (size or modification time)"
        if before != after:
            return f"source {after.get('name')!r} differs"
    return "another build"


def _prepare(root: Path, build: dict[str, Any], overwrite: bool) -> list[dict[str, Any]] | Manifest:
    """Checks what ``root`` holds; returns a finished manifest, or the records to resume from."""
    splits = {s["split"] for s in build["sources"]}
    manifest_path, spec_path = root / MANIFEST, root / PROGRESS_DIR / BUILD_SPEC
    old_manifest = _read_ours(manifest_path)
    old_spec = _read_ours(spec_path) if old_manifest is None else None
    _refuse_foreign_files(root, splits, old_manifest, old_spec)
    if old_manifest is not None:
        if old_manifest["build"]["fingerprint"] == build["fingerprint"] and not overwrite:
            shutil.rmtree(root / PROGRESS_DIR, ignore_errors=True)
            return old_manifest
        if not overwrite:
            raise BuildError(
                f"{root} already holds a dataset built from other inputs or settings "
                f"({_what_changed(old_manifest['build'], build)}); pass --overwrite to replace it"
            )
        _clear(root, splits | set(old_manifest.get("splits", {})))
    elif old_spec is not None:
        if old_spec["fingerprint"] != build["fingerprint"] or overwrite:
            if not overwrite:
                raise BuildError(
                    f"{root} holds an unfinished build of other inputs or settings "
                    f"({_what_changed(old_spec, build)}); pass --overwrite to start again"
                )
            _clear(root, splits | {s["split"] for s in old_spec.get("sources", [])})
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


def build_spec(
    sources: Sequence[Source], shard_bytes: int | None, shard_rows: int | None, shuffle_seed: int | None = None
) -> dict[str, Any]:
    """What identifies a build: its sources in order, shard targets and shuffle seed, with their fingerprint."""
    spec = {
        "schema_version": SCHEMA_VERSION,
        "sources": [s.describe() for s in _ordered(sources)],
        "shard_bytes": shard_bytes,
        "shard_rows": shard_rows,
        "shuffle_seed": shuffle_seed,
    }
    digest = hashlib.sha256(json.dumps(spec, sort_keys=True, default=str).encode()).hexdigest()
    return {"fingerprint": digest, **spec}


def _check_targets(shard_bytes: int | None, shard_rows: int | None, shuffle_seed: int | None) -> None:
    if shard_bytes is None and shard_rows is None:
        raise ValueError("give shard_bytes or shard_rows")
    for name, value in (("shard_bytes", shard_bytes), ("shard_rows", shard_rows)):
        if value is not None and (not isinstance(value, int) or value <= 0):
            raise ValueError(f"{name}: must be a positive integer, got {value!r}")
    if shuffle_seed is not None and (not isinstance(shuffle_seed, int) or shuffle_seed < 0):
        raise ValueError(f"shuffle_seed: must be a non-negative integer or None, got {shuffle_seed!r}")


def write_dataset(
    root: str | os.PathLike,
    sources: Sequence[Source],
    *,
    shard_bytes: int | None = DEFAULT_SHARD_BYTES,
    shard_rows: int | None = None,
    shuffle_seed: int | None = DEFAULT_SHUFFLE_SEED,
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
        shuffle_seed: rows of each split are written in a permutation drawn from this seed
            (the same seed and inputs give the same shards); ``None`` keeps input order.
        workers: processes that decode and validate images; 0 or 1 works in this process.
        progress: show a tqdm bar.
        overwrite: replace a dataset or unfinished build of other inputs instead of refusing.
        extra: further manifest sections (e.g. ``{"synth": {...}}``).

    Returns:
        The manifest (also written to ``<root>/manifest.json``).

    Raises:
        BuildError: ``root`` is a file, holds a dataset or unfinished build of other inputs, or
            holds files no build of ours wrote.
        ValueError: a misconfigured source (missing input file, an annotation file that is not
            a JSON list), or no or non-positive shard targets.
    """
    _check_targets(shard_bytes, shard_rows, shuffle_seed)
    for source in sources:
        source.check()
    root = Path(root)
    if root.exists() and not root.is_dir():
        raise BuildError(f"{root} exists and is not a directory; give a folder for the dataset")
    root.mkdir(parents=True, exist_ok=True)
    build = build_spec(sources, shard_bytes, shard_rows, shuffle_seed)
    state = _prepare(root, build, overwrite)
    if isinstance(state, dict):  # already finished: refresh the extra sections only
        if extra and any(state.get(k) != v for k, v in extra.items()):
            state.update(extra)
            _atomic_json(root / MANIFEST, state)
        logger.info("%s: already built (%d rows)", root, sum(s["rows"] for s in state["splits"].values()))
        return state
    ordered = _ordered(sources)
    log = _RecordLog(root, state, spill=shuffle_seed is not None)
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
    shards = None
    if shuffle_seed is not None:
        splits = list(dict.fromkeys(s.split for s in ordered))
        shards = {
            split: _write_shuffled(root, split, log.records, shuffle_seed, shard_rows, shard_bytes, progress)
            for split in splits
        }
    return _finish(root, build, log.records, extra, shards)


def _write_shuffled(
    root: Path,
    split: str,
    records: list[dict[str, Any]],
    seed: int,
    shard_rows: int | None,
    shard_bytes: int | None,
    progress: bool,
) -> list[dict[str, Any]]:
    """The shuffle pass of one split: its spilled rows, permuted, cut and written as shards."""
    progress_dir = root / PROGRESS_DIR
    starts, ends = shuffle.split_offsets(progress_dir, records, split)
    order = shuffle.permutation(seed, split, len(starts))
    ranges = shuffle.cut(shuffle.row_bytes(starts, ends)[order], shard_rows, shard_bytes)
    entries = []
    bar = tqdm(total=len(order), unit="row", desc=f"shuffling {split}", disable=not progress)
    for number, (first, last) in enumerate(ranges):
        path = f"{split}/{shard_name(number)}"
        target = root / path
        if not (target.exists() and pq.ParquetFile(target).metadata.num_rows == last - first):
            rows = shuffle.gather(shuffle.spill_path(progress_dir, split), starts, ends, order[first:last])
            write_shard(target, rows)
        entries.append({"path": path, "rows": last - first, "bytes": target.stat().st_size})
        bar.update(last - first)
    bar.close()
    return entries


def distinct_images(root: Path, shards: dict[str, list[dict[str, Any]]]) -> dict[str, dict[str, int]]:
    """Distinct ``(source, image_id)`` pairs per split and per source, read from the shards.

    An annotation file may list an image once per caption (COCO in ALBEF's JSON form does), so
    counting input entries would count such an image several times.
    """
    per_split: dict[str, int] = {}
    per_source: Counter[str] = Counter()
    for split, entries in shards.items():
        tables = [pq.read_table(root / e["path"], columns=["source", "image_id"]) for e in entries]
        if not tables:
            per_split[split] = 0
            continue
        unique = pa.concat_tables(tables).group_by(["source", "image_id"]).aggregate([])
        per_split[split] = unique.num_rows
        for item in pc.value_counts(unique["source"]).to_pylist():
            per_source[item["values"]] += item["counts"]
    return {"splits": per_split, "sources": dict(per_source)}


def _finish(
    root: Path,
    build: dict[str, Any],
    records: list[dict[str, Any]],
    extra: dict[str, Any] | None,
    shuffled: dict[str, list[dict[str, Any]]] | None = None,
) -> Manifest:
    if shuffled is None:
        shards: dict[str, list[dict[str, Any]]] = {}
        for record in records:
            if record["shard"] is not None:
                entry = {"path": record["shard"], "rows": record["rows"], "bytes": record["bytes"]}
                shards.setdefault(record["split"], []).append(entry)
    else:
        shards = shuffled
    manifest = assemble_manifest(build, records, extra, images=distinct_images(root, shards), shards=shuffled)
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
