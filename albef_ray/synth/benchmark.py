"""The embedded benchmark: generated image-caption scenes, written like any other dataset.

``build_synth`` plans every split from the seed (scenes, captions, which training captions are
noisy), renders the images with PIL while the shard writer consumes them (source ``synth``),
then trains the dataset's WordPiece tokenizer into ``<root>/tokenizer/``.

* Splits are disjoint by scene: no scene (hence no caption text) of val or test occurs in
  another split; test and val scenes are unique within their split, so each of their captions
  matches exactly one image. They are planned first, so they do not change with ``train``.
* A val or test image has ``eval_captions`` paraphrases (rows sharing its ``image_id``); a
  training image has one caption, wrong for a ``noise`` fraction of them (exactly
  ``round(noise * train)``), recorded in the manifest's ``synth.noise`` and, per image, in
  ``synth_noise.jsonl``.
* Everything is a function of the seed: the same config gives byte-identical shards.
"""

from __future__ import annotations

import io
import json
import math
import os
from collections import Counter
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageDraw

from ..data.build.candidates import Candidate, Source
from ..data.manifest import Manifest
from .scenes import (
    COLOURS,
    NOISE_KINDS,
    OBJECT_COUNTS,
    TEMPLATES_PER_COUNT,
    Scene,
    caption,
    corrupt,
    lexicon,
    sample_scene,
    template_count,
)
from ..data.schema import TOKENIZER_DIR
from ..data.tokenizer import DEFAULT_VOCAB_SIZE, train_wordpiece
from ..data.build.writer import write_dataset

SPLIT_CODES = {"train": 0, "val": 1, "test": 2}  # seeds each split's own random stream
NOISE_FILE = "synth_noise.jsonl"
SUPERSAMPLE = 4  # draw at 4x and box-downsample: anti-aliased edges at 64 px


@dataclass
class SynthConfig:
    """What the generated dataset looks like; all of it is recorded in the manifest."""

    seed: int = 0
    image_size: int = 64  # albef_tiny trains at 32 px: room for its random crops; resize for larger models
    train: int = 10_000
    val: int = 500
    test: int = 500
    noise: float = 0.2  # fraction of training captions that are wrong
    eval_captions: int = 5  # captions per val/test image, as in COCO
    image_format: str = "png"  # "png" (lossless) or "jpeg" (like web data)
    object_counts: tuple[int, ...] = OBJECT_COUNTS

    def __post_init__(self) -> None:
        self.object_counts = tuple(self.object_counts)
        if self.image_size < 16:
            raise ValueError(f"image_size: {self.image_size} is below 16 px")
        if min(self.train, self.val, self.test) < 0:
            raise ValueError("train, val and test counts must be >= 0")
        if not 0.0 <= self.noise <= 1.0:
            raise ValueError(f"noise: {self.noise} is not a fraction in [0, 1]")
        if not set(self.object_counts) <= set(OBJECT_COUNTS) or not self.object_counts:
            raise ValueError(f"object_counts: {self.object_counts}; supported: {OBJECT_COUNTS}")
        most = min(TEMPLATES_PER_COUNT[n] for n in self.object_counts)
        if not 1 <= self.eval_captions <= most:
            raise ValueError(f"eval_captions: {self.eval_captions} is not in 1..{most} (distinct paraphrases)")
        if self.image_format not in ("png", "jpeg"):
            raise ValueError(f"image_format: {self.image_format!r} is not 'png' or 'jpeg'")


@dataclass
class SynthImage:
    """One planned image: its scene and captions (and, when noisy, what it should have said)."""

    image_id: str
    scene: Scene
    captions: list[str]
    noise: str | None = None
    true_caption: str | None = None


@dataclass
class SynthPlan:
    """Every split's images, in order."""

    splits: dict[str, list[SynthImage]] = field(default_factory=dict)


def _new_scenes(rng: np.random.Generator, config: SynthConfig, taken: set[Scene]) -> Iterator[Scene]:
    """Random scenes not in ``taken``; gives up when the scene space is nearly exhausted."""
    misses = 0
    while True:
        scene = sample_scene(rng, config.object_counts)
        if scene in taken:
            misses += 1
            if misses > 10_000:
                raise ValueError("too few distinct scenes for these split sizes: lower val/test or allow 3 objects")
            continue
        misses = 0
        yield scene


def _held_out(config: SynthConfig, split: str, count: int, taken: set[Scene]) -> list[SynthImage]:
    rng = np.random.default_rng([config.seed, SPLIT_CODES[split]])
    images: list[SynthImage] = []
    scenes = _new_scenes(rng, config, taken)
    while len(images) < count:
        scene = next(scenes)
        taken.add(scene)
        templates = rng.choice(template_count(scene), size=config.eval_captions, replace=False)
        captions = [caption(scene, int(t)) for t in templates]
        images.append(SynthImage(f"{split}-{len(images):06d}", scene, captions))
    return images


