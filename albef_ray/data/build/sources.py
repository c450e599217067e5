"""Readers that turn raw image-caption collections into candidate samples for the shard writer.

Three input formats are read:

* ``json``: ALBEF-style annotations, a JSON list of ``{"image": relative path, "caption": str
  or list of str, "image_id"?: ...}`` with an image root (a list caption gives one row per
  caption, all sharing the image's ``image_id``);
* ``img2dataset``: the Parquet output of img2dataset (image bytes and caption columns, by
  default ``jpg`` and ``caption``; ``key`` or ``url`` gives the id);
* ``webdataset``: tar shards whose members ``<key>.jpg|.jpeg|.png`` and ``<key>.txt`` form a sample.

A reader never validates images: it yields one :class:`Candidate` per input image (or a
candidate carrying a reader-level ``error``), in a deterministic order, and can start after the
first ``skip`` candidates without decoding them, which is how an interrupted build resumes.
Any other iterable of candidates is written through :class:`IterableSource`.
"""

from __future__ import annotations

import json
import os
import tarfile
import zlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any, ClassVar

import pyarrow.parquet as pq

from .candidates import Candidate, IterableSource, Source, check_files_exist, expand_paths, file_identity

__all__ = [
    "Candidate",
    "IterableSource",
    "Source",
    "JsonSource",
    "Img2DatasetSource",
    "WebDatasetSource",
    "expand_paths",
    "parse_source_spec",
    "source_from_dict",
]
IMAGE_EXTENSIONS = ("jpg", "jpeg", "png")  # preference order when a sample has several


class JsonSource(Source):
    """ALBEF-style JSON annotations: ``[{"image": path, "caption": str | list, "image_id"?}]``.

    Args:
        name: source name.
        path: annotation file(s), a directory of ``*.json`` or a glob.
        image_root: directory the ``image`` paths are relative to (default: the annotation
            file's directory).
        split: split the rows go to.
    """

    format = "json"
    options: ClassVar[tuple[str, ...]] = ("image_root",)

    def __init__(self, name: str, path: Any, image_root: str | None = None, split: str = "train") -> None:
        super().__init__(name, split)
        self.files = expand_paths(path, (".json",))
        self.image_root = None if image_root is None else str(image_root)
        self._counts: dict[str, int] = {}

    def check(self) -> None:
        """Every annotation file must exist and hold a JSON list (checked before any work)."""
        check_files_exist(self.name, self.files, "annotation")
        if self.image_root is not None and not os.path.isdir(self.image_root):
            raise ValueError(f"source {self.name!r}: image_root {self.image_root!r} is not a directory")
        for file in self.files:
            try:
                with open(file, encoding="utf-8-sig") as handle:  # -sig: a BOM, as some editors write
                    entries = json.load(handle)
            except (OSError, ValueError) as err:
                raise ValueError(f"source {self.name!r}: {file}: not readable as JSON ({_short(err)})") from None
            if not isinstance(entries, list):
                keys = ", ".join(map(repr, list(entries)[:4])) if isinstance(entries, dict) else ""
                found = f"an object with keys {keys}" if isinstance(entries, dict) else type(entries).__name__
                raise ValueError(
                    f"source {self.name!r}: {file}: expected a JSON list of "
                    f'{{"image", "caption"}} entries, found {found}'
                )
            self._counts[file] = len(self._units(entries))

    def describe(self) -> dict[str, Any]:
        root = None if self.image_root is None else str(Path(self.image_root).expanduser().resolve())
        return {**super().describe(), "files": file_identity(self.files), "image_root": root}

    def _entries(self, file: str) -> list[Any] | None:
        try:
            with open(file, encoding="utf-8-sig") as handle:
                entries = json.load(handle)
        except (OSError, ValueError):
            return None
        return entries if isinstance(entries, list) else None

    def _units(self, entries: list[Any]) -> list[tuple[int, Any]]:
        """One file's candidates-to-be: ``(row, entry)`` each; a format that groups entries
        (e.g. the questions of one image) overrides it to give ``(first row, group)``."""
        return list(enumerate(entries))

    def count(self) -> int | None:
        if len(self._counts) == len(self.files):
            return sum(self._counts.values())
        return sum(len(self._units(entries)) if (entries := self._entries(f)) is not None else 1 for f in self.files)

    def iter_candidates(self, skip: int = 0) -> Iterator[Candidate]:
        index = 0
        for file in self.files:
            entries = self._entries(file)
            if entries is None:  # one unreadable file counts as one candidate
                if index >= skip:
                    error = ("unreadable_input", "not a JSON list of annotations")
                    yield Candidate(self.name, file, file, error=error, position=index)
                index += 1
                continue
            root = self.image_root if self.image_root is not None else os.path.dirname(file)
            for row, unit in self._units(entries):
                if index >= skip:
                    candidate = self._candidate(file, row, unit, root)
                    if candidate is not None:  # None: nothing of this unit is wanted (still counted)
                        candidate.position = index
                        yield candidate
                index += 1

    def _candidate(self, file: str, row: int, entry: Any, root: str) -> Candidate | None:
        if not isinstance(entry, dict) or not isinstance(entry.get("image"), str):
            return Candidate(
                self.name, f"{file}#{row}", f"{file}#{row}", error=("missing_image", "entry has no 'image' path")
            )
        image = entry["image"]
        caption = entry.get("caption")
        captions = list(caption) if isinstance(caption, list) else [caption]
        image_id = str(entry.get("image_id", image))
        return Candidate(self.name, image, image_id, captions, image_path=os.path.join(root, image))


