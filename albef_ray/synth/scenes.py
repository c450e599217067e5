"""Scenes of the synthetic benchmark and the captions that describe them.

A scene is two or three distinct objects (size, colour, shape) in a row along one axis:
left to right, or top to bottom. Every caption template names all objects and their order,
so each caption determines its scene exactly; that is what makes one test caption match one
test image. Paraphrases vary the word order and the relation phrasing: "a small red circle
left of a large blue square" and "a large blue square to the right of a small red circle"
describe the same scene.

Noise for training captions, as in web data: ``attribute`` (one object's size, colour or
shape is wrong), ``relation`` (the order is reversed: "left of" where it is right of) and
``unrelated`` (the caption of another image, chosen by the generator).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple

import numpy as np

SIZES = ("small", "large")
COLOURS = {  # RGB; far apart in hue so that a 64 px render keeps them distinct
    "red": (220, 40, 40),
    "green": (40, 170, 70),
    "blue": (50, 90, 230),
    "yellow": (240, 215, 40),
    "purple": (150, 70, 200),
    "orange": (250, 140, 30),
    "white": (245, 245, 245),
    "cyan": (40, 210, 220),
}
# Four outlines that stay distinct at 64 px (a diamond or a hexagon of 10 px reads as a square or a
# circle); every caption names each object's shape, so a shape the model cannot see is noise.
SHAPES = ("circle", "square", "triangle", "star")
AXES = ("horizontal", "vertical")
NOISE_KINDS = ("attribute", "relation", "unrelated")

# Phrasings per axis; the objects of a scene are listed first-to-last (left-to-right, top-to-bottom).
_WORDS = {
    "horizontal": {
        "before": "left of",
        "before_long": "to the left of",
        "after": "right of",
        "after_long": "to the right of",
        "first_end": "on the left",
        "last_end": "on the right",
        "beside": "on its left",
        "order": "from left to right",
        "reverse": "from right to left",
    },
    "vertical": {
        "before": "above",
        "before_long": "over",
        "after": "below",
        "after_long": "beneath",
        "first_end": "at the top",
        "last_end": "at the bottom",
        "beside": "above it",
        "order": "from top to bottom",
        "reverse": "from bottom to top",
    },
}
_TEMPLATES = {
    2: (
        "{a} {before} {b}",
        "{a} {before_long} {b}",
        "{b} {after} {a}",
        "{b} {after_long} {a}",
        "{a} {first_end} and {b} {last_end}",
        "{b} with {a} {beside}",
        "there is {a} {before_long} {b}",
    ),
    3: (
        "{a}, {b} and {c} {order}",
        "{order}: {a}, {b} and {c}",
        "{c}, {b} and {a} {reverse}",
        "{a} {before} {b}, which is {before} {c}",
        "{c} {after} {b}, which is {after} {a}",
        "{b} between {a} {first_end} and {c} {last_end}",
        "{a} {first_end}, {b} in the middle and {c} {last_end}",
    ),
}
OBJECT_COUNTS = tuple(_TEMPLATES)
TEMPLATES_PER_COUNT = {count: len(templates) for count, templates in _TEMPLATES.items()}


class Thing(NamedTuple):
    """One object of a scene."""

    size: str
    colour: str
    shape: str

    def phrase(self) -> str:
        return f"a {self.size} {self.colour} {self.shape}"


@dataclass(frozen=True)
class Scene:
    """Objects in order along an axis (left to right, or top to bottom); its own identity key."""

    axis: str
    things: tuple[Thing, ...]


def template_count(scene: Scene) -> int:
    """Number of distinct caption templates for a scene of this many objects."""
    return TEMPLATES_PER_COUNT[len(scene.things)]


def caption(scene: Scene, template: int) -> str:
    """The scene described with template number ``template`` (0 is the plainest)."""
    names = dict(zip("abc", (t.phrase() for t in scene.things)))
    return _TEMPLATES[len(scene.things)][template].format(**names, **_WORDS[scene.axis])


def lexicon() -> str:
    """Every word the captions can use, as one text (helps a tokenizer trained on few captions)."""
    words = set(SIZES) | set(COLOURS) | set(SHAPES) | {"a"}
    for phrasing in _WORDS.values():
        words |= {w for text in phrasing.values() for w in text.split()}
    for templates in _TEMPLATES.values():
        words |= {w.strip(",:") for t in templates for w in t.split() if "{" not in w}
    return " ".join(sorted(words))


def sample_scene(rng: np.random.Generator, object_counts: tuple[int, ...] = OBJECT_COUNTS) -> Scene:
    """A random scene of distinct objects."""
    count = int(rng.choice(object_counts))
    things: list[Thing] = []
    while len(things) < count:
        thing = Thing(
            SIZES[rng.integers(len(SIZES))],
            list(COLOURS)[rng.integers(len(COLOURS))],
            SHAPES[rng.integers(len(SHAPES))],
        )
        if thing not in things:
            things.append(thing)
    return Scene(AXES[rng.integers(len(AXES))], tuple(things))


def corrupt(scene: Scene, kind: str, rng: np.random.Generator) -> Scene:
    """A scene that differs from ``scene`` as a noisy caption would (``attribute`` or ``relation``).

    ``relation`` reverses the order of the objects; ``attribute`` changes one object's size,
    colour or shape to another value.
    """
    if kind == "relation":
        return Scene(scene.axis, scene.things[::-1])
    if kind != "attribute":
        raise ValueError(f"corrupt() makes 'attribute' or 'relation' noise, not {kind!r}")
    index = int(rng.integers(len(scene.things)))
    field = int(rng.integers(3))
    values = (SIZES, tuple(COLOURS), SHAPES)[field]
    current = scene.things[index][field]
    wrong = [v for v in values if v != current][int(rng.integers(len(values) - 1))]
    things = list(scene.things)
    things[index] = things[index]._replace(**{Thing._fields[field]: wrong})
    return Scene(scene.axis, tuple(things))