def _noise(
    scene: Scene, kind: str, others: list[Scene], held_out: set[Scene], rng: np.random.Generator
) -> tuple[str, str]:
    """A wrong caption for ``scene``: (the kind of noise made, the caption).

    A wrong caption must not describe a val/test scene; when the reversed scene is one of them,
    relation noise gives way to attribute noise.
    """
    for attempt in range(100):
        if kind == "relation" and attempt == 1:
            kind = "attribute"
        wrong = others[int(rng.integers(len(others)))] if kind == "unrelated" else corrupt(scene, kind, rng)
        if wrong != scene and wrong not in held_out:
            return kind, caption(wrong, int(rng.integers(template_count(wrong))))
    raise RuntimeError(f"no {kind} noise found for {scene}")


def plan(config: SynthConfig) -> SynthPlan:
    """Plans scenes and captions of every split from the seed (no rendering)."""
    taken: set[Scene] = set()
    out = SynthPlan()
    # Held-out splits first, so that their scenes do not depend on the size of train.
    out.splits["test"] = _held_out(config, "test", config.test, taken)
    out.splits["val"] = _held_out(config, "val", config.val, taken)
    rng = np.random.default_rng([config.seed, SPLIT_CODES["train"]])
    new_scenes = _new_scenes(rng, config, taken)  # train may repeat a scene, as web data does
    scenes = [next(new_scenes) for _ in range(config.train)]
    train = [
        SynthImage(f"train-{i:06d}", s, [caption(s, int(rng.integers(template_count(s))))])
        for i, s in enumerate(scenes)
    ]
    noisy = rng.choice(len(train), size=round(config.noise * len(train)), replace=False) if train else []
    for index in sorted(int(i) for i in noisy):
        image = train[index]
        kind = NOISE_KINDS[int(rng.integers(len(NOISE_KINDS)))]
        if kind == "unrelated" and len(set(scenes)) < 2:
            kind = "attribute"
        image.true_caption = image.captions[0]
        image.noise, noisy_caption = _noise(image.scene, kind, scenes, taken, rng)
        image.captions = [noisy_caption]
    out.splits = {"train": train, "val": out.splits["val"], "test": out.splits["test"]}
    return out


def _polygon(cx: float, cy: float, radii: list[float], start_deg: float) -> list[tuple[float, float]]:
    step = 2 * math.pi / len(radii)
    start = math.radians(start_deg)
    return [(cx + r * math.cos(start + i * step), cy + r * math.sin(start + i * step)) for i, r in enumerate(radii)]


def _draw(draw: ImageDraw.ImageDraw, shape: str, cx: float, cy: float, r: float, fill: tuple[int, int, int]) -> None:
    if shape == "circle":
        draw.ellipse((cx - r, cy - r, cx + r, cy + r), fill=fill)
    elif shape == "square":
        h = 0.85 * r  # same visual weight as a circle of radius r
        draw.rectangle((cx - h, cy - h, cx + h, cy + h), fill=fill)
    elif shape == "triangle":
        draw.polygon(_polygon(cx, cy + 0.15 * r, [1.15 * r] * 3, -90), fill=fill)
    elif shape == "diamond":
        draw.polygon([(cx, cy - r), (cx + 0.75 * r, cy), (cx, cy + r), (cx - 0.75 * r, cy)], fill=fill)
    elif shape == "star":
        draw.polygon(_polygon(cx, cy, [1.1 * r, 0.45 * r] * 5, -90), fill=fill)
    elif shape == "hexagon":
        draw.polygon(_polygon(cx, cy, [r] * 6, 0), fill=fill)
    else:
        raise ValueError(f"unknown shape {shape!r}")


def _layout(scene: Scene, rng: np.random.Generator) -> list[tuple[float, float, float]]:
    """Centres (x, y) and radii as fractions of the image side; no overlaps, order unambiguous."""
    count = len(scene.things)
    radii = [(0.10 if t.size == "small" else 0.15) * rng.uniform(0.9, 1.05) for t in scene.things]
    if count == 2:
        along = [rng.uniform(0.18, 0.32), rng.uniform(0.68, 0.82)]
        first = rng.uniform(0.3, 0.7)
        # The perpendicular offset stays well below the gap along the axis.
        across = [first, float(np.clip(first + rng.uniform(-0.3, 0.3) * (along[1] - along[0]), 0.2, 0.8))]
    else:
        along = [(2 * i + 1) / (2 * count) + rng.uniform(-0.02, 0.02) for i in range(count)]
        line = rng.uniform(0.35, 0.65)
        across = [line + rng.uniform(-0.08, 0.08) for _ in range(count)]
    if scene.axis == "horizontal":
        return [(a, c, r) for a, c, r in zip(along, across, radii)]
    return [(c, a, r) for a, c, r in zip(along, across, radii)]


