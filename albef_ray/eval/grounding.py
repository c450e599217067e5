"""Weakly-supervised grounding: rank proposal boxes by a Grad-CAM heat map (ALBEF Sec. 5.5).

The procedure of the official ``Grounding.py`` (``val``) and ``grounding_eval``, per referring
expression:

1. The Grad-CAM map of the expression over its image, G x G patches
   (:mod:`albef_ray.eval.gradcam`): ALBEF_itm (a fusion layer's cross-attention, ITM match
   logit; the official mean over heads and tokens) or ALBEF_itc (the ViT's last [CLS]
   self-attention, ITC similarity). The image goes in as the evaluation transform resizes it
   (whole image to R x R, no crop), so the patch grid covers the whole picture.
2. The map is upsampled bicubically to the image's own height x width, not rescaled.
3. Each proposal box ``[x, y, w, h]`` (image pixels) scores the map's sum over the pixels
   ``[int(y) : int(y + h), int(x) : int(x + w)]`` divided by ``(w * h) ** alpha``
   (``grounding.box_alpha``, official 0.5: between the mean, which favours tiny boxes on a
   peak, and the sum, which favours big ones).
4. The best-scoring proposal is the prediction; it is correct at IoU >= 0.5 with the referred
   object's box (:func:`box_iou`, the official ``computeIoU``: inclusive pixel corners).

Accuracy is reported per split (RefCOCO+: val, testA, testB) beside two baselines that read
no image: a random proposal (its expected accuracy, the mean fraction of proposals that would
be correct, exact rather than sampled) and the largest proposal. ``acc_upper`` is the share of
expressions with any correct proposal, the ceiling a perfect ranking reaches.

Deviations from the official code, none of which changes a ranking it makes: ties and a map
that is nowhere positive pick the first best proposal (the official loop starts at score 0
and would keep the previous expression's box); box corners are clipped to the image (a
negative start would wrap around in a Python slice); a zero-area box never wins.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from ..config import AlbefConfig, ConfigError
from ..model.albef import ALBEF
from .gradcam import default_layer, itc_gradcam, itm_gradcam
from .retrieval import as_albef

log = logging.getLogger(__name__)
BASELINES = ("random", "largest")


# ----------------------------------------------------------------------------- box math


def upsample_map(cam: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """A (G, G) heat map -> (height, width) float32, bicubic (official: no rescaling)."""
    return F.interpolate(cam.detach().float().cpu()[None, None], size=(height, width), mode="bicubic",
                         align_corners=False)[0, 0]


def box_scores(heat: torch.Tensor, boxes: torch.Tensor, alpha: float = 0.5) -> torch.Tensor:
    """Each box's score: ``heat`` summed inside it / ``(w * h) ** alpha``.

    Args:
        heat: (H, W) map on the image's pixels.
        boxes: (K, 4) ``[x, y, w, h]`` in pixels; a box covers rows ``int(y) : int(y + h)``
            and columns ``int(x) : int(x + w)`` (the official slice), clipped to the image.
        alpha: area exponent (0: sum, 1: mean).

    Returns:
        (K,) float64; ``-inf`` for a box of zero area.
    """
    h, w = heat.shape
    integral = F.pad(heat.double().cumsum(0).cumsum(1), (1, 0, 1, 0))  # (H+1, W+1): sums of [0:i, 0:j]
    b = boxes.double()
    x0, y0 = b[:, 0].trunc().long().clamp(0, w), b[:, 1].trunc().long().clamp(0, h)
    x1, y1 = (b[:, 0] + b[:, 2]).trunc().long().clamp(0, w), (b[:, 1] + b[:, 3]).trunc().long().clamp(0, h)
    x1, y1 = torch.maximum(x1, x0), torch.maximum(y1, y0)  # an inverted box holds nothing
    inside = integral[y1, x1] - integral[y0, x1] - integral[y1, x0] + integral[y0, x0]  # (K,)
    area = b[:, 2] * b[:, 3]
    score = inside / area.clamp(min=1e-12) ** alpha
    return torch.where(area > 0, score, torch.full_like(score, -math.inf))


def box_iou(a: Sequence[float], b: Sequence[float]) -> float:
    """IoU of two ``[x, y, w, h]`` boxes, the official ``computeIoU``.

    Corners are inclusive pixels (``x + w - 1`` is the last column), and boxes that only
    touch or overlap by less than one pixel in either direction do not intersect.
    """
    ix0, iy0 = max(a[0], b[0]), max(a[1], b[1])
    ix1, iy1 = min(a[0] + a[2] - 1, b[0] + b[2] - 1), min(a[1] + a[3] - 1, b[1] + b[3] - 1)
    inter = (ix1 - ix0 + 1) * (iy1 - iy0 + 1) if ix0 < ix1 and iy0 < iy1 else 0.0
    union = a[2] * a[3] + b[2] * b[3] - inter
    return float(inter) / union if union > 0 else 0.0


def pick_box(cam: torch.Tensor, proposals: torch.Tensor, height: int, width: int, alpha: float = 0.5) -> int:
    """Index of the proposal the (G, G) map ranks first (the first of equal best scores)."""
    return int(torch.argmax(box_scores(upsample_map(cam, height, width), proposals, alpha)))


def largest_box(proposals: torch.Tensor) -> int:
    """Index of the proposal of largest area (the first of equal ones)."""
    return int(torch.argmax(proposals[:, 2].double() * proposals[:, 3].double()))


# ----------------------------------------------------------------------------- heat maps


def grounding_maps(
    model: ALBEF, tensors: dict[str, torch.Tensor], variants: Sequence[str], cfg: AlbefConfig,
    device: torch.device, precision: str = "fp32",
) -> dict[str, torch.Tensor]:
    """Each variant's Grad-CAM map of a batch's expressions over their images.

    Returns:
        ``{variant: (B, G, G) float32 on CPU}``.
    """
    image = tensors["image"].to(device)
    ids, mask = tensors["input_ids"].to(device), tensors["attention_mask"].to(device)
    out = {}
    for variant in variants:
        if variant == "itm":
            layer = cfg.grounding.itm_layer if cfg.grounding.itm_layer is not None else default_layer(model, "itm")
            cam = itm_gradcam(model, image, ids, mask, layer, precision=precision)
        elif variant == "itc":
            cam = itc_gradcam(model, image, ids, mask, cfg.grounding.itc_layer, precision=precision)
        else:
            raise ValueError(f"variant {variant!r}: expected 'itm' or 'itc'")
        out[variant] = cam.expression.float().cpu()
    return out


@dataclass
class GroundedExample:
    """One expression's inputs and outcome, kept for drawing.

    Attributes:
        image: the stored image bytes; text: the cleaned expression; ref_id: its id.
        width, height: the image's size (the boxes' frame).
        box: the referred object's ``[x, y, w, h]``; proposals: (K, 4).
        cams: ``{variant: (G, G) map}``; picks: ``{variant: proposal index}``;
        correct: ``{variant: IoU >= threshold}``.
    """

    image: bytes
    text: str
    ref_id: str
    width: int
    height: int
    box: list[float]
    proposals: torch.Tensor
    cams: dict[str, torch.Tensor] = field(default_factory=dict)
    picks: dict[str, int] = field(default_factory=dict)
    correct: dict[str, bool] = field(default_factory=dict)


def _columns(batch, split: str) -> tuple[list, list, list, list, list]:
    cols = batch.columns
    missing = [c for c in ("box", "proposals", "width", "height") if c not in cols]
    if missing:
        raise ConfigError(f"eval.split: rows of {split!r} have no {', '.join(missing)} column: not a grounding dataset")
    refs = cols.get("ref_id") or batch.question_id
    return cols["box"], cols["proposals"], cols["width"], cols["height"], refs


MapsFn = Callable[[ALBEF, dict[str, torch.Tensor]], dict[str, torch.Tensor]]


def evaluate_split(
    model: torch.nn.Module, paths: list[str], split: str, cfg: AlbefConfig, tokenizer,
    device: torch.device | str | None = None, keep: int = 0, log_fn=None, maps_fn: MapsFn | None = None,
) -> tuple[dict[str, float], list[GroundedExample]]:
    """Grounding accuracy of every variant and baseline on one split.

    Args:
        model: an ALBEF, or a task / DDP wrapper holding one; evaluated in eval mode (its
            mode is restored afterwards).
        paths: dataset roots; split: e.g. ``"val"``.
        cfg: ``grounding.*`` (variants, layers, box_alpha, iou_threshold, max_refs),
            ``eval.batch_size``, ``data.*``, ``train.precision``.
        tokenizer: a loaded tokenizer.
        device: default: the model's.
        keep: return the first ``keep`` expressions with their maps and picks (figures).
        maps_fn: ``(albef, batch tensors on the CPU) -> {name: (B, G, G) map}``, the maps
            that rank the boxes; default: :func:`grounding_maps` of ``grounding.variants``.
            Probes of other maps (benchmarks/grounding_maps.py) share the scoring this way.

    Returns:
        ``(metrics, kept)``: ``acc_<name>`` of every map, ``acc_random``, ``acc_largest``,
        ``acc_upper`` (percent), ``grounding_acc`` (``acc`` of ``grounding.score_variant``, NaN
        when ``maps_fn`` makes no map of that name), ``num_refs``, ``no_proposals`` and
        ``eval_seconds``; and the kept :class:`GroundedExample` list.
    """
    from .examples import iter_examples

    albef = as_albef(model)
    device = torch.device(device) if device is not None else next(albef.parameters()).device
    g = cfg.grounding
    precision = cfg.train.precision
    if maps_fn is None:
        def maps_fn(albef: ALBEF, tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
            return grounding_maps(albef, tensors, g.variants, cfg, device, precision)
    hits = {name: 0.0 for name in (*BASELINES, "upper")}
    map_hits: dict[str, float] = {}  # per map name, in the order maps_fn returns them
    total = empty = 0
    kept: list[GroundedExample] = []
    start = time.perf_counter()
    was_training = albef.training
    albef.eval()
    try:
        for batch in iter_examples(paths, split, cfg, tokenizer, max_rows=g.max_refs):
            if not batch.text:
                continue
            boxes, proposals, widths, heights, refs = _columns(batch, split)
            cams = maps_fn(albef, batch.tensors)
            for name in cams:
                map_hits.setdefault(name, 0.0)
            for k, (box, props) in enumerate(zip(boxes, proposals)):
                total += 1
                props = torch.tensor([list(p)[:4] for p in props or []], dtype=torch.float64).reshape(-1, 4)
                if len(props) == 0:
                    empty += 1  # nothing to pick: wrong for every method
                    continue
                correct = torch.tensor([box_iou(p.tolist(), box) >= g.iou_threshold for p in props])
                hits["random"] += float(correct.double().mean())
                hits["largest"] += float(correct[largest_box(props)])
                hits["upper"] += float(correct.any())
                example = None
                if len(kept) < keep:
                    example = GroundedExample(batch.columns["image"][k], batch.text[k], str(refs[k]), int(widths[k]),
                                              int(heights[k]), list(box), props)
                    kept.append(example)
                for variant, maps in cams.items():
                    chosen = pick_box(maps[k], props, int(heights[k]), int(widths[k]), g.box_alpha)
                    map_hits[variant] += float(correct[chosen])
                    if example is not None:
                        example.cams[variant], example.picks[variant] = maps[k], chosen
                        example.correct[variant] = bool(correct[chosen])
    finally:
        albef.train(was_training)
    if total == 0:
        raise ConfigError(f"eval.split: split {split!r} has no decodable expressions")
    hits = {**map_hits, **hits}  # the maps first, as before
    names = [n for n in hits if n != "upper"]
    metrics = {f"acc_{name}": 100.0 * value / total for name, value in hits.items()}
    metrics.update(grounding_acc=metrics.get(f"acc_{g.score_variant}", math.nan), num_refs=float(total),
                   no_proposals=float(empty), eval_seconds=time.perf_counter() - start)
    if log_fn is not None:
        log_fn(f"grounding {split}: {total} expressions in {metrics['eval_seconds']:.1f} s: "
               + ", ".join(f"{n} {metrics[f'acc_{n}']:.2f}" for n in names))
    return metrics, kept


# ----------------------------------------------------------------------------- during and after training


class GroundingEvaluator:
    """Epoch-end grounding accuracy on ``eval.split``; heat-map figures of its first expressions to MLflow.

    Args:
        cfg: ``grounding.*``, ``eval.split`` / ``eval.shards`` (else ``data.shards``), ``data.tokenizer``.
        device: where the model is.
        tracker: an MLflow :class:`~albef_ray.tracking.MetricLogger` (metrics and the
            ``grounding.heatmaps`` PNGs under ``heatmaps/step_<step>/``), or None.
    """

    score = "grounding_acc"

    def __init__(self, cfg: AlbefConfig, device: torch.device | str | None = None, tracker=None):
        self.cfg = cfg
        self.device = device
        self.tracker = tracker
        self._tokenizer = None

    def __call__(self, task: torch.nn.Module, step: int, run: bool = True) -> dict[str, float]:
        """The split's metrics (``grounding_acc`` = NaN when not ``run``), logged at ``step``."""
        if not run:
            return {self.score: math.nan}
        from ..data.collate import load_tokenizer
        from .checkpoint import eval_paths

        cfg = self.cfg
        if self._tokenizer is None:
            self._tokenizer = load_tokenizer(cfg.data.tokenizer)
        keep = cfg.grounding.heatmaps if self.tracker is not None else 0
        metrics, kept = evaluate_split(task, eval_paths(cfg), cfg.eval.split, cfg, self._tokenizer, self.device,
                                       keep=keep, log_fn=log.info)
        if self.tracker is not None:
            self.tracker.log(metrics, step)
            self._log_figures(kept, step)
        return {k: float(v) for k, v in metrics.items()}

    def _log_figures(self, kept: list[GroundedExample], step: int) -> None:
        import tempfile
        from pathlib import Path

        from .grounding_figure import save_grounding_figure

        with tempfile.TemporaryDirectory() as scratch:
            for n, example in enumerate(kept):
                path = save_grounding_figure(Path(scratch) / f"{n:02d}_ref{example.ref_id}.png", example)
                self.tracker.log_artifact(path, f"heatmaps/step_{step:06d}")


def grounding_metrics(cfg: AlbefConfig, checkpoint: str) -> dict[str, float]:
    """A trained checkpoint's grounding accuracies on ``eval.split`` (a sweep stage's report)."""
    from ..data.collate import load_tokenizer
    from ..precision import resolve_device
    from .checkpoint import eval_paths, load_eval_model

    device = resolve_device(cfg)
    model = load_eval_model(cfg, checkpoint).to(device)
    metrics, _ = evaluate_split(model, eval_paths(cfg), cfg.eval.split, cfg, load_tokenizer(cfg.data.tokenizer), device)
    return metrics
