"""ALBEF's image transforms and caption cleaning, as plain functions (no Ray).

The pretraining transform is the official one (``dataset/__init__.py``)::

    RandomResizedCrop(res, scale=(0.2, 1.0), bicubic) -> RandomHorizontalFlip()
    -> RandomAugment(2, 7, ALBEF_OPS) -> ToTensor() -> Normalize(MEAN, STD)

built from torchvision.transforms.v2 functional ops, with every random draw taken from a
``torch.Generator`` so a seed fixes the output. The crop and resize run on ``uint8`` tensors
(torch's anti-aliased bicubic kernel is PIL's filter, several times faster); the RandAugment
ops run on PIL images, as the official OpenCV code reproduces PIL's. The transform is split in
two stages: :func:`pretrain_image` (bytes -> augmented ``uint8`` (3, R, R)) runs where images
are decoded, and :func:`normalize` (``uint8`` -> normalised ``float32``) runs on whole batches;
a quarter of the bytes travel between them. :func:`pretrain_transform` chains both.

One thing differs from decoding the full image first: a JPEG is decoded at the smallest
DCT scale (1/2, 1/4, 1/8) at which the sampled crop still has at least ``R`` pixels on each
side (PIL's ``draft``). The crop box is sampled on the original size and mapped onto the
reduced image (rounded to its whole pixels), so the crop-scale statistics are unchanged;
the reduction acts as the anti-aliasing the bicubic resize would have done anyway.
"""

from __future__ import annotations

import io
import logging
import math
import re
from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np
import torch
import torchvision.transforms.v2.functional as F
from PIL import Image
from torchvision.transforms import InterpolationMode

from .orientation import apply_orientation, exif_orientation, oriented_size
from .randaugment import apply_ops, sample_ops
from .schema import image_indices

log = logging.getLogger(__name__)

# CLIP's statistics, which the official ALBEF code normalises with.
MEAN = (0.48145466, 0.4578275, 0.40821073)
STD = (0.26862954, 0.26130258, 0.27577711)
CROP_RATIO = (3 / 4, 4 / 3)  # RandomResizedCrop's default aspect range (official keeps it)


@dataclass(frozen=True)
class AugmentSpec:
    """Settings of the pretraining transform (defaults: the official pretraining ones).

    Attributes:
        image_res: R, output images are (3, R, R).
        crop_scale: range of the crop's area as a fraction of the image's.
        flip_prob: probability of a horizontal flip.
        randaug_ops: RandAugment ops drawn per image (with replacement).
        randaug_magnitude: RandAugment level out of 10.
        jpeg_draft: decode JPEGs at a reduced DCT scale where the crop allows it.
    """

    image_res: int
    crop_scale: tuple[float, float] = (0.2, 1.0)
    flip_prob: float = 0.5
    randaug_ops: int = 2
    randaug_magnitude: int = 7
    jpeg_draft: bool = True

    @classmethod
    def from_config(cls, cfg) -> "AugmentSpec":
        """From an :class:`~albef_ray.config.AlbefConfig`; R is the model's input resolution."""
        from ..model.registry import get_arch

        d = cfg.data
        return cls(
            image_res=get_arch(cfg.model.size, cfg.model.image_res).image_res,
            crop_scale=tuple(d.crop_scale),
            flip_prob=d.flip_prob,
            randaug_ops=d.randaug_ops,
            randaug_magnitude=d.randaug_magnitude,
            jpeg_draft=d.jpeg_draft,
        )


@dataclass(frozen=True)
class CropBox:
    """A crop in pixels of the original image: rows ``top:top+height``, columns ``left:left+width``."""

    top: int
    left: int
    height: int
    width: int


# ----------------------------------------------------------------------------- decoding


def _open(data: bytes) -> Image.Image | None:
    """Read the header only (size, format); pixels are decoded on first use."""
    try:
        return Image.open(io.BytesIO(data))
    except Exception:  # noqa: BLE001 - any unreadable input is a dropped row, never a crash
        return None


def _to_rgb(img: Image.Image) -> Image.Image | None:
    try:
        return img.convert("RGB")  # forces the decode; truncated or corrupt data raises here
    except Exception:  # noqa: BLE001
        return None


