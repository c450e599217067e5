"""The embedded grounding benchmark: referring expressions that name one object of a rendered scene.

A scene (:mod:`.scenes`: two or three distinct coloured shapes in a row, left to right or top
to bottom) is rendered as the caption benchmark renders it (:func:`.benchmark.render`), and the
renderer's own geometry gives every object's exact box ``[x, y, w, h]`` in pixels. Each
expression refers to exactly one object: its box is the ground truth, and the boxes of all
objects of the scene are the proposals (RefCOCO+'s detections, without detector error).

Two kinds of expression (RefCOCO+ splits its test set by what is referred to, people in testA
and other objects in testB; here the two test splits differ in how):

* ``attribute`` ("the red circle", "the small star"): the shape and as many of size and
  colour as name the object alone; no spatial word.
* ``spatial``: the object's description on its own names several objects, and where it is
  decides which: "the circle on the left" (the first of the circles along the scene's axis),
  "the square below the red star" (a relation to another object, itself named uniquely).

Splits: ``train`` and ``val`` mix both kinds (each expression's kind is drawn half and half
first, and a scene that allows no expression of it is drawn again; scenes with two spatial
expressions are rarer, so about 40 % are spatial); ``testA`` holds attribute
expressions (RefCOCO+'s own kind: its annotators were not allowed location words),
``testB`` spatial ones (RefCOCO's kind). Every scene has two expressions about different objects
(one image, two rows, as RefCOCO+ has several per image); val and test scenes never occur in
another split. Every expression is checked with :func:`resolve`, the meaning of its words,
before it is written: exactly one object fits it, the target. Everything is a function of
the seed.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from ..data.build.candidates import Candidate
from .benchmark import SUPERSAMPLE, _draw, _layout, encode, render
from .scenes import Scene, Thing, sample_scene
from .tasks import SynthTaskSettings, write_task_dataset

KINDS = ("attribute", "spatial")
SPLIT_KINDS = {"train": KINDS, "val": KINDS, "testA": ("attribute",), "testB": ("spatial",)}
_SPLIT_CODES = {"train": 0, "val": 1, "testA": 2, "testB": 3}
_PLAN_CODE, _RENDER_CODE = 30, 40  # random streams of their own, apart from the other generators'
REFS_PER_IMAGE = 2
# Words of the caption benchmark's vocabulary (scenes._WORDS): the pretrained tokenizer knows them.
_ENDS = {"horizontal": ("on the left", "on the right"), "vertical": ("at the top", "at the bottom")}
_RELATIONS = {"horizontal": ("left of", "right of"), "vertical": ("above", "below")}
_DESCRIPTIONS = (("shape",), ("colour", "shape"), ("size", "shape"), ("size", "colour", "shape"))


@dataclass(frozen=True)
class Description:
    """The attributes an expression names (None: not named); the shape is always the noun."""

    shape: str
    colour: str | None = None
    size: str | None = None

    @classmethod
    def of(cls, thing: Thing, fields: tuple[str, ...]) -> Description:
        return cls(**{f: getattr(thing, f) for f in fields})

    def phrase(self) -> str:
        return " ".join(w for w in (self.size, self.colour, self.shape) if w)

    def matches(self, thing: Thing) -> bool:
        return all(getattr(self, f) in (None, getattr(thing, f)) for f in ("shape", "colour", "size"))


@dataclass(frozen=True)
class Expression:
    """A referring expression and the object it is meant to refer to.

    Attributes:
        target: index of the referred object in ``scene.things``.
        subject: how the object is described.
        end: ``"first"`` / ``"last"``: the first or last of the objects ``subject`` fits
            (on the left / on the right, at the top / at the bottom); None: no end named.
        anchor: an object named as the relation's landmark, or None; ``before``: the subject
            comes before it (left of / above) rather than after it.
    """

    target: int
    subject: Description
    end: str | None = None
    anchor: Description | None = None
    before: bool | None = None

    @property
    def kind(self) -> str:
        return "attribute" if self.end is None and self.anchor is None else "spatial"

    def text(self, axis: str) -> str:
        words = f"the {self.subject.phrase()}"
        if self.end is not None:
            return f"{words} {_ENDS[axis][0 if self.end == 'first' else 1]}"
        if self.anchor is not None:
            return f"{words} {_RELATIONS[axis][0 if self.before else 1]} the {self.anchor.phrase()}"
        return words


def resolve(scene: Scene, expression: Expression) -> list[int]:
    """The indices of the objects the expression's words fit (a good expression: one, its target)."""
    fits = [i for i, t in enumerate(scene.things) if expression.subject.matches(t)]
    if expression.end is not None:
        return fits[:1] if expression.end == "first" else fits[-1:]
    if expression.anchor is not None:
        anchors = [i for i, t in enumerate(scene.things) if expression.anchor.matches(t)]
        if len(anchors) != 1:
            return []  # the landmark itself must be one object
        return [i for i in fits if (i < anchors[0]) == expression.before and i != anchors[0]]
    return fits