def render(scene: Scene, size: int, rng: np.random.Generator) -> Image.Image:
    """Draws a scene on a plain grey background (its shade random) as a ``size`` x ``size`` RGB image."""
    big = size * SUPERSAMPLE
    shade = int(rng.integers(25, 95))
    image = Image.new("RGB", (big, big), (shade, shade, shade))
    draw = ImageDraw.Draw(image)
    for thing, (x, y, r) in zip(scene.things, _layout(scene, rng)):
        _draw(draw, thing.shape, x * big, y * big, r * big, COLOURS[thing.colour])
    return image.reduce(SUPERSAMPLE)


def encode(image: Image.Image, image_format: str) -> bytes:
    """PNG or JPEG (quality 90) bytes of an image."""
    buffer = io.BytesIO()
    if image_format == "png":
        image.save(buffer, "PNG")
    else:
        image.save(buffer, "JPEG", quality=90)
    return buffer.getvalue()


class SynthSource(Source):
    """One split of a planned synthetic dataset; images are rendered as they are read."""

    format = "synth"

    def __init__(self, config: SynthConfig, split: str, images: list[SynthImage], name: str = "synth") -> None:
        super().__init__(name, split)
        self.config, self.images = config, images

    def describe(self) -> dict[str, Any]:
        return {**super().describe(), "config": asdict(self.config)}

    def count(self) -> int | None:
        return len(self.images)

    def iter_candidates(self, skip: int = 0) -> Iterator[Candidate]:
        for index in range(skip, len(self.images)):
            image = self.images[index]
            # One stream per image: a resumed build renders image i exactly as the first attempt did.
            rng = np.random.default_rng([self.config.seed, SPLIT_CODES[self.split], index])
            data = encode(render(image.scene, self.config.image_size, rng), self.config.image_format)
            where = f"synth:{image.image_id}"
            yield Candidate(self.name, where, image.image_id, list(image.captions), image=data, position=index)


def _summary(config: SynthConfig, synth_plan: SynthPlan) -> dict[str, Any]:
    noisy = [image for image in synth_plan.splits["train"] if image.noise]
    return {
        "config": asdict(config),
        "images": {split: len(images) for split, images in synth_plan.splits.items()},
        "noise": {
            "fraction": config.noise,
            "rows": len(noisy),
            "by_kind": dict(Counter(image.noise for image in noisy)),
            "file": NOISE_FILE,
        },
    }


def build_synth(
    root: str | os.PathLike,
    config: SynthConfig | None = None,
    *,
    shard_rows: int = 2048,
    vocab_size: int = DEFAULT_VOCAB_SIZE,
    workers: int = 0,
    progress: bool = True,
    overwrite: bool = False,
) -> Manifest:
    """Generates the synthetic benchmark into ``root`` (shards, manifest, noise list, tokenizer).

    Args:
        root: output dataset directory.
        config: what to generate (default :class:`SynthConfig`).
        shard_rows: rows per Parquet shard (small images: several shards even for small splits).
        vocab_size: upper bound on the WordPiece vocabulary.
        workers: validation processes for the writer (0: in this process).
        progress: show a progress bar.
        overwrite: replace a dataset of another config in ``root``.

    Returns:
        The manifest; its ``synth`` section holds the config, image counts and noise counts.
    """
    config = config or SynthConfig()
    synth_plan = plan(config)
    sources = [SynthSource(config, split, images) for split, images in synth_plan.splits.items()]
    extra = {"tokenizer": TOKENIZER_DIR, "synth": _summary(config, synth_plan)}
    manifest = write_dataset(
        root, sources, shard_rows=shard_rows, workers=workers, progress=progress, overwrite=overwrite, extra=extra
    )
    root = Path(root)
    lines = [
        json.dumps({"image_id": i.image_id, "kind": i.noise, "caption": i.captions[0], "true_caption": i.true_caption})
        for i in synth_plan.splits["train"]
        if i.noise
    ]
    (root / (NOISE_FILE + ".tmp")).write_text("".join(line + "\n" for line in lines), encoding="utf-8")
    os.replace(root / (NOISE_FILE + ".tmp"), root / NOISE_FILE)
    texts = [lexicon()] + [c for image in synth_plan.splits["train"] for c in image.captions]
    train_wordpiece(texts, root / TOKENIZER_DIR, vocab_size=vocab_size)
    return manifest
