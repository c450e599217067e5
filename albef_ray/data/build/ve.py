"""SNLI-VE annotations (official ``ve_train.json``, ``ve_dev.json``, ``ve_test.json``) as candidates.

Each file is a JSON list of ``{"image": "<Flickr30K id>", "sentence": hypothesis, "label":
"entailment" | "neutral" | "contradiction"}``; the official ``dataset/ve_dataset.py`` opens
``<image_root>/<image>.jpg`` (an ``image`` that already ends in ``.jpg``/``.jpeg``/``.png`` is
taken as it is) and maps labels to ``{contradiction: 0, neutral: 1, entailment: 2}``, the
order of the released ``cls_head``'s outputs. The same ids are the ``label`` column here
(:data:`VE_LABELS`).

The ~17 hypotheses of one image are one candidate (rows in the file's order of first
appearance of each image), so each image is read and validated once; a bad image skips them
all as one skip line, an empty hypothesis only itself. An unknown label is an input error,
named with its file and row before anything is written.

    albef-ray data build data/snli_ve --source name=snli_ve,format=ve_json,path=ve_train.json,image_root=flickr30k-images,split=train \\
        --source name=snli_ve_dev,format=ve_json,path=ve_dev.json,image_root=flickr30k-images,split=val ...
"""

from __future__ import annotations

import os
from typing import Any, ClassVar

from .candidates import Candidate
from .sources import JsonSource

VE_LABELS = ("contradiction", "neutral", "entailment")  # label id = index (official ve_dataset.py)
_IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png")


def ve_label(value: Any) -> int | None:
    """The label id of an annotation's ``label`` (a name of :data:`VE_LABELS`, or its id); None if neither."""
    if isinstance(value, str) and value.strip().lower() in VE_LABELS:
        return VE_LABELS.index(value.strip().lower())
    if isinstance(value, int) and not isinstance(value, bool) and 0 <= value < len(VE_LABELS):
        return value
    return None


class VEJsonSource(JsonSource):
    """SNLI-VE JSON annotations (``format=ve_json``).

    Args:
        name: source name.
        path: annotation file(s), a directory of ``*.json`` or a glob.
        image_root: the Flickr30K image directory (default: the annotation file's directory).
        split: split the rows go to.
    """

    format = "ve_json"
    options: ClassVar[tuple[str, ...]] = ("image_root",)

    def check(self) -> None:
        """Files as :class:`JsonSource` checks them, and every entry's label known."""
        super().check()
        for file in self.files:
            entries = self._entries(file) or []
            for row, entry in enumerate(entries):
                if isinstance(entry, dict) and ve_label(entry.get("label")) is None:
                    raise ValueError(
                        f"source {self.name!r}: {file} entry {row}: label {entry.get('label')!r} is not one of "
                        f"{', '.join(VE_LABELS)}"
                    )

    def _units(self, entries: list[Any]) -> list[tuple[int, list[Any]]]:
        return _by_image(entries)  # one candidate per image: its hypotheses

    def _candidate(self, file: str, row: int, group: list[Any], root: str) -> Candidate:
        entry = group[0]
        if not isinstance(entry, dict) or not isinstance(entry.get("image"), str):
            return Candidate(
                self.name, f"{file}#{row}", f"{file}#{row}", error=("missing_image", "entry has no 'image' id")
            )
        image = entry["image"]
        filename = image if image.lower().endswith(_IMAGE_SUFFIXES) else f"{image}.jpg"
        image_id = os.path.splitext(image)[0] if filename == image else image
        texts = []
        for item in group:
            label = ve_label(item.get("label"))
            if label is None:
                raise ValueError(f"source {self.name!r}: {file}: label {item.get('label')!r} is not one of {VE_LABELS}")
            texts.append({"text": item.get("sentence"), "label": label})
        return Candidate(self.name, f"{file}#{row}", image_id, texts, image_path=os.path.join(root, filename))


def _by_image(entries: list[Any]) -> list[tuple[int, list[Any]]]:
    """Entries grouped by ``image`` in order of first appearance: ``(first row, entries)``.

    An entry without an ``image`` string is a group of its own (a ``missing_image`` skip).
    """
    groups: dict[str, list[Any]] = {}
    out: list[tuple[int, list[Any]]] = []
    for row, entry in enumerate(entries):
        key = entry.get("image") if isinstance(entry, dict) else None
        if not isinstance(key, str):
            out.append((row, [entry]))
        elif key in groups:
            groups[key].append(entry)
        else:
            groups[key] = [entry]
            out.append((row, groups[key]))
    return out


SOURCES = (VEJsonSource,)