# ----------------------------------------------------------------------------- sampling


def _pick(rng: np.random.Generator, items):
    return items[int(rng.integers(len(items)))] if len(items) else None


def _descriptions(scene: Scene, index: int, unique: bool) -> list[Description]:
    """Descriptions of object ``index`` that name it alone (``unique``) or name others too."""
    out = []
    for fields in _DESCRIPTIONS:
        ref = Description.of(scene.things[index], fields)
        if (sum(ref.matches(t) for t in scene.things) == 1) == unique:
            out.append(ref)
    return out


def sample_expression(scene: Scene, target: int, kind: str, rng: np.random.Generator) -> Expression | None:
    """An expression of ``kind`` that names ``target`` alone, or None where the scene allows none.

    A spatial expression needs a description of the target that fits another object too
    (otherwise the spatial words would be decoration); it then names the end or, when the
    target is in the middle of the objects that fit, a landmark.
    """
    if kind == "attribute":
        subject = _pick(rng, _descriptions(scene, target, unique=True))
        return None if subject is None else Expression(target, subject)
    subject = _pick(rng, _descriptions(scene, target, unique=False))
    if subject is None:
        return None
    fits = [i for i, t in enumerate(scene.things) if subject.matches(t)]
    options = [Expression(target, subject, end=e) for e, i in (("first", fits[0]), ("last", fits[-1])) if i == target]
    for other in range(len(scene.things)):
        if other != target:
            for anchor in _descriptions(scene, other, unique=True):
                options.append(Expression(target, subject, anchor=anchor, before=target < other))
    good = [e for e in options if resolve(scene, e) == [target]]
    return _pick(rng, good)


@dataclass(frozen=True)
class GroundingScene:
    """One image's scene and its expressions (about different objects)."""

    image_id: str
    scene: Scene
    expressions: tuple[Expression, ...]


def _scenes(settings: SynthTaskSettings, split: str, count: int, taken: set[Scene], held_out: bool) -> list[GroundingScene]:
    rng = np.random.default_rng([settings.seed, _PLAN_CODE + _SPLIT_CODES[split]])
    out: list[GroundingScene] = []
    while len(out) < count:
        scene = sample_scene(rng)
        if scene in taken:  # val and test scenes: never elsewhere, never twice
            continue
        expressions: list[Expression] = []
        targets = rng.permutation(len(scene.things)).tolist()
        for _ in range(REFS_PER_IMAGE):
            kind = _pick(rng, SPLIT_KINDS[split])  # drawn first: a scene that allows none is redrawn
            for target in [t for t in targets if t not in {e.target for e in expressions}]:
                expression = sample_expression(scene, target, kind, rng)
                if expression is not None:
                    expressions.append(expression)
                    break
        if len(expressions) < REFS_PER_IMAGE:
            continue  # e.g. spatial: no two objects share a description
        if held_out:
            taken.add(scene)
        out.append(GroundingScene(f"{split}-{len(out):06d}", scene, tuple(expressions)))
    return out


