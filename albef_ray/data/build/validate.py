"""Validation of candidate samples: which become rows, which are skipped and why.

An image is accepted when its bytes are present, PIL identifies it and ``verify()`` passes, and
a real ``load()`` of the pixels succeeds (``verify()`` alone does not notice a JPEG cut short).
A caption is accepted when it is non-empty after stripping whitespace. Nothing here raises on
bad data: every problem becomes a skip record.

:func:`check_stream` runs :func:`check_candidate` over a stream in a process pool and yields
results in input order, so the shards a build writes do not depend on the number of workers.
Workers exit with the process that started them, however it ends (SIGKILL included).
"""

from __future__ import annotations

import ctypes
import io
import multiprocessing
import os
import re
import signal
import sys
import threading
import time
import warnings
from collections import deque
from collections.abc import Iterable, Iterator
from concurrent.futures import Future, ProcessPoolExecutor
from dataclasses import dataclass, field
from typing import Any, TypeVar

from PIL import Image, ImageFile

from .candidates import Candidate
from ..orientation import exif_orientation, oriented_size
from ..schema import TASK_TEXT_FIELDS

Meta = TypeVar("Meta")


@dataclass
class Checked:
    """The outcome of validating one candidate.

    Attributes:
        rows: accepted rows, dicts with the columns of ``ROW_SCHEMA``.
        skipped: skip records ``{"source", "input", "image_id", "reason", "detail"}``.
    """

    rows: list[dict[str, Any]] = field(default_factory=list)
    skipped: list[dict[str, str]] = field(default_factory=list)


class ImageCheckError(Exception):
    """An image failed validation; ``reason`` is one of the schema's skip reasons."""

    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(detail)
        self.reason, self.detail = reason, detail


def image_size(data: bytes) -> tuple[int, int]:
    """Width and height of an encoded image as displayed, after checking it decodes completely.

    "As displayed": an EXIF orientation of 5 to 8 (a photo taken upright, stored sideways)
    exchanges the stored width and height, as the training decode turns it upright.

    Raises:
        ImageCheckError: ``truncated_image`` when the data ends early (found by ``verify()``
            for PNG, by ``load()`` for JPEG) or the pixel data fails to load,
            ``unreadable_image`` when PIL cannot identify or verify it otherwise.
    """
    # Another module may have set this global to tolerate truncation; a build must not.
    tolerant = ImageFile.LOAD_TRUNCATED_IMAGES
    ImageFile.LOAD_TRUNCATED_IMAGES = False
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            try:
                with Image.open(io.BytesIO(data)) as image:
                    image.verify()
            except Exception as err:
                raise ImageCheckError(_reason(err, "unreadable_image"), _short(err)) from None
            try:  # verify() leaves the image unusable: open again for the real decode
                with Image.open(io.BytesIO(data)) as image:
                    image.load()
                    return oriented_size(image.size, exif_orientation(image))
            except Exception as err:
                raise ImageCheckError(_reason(err, "truncated_image"), _short(err)) from None
    finally:
        ImageFile.LOAD_TRUNCATED_IMAGES = tolerant


def check_candidate(candidate: Candidate) -> Checked:
    """Validates one candidate: its image once, then each caption.

    Args:
        candidate: a reader's candidate; ``image_path`` is read here when set.

    Returns:
        The rows to write (one per valid caption of a valid image) and the skip records
        (one for an unusable image, else one per empty caption).
    """
    out = Checked()

    def skip(reason: str, detail: str, where: str | None = None) -> Checked:
        out.skipped.append(
            {
                "source": candidate.source,
                "input": where or candidate.input,
                "image_id": candidate.image_id,
                "reason": reason,
                "detail": detail,
            }
        )
        return out

    if candidate.error is not None:
        return skip(*candidate.error)
    try:
        data, (width, height) = _checked_image(candidate.image, candidate.image_path)
        second = None
        if candidate.image2 is not None or candidate.image2_path is not None:
            second = _checked_image(candidate.image2, candidate.image2_path)[0]
    except ImageCheckError as err:
        return skip(err.reason, err.detail)
    if not candidate.captions:
        return skip("empty_caption", "no caption")
    several = len(candidate.captions) > 1
    for number, caption in enumerate(candidate.captions):
        fields = {}
        if isinstance(caption, dict):  # a downstream task's text with its fields
            fields = {k: v for k, v in caption.items() if k != "text"}
            unknown = sorted(set(fields) - set(TASK_TEXT_FIELDS))
            if unknown:
                raise ValueError(f"{candidate.input}: unknown task fields {unknown} (known: {', '.join(TASK_TEXT_FIELDS)})")
            caption = caption.get("text")
        text = caption.strip() if isinstance(caption, str) else ("" if caption is None else str(caption).strip())
        if not text:
            skip("empty_caption", "caption is empty", f"{candidate.input}#caption{number}" if several else None)
            continue
        row = {
            "image": data,
            "caption": text,
            "image_id": candidate.image_id,
            "source": candidate.source,
            "width": width,
            "height": height,
            **fields,
        }
        if second is not None:
            row.update(image2=second, image_id2=candidate.image_id2 or "")
        out.rows.append(row)
    return out