class Img2DatasetSource(Source):
    """The Parquet output of img2dataset: one row per image with its bytes and caption.

    Args:
        name: source name.
        path: Parquet file(s), a directory of ``*.parquet`` or a glob.
        split: split the rows go to.
        image_column: column of encoded image bytes.
        caption_column: column of captions.
        id_column: column giving ``image_id``; default ``key``, else ``url``, else ``file#row``.
    """

    format = "img2dataset"
    options: ClassVar[tuple[str, ...]] = ("image_column", "caption_column", "id_column")

    def __init__(
        self,
        name: str,
        path: Any,
        split: str = "train",
        image_column: str = "jpg",
        caption_column: str = "caption",
        id_column: str | None = None,
    ) -> None:
        super().__init__(name, split)
        self.files = expand_paths(path, (".parquet",))
        self.image_column, self.caption_column, self.id_column = image_column, caption_column, id_column

    def check(self) -> None:
        check_files_exist(self.name, self.files, "Parquet")
        names = pq.read_schema(self.files[0]).names
        wanted = [self.image_column, self.caption_column] + ([self.id_column] if self.id_column else [])
        missing = [c for c in wanted if c not in names]
        if missing:
            raise ValueError(f"source {self.name!r}: {self.files[0]} has no column(s) {missing}; columns: {names}")

    def describe(self) -> dict[str, Any]:
        columns = [self.image_column, self.caption_column, self.id_column]
        return {**super().describe(), "files": file_identity(self.files), "columns": columns}

    def count(self) -> int | None:
        total = 0
        for file in self.files:
            try:
                total += pq.ParquetFile(file).metadata.num_rows
            except Exception:  # an unreadable file is one candidate
                total += 1
        return total

    def iter_candidates(self, skip: int = 0) -> Iterator[Candidate]:
        index = 0
        for file in self.files:
            try:
                handle = pq.ParquetFile(file)
            except Exception as err:
                if index >= skip:
                    yield Candidate(self.name, file, file, error=("unreadable_input", _short(err)), position=index)
                index += 1
                continue
            rows = handle.metadata.num_rows
            if index + rows <= skip:
                index += rows
                continue
            reached = [index]  # position of the next row to read, kept up to date by _read_file
            try:
                yield from self._read_file(handle, file, index, skip, reached)
            except Exception as err:  # corrupt pages part-way: the rest of the file is one skip
                if reached[0] >= skip:
                    error = ("unreadable_input", f"from row {reached[0] - index}: {_short(err)}")
                    yield Candidate(self.name, file, file, error=error, position=reached[0])
            index += rows

    def _read_file(
        self, handle: pq.ParquetFile, file: str, index: int, skip: int, reached: list[int]
    ) -> Iterator[Candidate]:
        names = handle.schema_arrow.names
        id_column = self.id_column or next((c for c in ("key", "url") if c in names), None)
        missing = [c for c in (self.image_column, self.caption_column, id_column) if c and c not in names]
        if missing:
            raise ValueError(f"no column(s) {missing}")
        columns = [self.image_column, self.caption_column] + ([id_column] if id_column else [])
        # Whole row groups before the resume point are never read.
        groups, first_row = [], index
        for g in range(handle.metadata.num_row_groups):
            n = handle.metadata.row_group(g).num_rows
            if first_row + n > skip or groups:
                groups.append(g)
            else:
                first_row += n
        row = first_row - index
        reached[0] = first_row
        for batch in handle.iter_batches(batch_size=256, row_groups=groups, columns=columns):
            data = batch.to_pydict()
            for i in range(batch.num_rows):
                if index + row >= skip:
                    key = data[id_column][i] if id_column else None
                    image_id = str(key) if key is not None else f"{Path(file).stem}#{row}"
                    image = data[self.image_column][i]
                    captions = [data[self.caption_column][i]]
                    yield Candidate(self.name, f"{file}#{row}", image_id, captions, image=image, position=index + row)
                row += 1
                reached[0] = index + row


