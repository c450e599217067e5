"""The embedded VQA: questions about a rendered scene, answered from its ground truth.

A scene (:mod:`.scenes`: two or three coloured shapes in a row, left to right or top to
bottom) gets five questions (VQA v2 asks ~5 per image), one of six kinds drawn for each:

==========  ==========================================  =====================================
kind        example                                     answer
==========  ==========================================  =====================================
colour      what color is the small square?             the named object's colour
shape       what shape is the object on the left?       its shape
size        what size is the blue circle?               small / large
count       how many large objects are there?           0 .. 3
spatial     what color is the object left of the star?  an attribute of the one object there
yes/no      is there a red star? / is the circle above  yes / no (each as likely)
            the square? / is the star green?
==========  ==========================================  =====================================

The object a question is about is named uniquely, by attributes other than the one asked
(never "what color is the red circle"), or by its place in the row when no such description
is unique. A spatial question names a neighbour only where exactly one object lies on that
side. Left/right words are used for rows, above/below for columns.

Answers follow VQA's annotation: 10 "annotators" per question; most give the true answer,
some a synonym (``little`` for small, ``big``, ``violet``, ``light blue``, ``round``) and a few
a wrong value of the same kind, so a question's distinct answers carry weights count / 10
(``answers`` / ``answer_weights``) and VQA accuracy (min(#humans / 3, 1)) rewards the
canonical answer most. ``answer_list.json`` in the dataset root holds every answer a question
can have (canonical and synonyms), the list evaluation ranks.

Val and test scenes are distinct and never occur in train; everything is a function of the seed.
"""

from __future__ import annotations

import functools
import json
import math
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..data.build.candidates import Candidate
from .benchmark import SPLIT_CODES, encode, render
from .scenes import COLOURS, SHAPES, SIZES, Scene, Thing, sample_scene
from .tasks import SynthTaskSettings, write_task_dataset

QUESTIONS_PER_SCENE = 5
KINDS = ("colour", "shape", "size", "count", "spatial", "yesno")
COUNTS = ("0", "1", "2", "3")
SYNONYMS = {"small": "little", "large": "big", "purple": "violet", "cyan": "light blue", "circle": "round"}
ANSWERS = (*COLOURS, *SHAPES, *SIZES, *COUNTS, "yes", "no", *SYNONYMS.values())
ANNOTATORS = 10
_VALUES = {"colour": tuple(COLOURS), "shape": SHAPES, "size": SIZES}
_WORDS = {  # (before, after, first end, last end, middle)
    "horizontal": ("left of", "right of", "on the left", "on the right", "in the middle"),
    "vertical": ("above", "below", "at the top", "at the bottom", "in the middle"),
}
_DESCRIPTIONS = (("shape",), ("colour", "shape"), ("size", "shape"), ("size", "colour", "shape"), ("colour",),
                 ("size", "colour"))
_PLAN_CODE, _RENDER_CODE = 30, 40  # random streams of their own (caption benchmark 0-2, VE 10/20)


@dataclass(frozen=True)
class Question:
    """A question about a scene and its true (canonical) answer."""

    kind: str
    text: str
    answer: str


def _matches(thing: Thing, ref: dict[str, str]) -> bool:
    return all(getattr(thing, f) == v for f, v in ref.items())


def _phrase(ref: dict[str, str]) -> str:
    words = [ref.get(f) for f in ("size", "colour", "shape")]
    return " ".join(w for w in words if w) + ("" if "shape" in ref else " object")


def refer(scene: Scene, index: int, rng: np.random.Generator, leave_out: str | None = None) -> str:
    """A phrase naming object ``index`` alone ("the small square", "the object on the left").

    Attribute descriptions that do not use ``leave_out`` and match no other object are drawn
    first; without one, the object's place in the row names it.
    """
    thing = scene.things[index]
    refs = []
    for fields in _DESCRIPTIONS:
        if leave_out in fields:
            continue
        ref = {f: getattr(thing, f) for f in fields}
        if sum(_matches(t, ref) for t in scene.things) == 1:
            refs.append(ref)
    if refs:
        return "the " + _phrase(refs[int(rng.integers(len(refs)))])
    return "the object " + _place(scene, index)