def _checked_image(data: bytes | None, path: str | None) -> tuple[bytes, tuple[int, int]]:
    """The image's bytes (read from ``path`` when not given) and its oriented size.

    Raises:
        ImageCheckError: missing, empty, unreadable or truncated.
    """
    if data is None and path is not None:
        try:
            with open(path, "rb") as handle:
                data = handle.read()
        except OSError as err:
            raise ImageCheckError("missing_image", _short(err)) from None
        if not data:
            raise ImageCheckError("empty_image", "0-byte file")
    if data is None:
        raise ImageCheckError("missing_image", "no image bytes")
    if not data:
        raise ImageCheckError("empty_image", "empty image bytes")
    return data, image_size(bytes(data))


def _check_chunk(chunk: list[Candidate]) -> list[Checked]:
    """Runs in a worker: rows come back without the image bytes the parent already holds."""
    results = [check_candidate(c) for c in chunk]
    for candidate, checked in zip(chunk, results):
        for column, held in (("image", candidate.image), ("image2", candidate.image2)):
            if held is not None:
                for row in checked.rows:
                    row[column] = None
    return results


def _reattach(chunk: list[Candidate], results: list[Checked]) -> list[Checked]:
    for candidate, checked in zip(chunk, results):
        for column, held in (("image", candidate.image), ("image2", candidate.image2)):
            if held is not None:
                for row in checked.rows:
                    row[column] = held
    return results


def check_stream(
    items: Iterable[tuple[Meta, Candidate]], workers: int = 0, chunk_size: int = 32
) -> Iterator[tuple[Meta, Checked]]:
    """Validates a stream of candidates, in order, optionally in worker processes.

    Args:
        items: ``(meta, candidate)`` pairs; ``meta`` is passed through untouched.
        workers: processes to decode in; 0 or 1 validates in this process.
        chunk_size: candidates sent to a worker at a time.

    Yields:
        ``(meta, checked)`` in the order of ``items``. At most ``4 * workers`` chunks are in
        flight, so memory stays bounded however long the stream is.

    Workers are started with ``spawn``: a script calling this with ``workers > 1`` needs the
    usual ``if __name__ == "__main__":`` guard.
    """
    if workers <= 1:
        for meta, candidate in items:
            yield meta, check_candidate(candidate)
        return
    # spawn, not fork: the parent may hold threads (tqdm, Arrow pools) that fork would copy mid-lock.
    context = multiprocessing.get_context("spawn")
    pool = ProcessPoolExecutor(
        max_workers=workers, mp_context=context, initializer=_die_with_parent, initargs=(os.getpid(),)
    )
    with pool:
        pending: deque[tuple[list[Meta], list[Candidate], Future]] = deque()
        metas: list[Meta] = []
        chunk: list[Candidate] = []

        def drain(limit: int) -> Iterator[tuple[Meta, Checked]]:
            while len(pending) > limit:
                done_metas, done_chunk, future = pending.popleft()
                yield from zip(done_metas, _reattach(done_chunk, future.result()))

        try:
            for meta, candidate in items:
                metas.append(meta)
                chunk.append(candidate)
                if len(chunk) >= chunk_size:
                    pending.append((metas, chunk, pool.submit(_check_chunk, chunk)))
                    metas, chunk = [], []
                    yield from drain(4 * workers)
            if chunk:
                pending.append((metas, chunk, pool.submit(_check_chunk, chunk)))
            yield from drain(0)
        except BaseException:  # interrupted (Ctrl-C, SIGTERM, a failing reader): drop queued chunks
            pool.shutdown(wait=True, cancel_futures=True)
            raise


def _die_with_parent(parent: int) -> None:
    """Worker initializer: end this worker when the building process ends.

    An idle pool worker waits on a queue whose writing end it shares with its siblings, so it
    never sees the parent go. On Linux the kernel sends SIGKILL when the parent dies
    (``prctl(PR_SET_PDEATHSIG)``); elsewhere a thread polls the parent's id.
    """
    watched = False
    if sys.platform.startswith("linux"):
        try:
            pr_set_pdeathsig = 1
            watched = ctypes.CDLL(None, use_errno=True).prctl(pr_set_pdeathsig, int(signal.SIGKILL)) == 0
        except (OSError, AttributeError):
            watched = False
    if os.getppid() != parent:  # the parent died before the death signal was armed
        os._exit(1)
    if not watched:
        threading.Thread(target=_poll_parent, args=(parent,), daemon=True).start()


def _poll_parent(parent: int) -> None:
    while os.getppid() == parent:
        time.sleep(1.0)
    os._exit(1)


def _reason(err: BaseException, default: str) -> str:
    # A PNG cut short already fails verify(); it is still a truncation, not garbage.
    return "truncated_image" if "truncat" in str(err).lower() else default


def _short(err: BaseException) -> str:
    # PIL names the in-memory file by its address; drop it so reports are reproducible.
    message = re.sub(r" ?<_io\.BytesIO object at 0x[0-9a-f]+>", "", str(err))
    return f"{type(err).__name__}: {message}"[:300]
