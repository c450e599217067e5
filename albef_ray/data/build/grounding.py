"""RefCOCO+ referring expressions in the official ALBEF formats, as candidates (``format=grounding_json``).

The official ``Grounding.py`` reads three kinds of file:

* ``refcoco+_train.json``, ``refcoco+_val.json``, ``refcoco+_test.json`` (ALBEF's data
  release): a JSON list of ``{"image": path under the COCO image root, "text": expression,
  "ref_id": int, ...}``; training uses ``image`` and ``text`` (the image file groups
  positives), evaluation ``ref_id``.
* ``dets.json`` (MAttNet's Mask R-CNN detections): ``{"<COCO image id>": [[x, y, w, h, ...],
  ...]}``, the proposals ranked at evaluation (the first four numbers of each).
* The REFER annotation of RefCOCO+ (``refs(unc).p``, ``instances.json``), through which
  ``grounding_eval`` finds each ``ref_id``'s image, split (val, testA, testB) and referred
  box (``refToAnn[ref_id]["bbox"]``). (``cocos.json`` is loaded by ``Grounding.py`` but never
  read by its evaluation; it is not needed here.)

Every row gets its ``ref_id`` (empty when the entry has none); options ``refs`` and
``instances`` attach the referred ``box`` and ``dets`` the ``proposals`` of its image
(columns of :data:`~albef_ray.data.schema.TASK_FIELDS`), so the evaluation needs the shards
only; ``ref_split`` keeps the expressions of one REFER split (``refcoco+_test.json`` holds
testA and testB together: build it twice, ``ref_split=testA,split=testA`` and
``ref_split=testB,split=testB``). ``refs`` is REFER's pickle (read with an unpickler that
admits plain lists, dicts, strings and numbers only) or the same list as JSON.

The expressions of one image are one candidate (in the file's order of first appearance of
each image), so each image is read and validated once; a bad image skips them all as one skip
line, an empty expression only itself. An expression whose ``ref_id`` the REFER annotation
lacks is an ``unreadable_input`` skip.

    albef-ray data build data/refcoco+ \\
        --source name=refcoco+,format=grounding_json,path=refcoco+_train.json,image_root=coco,split=train \\
        --source name=refcoco+_val,format=grounding_json,path=refcoco+_val.json,image_root=coco,split=val,dets=refcoco+/dets.json,refs=refcoco+/refs(unc).p,instances=refcoco+/instances.json \\
        --source name=refcoco+_testA,format=grounding_json,path=refcoco+_test.json,image_root=coco,split=testA,ref_split=testA,dets=...,refs=...,instances=...
"""

from __future__ import annotations

import json
import os
import pickle
from collections.abc import Iterator
from typing import Any, ClassVar

from .candidates import Candidate, check_files_exist, file_identity
from .sources import JsonSource


class _PlainUnpickler(pickle.Unpickler):
    """Admits the builtin containers and scalars only: a pickle naming any class or function fails."""

    def find_class(self, module: str, name: str):
        raise pickle.UnpicklingError(f"{module}.{name}: only plain lists, dicts, strings and numbers are read")


def load_refs(path: str) -> list[dict[str, Any]]:
    """REFER's refs (``refs(unc).p``, or the same list as ``.json``): ``[{"ref_id", "ann_id", "image_id", "split", ...}]``."""
    if path.lower().endswith(".json"):
        with open(path, encoding="utf-8-sig") as handle:
            refs = json.load(handle)
    else:
        with open(path, "rb") as handle:
            refs = _PlainUnpickler(handle, encoding="latin1").load()  # Python 2's str: bytes as latin1
    if not isinstance(refs, list):
        raise TypeError(f"{path}: expected a list of refs, found {type(refs).__name__}")
    return refs


