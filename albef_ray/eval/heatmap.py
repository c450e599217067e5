"""Draw Grad-CAM maps over an image: the whole expression, then a strip with one panel per word.

The figure follows the paper's Fig. 5 / 6: the image, its heat map for the whole text, and one
map per word. A map (G, G) is min-max scaled to [0, 1], upsampled bicubically to the image's
size (the evaluation transform resizes the whole image to R x R without cropping, so the patch
grid covers the whole picture) and blended over the image with matplotlib's ``jet`` colours.
matplotlib's object API is used (no pyplot), so no global backend or figure state changes.
"""

from __future__ import annotations

import math
import textwrap
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image


def upsample(cam: torch.Tensor, height: int, width: int) -> np.ndarray:
    """A (G, G) map -> (height, width) float32 in [0, 1] (min-max scaled, bicubic)."""
    cam = cam.detach().float().cpu()
    cam = cam - cam.min()
    if cam.max() > 0:
        cam = cam / cam.max()
    big = F.interpolate(cam[None, None], size=(height, width), mode="bicubic", align_corners=False)[0, 0]
    return big.clamp(0, 1).numpy()


def overlay(image: np.ndarray, cam: torch.Tensor, strength: float = 0.7) -> np.ndarray:
    """Blend a heat map over an image.

    Args:
        image: (H, W, 3) float in [0, 1].
        cam: (G, G) map, any scale.
        strength: opacity of the colours where the map is highest.

    Returns:
        (H, W, 3) float in [0, 1]; hot regions take the colour map's colour, cold ones keep the image.
    """
    from matplotlib import colormaps

    heat = upsample(cam, *image.shape[:2])  # (H, W)
    colours = colormaps["jet"](heat)[..., :3]  # (H, W, 3)
    alpha = strength * np.sqrt(heat)[..., None]  # cold areas stay visible
    return (1 - alpha) * image + alpha * colours


def _display_image(image: Image.Image, max_side: int) -> np.ndarray:
    image = image.convert("RGB")
    scale = max_side / max(image.size)
    if scale < 1:
        image = image.resize((max(1, round(image.width * scale)), max(1, round(image.height * scale))), Image.BICUBIC)
    return np.asarray(image, dtype=np.float32) / 255


def save_heatmaps(
    path: str | Path,
    image: Image.Image,
    expression: torch.Tensor,
    words: Sequence[tuple[str, torch.Tensor]] = (),
    title: str = "",
    max_side: int = 384,
    max_per_row: int = 8,
) -> Path:
    """Write the figure as a PNG: image | whole-expression map, then one panel per word.

    Args:
        path: output file (``.png``); parent folders are created.
        image: the original image (any mode, any size).
        expression: (G, G) map of the whole text.
        words: ``[(word, (G, G) map), ...]`` for the strip (ALBEF_itm); empty: no strip.
        title: caption above the figure (e.g. the text and its score).
        max_side: the image is drawn at most this many pixels on its longer side.
        max_per_row: word panels per strip row; longer texts wrap onto more rows.

    Returns:
        ``path`` as a :class:`~pathlib.Path`.
    """
    from matplotlib.figure import Figure

    rgb = _display_image(image, max_side)
    per_row = max(2, min(len(words), max_per_row))
    strip_rows = math.ceil(len(words) / per_row)
    panel = 2.0  # inches per strip panel; the top pair is twice as tall
    width = max(panel * per_row, 6.0)
    fig = Figure(figsize=(width, panel * (2 + strip_rows) + 0.6), layout="constrained")
    grid = fig.add_gridspec(1 + strip_rows, per_row, height_ratios=[2] + [1] * strip_rows)
    pair = grid[0, :].subgridspec(1, 2)  # image | whole expression, equal halves
    top = [fig.add_subplot(pair[0, 0]), fig.add_subplot(pair[0, 1])]
    for ax, picture, label in zip(top, (rgb, overlay(rgb, expression)), ("image", "whole expression")):
        ax.imshow(picture)
        ax.set_xlabel(label)
    for i, (word, cam) in enumerate(words):
        ax = fig.add_subplot(grid[1 + i // per_row, i % per_row])
        ax.imshow(overlay(rgb, cam))
        ax.set_xlabel(word)
        top.append(ax)
    for ax in top:
        ax.set_xticks([])
        ax.set_yticks([])
    if title:
        fig.suptitle(textwrap.fill(title, width=int(width * 11)))  # ~11 characters per inch
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, format="png", dpi=100)
    return path
