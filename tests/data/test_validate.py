"""Validation of one candidate, and of a stream in worker processes."""

from __future__ import annotations

import pytest
from PIL import ImageFile

from albef_ray.data.build.candidates import Candidate
from albef_ray.data.build.validate import ImageCheckError, check_candidate, check_stream, image_size

from .samples import garbage, image_bytes, truncated


@pytest.mark.parametrize("fmt", ["JPEG", "PNG"])
def test_a_truncated_image_is_named_so(fmt):
    assert image_size(image_bytes(0, fmt, size=(50, 20))) == (50, 20)
    with pytest.raises(ImageCheckError) as err:
        image_size(truncated(image_bytes(0, fmt)))
    assert err.value.reason == "truncated_image"


def test_truncation_is_caught_even_when_pil_was_told_to_tolerate_it(monkeypatch):
    monkeypatch.setattr(ImageFile, "LOAD_TRUNCATED_IMAGES", True)
    with pytest.raises(ImageCheckError):
        image_size(truncated(image_bytes(0)))
    assert ImageFile.LOAD_TRUNCATED_IMAGES is True  # the caller's setting is restored


def test_garbage_and_missing_bytes():
    checked = check_candidate(Candidate("s", "in", "id", ["text"], image=garbage(0)))
    assert checked.rows == [] and checked.skipped[0]["reason"] == "unreadable_image"
    assert "0x" not in checked.skipped[0]["detail"]  # no memory addresses: reports are reproducible
    assert check_candidate(Candidate("s", "in", "id", ["text"], image=None)).skipped[0]["reason"] == "missing_image"
    assert check_candidate(Candidate("s", "in", "id", ["text"], image=b"")).skipped[0]["reason"] == "empty_image"
    assert check_candidate(Candidate("s", "in", "id", [], image=image_bytes(0))).skipped[0]["reason"] == "empty_caption"


def test_captions_are_checked_one_by_one():
    checked = check_candidate(Candidate("s", "img.jpg", "7", [" a cat ", None, "", "a dog"], image=image_bytes(1)))
    assert [r["caption"] for r in checked.rows] == ["a cat", "a dog"]
    assert [s["input"] for s in checked.skipped] == ["img.jpg#caption1", "img.jpg#caption2"]


def test_the_stream_keeps_input_order_across_worker_processes():
    candidates = [
        Candidate("s", f"in{i}", str(i), [f"c{i}"], image=garbage(i) if i % 4 == 0 else image_bytes(i))
        for i in range(23)
    ]
    items = [(i, c) for i, c in enumerate(candidates)]
    serial = list(check_stream(items, workers=0))
    parallel = list(check_stream(items, workers=2, chunk_size=2))
    assert [meta for meta, _ in parallel] == list(range(23))
    assert parallel == serial
    assert sum(len(checked.skipped) for _, checked in parallel) == 6