class WebDatasetSource(Source):
    """WebDataset tar shards: members ``<key>.jpg|.jpeg|.png`` and ``<key>.txt`` form one sample.

    A sample is a run of consecutive members sharing a key (the member path up to the first dot
    of its file name). Members with other extensions are ignored.

    Args:
        name: source name.
        path: tar file(s), a directory of ``*.tar`` or a glob.
        split: split the rows go to.
    """

    format = "webdataset"

    def __init__(self, name: str, path: Any, split: str = "train") -> None:
        super().__init__(name, split)
        self.files = expand_paths(path, (".tar", ".tar.gz", ".tgz"))

    def check(self) -> None:
        check_files_exist(self.name, self.files, "tar")

    def describe(self) -> dict[str, Any]:
        return {**super().describe(), "files": file_identity(self.files)}

    def iter_candidates(self, skip: int = 0) -> Iterator[Candidate]:
        index = 0
        for file in self.files:
            try:
                for key, members, archive in self._samples(file):
                    if index >= skip:
                        candidate = self._candidate(file, key, members, archive)
                        candidate.position = index
                        yield candidate
                    index += 1
            except (OSError, tarfile.TarError, EOFError, zlib.error) as err:
                if index >= skip:
                    yield Candidate(self.name, file, file, error=("unreadable_input", _short(err)), position=index)
                index += 1

    def _samples(self, file: str) -> Iterator[tuple[str, dict[str, tarfile.TarInfo], tarfile.TarFile]]:
        # Random-access mode: iterating reads headers only, so skipped samples cost no data reads.
        with tarfile.open(file, "r:*") as archive:
            key, members = None, {}
            for member in archive:
                if not member.isfile():
                    continue
                folder, base = os.path.split(member.name)
                if "." not in base:
                    continue
                stem, ext = base.split(".", 1)
                member_key = os.path.join(folder, stem)
                if member_key != key:
                    if self._is_sample(members):
                        yield key, members, archive
                    key, members = member_key, {}
                members[ext.lower()] = member
            if self._is_sample(members):
                yield key, members, archive

    @staticmethod
    def _is_sample(members: dict[str, tarfile.TarInfo]) -> bool:
        return "txt" in members or any(ext in members for ext in IMAGE_EXTENSIONS)

    def _candidate(
        self, file: str, key: str, members: dict[str, tarfile.TarInfo], archive: tarfile.TarFile
    ) -> Candidate:
        where = f"{file}:{key}"
        image_member = next((members[e] for e in IMAGE_EXTENSIONS if e in members), None)
        if image_member is None:
            return Candidate(self.name, where, key, error=("missing_image", "no .jpg/.jpeg/.png member"))
        if "txt" not in members:
            return Candidate(self.name, where, key, error=("missing_caption", "no .txt member"))
        image = archive.extractfile(image_member).read()
        caption = archive.extractfile(members["txt"]).read().decode("utf-8", errors="replace")
        return Candidate(self.name, where, key, [caption], image=image)


def _short(err: BaseException) -> str:
    return f"{type(err).__name__}: {err}"[:300]


FORMATS: dict[str, type[Source]] = {s.format: s for s in (JsonSource, Img2DatasetSource, WebDatasetSource)}
# Downstream tasks' annotation formats (SNLI-VE, NLVR2, VQA JSON): each module defines Source
# classes with ``format`` and ``options`` and lists them in its ``SOURCES``.
TASK_SOURCE_MODULES: tuple[str, ...] = ("albef_ray.data.build.ve", "albef_ray.data.build.vqa", "albef_ray.data.build.nlvr",
                                         "albef_ray.data.build.grounding")


def formats() -> dict[str, type[Source]]:
    """Every readable format: the caption formats above and the task modules' sources."""
    import importlib

    found = dict(FORMATS)
    for module in TASK_SOURCE_MODULES:
        found.update({s.format: s for s in importlib.import_module(module).SOURCES})
    return found


def source_from_dict(spec: dict[str, Any]) -> Source:
    """Builds a source from ``{"name", "format", "path", "split"?, ...format options}``.

    Raises:
        ValueError: naming the missing or unknown key.
    """
    spec = dict(spec)
    for key in ("name", "format", "path"):
        if key not in spec:
            raise ValueError(f"source spec {spec}: missing '{key}'")
    kind = spec.pop("format")
    known = formats()
    if kind not in known:
        raise ValueError(f"source {spec['name']!r}: unknown format {kind!r}; known: {', '.join(known)}")
    allowed = {"name", "path", "split", *known[kind].options}
    unknown = sorted(set(spec) - allowed)
    if unknown:
        raise ValueError(
            f"source {spec['name']!r}: unknown key(s) {unknown} for format {kind}; allowed: {sorted(allowed)}"
        )
    return known[kind](**spec)


def parse_source_spec(text: str) -> Source:
    """Builds a source from ``name=coco,format=json,path=ann.json,image_root=images,split=train``."""
    spec = {}
    for part in filter(None, (p.strip() for p in text.split(","))):
        key, sep, value = part.partition("=")
        if not sep:
            raise ValueError(f"source spec {text!r}: expected key=value, got {part!r}")
        spec[key.strip()] = value.strip()
    return source_from_dict(spec)
