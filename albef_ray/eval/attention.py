"""Read one layer's attention probabilities (and their gradients) out of an ALBEF, temporarily.

Every attention in the model runs on ``scaled_dot_product_attention``, which never forms the
(B, h, Q, L) probability map that Grad-CAM needs. The context managers here switch a single
layer onto an explicit ``softmax(Q K^T / sqrt(d)) V`` path for the duration of a ``with``
block and put everything back on exit; the model's own code is untouched and its other
layers keep SDPA. The explicit path computes the same function (tests check the outputs)::

    with capture_cross_attention(model, layer=2) as record:   # fusion layer index 2
        logits = model.itm_logits(model.fuse(text_hidden, mask, image_tokens))
    grad, = torch.autograd.grad(logits[:, 1].sum(), record.attn)   # or .backward(); record.attn.grad

* :func:`capture_cross_attention`: a fusion layer's cross-attention, text queries over image
  tokens, ``record.attn`` (B, h, T, 1 + N).
* :func:`capture_image_attention`: a ViT block's self-attention, ``record.attn`` (B, h, 1 + N, 1 + N).

The probabilities are recorded before attention dropout (which is off in eval mode anyway), as
the official code saves them.
"""

from __future__ import annotations

import contextlib
import math
import types
from collections.abc import Iterator
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from ..model.albef import ALBEF
from ..model.text import CrossAttention, _merge_heads, _split_heads


@dataclass
class AttentionRecord:
    """The attention probabilities of the captured layer's latest forward.

    Attributes:
        attn: (B, h, Q, L) softmax probabilities, ``None`` before the first forward. Under
            grad mode it is part of the graph with ``retain_grad()``, so after ``backward()``
            ``attn.grad`` holds d(output)/d(attn); ``torch.autograd.grad(out, attn)`` works too.
        calls: forwards seen inside the block (one per model call).
    """

    attn: torch.Tensor | None = None
    calls: int = 0

    def keep(self, attn: torch.Tensor) -> torch.Tensor:
        """Record ``attn`` and return the tensor the layer must continue with."""
        if torch.is_grad_enabled():
            if attn.requires_grad:
                attn.retain_grad()
            else:
                # Nothing upstream needs a gradient (frozen weights, no_grad inputs): start the
                # graph here, so d(output)/d(attn) still exists; no upstream gradient is lost.
                attn = attn.detach().requires_grad_()
        self.attn = attn
        self.calls += 1
        return attn


def _check_index(layer: int, count: int, what: str) -> int:
    if not -count <= layer < count:
        raise ValueError(f"layer index {layer}: {what} has {count} layers (0..{count - 1}, or negative from the end)")
    return layer % count


def _explicit_cross_attention(record: AttentionRecord):
    """CrossAttention.forward with the probabilities formed explicitly and recorded."""

    def forward(self: CrossAttention, x, context, context_index, context_mask=None):
        kv = self.kv(context)  # (M, L, 2C)
        if context_index is not None:
            kv = kv.index_select(0, context_index)  # (B, L, 2C)
            context_mask = None if context_mask is None else context_mask.index_select(0, context_index)
        k, v = (_split_heads(t, self.heads) for t in kv.chunk(2, dim=-1))  # (B, h, L, d)
        q = _split_heads(self.q(x), self.heads)  # (B, h, T, d)
        scores = q @ k.transpose(-2, -1) / math.sqrt(q.shape[-1])  # (B, h, T, L)
        if context_mask is not None:  # a text context's padding (the VQA decoder); image tokens have none
            scores = scores.masked_fill(~context_mask.bool()[:, None, None, :], float("-inf"))
        attn = record.keep(scores.softmax(dim=-1))
        p = self.dropout if self.training else 0.0
        y = F.dropout(attn, p, self.training) @ v  # (B, h, T, d)
        return self.norm(x + F.dropout(self.out(_merge_heads(y)), p, self.training))

    return forward


def _explicit_vit_attention(record: AttentionRecord):
    """timm ``Attention.forward`` (as used by ALBEF's ViT: no mask) with recorded probabilities."""

    def forward(self, x, attn_mask=None, is_causal=False):
        if attn_mask is not None or is_causal:
            raise NotImplementedError("attention capture supports the unmasked ViT of ALBEF only")
        b, n, _ = x.shape
        gate = self.gate(x).sigmoid() if getattr(self, "gate", None) is not None else None
        qkv = self.qkv(x).reshape(b, n, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)  # (B, h, N+1, d) each
        q, k = self.q_norm(q), self.k_norm(k)
        attn = record.keep(((q * self.scale) @ k.transpose(-2, -1)).softmax(dim=-1))  # (B, h, N+1, N+1)
        y = (self.attn_drop(attn) @ v).transpose(1, 2).reshape(b, n, -1)  # (B, N+1, h*d)
        y = getattr(self, "norm", nn.Identity())(y)
        if gate is not None:
            y = y * gate
        return self.proj_drop(self.proj(y))

    return forward


@contextlib.contextmanager
def _swapped_forward(module: nn.Module, forward) -> Iterator[None]:
    if "forward" in vars(module):
        raise RuntimeError(f"{type(module).__name__} already has a patched forward (nested capture of one layer?)")
    module.forward = types.MethodType(forward, module)
    try:
        yield
    finally:
        del module.forward  # the class's forward (SDPA) again


@contextlib.contextmanager
def capture_cross_attention(model: ALBEF, layer: int = 2) -> Iterator[AttentionRecord]:
    """Record the cross-attention probabilities of fusion layer ``layer`` inside the block.

    Args:
        model: the ALBEF (not a DDP wrapper or task).
        layer: index into ``model.fusion.layers``; 2 is the paper's Grad-CAM layer (the 3rd
            fusion layer, ``encoder.layer[8]`` of the official 6 + 6 BERT).

    Yields:
        An :class:`AttentionRecord`; ``record.attn`` is (B, h, T, 1 + N) after a fusion call.
    """
    layers = model.fusion.layers
    cross = layers[_check_index(layer, len(layers), "the fusion encoder")].cross_attn
    record = AttentionRecord()
    with _swapped_forward(cross, _explicit_cross_attention(record)):
        yield record


@contextlib.contextmanager
def capture_image_attention(model: ALBEF, layer: int = -1) -> Iterator[AttentionRecord]:
    """Record the self-attention probabilities of ViT block ``layer`` (default: the last).

    Yields:
        An :class:`AttentionRecord`; ``record.attn`` is (B, h, 1 + N, 1 + N) after
        ``model.encode_image``; row 0 is the [CLS] token's attention.
    """
    blocks = model.vision.vit.blocks
    attn = blocks[_check_index(layer, len(blocks), "the image encoder")].attn
    record = AttentionRecord()
    with _swapped_forward(attn, _explicit_vit_attention(record)):
        yield record
