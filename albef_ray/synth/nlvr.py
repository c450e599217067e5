"""NLVR2's embedded version: a statement about two scenes (left image, right image), true or false.

Each example draws a statement first (a family and its words, uniformly), then the label (an
exact half of each split is true, in a seeded order), then pairs of scenes
(:func:`~albef_ray.synth.scenes.sample_scene`) until the statement's truth on the pair is the
label. The words never depend on the label, so the statement alone says nothing about it
(P(true | text) = 1/2): a model has to look at both images. Families:

* ``both``: "both images contain a red square"
* ``only``: "only the left image contains a circle"
* ``neither``: "neither image contains a large yellow object"
* ``more``: "there are more circles in the left image than in the right image"
* ``same``: "the two images contain the same number of blue objects"
* ``total``: "there are exactly two stars in the two images"
* ``relation``: "in the right image a red object is left of a triangle"

A description is a non-empty subset of an object's size, colour and shape ("a small red
circle", "a blue object", "a star"); an object matches it when it agrees on what it names.
Val and test pairs are planned first and never occur in train (as ordered scene pairs).
Images are rendered like the caption benchmark (:func:`~albef_ray.synth.benchmark.render`).
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..data.build.candidates import Candidate
from .benchmark import SPLIT_CODES, encode, render
from .scenes import COLOURS, SHAPES, SIZES, Scene, Thing, sample_scene
from .tasks import SynthTaskSettings, write_task_dataset

FAMILIES = ("both", "only", "neither", "more", "same", "total", "relation")
SIDES = ("left", "right")
NUMBERS = ("no", "one", "two", "three", "four", "five", "six")
# relation word -> (axis it needs, whether the first-named object comes first along the axis)
RELATIONS = {"left of": ("horizontal", True), "right of": ("horizontal", False),
             "above": ("vertical", True), "below": ("vertical", False)}
MAX_TRIES = 50_000  # scene pairs drawn for one example before its words are drawn again


@dataclass(frozen=True)
class Description:
    """Some of an object's attributes; None = not named."""

    size: str | None = None
    colour: str | None = None
    shape: str | None = None

    def matches(self, thing: Thing) -> bool:
        return all(want is None or want == have for want, have in zip((self.size, self.colour, self.shape), thing))

    def words(self, plural: bool = False) -> str:
        noun = (self.shape or "object") + ("s" if plural else "")
        return " ".join(w for w in (self.size, self.colour, noun) if w)

    def phrase(self) -> str:
        """``a small red circle``, ``a blue object``, ``a star``."""
        return f"a {self.words()}"


def count(scene: Scene, what: Description) -> int:
    return sum(what.matches(t) for t in scene.things)


def related(scene: Scene, a: Description, relation: str, b: Description) -> bool:
    """Whether an object matching ``a`` is ``relation`` ("left of", ...) a different one matching ``b``."""
    axis, a_first = RELATIONS[relation]
    if scene.axis != axis:
        return False
    things = scene.things  # in order along the axis
    return any(
        a.matches(things[i]) and b.matches(things[j]) and (i < j) == a_first
        for i in range(len(things)) for j in range(len(things)) if i != j
    )


@dataclass(frozen=True)
class Statement:
    """One statement: its family and words; :meth:`truth` decides it on a pair of scenes.

    Attributes:
        family: one of :data:`FAMILIES`.
        what: the described object (``relation``: the first one).
        side: ``left`` / ``right`` (``only``, ``more``, ``relation``), else None.
        number: ``total``: the count stated.
        relation: ``relation``: a key of :data:`RELATIONS`.
        other: ``relation``: the second object.
    """

    family: str
    what: Description
    side: str | None = None
    number: int = 0
    relation: str | None = None
    other: Description | None = None

    @property
    def text(self) -> str:
        far = None if self.side is None else SIDES[1 - SIDES.index(self.side)]
        if self.family == "both":
            return f"both images contain {self.what.phrase()}"
        if self.family == "only":
            return f"only the {self.side} image contains {self.what.phrase()}"
        if self.family == "neither":
            return f"neither image contains {self.what.phrase()}"
        if self.family == "more":
            return f"there are more {self.what.words(plural=True)} in the {self.side} image than in the {far} image"
        if self.family == "same":
            return f"the two images contain the same number of {self.what.words(plural=True)}"
        if self.family == "total":
            return f"there are exactly {NUMBERS[self.number]} {self.what.words(plural=self.number != 1)} in the two images"
        return f"in the {self.side} image {self.what.phrase()} is {self.relation} {self.other.phrase()}"

    def truth(self, left: Scene, right: Scene) -> bool:
        """The statement's truth value on (left image, right image)."""
        here, there = (left, right) if self.side != "right" else (right, left)
        n_here, n_there = count(here, self.what), count(there, self.what)
        if self.family == "both":
            return n_here > 0 and n_there > 0
        if self.family == "only":
            return n_here > 0 and n_there == 0
        if self.family == "neither":
            return n_here == 0 and n_there == 0
        if self.family == "more":
            return n_here > n_there
        if self.family == "same":
            return n_here == n_there
        if self.family == "total":
            return n_here + n_there == self.number
        if self.family == "relation":
            return related(here, self.what, self.relation, self.other)
        raise ValueError(f"unknown statement family {self.family!r}")


