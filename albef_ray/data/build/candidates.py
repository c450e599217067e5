"""What the shard writer consumes: candidate samples, from named sources, one split each.

A :class:`Source` yields :class:`Candidate` objects (one per input image, with its captions) in
a fixed order, each with its ``position`` in that order, and can restart at a position: that is
all the writer needs to resume an interrupted build. The readers of real input formats are in
:mod:`albef_ray.data.build.sources`; :class:`IterableSource` wraps any other generator.
"""

from __future__ import annotations

import glob
import os
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, ClassVar


@dataclass
class Candidate:
    """One input image with its captions, before validation.

    Attributes:
        source: name of the source it came from (the ``source`` column).
        input: where it came from, for the skip report (``file#row``, ``tar:key``, a path).
        image_id: id shared by the rows of this image; unique within the source.
        captions: raw captions (``None`` or blank ones are skipped one by one); for a
            downstream task, dicts ``{"text": ..., <task fields>}`` whose other keys are
            columns of :data:`~albef_ray.data.schema.TASK_TEXT_FIELDS` (label, answers, ...).
        image: encoded image bytes, when the reader holds them.
        image_path: a file to read the bytes from (read by the validating process).
        image2, image2_path, image_id2: NLVR2's second image, validated like the first (a bad
            one skips the candidate).
        error: ``(reason, detail)`` when the reader already knows the input is unusable.
        position: index of this candidate in its source's order; a resumed read starts at the
            first position not yet written (positions may jump after an unreadable file).
    """

    source: str
    input: str
    image_id: str
    captions: list[Any] = field(default_factory=list)
    image: bytes | None = None
    image_path: str | None = None
    error: tuple[str, str] | None = None
    position: int = 0
    image2: bytes | None = None
    image2_path: str | None = None
    image_id2: str | None = None


class Source(ABC):
    """A named, ordered collection of candidates for one split."""

    format: ClassVar[str] = ""
    options: ClassVar[tuple[str, ...]] = ()  # spec keys besides name, path, split

    def __init__(self, name: str, split: str = "train") -> None:
        if not name or "/" in name:
            raise ValueError(f"source name must be non-empty and contain no '/': {name!r}")
        if not split or "/" in split or split.startswith(("_", ".")):
            raise ValueError(f"split must be a plain directory name: {split!r}")
        self.name = name
        self.split = split

    @abstractmethod
    def iter_candidates(self, skip: int = 0) -> Iterator[Candidate]:
        """Yields the candidates in input order, leaving out those at positions below ``skip``."""

    def check(self) -> None:
        """Raises ``ValueError`` for a misconfigured source (no input files, wrong columns)."""

    def count(self) -> int | None:
        """Number of candidates when cheap to know (for the progress bar), else ``None``."""
        return None

    def describe(self) -> dict[str, Any]:
        """JSON-able identity of this source; a resumed build must see the same description."""
        return {"name": self.name, "split": self.split, "format": self.format}


def file_identity(files: Sequence[str]) -> list[dict[str, Any]]:
    """Resolved path, size and modification time of each input file, for the build fingerprint.

    The same file named by a relative or an absolute path gives the same identity; a file
    edited (or replaced) since gives another, so a build of the old content is not taken for it.
    A file that cannot be stat'ed keeps its resolved path only (the reader reports it).
    """
    out = []
    for file in files:
        path = Path(file).expanduser().resolve()
        try:
            stat = path.stat()
            out.append({"path": str(path), "bytes": stat.st_size, "mtime_ns": stat.st_mtime_ns})
        except OSError:
            out.append({"path": str(path)})
    return out


def check_files_exist(name: str, files: Sequence[str], kind: str) -> None:
    """Raises ``ValueError`` naming the first input path that is not an existing file."""
    if not files:
        raise ValueError(f"source {name!r}: no {kind} files found")
    for file in files:
        if not os.path.isfile(file):
            raise ValueError(f"source {name!r}: {file} does not exist")


def expand_paths(paths: str | os.PathLike | Sequence[str | os.PathLike], suffixes: Sequence[str]) -> list[str]:
    """Files named by paths, directories (searched recursively) or glob patterns, in sorted order.

    Args:
        paths: one or several files, directories or glob patterns.
        suffixes: file suffixes looked for inside directories, e.g. ``(".parquet",)``.

    Returns:
        The matching file paths as strings, sorted within each entry of ``paths``.
    """
    entries = [paths] if isinstance(paths, (str, os.PathLike)) else list(paths)
    found: list[str] = []
    for entry in map(str, entries):
        if os.path.isdir(entry):
            found += sorted(str(p) for p in Path(entry).rglob("*") if p.is_file() and p.name.endswith(tuple(suffixes)))
        elif glob.has_magic(entry):
            found += sorted(glob.glob(entry, recursive=True))
        else:
            found.append(entry)
    return found


class IterableSource(Source):
    """Candidates from any function returning an iterable of them (e.g. a generator function).

    A resumed build calls ``candidates()`` again and drops what was already written, so it must
    yield the same candidates in the same order every time.

    Args:
        name: source name (replaces the candidates' own ``source``).
        candidates: called once per build (or resume) for a fresh iterable.
        split: split the rows go to.
        description: JSON-able settings identifying the content, for resume checks.
    """

    format = "iterable"

    def __init__(
        self, name: str, candidates: Callable[[], Iterable[Candidate]], split: str = "train", description: Any = None
    ) -> None:
        super().__init__(name, split)
        self.candidates, self.description = candidates, description

    def describe(self) -> dict[str, Any]:
        return {**super().describe(), "description": self.description}

    def iter_candidates(self, skip: int = 0) -> Iterator[Candidate]:
        for position, candidate in enumerate(self.candidates()):
            if position >= skip:
                yield replace(candidate, source=self.name, position=position)
