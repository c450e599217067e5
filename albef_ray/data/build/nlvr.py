"""NLVR2 annotations (official ``nlvr_train.json``, ``nlvr_dev.json``, ``nlvr_test.json``) as candidates.

Each file is a JSON list of ``{"images": ["<left>.png", "<right>.png"], "sentence": statement,
"label": "True" | "False"}``; the official ``dataset/nlvr_dataset.py`` opens both under
``image_root`` and maps ``"True"`` to 1, anything else to 0. Here the label must be ``True`` /
``False`` (string, bool or 0/1): any other value is an input error named with its file and row
before anything is written. An entry's ``identifier`` (NLVR2's own id), when present, is kept
as ``question_id`` so predictions can be written per statement.

Statements about the same pair (in order of the pair's first appearance) are one candidate, so
the two images are read and validated once; a missing or unreadable image of either side skips
them all as one skip line, an empty statement only itself. Rows carry ``image`` (left, image 1),
``image2`` (right, image 2), ``image_id`` / ``image_id2`` (the paths without extension).

    albef-ray data build data/nlvr2 --source name=nlvr2,format=nlvr_json,path=nlvr_train.json,image_root=NLVR2,split=train \\
        --source name=nlvr2_dev,format=nlvr_json,path=nlvr_dev.json,image_root=NLVR2,split=val \\
        --source name=nlvr2_test,format=nlvr_json,path=nlvr_test.json,image_root=NLVR2,split=test
"""

from __future__ import annotations

import os
from typing import Any, ClassVar

from .candidates import Candidate
from .sources import JsonSource


def nlvr_label(value: Any) -> int | None:
    """1 for a true statement, 0 for a false one (``"True"``/``"False"``, bools, 0/1); None otherwise."""
    if isinstance(value, bool):
        return int(value)
    if isinstance(value, str) and value.strip().lower() in ("true", "false"):
        return int(value.strip().lower() == "true")
    if isinstance(value, int) and value in (0, 1):
        return value
    return None


def _pair(entry: Any) -> tuple[str, str] | None:
    images = entry.get("images") if isinstance(entry, dict) else None
    if isinstance(images, list) and len(images) == 2 and all(isinstance(i, str) and i for i in images):
        return images[0], images[1]
    return None


class NLVRJsonSource(JsonSource):
    """NLVR2 JSON annotations (``format=nlvr_json``).

    Args:
        name: source name.
        path: annotation file(s), a directory of ``*.json`` or a glob.
        image_root: directory the ``images`` paths are relative to (default: the annotation file's).
        split: split the rows go to.
    """

    format = "nlvr_json"
    options: ClassVar[tuple[str, ...]] = ("image_root",)

    def check(self) -> None:
        """Files as :class:`JsonSource` checks them, and every entry's label true or false."""
        super().check()
        for file in self.files:
            for row, entry in enumerate(self._entries(file) or []):
                if isinstance(entry, dict) and nlvr_label(entry.get("label")) is None:
                    raise ValueError(
                        f"source {self.name!r}: {file} entry {row}: label {entry.get('label')!r} is not True or False"
                    )

    def _units(self, entries: list[Any]) -> list[tuple[int, list[Any]]]:
        return _by_pair(entries)  # one candidate per image pair: its statements

    def _candidate(self, file: str, row: int, group: list[Any], root: str) -> Candidate:
        pair = _pair(group[0])
        if pair is None:
            return Candidate(self.name, f"{file}#{row}", f"{file}#{row}",
                             error=("missing_image", "entry has no 'images' pair of paths"))
        texts = []
        for item in group:
            label = nlvr_label(item.get("label"))
            if label is None:
                raise ValueError(f"source {self.name!r}: {file}: label {item.get('label')!r} is not True or False")
            text = {"text": item.get("sentence"), "label": label}
            if isinstance(item.get("identifier"), str):
                text["question_id"] = item["identifier"]
            texts.append(text)
        left, right = pair
        return Candidate(
            self.name, f"{file}#{row}", os.path.splitext(left)[0], texts,
            image_path=os.path.join(root, left), image2_path=os.path.join(root, right),
            image_id2=os.path.splitext(right)[0],
        )


def _by_pair(entries: list[Any]) -> list[tuple[int, list[Any]]]:
    """Entries grouped by their image pair in order of first appearance: ``(first row, entries)``.

    An entry without a valid ``images`` pair is a group of its own (a ``missing_image`` skip).
    """
    groups: dict[tuple[str, str], list[Any]] = {}
    out: list[tuple[int, list[Any]]] = []
    for row, entry in enumerate(entries):
        key = _pair(entry)
        if key is None:
            out.append((row, [entry]))
        elif key in groups:
            groups[key].append(entry)
        else:
            groups[key] = [entry]
            out.append((row, groups[key]))
    return out


SOURCES = (NLVRJsonSource,)