class GroundingJsonSource(JsonSource):
    """ALBEF's RefCOCO+ JSON with MAttNet proposals and REFER ground truth (``format=grounding_json``).

    Args:
        name: source name.
        path: ALBEF annotation file(s) (``refcoco+_*.json``), a directory of ``*.json`` or a glob.
        image_root: the COCO image directory ``image`` paths are relative to (default: the
            annotation file's directory).
        split: split the rows go to.
        dets: MAttNet ``dets.json``: per COCO image id, the proposal boxes (evaluation rows).
        refs: REFER ``refs(unc).p`` (or ``.json``): each ref's image, annotation and split.
        instances: REFER ``instances.json``: the annotations' boxes (with ``refs``).
        ref_split: keep only expressions of this REFER split (val, testA, testB); needs ``refs``.
    """

    format = "grounding_json"
    options: ClassVar[tuple[str, ...]] = ("image_root", "dets", "refs", "instances", "ref_split")

    def __init__(self, name: str, path: Any, image_root: str | None = None, split: str = "train",
                 dets: str | None = None, refs: str | None = None, instances: str | None = None,
                 ref_split: str | None = None) -> None:
        super().__init__(name, path, image_root, split)
        self.dets_file, self.refs_file, self.instances_file, self.ref_split = dets, refs, instances, ref_split
        self._dets: dict[str, list] | None = None
        self._refs: dict[str, dict[str, Any]] | None = None

    def check(self) -> None:
        """The annotation files as :class:`JsonSource` checks them; dets / refs / instances readable."""
        super().check()
        if (self.refs_file is None) != (self.instances_file is None):
            raise ValueError(f"source {self.name!r}: refs and instances come together (REFER's ground truth)")
        for option, value in (("ref_split", self.ref_split), ("dets", self.dets_file)):
            if value is not None and self.refs_file is None:  # an expression's image id comes from its ref
                raise ValueError(f"source {self.name!r}: {option}={value} needs refs and instances")
        extra = [f for f in (self.dets_file, self.refs_file, self.instances_file) if f is not None]
        if extra:
            check_files_exist(self.name, extra, "grounding annotation")
        try:
            self._load()
        except (OSError, ValueError, KeyError, TypeError, pickle.UnpicklingError) as err:
            raise ValueError(f"source {self.name!r}: {type(err).__name__}: {err}"[:400]) from None

    def describe(self) -> dict[str, Any]:
        extra = [f for f in (self.dets_file, self.refs_file, self.instances_file) if f is not None]
        return {**super().describe(), "annotations": file_identity(extra), "ref_split": self.ref_split}

    def _load(self) -> None:
        """Read dets and the REFER ground truth once: ``ref_id -> {box, split, image_id}``."""
        if self._dets is None and self.dets_file is not None:
            with open(self.dets_file, encoding="utf-8-sig") as handle:
                dets = json.load(handle)
            if not isinstance(dets, dict):
                raise ValueError(f"{self.dets_file}: expected {{image id: [boxes]}}, found {type(dets).__name__}")
            self._dets = {str(k): v for k, v in dets.items()}
        if self._refs is None and self.refs_file is not None:
            with open(self.instances_file, encoding="utf-8-sig") as handle:
                instances = json.load(handle)
            boxes = {ann["id"]: ann["bbox"] for ann in instances["annotations"]}
            self._refs = {
                str(ref["ref_id"]): {"box": boxes[ref["ann_id"]], "split": ref["split"], "image_id": ref["image_id"]}
                for ref in load_refs(self.refs_file)
            }

    def _units(self, entries: list[Any]) -> list[tuple[int, list[Any]]]:
        return _by_image(entries)  # one candidate per image: its expressions

    def iter_candidates(self, skip: int = 0) -> Iterator[Candidate]:
        self._load()
        yield from super().iter_candidates(skip)  # a group with no expression of ref_split yields nothing

    def _candidate(self, file: str, row: int, group: list[Any], root: str) -> Candidate | None:
        entry = group[0]
        where = f"{file}#{row}"
        if not isinstance(entry, dict) or not isinstance(entry.get("image"), str):
            return Candidate(self.name, where, where, error=("missing_image", "entry has no 'image' path"))
        image = entry["image"]
        texts = []
        for item in group:
            ref_id = item.get("ref_id")
            text = {"text": item.get("text"), "ref_id": "" if ref_id is None else str(ref_id)}
            if self._refs is not None:
                ref = self._refs.get(str(ref_id))
                if ref is None:
                    return Candidate(self.name, where, image, error=("unreadable_input", f"ref_id {ref_id!r} not in refs"))
                if self.ref_split is not None and ref["split"] != self.ref_split:
                    continue
                text["box"] = [float(v) for v in ref["box"][:4]]
                if self._dets is not None:
                    text["proposals"] = [[float(v) for v in d[:4]] for d in self._dets.get(str(ref["image_id"]), [])]
            texts.append(text)
        if not texts:
            return None
        return Candidate(self.name, where, image, texts, image_path=os.path.join(root, image))


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


SOURCES = (GroundingJsonSource,)
