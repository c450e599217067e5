"""Draw one grounded expression: the image with its proposals, then each variant's heat map and pick.

Panels, left to right: the image with every proposal (thin white) and the referred object's box
(green); then per Grad-CAM variant its map blended over the image
(:func:`albef_ray.eval.heatmap.overlay`) with the picked proposal, green when correct (IoU >=
the threshold) and red when not, and the referred box dashed. matplotlib's object API (no
pyplot): no global backend or figure state changes.
"""

from __future__ import annotations

import textwrap
from pathlib import Path

import numpy as np

from ..data.transforms import decode_image
from .heatmap import overlay

TRUE, WRONG, PROPOSAL = "#2ecc40", "#ff4136", "white"


def _rectangle(ax, box, colour: str, width: float = 2.0, style: str = "-") -> None:
    from matplotlib.patches import Rectangle

    x, y, w, h = box[:4]
    # imshow puts pixel centres on integers: pixel column x spans [x - 0.5, x + 0.5).
    ax.add_patch(Rectangle((x - 0.5, y - 0.5), w, h, fill=False, edgecolor=colour, linewidth=width, linestyle=style))


def save_grounding_figure(path: str | Path, example, panel_inches: float = 3.2) -> Path:
    """Write the figure of one :class:`~albef_ray.eval.grounding.GroundedExample` as a PNG.

    Args:
        path: output ``.png``; parent folders are created.
        example: its image bytes, boxes, maps and picks.
        panel_inches: width of one panel.

    Returns:
        ``path`` as a :class:`~pathlib.Path`.
    """
    from matplotlib.figure import Figure

    image = decode_image(example.image)
    if image is None:
        raise ValueError(f"ref {example.ref_id}: the image does not decode")
    rgb = np.asarray(image.convert("RGB"), dtype=np.float32) / 255  # (H, W, 3) at the boxes' scale
    variants = list(example.cams)
    aspect = rgb.shape[0] / rgb.shape[1]
    fig = Figure(figsize=(panel_inches * (1 + len(variants)), panel_inches * aspect + 0.9), layout="constrained")
    axes = fig.subplots(1, 1 + len(variants), squeeze=False)[0]
    axes[0].imshow(rgb)
    for proposal in example.proposals.tolist():
        _rectangle(axes[0], proposal, PROPOSAL, width=1.0)
    _rectangle(axes[0], example.box, TRUE)
    axes[0].set_xlabel(f"{len(example.proposals)} proposals, referred box green")
    for ax, variant in zip(axes[1:], variants):
        ax.imshow(np.clip(overlay(rgb, example.cams[variant]), 0, 1))
        _rectangle(ax, example.box, TRUE, width=1.5, style="--")
        ok = example.correct[variant]
        _rectangle(ax, example.proposals[example.picks[variant]].tolist(), TRUE if ok else WRONG, width=2.5)
        ax.set_xlabel(f"ALBEF_{variant}: {'correct' if ok else 'wrong'} pick")
    for ax in axes:
        ax.set_xticks([])
        ax.set_yticks([])
    fig.suptitle(textwrap.fill(f'"{example.text}"', width=int(panel_inches * (1 + len(variants)) * 11)))
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, format="png", dpi=100)
    return path