def _place(scene: Scene, index: int) -> str:
    words = _WORDS[scene.axis]
    if index == 0:
        return words[2]
    return words[3] if index == len(scene.things) - 1 else words[4]


def _attribute_question(scene: Scene, kind: str, rng: np.random.Generator) -> Question:
    i = int(rng.integers(len(scene.things)))
    noun = {"colour": "color"}.get(kind, kind)
    return Question(kind, f"what {noun} is {refer(scene, i, rng, leave_out=kind)}?", getattr(scene.things[i], kind))


def _count_question(scene: Scene, rng: np.random.Generator) -> Question:
    form = int(rng.integers(3))
    if form == 0:
        return Question("count", "how many objects are there?", str(len(scene.things)))
    if form == 1:
        size = SIZES[int(rng.integers(len(SIZES)))]
        return Question("count", f"how many {size} objects are there?", str(sum(t.size == size for t in scene.things)))
    shape = SHAPES[int(rng.integers(len(SHAPES)))]
    return Question("count", f"how many {shape}s are there?", str(sum(t.shape == shape for t in scene.things)))


def _spatial_question(scene: Scene, rng: np.random.Generator) -> Question:
    """An attribute of the one neighbour on a side, or of the object at an end of the row."""
    n, words = len(scene.things), _WORDS[scene.axis]
    field = ("colour", "shape")[int(rng.integers(2))]
    noun = "color" if field == "colour" else "shape"
    if rng.random() < 0.5:  # the only object before index 1 is 0; the only one after n-2 is n-1
        anchor, target, word = (1, 0, words[0]) if rng.random() < 0.5 else (n - 2, n - 1, words[1])
        text = f"what {noun} is the object {word} {refer(scene, anchor, rng)}?"
        return Question("spatial", text, getattr(scene.things[target], field))
    target = 0 if rng.random() < 0.5 else n - 1
    return Question("spatial", f"what {noun} is {_place(scene, target)}?", getattr(scene.things[target], field))


def _yesno_question(scene: Scene, rng: np.random.Generator) -> Question:
    """Existence, attribute or order; true and false equally often."""
    truth = bool(rng.random() < 0.5)
    form = int(rng.integers(3))
    n = len(scene.things)
    answer = "yes" if truth else "no"
    if form == 0:  # is there a {colour} {shape}?
        present = {(t.colour, t.shape) for t in scene.things}
        pool = sorted(present) if truth else [(c, s) for c in COLOURS for s in SHAPES if (c, s) not in present]
        colour, shape = pool[int(rng.integers(len(pool)))]
        return Question("yesno", f"is there a {colour} {shape}?", answer)
    if form == 1:  # is the {ref} {colour}?
        i = int(rng.integers(n))
        true_colour = scene.things[i].colour
        others = [c for c in COLOURS if c != true_colour]
        colour = true_colour if truth else others[int(rng.integers(len(others)))]
        return Question("yesno", f"is {refer(scene, i, rng, leave_out='colour')} {colour}?", answer)
    i, j = (int(x) for x in rng.choice(n, size=2, replace=False))  # is A before B?
    word = _WORDS[scene.axis][0 if (i < j) == truth else 1]
    return Question("yesno", f"is {refer(scene, i, rng)} {word} {refer(scene, j, rng)}?", answer)


def sample_question(scene: Scene, kind: str, rng: np.random.Generator) -> Question:
    """A question of ``kind`` (see :data:`KINDS`) with its true answer in ``scene``."""
    if kind in ("colour", "shape", "size"):
        return _attribute_question(scene, kind, rng)
    if kind == "count":
        return _count_question(scene, rng)
    if kind == "spatial":
        return _spatial_question(scene, rng)
    if kind == "yesno":
        return _yesno_question(scene, rng)
    raise ValueError(f"unknown question kind {kind!r}; known: {', '.join(KINDS)}")


def _kind_of(answer: str) -> tuple[str, ...]:
    for values in (tuple(COLOURS), SHAPES, SIZES, COUNTS, ("yes", "no")):
        if answer in values:
            return values
    raise ValueError(answer)