def decode_image(data: bytes, draft_size: tuple[int, int] | None = None) -> Image.Image | None:
    """Decode encoded image bytes (JPEG, PNG, ...) into an upright RGB PIL image.

    The EXIF orientation is applied (a phone's portrait photo, stored sideways, comes out
    upright), as every viewer and the builder's recorded width and height have it.

    Args:
        data: the encoded bytes as stored in a shard.
        draft_size: for JPEGs, decode at the smallest DCT scale whose output is still at
            least this (width, height); ``None`` decodes at full size.

    Returns:
        The RGB image, or ``None`` if the bytes cannot be decoded (never raises).
    """
    img = _open(data)
    if img is None:
        return None
    orientation = exif_orientation(img)
    if draft_size is not None:  # the request is in displayed pixels; draft works on stored ones
        img.draft("RGB", oriented_size(draft_size, orientation))
    rgb = _to_rgb(img)
    return None if rgb is None else apply_orientation(rgb, orientation)


# ----------------------------------------------------------------------------- crop sampling


def sample_crop(
    height: int,
    width: int,
    scale: tuple[float, float] = (0.2, 1.0),
    ratio: tuple[float, float] = CROP_RATIO,
    generator: torch.Generator | None = None,
) -> CropBox:
    """RandomResizedCrop's box: area fraction uniform in ``scale``, log-aspect uniform in ``ratio``.

    Ten tries for a box that fits; otherwise the largest centred box with an aspect inside
    ``ratio`` (torchvision's algorithm, drawing from ``generator``).
    """
    area = height * width
    log_lo, log_hi = math.log(ratio[0]), math.log(ratio[1])
    for _ in range(10):
        u_area, u_ratio = torch.rand(2, generator=generator).tolist()
        target = area * (scale[0] + (scale[1] - scale[0]) * u_area)
        aspect = math.exp(log_lo + (log_hi - log_lo) * u_ratio)
        w = round(math.sqrt(target * aspect))
        h = round(math.sqrt(target / aspect))
        if 0 < w <= width and 0 < h <= height:
            top = int(torch.randint(0, height - h + 1, (1,), generator=generator))
            left = int(torch.randint(0, width - w + 1, (1,), generator=generator))
            return CropBox(top, left, h, w)
    aspect = width / height
    if aspect < ratio[0]:
        w, h = width, round(width / ratio[0])
    elif aspect > ratio[1]:
        w, h = round(height * ratio[1]), height
    else:
        w, h = width, height
    return CropBox((height - h) // 2, (width - w) // 2, h, w)


def _crop_draft_size(img_size: tuple[int, int], box: CropBox, res: int) -> tuple[int, int]:
    # PIL reduces by s <= min(W // req_w, H // req_h); with these requests s <= min(w, h) / res,
    # so the crop keeps at least `res` decoded pixels per side.
    w_img, h_img = img_size
    return math.ceil(w_img * res / box.width), math.ceil(h_img * res / box.height)


# ----------------------------------------------------------------------------- transforms


def _draft(img: Image.Image, box: CropBox, res: int, orientation: int = 1) -> float:
    """Let a JPEG decode at a reduced DCT scale if the crop allows; returns the reduction s.

    ``box`` is on the upright image; ``orientation`` (EXIF) maps the request to stored pixels.
    """
    if img.format != "JPEG":
        return 1.0
    full_width = img.width
    request = _crop_draft_size(oriented_size(img.size, orientation), box, res)
    drafted = img.draft("RGB", oriented_size(request, orientation))
    # (mode, (0, 0, W / s, H / s)): the original image's extent in the reduced one.
    return 1.0 if drafted is None else full_width / drafted[1][2]


def _reduce_box(box: CropBox, reduction: float, height: int, width: int) -> CropBox:
    # The box on the reduced image, rounded to its whole pixels: a crop sampled on a grid of
    # `reduction` original pixels (at most 8, on a crop of >= 2R of them).
    top, left = round(box.top / reduction), round(box.left / reduction)
    bottom = min(max(round((box.top + box.height) / reduction), top + 1), height)
    right = min(max(round((box.left + box.width) / reduction), left + 1), width)
    return CropBox(top, left, bottom - top, right - left)


def pretrain_image(data: bytes, spec: AugmentSpec, generator: torch.Generator | None = None) -> torch.Tensor | None:
    """Decode, random-resized-crop, flip and RandAugment one image.

    Args:
        data: encoded image bytes.
        spec: transform settings.
        generator: source of every random draw; a seeded one makes the output reproducible.

    Returns:
        ``uint8`` (3, R, R), or ``None`` if the image cannot be decoded.
    """
    res = spec.image_res
    img = _open(data)
    if img is None:
        return None
    orientation = exif_orientation(img)  # the crop is sampled on the upright image
    width, height = oriented_size(img.size, orientation)
    box = sample_crop(height, width, spec.crop_scale, CROP_RATIO, generator)
    reduction = _draft(img, box, res, orientation) if spec.jpeg_draft else 1.0
    rgb = _to_rgb(img)
    if rgb is None:
        return None
    rgb = apply_orientation(rgb, orientation)
    if reduction > 1:
        box = _reduce_box(box, reduction, rgb.height, rgb.width)
    # torch's uint8 anti-aliased bicubic is PIL's filter, ~5x faster on PIL's (H, W, 3) memory.
    crop = F.resized_crop(
        F.pil_to_tensor(rgb), box.top, box.left, box.height, box.width, [res, res],
        interpolation=InterpolationMode.BICUBIC, antialias=True,
    )
    if float(torch.rand(1, generator=generator)) < spec.flip_prob:
        crop = F.horizontal_flip(crop)
    applied = [op for op in sample_ops(spec.randaug_ops, generator) if op[0] != "Identity"]
    if applied:  # the ops are PIL's (as the official OpenCV code reproduces them)
        crop = F.pil_to_tensor(apply_ops(F.to_pil_image(crop), applied, spec.randaug_magnitude))
    return crop


def eval_image(data: bytes, image_res: int, jpeg_draft: bool = True) -> torch.Tensor | None:
    """The evaluation transform before normalisation: resize to (R, R), bicubic, no crop.

    Returns:
        ``uint8`` (3, R, R), or ``None`` if the image cannot be decoded.
    """
    rgb = decode_image(data, (image_res, image_res) if jpeg_draft else None)
    if rgb is None:
        return None
    return F.resize(
        F.pil_to_tensor(rgb), [image_res, image_res], interpolation=InterpolationMode.BICUBIC, antialias=True
    )


_SCALE = (1 / (255 * torch.tensor(STD))).view(3, 1, 1)
_SHIFT = (-torch.tensor(MEAN) / torch.tensor(STD)).view(3, 1, 1)
# Every uint8 level's output per channel, by the same float32 ops as the arithmetic path.
_TABLE = (torch.arange(256, dtype=torch.float32).view(1, 256) * _SCALE.view(3, 1) + _SHIFT.view(3, 1)).numpy()


def normalize(images: torch.Tensor) -> torch.Tensor:
    """ToTensor + Normalize: ``uint8`` (..., 3, H, W) -> ``float32`` ``(x / 255 - MEAN) / STD``.

    The value is ``x * (1 / (255 STD)) - MEAN / STD`` in float32, on the input's device. On
    the CPU each channel of each image is looked up in a 256-entry table of those values
    (bit-identical, 0.18 ms per 256 px image vs 0.32 ms for converting, scaling and shifting
    image by image); elsewhere (a GPU, or an input that is not uint8) it is computed.
    """
    if images.device.type != "cpu" or images.dtype != torch.uint8:
        return images.to(torch.float32).mul_(_SCALE.to(images.device)).add_(_SHIFT.to(images.device))
    out = np.empty(tuple(images.shape), np.float32)
    flat_in = images.reshape(-1, *images.shape[-3:]).numpy()
    flat_out = out.reshape(-1, *images.shape[-3:])
    for src, dst in zip(flat_in, flat_out):
        for c in range(3):  # mode="clip": no bounds checks or buffering (uint8 indices are in range)
            np.take(_TABLE[c], src[c], out=dst[c], mode="clip")
    return torch.from_numpy(out)


def pretrain_transform(data: bytes, spec: AugmentSpec, generator: torch.Generator | None = None) -> torch.Tensor | None:
    """The whole pretraining transform: ``float32`` (3, R, R), or ``None`` if undecodable."""
    img = pretrain_image(data, spec, generator)
    return None if img is None else normalize(img)


def eval_transform(data: bytes, image_res: int, jpeg_draft: bool = True) -> torch.Tensor | None:
    """The whole evaluation transform: ``float32`` (3, R, R), or ``None`` if undecodable."""
    img = eval_image(data, image_res, jpeg_draft)
    return None if img is None else normalize(img)


# ----------------------------------------------------------------------------- captions

_PUNCTUATION = re.compile(r"[,.'!?\"()*#:;~]")  # the official pre_caption's set
_WHITESPACE = re.compile(r"\s+")


def pre_caption(caption: str, max_words: int = 30) -> str:
    """ALBEF's caption cleaning.

    Lower-case; delete ``, . ' ! ? " ( ) * # : ; ~``; ``-`` and ``/`` become spaces;
    ``<person>`` becomes ``person``; whitespace runs collapse to one space; the ends are
    stripped; at most ``max_words`` words are kept. (The official code collapses runs of two
    or more whitespace characters only, so a lone tab or newline stayed inside a "word".)
    """
    text = _PUNCTUATION.sub("", caption.lower())
    text = text.replace("-", " ").replace("/", " ").replace("<person>", "person")
    words = _WHITESPACE.sub(" ", text).strip().split(" ")
    return " ".join(words[:max_words])


# ----------------------------------------------------------------------------- batches


def transform_batch(
    batch: Mapping[str, np.ndarray],
    spec: AugmentSpec,
    training: bool,
    max_words: int,
    generator: torch.Generator | None = None,
) -> dict[str, np.ndarray]:
    """Decode, transform and clean a batch of shard rows; undecodable rows are dropped and counted.

    Rows are returned in a random order when ``training`` (a shuffle within the batch).
    Keeping every output row valid keeps training batches at their full size, which the
    ITC queue and the cross-rank gathers need; the count of dropped rows rides on the
    ``num_dropped`` column of the first row (all rows dropped: the count is only logged).

    Args:
        batch: columns ``image`` (encoded bytes), ``caption``, ``image_id`` and optionally
            ``source`` (missing: ``""``) of N rows.
        spec: transform settings.
        training: pretraining transform and in-batch shuffle; else the evaluation transform.
        max_words: caption word limit.
        generator: source of every random draw.

    Returns:
        ``image`` uint8 (n, 3, R, R), ``caption`` (cleaned), ``image_id``, ``image_idx``
        int64 (n,) (:func:`~albef_ray.data.schema.image_indices` of source and image id: equal
        for captions of one image), ``num_dropped`` int64 (n,), for the n <= N decodable rows.
    """
    res = spec.image_res
    images, kept = [], []
    for k, data in enumerate(batch["image"]):
        img = pretrain_image(data, spec, generator) if training else eval_image(data, res, spec.jpeg_draft)
        if img is not None:
            images.append(img)
            kept.append(k)
    dropped = len(batch["image"]) - len(kept)
    if training and kept:
        order = torch.randperm(len(kept), generator=generator).tolist()
        images, kept = [images[i] for i in order], [kept[i] for i in order]
    if dropped and not kept:
        log.warning("all %d rows of a batch failed to decode; their count is lost to the metrics", dropped)
    num_dropped = np.zeros(len(kept), dtype=np.int64)
    if kept:
        num_dropped[0] = dropped
    captions = batch["caption"]
    image_ids = [str(batch["image_id"][k]) for k in kept]
    sources = [str(batch["source"][k]) for k in kept] if "source" in batch else [""] * len(kept)
    return {
        "image": torch.stack(images).numpy() if images else np.zeros((0, 3, res, res), np.uint8),
        "caption": np.array([pre_caption(str(captions[k]), max_words) for k in kept], dtype=object),
        "image_id": np.array(image_ids, dtype=object),
        "image_idx": image_indices(sources, image_ids),
        "num_dropped": num_dropped,
    }