def _description(rng: np.random.Generator) -> Description:
    while True:
        named = rng.random(3) < (0.3, 0.6, 0.6)  # size, colour, shape: colour and shape named more often
        if named.any():
            return Description(
                SIZES[rng.integers(len(SIZES))] if named[0] else None,
                list(COLOURS)[rng.integers(len(COLOURS))] if named[1] else None,
                SHAPES[rng.integers(len(SHAPES))] if named[2] else None,
            )


def draw_statement(rng: np.random.Generator) -> Statement:
    """A statement drawn uniformly over families, then its words (independent of any label)."""
    family = FAMILIES[rng.integers(len(FAMILIES))]
    what = _description(rng)
    side = SIDES[rng.integers(2)] if family in ("only", "more", "relation") else None
    if family == "total":
        return Statement(family, what, number=int(rng.integers(1, 4)))
    if family == "relation":
        return Statement(family, what, side, relation=list(RELATIONS)[rng.integers(len(RELATIONS))],
                         other=_description(rng))
    return Statement(family, what, side)


@dataclass(frozen=True)
class NLVRExample:
    """One planned example: the statement, its label and the two scenes it was decided on."""

    example_id: str
    statement: Statement
    label: bool
    left: Scene
    right: Scene


def _split(settings: SynthTaskSettings, split: str, n: int, taken: set[tuple[Scene, Scene]],
           exclude: set[tuple[Scene, Scene]]) -> list[NLVRExample]:
    rng = np.random.default_rng([settings.seed, SPLIT_CODES[split], 7])  # 7: this task's stream
    labels = rng.permutation(np.arange(n) < n - n // 2)  # exactly ceil(n/2) true, in a random order
    out = []
    for i in range(n):
        label = bool(labels[i])
        while True:  # a statement whose truth the scenes can be drawn to match (all can, in practice)
            statement = draw_statement(rng)
            for _ in range(MAX_TRIES):
                pair = (sample_scene(rng), sample_scene(rng))
                if statement.truth(*pair) == label and pair not in exclude:
                    break
            else:
                continue
            break
        taken.add(pair)
        out.append(NLVRExample(f"{split}-{i:06d}", statement, label, *pair))
    return out


def plan(settings: SynthTaskSettings) -> dict[str, list[NLVRExample]]:
    """Every split's examples from the seed (no rendering); test and val first, train avoids their pairs."""
    held_out: set[tuple[Scene, Scene]] = set()
    splits = {}
    for split in ("test", "val"):
        splits[split] = _split(settings, split, settings.split_sizes()[split], held_out, set())
    splits["train"] = _split(settings, "train", settings.train, set(), held_out)
    return splits


def _candidates(settings: SynthTaskSettings, examples: list[NLVRExample], split: str) -> Iterator[Candidate]:
    for index, ex in enumerate(examples):
        images = []
        for side, scene in enumerate((ex.left, ex.right)):  # one stream per image: resumable builds
            rng = np.random.default_rng([settings.seed, SPLIT_CODES[split], index, side, 7])
            images.append(encode(render(scene, settings.image_size, rng), "png"))
        text = {"text": ex.statement.text, "label": int(ex.label), "question_id": ex.example_id}
        yield Candidate("synth_nlvr", f"synth_nlvr:{ex.example_id}", f"{ex.example_id}-left", [text],
                        image=images[0], image2=images[1], image_id2=f"{ex.example_id}-right", position=index)


def build_nlvr(out: str | Path, settings: SynthTaskSettings, progress: bool = True, overwrite: bool = False) -> dict:
    """Write the embedded NLVR2 (``albef-ray data synth-task nlvr OUT --from runs/synth``).

    Returns:
        The manifest.
    """
    splits = plan(settings)
    return write_task_dataset(
        out, "nlvr", settings, lambda split, n: _candidates(settings, splits[split][:n], split),
        progress=progress, overwrite=overwrite,
    )
