"""ALBEF: image encoder, text encoder, fusion encoder and heads. Returns features, never losses.

Shapes: B batch, N+1 image tokens of width Dv, T text tokens of width C, E projection width.
"""

from __future__ import annotations

import contextlib

import torch
import torch.nn.functional as F
from torch import nn

from .registry import AlbefArch, get_arch
from .text import FusionEncoder, MLMHead, TextEncoder, init_bert_weights
from .vision import ImageEncoder


def full_precision(t: torch.Tensor) -> contextlib.AbstractContextManager:
    """Autocast off for ``t``'s device: the block runs in the dtype of its (fp32) inputs.

    ITC logits reach 1 / temp (~14 at 0.07), where bf16 resolves 0.0625, over a softmax of
    B + 65,536 columns; similarities, their targets and the projected features are fp32.
    """
    return torch.autocast(device_type=t.device.type, enabled=False)


def _project(proj: nn.Linear, cls_token: torch.Tensor) -> torch.Tensor:
    with full_precision(cls_token):  # (B, D) -> (B, E) in the weights' dtype, normalised in fp32
        return F.normalize(proj(cls_token.to(proj.weight.dtype)).float(), dim=-1)


class ALBEF(nn.Module):
    """The ALBEF network (Li et al. 2021, Fig. 1) with paper-default widths from ``arch``."""

    def __init__(
        self,
        arch: AlbefArch,
        embed_dim: int = 256,
        temp: float = 0.07,
        text_dropout: float = 0.1,
        drop_path: float = 0.0,
    ):
        super().__init__()
        self.arch = arch
        self.vision = ImageEncoder(arch, drop_path)
        self.text = TextEncoder(arch, text_dropout)
        self.fusion = FusionEncoder(arch, text_dropout)
        self.mlm_head = MLMHead(arch)
        init_bert_weights(self.text)
        init_bert_weights(self.fusion)
        init_bert_weights(self.mlm_head)
        self.vision_proj = nn.Linear(arch.vision_width, embed_dim)
        self.text_proj = nn.Linear(arch.text_width, embed_dim)
        self.itm_head = nn.Linear(arch.text_width, 2)
        self.temp = nn.Parameter(torch.tensor(float(temp)))

    # -- unimodal ---------------------------------------------------------------------------
    def encode_image(self, image: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) -> image tokens (B, 1+N, Dv)."""
        return self.vision(image)

    def encode_text(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """(B, T) ids and padding mask -> text hidden states (B, T, C)."""
        return self.text(input_ids, attention_mask)

    def image_features(self, image_tokens: torch.Tensor) -> torch.Tensor:
        """[CLS] token -> L2-normalised ITC feature (B, E), fp32 even under autocast."""
        return _project(self.vision_proj, image_tokens[:, 0])

    def text_features(self, text_hidden: torch.Tensor) -> torch.Tensor:
        """[CLS] token -> L2-normalised ITC feature (B, E), fp32 even under autocast."""
        return _project(self.text_proj, text_hidden[:, 0])

    # -- multimodal -------------------------------------------------------------------------
    def fuse(
        self,
        text_hidden: torch.Tensor,
        attention_mask: torch.Tensor,
        image_tokens: torch.Tensor,
        image_index: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Fusion encoder: text (B, T, C) x image tokens (M, L, Dv) -> (B, T, C)."""
        return self.fusion(text_hidden, attention_mask, image_tokens, image_index)

    def itm_logits(self, fused: torch.Tensor) -> torch.Tensor:
        """Multimodal [CLS] -> (B, 2) logits: index 1 = "matched"."""
        return self.itm_head(fused[:, 0])

    def mlm_logits(self, fused: torch.Tensor) -> torch.Tensor:
        """(..., C) multimodal states -> (..., vocab) logits; decoder tied to word embeddings."""
        return self.mlm_head(fused, self.text.embeddings.word.weight)

    def forward(self, image: torch.Tensor, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> dict:
        """Unimodal features of a batch (used by retrieval and by the objectives)."""
        image_tokens = self.encode_image(image)
        text_hidden = self.encode_text(input_ids, attention_mask)
        return {
            "image_tokens": image_tokens,
            "text_hidden": text_hidden,
            "image_feat": self.image_features(image_tokens),
            "text_feat": self.text_features(text_hidden),
        }


def build_model(size: str, image_res: int | None = None, **kwargs) -> ALBEF:
    """An ALBEF of a registered size (see :mod:`albef_ray.model.registry`)."""
    return ALBEF(get_arch(size, image_res), **kwargs)
