"""ALBEF's RandAugment, on PIL images with torchvision.transforms.v2 functional ops.

The official ``RandomAugment(2, 7, isPIL=True, augs=ALBEF_OPS)`` (``dataset/randaugment.py``,
written with OpenCV) draws ``N`` op names with replacement and applies each with
probability 0.5 at level ``M`` of ``MAX_LEVEL = 10``. With ``l = M / 10`` the arguments are:

=================  ==========================================================
Brightness         factor ``1.8 l + 0.1`` (1.36 at M = 7; always brighter)
Sharpness          factor ``1.8 l + 0.1`` (PIL's 3x3 smoothing kernel blend)
ShearX / ShearY    ``x' = x + f y`` (or y) about the top-left corner, ``f = +-0.3 l``
TranslateX / Y     ``+-10 l`` pixels (absolute, whatever the resolution)
Rotate             ``+-30 l`` degrees about the centre
=================  ==========================================================

Geometric ops fill with grey (128, 128, 128) and interpolate bilinearly (OpenCV's
``INTER_LINEAR``); AutoContrast and Equalize are PIL's, which the OpenCV code reproduces.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
import torchvision.transforms.v2.functional as F
from PIL import Image
from torchvision.transforms import InterpolationMode

ALBEF_OPS = (
    "Identity", "AutoContrast", "Equalize", "Brightness", "Sharpness",
    "ShearX", "ShearY", "TranslateX", "TranslateY", "Rotate",
)
MAX_LEVEL = 10
APPLY_PROB = 0.5
FILL = [128, 128, 128]
TRANSLATE_CONST = 10  # pixels at MAX_LEVEL
_BILINEAR = InterpolationMode.BILINEAR


def _enhance_factor(level: float) -> float:
    return 1.8 * level + 0.1


def _shear(img: Image.Image, level: float, sign: float, axis: int) -> Image.Image:
    # A shear x' = x + f y is a torchvision shear of -atan(f) degrees about the origin.
    angle = -sign * math.degrees(math.atan(0.3 * level))
    shear = [angle, 0.0] if axis == 0 else [0.0, angle]
    return F.affine(img, 0.0, [0.0, 0.0], 1.0, shear, interpolation=_BILINEAR, fill=FILL, center=[0.0, 0.0])


def _translate(img: Image.Image, level: float, sign: float, axis: int) -> Image.Image:
    offset = sign * TRANSLATE_CONST * level
    interpolation = _BILINEAR
    if math.isclose(offset, round(offset), abs_tol=1e-6):
        # A whole-pixel shift (always, with the official constants) samples exactly on pixel
        # centres: nearest gives the bilinear result bit for bit, 30x cheaper.
        offset, interpolation = float(round(offset)), InterpolationMode.NEAREST
    shift = [offset, 0.0] if axis == 0 else [0.0, offset]
    return F.affine(img, 0.0, shift, 1.0, [0.0, 0.0], interpolation=interpolation, fill=FILL)


# name -> f(image, level in [0, 1], sign in {-1, +1}); ops without a direction ignore the sign.
OPS: dict[str, Callable[[Image.Image, float, float], Image.Image]] = {
    "Identity": lambda img, level, sign: img,
    "AutoContrast": lambda img, level, sign: F.autocontrast(img),
    "Equalize": lambda img, level, sign: F.equalize(img),
    "Brightness": lambda img, level, sign: F.adjust_brightness(img, _enhance_factor(level)),
    "Sharpness": lambda img, level, sign: F.adjust_sharpness(img, _enhance_factor(level)),
    "ShearX": lambda img, level, sign: _shear(img, level, sign, 0),
    "ShearY": lambda img, level, sign: _shear(img, level, sign, 1),
    "TranslateX": lambda img, level, sign: _translate(img, level, sign, 0),
    "TranslateY": lambda img, level, sign: _translate(img, level, sign, 1),
    "Rotate": lambda img, level, sign: F.rotate(img, sign * 30.0 * level, interpolation=_BILINEAR, fill=FILL),
}


def apply_op(img: Image.Image, name: str, magnitude: int, sign: float = 1.0) -> Image.Image:
    """Apply one named op at ``magnitude`` (out of :data:`MAX_LEVEL`) in direction ``sign``."""
    return OPS[name](img, magnitude / MAX_LEVEL, sign)


def sample_ops(
    num_ops: int = 2, generator: torch.Generator | None = None, ops: tuple[str, ...] = ALBEF_OPS
) -> list[tuple[str, float]]:
    """Draw ``num_ops`` ops from ``ops`` with replacement; keep each with probability 0.5.

    Returns:
        ``(name, sign)`` of the ops that apply, in order; ``sign`` in {-1, +1} is the direction
        of the geometric ops.
    """
    applied = []
    for _ in range(num_ops):
        name = ops[int(torch.randint(len(ops), (1,), generator=generator))]
        u_apply, u_sign = torch.rand(2, generator=generator).tolist()
        if u_apply < APPLY_PROB:
            applied.append((name, -1.0 if u_sign < 0.5 else 1.0))
    return applied


def apply_ops(img: Image.Image, applied: list[tuple[str, float]], magnitude: int) -> Image.Image:
    """Apply ``(name, sign)`` ops in order at ``magnitude``."""
    for name, sign in applied:
        img = apply_op(img, name, magnitude, sign)
    return img


def rand_augment(
    img: Image.Image,
    num_ops: int = 2,
    magnitude: int = 7,
    generator: torch.Generator | None = None,
    ops: tuple[str, ...] = ALBEF_OPS,
) -> Image.Image:
    """The official ``RandomAugment(num_ops, magnitude, augs=ops)`` on an RGB PIL image.

    Args:
        img: an RGB PIL image.
        num_ops: N, ops drawn.
        magnitude: M, level out of :data:`MAX_LEVEL`.
        generator: source of the draws (op, whether to apply it, its direction).
        ops: op names, keys of :data:`OPS`.

    Returns:
        The augmented image (the input itself when no op applied).
    """
    return apply_ops(img, sample_ops(num_ops, generator, ops), magnitude)
