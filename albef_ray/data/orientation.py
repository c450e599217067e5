"""EXIF orientation: how a camera says its pixels are to be turned for display.

A phone stores a portrait photo as landscape pixels with an EXIF ``Orientation`` tag (274)
saying "rotate 90 degrees". Viewers apply it; a decoder that ignores it trains on a sideways
image whose caption says "a tall tower". The builder records the displayed size and every
decode path (training and evaluation transforms) applies the tag. Reading the tag parses the
EXIF header only; pixels are transposed only when the tag is not 1 (already upright).
"""

from __future__ import annotations

from PIL import Image

ORIENTATION_TAG = 0x0112

# What PIL's ImageOps.exif_transpose does for each tag value (1: nothing).
_TRANSPOSE = {
    2: Image.Transpose.FLIP_LEFT_RIGHT,
    3: Image.Transpose.ROTATE_180,
    4: Image.Transpose.FLIP_TOP_BOTTOM,
    5: Image.Transpose.TRANSPOSE,
    6: Image.Transpose.ROTATE_270,
    7: Image.Transpose.TRANSVERSE,
    8: Image.Transpose.ROTATE_90,
}


def exif_orientation(image: Image.Image) -> int:
    """The image's EXIF orientation (1 to 8), 1 when absent, invalid or unreadable."""
    try:
        value = image.getexif().get(ORIENTATION_TAG, 1)
    except Exception:  # noqa: BLE001 - a broken EXIF block never makes an image unusable
        return 1
    return value if value in _TRANSPOSE else 1


def swaps_axes(orientation: int) -> bool:
    """Whether the displayed image has width and height exchanged (orientations 5 to 8)."""
    return orientation in (5, 6, 7, 8)


def oriented_size(size: tuple[int, int], orientation: int) -> tuple[int, int]:
    """(width, height) as displayed, from the stored (width, height)."""
    return (size[1], size[0]) if swaps_axes(orientation) else size


def apply_orientation(image: Image.Image, orientation: int) -> Image.Image:
    """The image turned upright (the same object when ``orientation`` is 1)."""
    transpose = _TRANSPOSE.get(orientation)
    return image if transpose is None else image.transpose(transpose)
