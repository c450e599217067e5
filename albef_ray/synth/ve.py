"""The embedded SNLI-VE: hypotheses about a rendered scene, entailed, neutral or contradicted.

A scene (:mod:`.scenes`: two or three coloured shapes in a row) is the premise. Each
hypothesis is built around one *checkable fact* F that the image decides:

* ``exists``: "there is a red circle" (some object matches the description; a false one
  names a colour, or without a colour a shape, that the scene does not show);
* ``attribute``: "the circle is red", "the red star is large" (the one object the description
  names has that colour or size);
* ``relation``: "the red circle is left of the blue square" (order along the scene's axis:
  left/right of in a row, above/below in a column; the other direction is never stated);
* ``scene``: a whole-scene description in the caption benchmark's words ("a small red circle
  left of a large blue square"): the scene's own, or that of another scene that keeps one of
  its objects in place and draws the others anew. Half of all facts are of this kind
  (:data:`KIND_WEIGHTS`): matching a description to a scene is what pretraining taught; the
  partial facts ask for finer reading (one attribute of one object, the order of two).

and, in two of its three forms, one *unknowable* clause U: a property the renderer never
shows, so no image can decide it: a material ("made of wood"), motion ("moving"), weight,
temperature, or depth ("behind the blue square": shapes are flat and never overlap). U is
always about an object that is in the scene, so it is undecidable, never false by absence.

=============  =============  =============
form           F holds        F fails
=============  =============  =============
``F``          entailment     contradiction
``F and U``    neutral        contradiction
``F or U``     entailment     neutral
=============  =============  =============

("there is a star and it is moving", "the circle is red or the blue square is made of wood").
Each form is as likely with F true as with F false, and a false F is drawn so that its words
are distributed like a true one's, so the text alone leaves every hypothesis two labels of
equal chance: a text-only model is held to ~50 % (a word 1-3-gram logistic regression trained
on 30,000 hypotheses scores 51 % on held-out ones), and above that it must read F off the image. Every scene gets three hypotheses, one per label
(ids as SNLI-VE's: 0 contradiction, 1 neutral, 2 entailment), so the labels are balanced and
no image predicts its label either. Descriptions name objects uniquely (an attribute fact's
description leaves out the attribute it asks about). Val and test scenes are distinct and
never occur in train; everything is a function of the seed.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..data.build.candidates import Candidate
from ..data.build.ve import VE_LABELS
from .benchmark import SPLIT_CODES, encode, render
from .scenes import (
    COLOURS,
    SHAPES,
    SIZES,
    Scene,
    Thing,
    caption,
    sample_scene,
    template_count,
)
from .tasks import SynthTaskSettings, write_task_dataset

CONTRADICTION, NEUTRAL, ENTAILMENT = (VE_LABELS.index(n) for n in ("contradiction", "neutral", "entailment"))
FORMS = ("plain", "and", "or")
FACT_KINDS = ("scene", "exists", "attribute", "relation")
# How often each kind is drawn: half are whole-scene descriptions (the caption benchmark's
# sentences, which pretraining taught the model to match), half the finer partial facts.
KIND_WEIGHTS = (0.5, 1 / 6, 1 / 6, 1 / 6)
# Properties the renderer never draws: no image decides them.
UNKNOWABLE = ("made of wood", "made of metal", "made of glass", "moving", "heavy", "hot")
DEPTH = ("behind", "in front of")  # flat shapes that never overlap: depth is not shown either
# (form, F holds) -> label; each label has two ways, taken equally often.
LABEL_OF = {
    ("plain", True): ENTAILMENT, ("plain", False): CONTRADICTION,
    ("and", True): NEUTRAL, ("and", False): CONTRADICTION,
    ("or", True): ENTAILMENT, ("or", False): NEUTRAL,
}
WAYS = {label: [key for key, value in LABEL_OF.items() if value == label] for label in set(LABEL_OF.values())}
_RELATION_WORDS = {"horizontal": ("left of", "right of"), "vertical": ("above", "below")}
_DESCRIPTIONS = (("shape",), ("colour", "shape"), ("size", "shape"), ("size", "colour", "shape"))
MAX_WORDS = 30  # the official max_words: a longer hypothesis would lose its end to pre_caption
_PLAN_CODE, _RENDER_CODE = 10, 20  # random streams of their own, apart from the caption benchmark's


@dataclass(frozen=True)
class Ref:
    """A description of objects: the attributes it names (None: not named)."""

    shape: str
    colour: str | None = None
    size: str | None = None

    def phrase(self) -> str:
        return " ".join(w for w in (self.size, self.colour, self.shape) if w)

    def matches(self, thing: Thing) -> bool:
        return all(getattr(self, f) in (None, getattr(thing, f)) for f in ("shape", "colour", "size"))

    def referent(self, scene: Scene) -> int:
        """Index of the one object this description names; ValueError if it names none or several."""
        hits = [i for i, t in enumerate(scene.things) if self.matches(t)]
        if len(hits) != 1:
            raise ValueError(f"'the {self.phrase()}' names {len(hits)} objects of {scene}")
        return hits[0]


@dataclass(frozen=True)
class Fact:
    """A statement the image decides.

    Attributes:
        kind: ``exists``, ``attribute`` or ``relation``.
        subject: what it is about (``exists``: the description looked for; ``scene``: None).
        field, value: ``attribute``: the asked attribute (``colour`` or ``size``) and its claimed value.
        other, before: ``relation``: the second object and whether the subject is claimed to
            come before it (left of / above).
        described, template: ``scene``: the scene a caption template describes (every object
            and their order); it holds when that is the premise's scene.
    """

    kind: str
    subject: Ref | None = None
    field: str | None = None
    value: str | None = None
    other: Ref | None = None
    before: bool | None = None
    described: Scene | None = None
    template: int = 0

    def holds(self, scene: Scene) -> bool:
        if self.kind == "scene":
            return self.described == scene
        if self.kind == "exists":
            return any(self.subject.matches(t) for t in scene.things)
        if self.kind == "attribute":
            return getattr(scene.things[self.subject.referent(scene)], self.field) == self.value
        if self.kind == "relation":
            return (self.subject.referent(scene) < self.other.referent(scene)) == self.before
        raise ValueError(f"unknown fact kind {self.kind!r}")

    def text(self, axis: str) -> str:
        if self.kind == "scene":
            return caption(self.described, self.template)
        if self.kind == "exists":
            return f"there is a {self.subject.phrase()}"
        if self.kind == "attribute":
            return f"the {self.subject.phrase()} is {self.value}"
        word = _RELATION_WORDS[axis][0 if self.before else 1]
        return f"the {self.subject.phrase()} is {word} the {self.other.phrase()}"


@dataclass(frozen=True)
class Unknowable:
    """A clause no image decides: ``predicate`` (with ``other`` for depth) of an object in the scene.

    ``subject`` None is "it": the fact's subject (the ``and`` form).
    """

    predicate: str
    subject: Ref | None = None
    other: Ref | None = None

    def text(self) -> str:
        tail = f"{self.predicate} the {self.other.phrase()}" if self.other is not None else self.predicate
        return f"{'it' if self.subject is None else 'the ' + self.subject.phrase()} is {tail}"


@dataclass(frozen=True)
class Hypothesis:
    """``fact`` alone (``plain``), ``fact and clause``, or ``fact or clause``."""

    form: str
    fact: Fact
    clause: Unknowable | None = None

    def text(self, scene: Scene) -> str:
        fact = self.fact.text(scene.axis)
        return fact if self.form == "plain" else f"{fact} {self.form} {self.clause.text()}"

    def label(self, scene: Scene) -> int:
        """The label the scene gives (checks that every object named once is there exactly once)."""
        if self.clause is not None:
            for ref in (self.clause.subject, self.clause.other):
                if ref is not None:
                    ref.referent(scene)  # an unknowable clause must be about objects in the scene
        return LABEL_OF[(self.form, self.fact.holds(scene))]


# ----------------------------------------------------------------------------- sampling


def _unique_refs(scene: Scene, index: int, leave_out: str | None = None) -> list[Ref]:
    """Descriptions of object ``index`` that name it alone (not naming ``leave_out``)."""
    thing = scene.things[index]
    refs = []
    for fields in _DESCRIPTIONS:
        if leave_out in fields:
            continue
        ref = Ref(**{f: getattr(thing, f) for f in fields})
        if sum(ref.matches(t) for t in scene.things) == 1:
            refs.append(ref)
    return refs


def _full_ref(scene: Scene, index: int) -> Ref:
    thing = scene.things[index]
    return Ref(thing.shape, thing.colour, thing.size)


def _pick(rng: np.random.Generator, items):
    return items[int(rng.integers(len(items)))] if len(items) else None


def _fact(scene: Scene, kind: str, truth: bool, fields: tuple[str, ...], rng: np.random.Generator) -> Fact | None:
    """A fact of ``kind`` whose truth in ``scene`` is ``truth``, or None where this draw finds none.

    ``fields``: the attributes an ``exists`` fact names (drawn by the caller and kept while it
    retries, so that how often a description is true does not depend on its length).
    """
    n = len(scene.things)
    i = int(rng.integers(n))
    thing = scene.things[i]
    absent = {"colour": [c for c in COLOURS if c not in {t.colour for t in scene.things}],
              "shape": [s for s in SHAPES if s not in {t.shape for t in scene.things}]}
    if kind == "scene":
        described = scene if truth else _other_scene(scene, i, rng)
        if described is None:
            return None
        fact = Fact("scene", described=described, template=int(rng.integers(template_count(described))))
    elif kind == "exists":
        ref = Ref(**{f: getattr(thing, f) for f in fields})
        if not truth:  # a colour (or, not naming one, a shape) that no object of the scene has
            field = "colour" if "colour" in fields else "shape"
            if not absent[field]:
                return None
            ref = Ref(**{**ref.__dict__, field: _pick(rng, absent[field])})
        fact = Fact("exists", ref)
    elif kind == "attribute":
        field = _pick(rng, ("colour", "size"))
        ref = _pick(rng, _unique_refs(scene, i, leave_out=field))
        if ref is None:
            return None
        values = tuple(COLOURS) if field == "colour" else SIZES
        value = getattr(thing, field) if truth else _pick(rng, [v for v in values if v != getattr(thing, field)])
        fact = Fact("attribute", ref, field=field, value=value)
    else:
        j = _pick(rng, [k for k in range(n) if k != i])
        a, b = _pick(rng, _unique_refs(scene, i)), _pick(rng, _unique_refs(scene, j))
        if a is None or b is None:
            return None
        fact = Fact("relation", a, other=b, before=(i < j) == truth)
    return fact if fact.holds(scene) == truth else None


def _other_scene(scene: Scene, keep: int, rng: np.random.Generator) -> Scene | None:
    """Another scene: object ``keep`` where it is, every other position drawn anew (and changed).

    The draw is symmetric (each scene is as likely the other's replacement), so a false
    description is distributed like a true one: the text alone cannot tell them apart.
    """
    things = [t if k == keep else Thing(_pick(rng, SIZES), _pick(rng, tuple(COLOURS)), _pick(rng, SHAPES))
              for k, t in enumerate(scene.things)]
    if len(set(things)) < len(things) or any(a == b for k, (a, b) in enumerate(zip(things, scene.things)) if k != keep):
        return None
    return Scene(scene.axis, tuple(things))


def _clause(scene: Scene, form: str, fact: Fact, rng: np.random.Generator) -> Unknowable | None:
    """The unknowable clause: about the fact's subject ("it", ``and``) or a named object (``or``).

    After a ``scene`` fact the clause names an object by its full description, one that both
    the scene and the described scene hold (a false description keeps one): naming an object
    the description lacks would tell the text alone that it is false. For the same reason it
    is never a depth clause (it would need two such objects).
    """
    if fact.kind == "scene":
        shared = [k for k, t in enumerate(scene.things) if t in fact.described.things]
        return Unknowable(_pick(rng, UNKNOWABLE), _full_ref(scene, _pick(rng, shared))) if shared else None
    if form == "and":
        subject, exclude = None, {k for k, t in enumerate(scene.things) if fact.subject.matches(t)}
    else:
        k = int(rng.integers(len(scene.things)))
        subject, exclude = _pick(rng, _unique_refs(scene, k)), {k}
        if subject is None:
            return None
    if rng.random() < 0.25:  # depth, relative to another object of the scene
        others = [k for k in range(len(scene.things)) if k not in exclude]
        other = _pick(rng, _unique_refs(scene, _pick(rng, others))) if others else None
        if other is None:
            return None
        return Unknowable(_pick(rng, DEPTH), subject, other)
    return Unknowable(_pick(rng, UNKNOWABLE), subject)


def sample_hypothesis(scene: Scene, label: int, rng: np.random.Generator, attempts: int = 200) -> Hypothesis:
    """A hypothesis that ``scene`` gives ``label``: one of the label's two forms, a random fact kind.

    The form, F's truth, the fact kind and an ``exists`` description's attributes are drawn
    first and kept while objects and values are retried, so none of them depends on how easily
    the scene satisfies it (a text-only model learns nothing from their frequencies).
    """
    for _ in range(attempts):
        form, truth = _pick(rng, WAYS[label])
        kind = FACT_KINDS[int(rng.choice(len(FACT_KINDS), p=KIND_WEIGHTS))]
        fields = _pick(rng, _DESCRIPTIONS)
        for _ in range(attempts):
            fact = _fact(scene, kind, truth, fields, rng)
            clause = None if form == "plain" or fact is None else _clause(scene, form, fact, rng)
            if fact is not None and (form == "plain" or clause is not None):
                break
        else:
            continue
        hypothesis = Hypothesis(form, fact, clause)
        if len(hypothesis.text(scene).split()) <= MAX_WORDS and hypothesis.label(scene) == label:
            return hypothesis
    raise RuntimeError(f"no hypothesis with label {VE_LABELS[label]} found for {scene}")


@dataclass(frozen=True)
class VEScene:
    """One premise image's scene and its hypotheses (one per label, in a random order)."""

    image_id: str
    scene: Scene
    hypotheses: tuple[Hypothesis, ...]


def _scenes(settings: SynthTaskSettings, split: str, count: int, taken: set[Scene], held_out: bool) -> list[VEScene]:
    rng = np.random.default_rng([settings.seed, _PLAN_CODE + SPLIT_CODES[split]])
    out: list[VEScene] = []
    while len(out) < count:
        scene = sample_scene(rng)
        if scene in taken:  # val and test scenes: never elsewhere, never twice
            continue
        if held_out:
            taken.add(scene)
        labels = rng.permutation(len(VE_LABELS))
        hypotheses = []
        for label in labels:
            for _ in range(20):  # three distinct texts
                h = sample_hypothesis(scene, int(label), rng)
                if h.text(scene) not in {x.text(scene) for x in hypotheses}:
                    break
            hypotheses.append(h)
        out.append(VEScene(f"{split}-{len(out):06d}", scene, tuple(hypotheses)))
    return out


@functools.lru_cache(maxsize=4)
def plan_ve(settings: SynthTaskSettings) -> dict[str, list[VEScene]]:
    """Every split's scenes and hypotheses (``ceil(n / 3)`` scenes for n examples), no rendering."""
    per_scene = len(VE_LABELS)
    taken: set[Scene] = set()
    plan = {split: _scenes(settings, split, math.ceil(getattr(settings, split) / per_scene), taken, True)
            for split in ("test", "val")}
    plan["train"] = _scenes(settings, "train", math.ceil(settings.train / per_scene), taken, False)
    return plan


def _candidates(settings: SynthTaskSettings, split: str, n: int) -> Iterator[Candidate]:
    left = n
    for index, item in enumerate(plan_ve(settings)[split]):
        if left <= 0:
            return
        hypotheses = item.hypotheses[:left]
        left -= len(hypotheses)
        rng = np.random.default_rng([settings.seed, _RENDER_CODE + SPLIT_CODES[split], index])
        image = encode(render(item.scene, settings.image_size, rng), "png")
        texts = [{"text": h.text(item.scene), "label": h.label(item.scene)} for h in hypotheses]
        yield Candidate("synth_ve", f"synth_ve:{item.image_id}", item.image_id, texts, image=image)


def build_ve(out: str | Path, settings: SynthTaskSettings, progress: bool = True, overwrite: bool = False) -> dict:
    """Write the embedded SNLI-VE (``albef-ray data synth-task ve OUT --from runs/synth``).

    Args:
        out: output dataset directory.
        settings: examples per split (three per scene), image size, seed, tokenizer source.
        progress: show a progress bar.
        overwrite: replace a dataset of other settings in ``out``.

    Returns:
        The manifest.
    """
    return write_task_dataset(
        out, "ve", settings, functools.partial(_candidates, settings), progress=progress, overwrite=overwrite
    )
