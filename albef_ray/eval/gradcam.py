"""Grad-CAM on attention maps, the two variants of the ALBEF paper (Sec. 6.3, Fig. 5 and 6).

Grad-CAM here weights an attention map by the positive part of its gradient and averages over
heads (the official ``Grounding.py`` and visualisation notebook)::

    cam[b, q, n] = mean_h( attn[b, h, q, 1 + n] * max(0, d score / d attn[b, h, q, 1 + n]) )

over the N image patches (the [CLS] image token, column 0, is dropped), reshaped to the
G x G patch grid.

* **ALBEF_itm** (:func:`itm_gradcam`): the cross-attention of a fusion layer (the 3rd by
  default: index 2 of ``model.fusion.layers``, ``encoder.layer[8]`` in the official 6 + 6
  BERT), ``score`` = the ITM "match" logit. One map per text token (query row q), and the
  whole expression's map is their mean over the caption's tokens ([CLS] included, padding not).
* **ALBEF_itc** (:func:`itc_gradcam`): the self-attention of the ViT's last block, [CLS] row
  over the patches, ``score`` = the image-text similarity s = g_v(v_cls)^T g_w(w_cls) / temp.

Gradients are taken with ``torch.autograd.grad`` with respect to the attention only, so no
parameter ``.grad`` is written; the model may be in eval mode and need not require grad.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from ..model.albef import ALBEF
from ..precision import autocast_context
from .attention import capture_cross_attention, capture_image_attention

ITM_LAYER = 2  # index into model.fusion.layers: the paper's 3rd fusion layer
ITC_LAYER = -1  # index into the ViT blocks: the last one
SPECIAL_TOKENS = ("[CLS]", "[SEP]", "[PAD]")


def default_layer(model: ALBEF, variant: str) -> int:
    """The paper's layer of ``variant``: fusion index 2 for itm, the last ViT block (-1) for itc.

    A fusion encoder of fewer than 4 layers (the tiny test sizes) gets its last-but-one layer
    instead: in the last one only the [CLS] query reaches the ITM head, so every word's map
    would be zero there.
    """
    if variant == "itm":
        return min(ITM_LAYER, max(0, len(model.fusion.layers) - 2))
    if variant == "itc":
        return ITC_LAYER
    raise ValueError(f"variant {variant!r}: expected 'itm' or 'itc'")


@dataclass
class GradCam:
    """Heat maps of one Grad-CAM call.

    Attributes:
        expression: (B, G, G) the whole text's map.
        tokens: (B, T, G, G) one map per text token (ALBEF_itm only; zero on padding), or None.
        score: (B,) the maximised score: the ITM match logit or the ITC similarity / temp.
    """

    expression: torch.Tensor
    tokens: torch.Tensor | None
    score: torch.Tensor


def attention_gradcam(attn: torch.Tensor, grad: torch.Tensor) -> torch.Tensor:
    """Gradient-weighted attention on the patch grid.

    Args:
        attn: (B, h, Q, 1 + N) attention probabilities; key 0 is the image [CLS] token.
        grad: (B, h, Q, 1 + N) gradient of the score with respect to ``attn``.

    Returns:
        (B, Q, G, G) float32 with G * G = N: ``mean_h(attn * grad.clamp(min=0))`` over the patches.
    """
    cam = (attn.float() * grad.float().clamp(min=0)).mean(dim=1)[..., 1:]  # (B, Q, N)
    grid = math.isqrt(cam.shape[-1])
    if grid * grid != cam.shape[-1]:
        raise ValueError(f"{cam.shape[-1]} patch tokens do not form a square grid")
    return cam.reshape(*cam.shape[:2], grid, grid)


def itm_gradcam(
    model: ALBEF,
    image: torch.Tensor,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    layer: int = ITM_LAYER,
    image_index: torch.Tensor | None = None,
    precision: str = "fp32",
) -> GradCam:
    """ALBEF_itm: Grad-CAM of the ITM match logit on a fusion layer's cross-attention.

    Args:
        model: the ALBEF, best in eval mode (dropout off).
        image: (M, 3, R, R) normalised images.
        input_ids: (B, T) caption ids; attention_mask: (B, T) its padding mask.
        layer: index into ``model.fusion.layers`` (default 2, the paper's 3rd fusion layer).
        image_index: (B,) image row of each caption; default: caption b pairs with image b.
        precision: ``"fp32"`` or ``"bf16"`` (autocast, as :func:`albef_ray.precision.autocast_context`).

    Returns:
        :class:`GradCam` with per-token maps (B, T, G, G) and the expression's (B, G, G).
    """
    with torch.enable_grad(), capture_cross_attention(model, layer) as record:
        with autocast_context(precision, image.device):
            image_tokens = model.encode_image(image)  # (M, 1+N, Dv)
            text_hidden = model.encode_text(input_ids, attention_mask)  # (B, T, C)
            fused = model.fuse(text_hidden, attention_mask, image_tokens, image_index)  # (B, T, C)
        score = model.itm_logits(fused.float())[:, 1]  # (B,) match logit, head in fp32
        (grad,) = torch.autograd.grad(score.sum(), record.attn)  # rows are independent: per-pair gradients
    mask = attention_mask.to(torch.float32)[:, :, None, None]  # (B, T, 1, 1)
    tokens = attention_gradcam(record.attn.detach(), grad) * mask  # (B, T, G, G)
    expression = tokens.sum(dim=1) / mask.sum(dim=1).clamp(min=1)
    return GradCam(expression=expression, tokens=tokens, score=score.detach())


def itc_gradcam(
    model: ALBEF,
    image: torch.Tensor,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    layer: int = ITC_LAYER,
    precision: str = "fp32",
) -> GradCam:
    """ALBEF_itc: Grad-CAM of the paired ITC similarity on a ViT block's [CLS] self-attention.

    Args:
        model: the ALBEF, best in eval mode.
        image: (B, 3, R, R) normalised images, paired with the B captions.
        input_ids: (B, T) caption ids; attention_mask: (B, T) its padding mask.
        layer: index into the ViT blocks (default -1, the last, as in the paper).
        precision: ``"fp32"`` or ``"bf16"``.

    Returns:
        :class:`GradCam` with the expression's map (B, G, G); ``tokens`` is None.
    """
    with torch.enable_grad(), capture_image_attention(model, layer) as record:
        with autocast_context(precision, image.device):
            image_tokens = model.encode_image(image)  # (B, 1+N, Dv)
            text_hidden = model.encode_text(input_ids, attention_mask)  # (B, T, C)
        image_feat = model.image_features(image_tokens)  # (B, E), fp32
        text_feat = model.text_features(text_hidden)
        score = (image_feat * text_feat).sum(dim=-1) / model.temp.float()  # (B,) the diagonal of sim
        (grad,) = torch.autograd.grad(score.sum(), record.attn)
    cls_row = slice(0, 1)  # the [CLS] query's attention over all keys
    cam = attention_gradcam(record.attn.detach()[:, :, cls_row], grad[:, :, cls_row])  # (B, 1, G, G)
    return GradCam(expression=cam[:, 0], tokens=None, score=score.detach())


def word_maps(
    tokens: Sequence[str], maps: torch.Tensor, skip: Sequence[str] = SPECIAL_TOKENS
) -> list[tuple[str, torch.Tensor]]:
    """Merge WordPiece tokens into words, each with the mean map of its pieces.

    Args:
        tokens: the caption's T tokens (``tokenizer.convert_ids_to_tokens``); ``##`` marks a
            continuation piece.
        maps: (T, G, G) per-token maps of that caption.
        skip: tokens left out ([CLS], [SEP], [PAD]).

    Returns:
        ``[(word, (G, G) map), ...]`` in reading order.
    """
    words: list[str] = []
    pieces: list[list[torch.Tensor]] = []
    for token, cam in zip(tokens, maps):
        if token in skip:
            continue
        if token.startswith("##") and words:
            words[-1] += token[2:]
            pieces[-1].append(cam)
        else:
            words.append(token)
            pieces.append([cam])
    return [(word, torch.stack(cams).mean(dim=0)) for word, cams in zip(words, pieces)]