def split_sizes(settings: SynthTaskSettings) -> dict[str, int]:
    """Expressions per split: ``settings.test`` is shared by testA and testB."""
    return {"train": settings.train, "val": settings.val, "testA": settings.test // 2,
            "testB": settings.test - settings.test // 2}


@functools.lru_cache(maxsize=4)
def plan_grounding(settings: SynthTaskSettings) -> dict[str, list[GroundingScene]]:
    """Every split's scenes and expressions (``ceil(n / 2)`` scenes for n expressions), no rendering."""
    sizes = split_sizes(settings)
    taken: set[Scene] = set()
    plan = {split: _scenes(settings, split, math.ceil(sizes[split] / REFS_PER_IMAGE), taken, True)
            for split in ("testA", "testB", "val")}
    plan["train"] = _scenes(settings, "train", math.ceil(sizes["train"] / REFS_PER_IMAGE), taken, False)
    return plan


# ----------------------------------------------------------------------------- rendering and boxes


def object_boxes(scene: Scene, size: int, rng_key: list[int]) -> list[list[float]]:
    """Each object's exact box ``[x, y, w, h]`` in pixels of the ``size`` image ``render`` draws.

    The layout is drawn from a generator seeded as the image's (``render`` takes its background
    shade first, then the layout), and each object is drawn alone on the supersampled canvas
    with the renderer's own shape code: its box is that drawing's extent, scaled down.
    """
    rng = np.random.default_rng(rng_key)
    rng.integers(25, 95)  # render's background shade
    big = size * SUPERSAMPLE
    boxes = []
    for thing, (x, y, r) in zip(scene.things, _layout(scene, rng)):
        mask = Image.new("L", (big, big), 0)
        _draw(ImageDraw.Draw(mask), thing.shape, x * big, y * big, r * big, 255)
        left, top, right, bottom = mask.getbbox()
        boxes.append([left / SUPERSAMPLE, top / SUPERSAMPLE, (right - left) / SUPERSAMPLE, (bottom - top) / SUPERSAMPLE])
    return boxes


def _candidates(settings: SynthTaskSettings, split: str, n: int) -> Iterator[Candidate]:
    left = n
    for index, item in enumerate(plan_grounding(settings)[split]):
        if left <= 0:
            return
        expressions = item.expressions[:left]
        left -= len(expressions)
        key = [settings.seed, _RENDER_CODE + _SPLIT_CODES[split], index]
        image = encode(render(item.scene, settings.image_size, np.random.default_rng(key)), "png")
        boxes = object_boxes(item.scene, settings.image_size, key)
        texts = [{"text": e.text(item.scene.axis), "box": boxes[e.target], "proposals": boxes,
                  "ref_id": f"{item.image_id}-{k}"} for k, e in enumerate(expressions)]
        yield Candidate("synth_grounding", f"synth_grounding:{item.image_id}", item.image_id, texts, image=image)


@dataclass(frozen=True)
class _GroundingSplits(SynthTaskSettings):
    def split_sizes(self) -> dict[str, int]:
        return split_sizes(self)


def build_grounding(out: str | Path, settings: SynthTaskSettings, progress: bool = True, overwrite: bool = False) -> dict:
    """Write the embedded grounding benchmark (``albef-ray data synth-task grounding OUT --from runs/synth``).

    Args:
        out: output dataset directory (splits train, val, testA, testB).
        settings: expressions per split (two per scene; ``test`` is halved into testA and
            testB), image size, seed, tokenizer source.
        progress: show a progress bar.
        overwrite: replace a dataset of other settings in ``out``.

    Returns:
        The manifest.
    """
    splits = _GroundingSplits(**settings.__dict__)
    return write_task_dataset(
        out, "grounding", splits, functools.partial(_candidates, settings), progress=progress, overwrite=overwrite
    )
