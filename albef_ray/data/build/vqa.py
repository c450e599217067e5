"""VQA annotations (official ``vqa_train.json``, ``vqa_val.json``, ``vg_qa.json``, ``vqa_test.json``).

Each file is a JSON list of ``{"question_id", "question", "answer", "image", "dataset"}``:
``answer`` is the list of the 10 human answers for VQA v2 (``"dataset": "vqa"``), one string for
Visual Genome QA (``"dataset": "vg"``), absent in ``vqa_test.json``. As the official
``dataset/vqa_dataset.py``, a VQA question's distinct answers are weighted by their share of the
annotators (``count / len(answers)``, in order of first appearance) and a VG answer gets weight
0.5. Rows carry ``question_id`` (a string), ``answers`` and ``answer_weights``
(:data:`~albef_ray.data.schema.TASK_FIELDS`); an unlabelled question has empty lists.

The questions of one image (VQA asks ~5 per image) are one candidate, so the image is read and
validated once and its rows are written together; a bad image skips all its questions as one
skip line, an empty question only itself. The image bytes are still stored in every row (see
docs/data.md for the measured cost).

    albef-ray data build data/vqa \\
        --source name=vqa_train,format=vqa_json,path=vqa_train.json,image_root=coco,split=train \\
        --source name=vqa_val,format=vqa_json,path=vqa_val.json,image_root=coco,split=train \\
        --source name=vg_qa,format=vqa_json,path=vg_qa.json,image_root=visual-genome,split=train \\
        --source name=vqa_test,format=vqa_json,path=vqa_test.json,image_root=coco,split=test
"""

from __future__ import annotations

import os
from typing import Any, ClassVar

from .candidates import Candidate
from .sources import JsonSource

VG_WEIGHT = 0.5  # official vqa_dataset.py: a Visual Genome answer's weight


def answer_weights(entry: dict[str, Any]) -> tuple[list[str], list[float]]:
    """Distinct answers of an annotation and their weights (official ``vqa_dataset.py``).

    VQA (``dataset`` "vqa", or an ``answer`` list): weight = count / number of answers. VG
    (``dataset`` "vg", or an ``answer`` string): each answer weighs 0.5. No answer: ``([], [])``.
    """
    given = entry.get("answer")
    if given is None:
        return [], []
    items = [given] if isinstance(given, str) else [a for a in given if isinstance(a, str)]
    vg = entry.get("dataset") == "vg" or (entry.get("dataset") is None and isinstance(given, str))
    answers = list(dict.fromkeys(items))  # distinct, in order of first appearance
    if vg:
        return answers, [VG_WEIGHT] * len(answers)
    return answers, [items.count(a) / len(items) for a in answers]


def _by_image(entries: list[Any]) -> list[tuple[int, list[Any]]]:
    """Entries grouped by (``dataset``, ``image``), in order of first appearance: ``(first row, group)``.

    An entry without an ``image`` string is a group of its own (a ``missing_image`` skip).
    """
    index: dict[tuple[Any, str], list[Any]] = {}
    groups: list[tuple[int, list[Any]]] = []
    for row, entry in enumerate(entries):
        image = entry.get("image") if isinstance(entry, dict) else None
        if not isinstance(image, str):
            groups.append((row, [entry]))
            continue
        key = (entry.get("dataset"), image)
        if key not in index:
            index[key] = []
            groups.append((row, index[key]))
        index[key].append(entry)
    return groups


class VQAJsonSource(JsonSource):
    """ALBEF's VQA / VG-QA JSON annotations (``format=vqa_json``).

    Args:
        name: source name.
        path: annotation file(s), a directory of ``*.json`` or a glob.
        image_root: directory the ``image`` paths are relative to (the official ``vqa_root`` for
            VQA files, ``vg_root`` for ``vg_qa.json``; default: the annotation file's directory).
        split: split the rows go to.
    """

    format = "vqa_json"
    options: ClassVar[tuple[str, ...]] = ("image_root",)

    def _units(self, entries: list[Any]) -> list[tuple[int, list[Any]]]:
        return _by_image(entries)  # one candidate per (dataset, image): its questions

    def _candidate(self, file: str, row: int, group: list[Any], root: str) -> Candidate:
        first = group[0]
        if not isinstance(first, dict) or not isinstance(first.get("image"), str):
            return Candidate(self.name, f"{file}#{row}", f"{file}#{row}", error=("missing_image", "entry has no 'image' path"))
        texts = []
        for entry in group:
            answers, weights = answer_weights(entry)
            question_id = entry.get("question_id")
            texts.append({
                "text": entry.get("question"),
                "question_id": None if question_id is None else str(question_id),
                "answers": answers,
                "answer_weights": weights,
            })
        image = first["image"]
        return Candidate(self.name, f"{file}#{row}", image, texts, image_path=os.path.join(root, image))


SOURCES = (VQAJsonSource,)