def annotate(answer: str, rng: np.random.Generator) -> tuple[list[str], list[float]]:
    """Ten simulated human answers as distinct answers and weights count / 10 (VQA's form).

    0-3 annotators give the answer's synonym (if it has one), 0-1 a wrong value of its kind.
    """
    synonym = int(rng.choice(4, p=(0.5, 0.25, 0.15, 0.1))) if answer in SYNONYMS else 0
    wrong = int(rng.random() < 0.3)
    counts = {answer: ANNOTATORS - synonym - wrong}
    if synonym:
        counts[SYNONYMS[answer]] = synonym
    if wrong:
        others = [v for v in _kind_of(answer) if v != answer]
        other = others[int(rng.integers(len(others)))]
        counts[other] = counts.get(other, 0) + wrong
    return list(counts), [c / ANNOTATORS for c in counts.values()]


@dataclass(frozen=True)
class VQAScene:
    """One image's scene and its questions."""

    image_id: str
    scene: Scene
    questions: tuple[Question, ...]


def _scenes(settings: SynthTaskSettings, split: str, count: int, taken: set[Scene], held_out: bool) -> list[VQAScene]:
    rng = np.random.default_rng([settings.seed, _PLAN_CODE + SPLIT_CODES[split]])
    out: list[VQAScene] = []
    while len(out) < count:
        scene = sample_scene(rng)
        if scene in taken:  # val and test scenes: never elsewhere, never twice
            continue
        if held_out:
            taken.add(scene)
        questions: list[Question] = []
        for _ in range(20 * QUESTIONS_PER_SCENE):  # distinct texts
            q = sample_question(scene, KINDS[int(rng.integers(len(KINDS)))], rng)
            if q.text not in {x.text for x in questions}:
                questions.append(q)
            if len(questions) == QUESTIONS_PER_SCENE:
                break
        out.append(VQAScene(f"{split}-{len(out):06d}", scene, tuple(questions)))
    return out


@functools.lru_cache(maxsize=4)
def plan_vqa(settings: SynthTaskSettings) -> dict[str, list[VQAScene]]:
    """Every split's scenes and questions (``ceil(n / 5)`` scenes for n questions), no rendering."""
    taken: set[Scene] = set()
    plan = {split: _scenes(settings, split, math.ceil(getattr(settings, split) / QUESTIONS_PER_SCENE), taken, True)
            for split in ("test", "val")}
    plan["train"] = _scenes(settings, "train", math.ceil(settings.train / QUESTIONS_PER_SCENE), taken, False)
    return plan


def _candidates(settings: SynthTaskSettings, split: str, n: int) -> Iterator[Candidate]:
    left = n
    for index, item in enumerate(plan_vqa(settings)[split]):
        if left <= 0:
            return
        questions = item.questions[:left]
        left -= len(questions)
        rng = np.random.default_rng([settings.seed, _RENDER_CODE + SPLIT_CODES[split], index])
        image = encode(render(item.scene, settings.image_size, rng), "png")
        texts = []
        for number, q in enumerate(questions):
            answers, weights = annotate(q.answer, rng)
            texts.append({"text": q.text, "question_id": f"{split}-{index:06d}-{number}", "answers": answers,
                          "answer_weights": weights})
        yield Candidate("synth_vqa", f"synth_vqa:{item.image_id}", item.image_id, texts, image=image)


def build_vqa(out: str | Path, settings: SynthTaskSettings, progress: bool = True, overwrite: bool = False) -> dict:
    """Write the embedded VQA (``albef-ray data synth-task vqa OUT --from runs/synth``) and its answer list.

    Args:
        out: output dataset directory.
        settings: questions per split (five per scene), image size, seed, tokenizer source.
        progress: show a progress bar.
        overwrite: replace a dataset of other settings in ``out``.

    Returns:
        The manifest.
    """
    manifest = write_task_dataset(
        out, "vqa", settings, functools.partial(_candidates, settings), progress=progress, overwrite=overwrite
    )
    path = Path(out) / "answer_list.json"
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(list(ANSWERS)) + "\n", encoding="utf-8")
    os.replace(tmp, path)
    return manifest
