"""Text and fusion encoders: BERT layers as plain PyTorch on ``scaled_dot_product_attention``.

ALBEF splits BERT-base in two: the first ``text_layers`` layers encode the caption alone
(self-attention), the remaining ``fusion_layers`` add cross-attention to the image tokens.
These modules are our own; Hugging Face BERT weights map onto them through
:mod:`albef_ray.model.adapters` (query/key/value are fused into one projection, so the
adapter concatenates them).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .registry import AlbefArch


def _split_heads(x: torch.Tensor, heads: int) -> torch.Tensor:
    b, t, c = x.shape
    return x.view(b, t, heads, c // heads).transpose(1, 2)  # (B, h, T, c/h)


def _merge_heads(x: torch.Tensor) -> torch.Tensor:
    b, h, t, d = x.shape
    return x.transpose(1, 2).reshape(b, t, h * d)  # (B, T, C)


class TextEmbeddings(nn.Module):
    def __init__(self, arch: AlbefArch, dropout: float):
        super().__init__()
        self.word = nn.Embedding(arch.vocab_size, arch.text_width, padding_idx=arch.pad_token_id)
        self.position = nn.Embedding(arch.max_position, arch.text_width)
        self.token_type = nn.Embedding(arch.type_vocab_size, arch.text_width)
        self.norm = nn.LayerNorm(arch.text_width, eps=arch.layer_norm_eps)
        self.dropout = nn.Dropout(dropout)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        t = input_ids.shape[1]
        if t > self.position.num_embeddings:
            raise ValueError(f"text of {t} tokens exceeds max_position {self.position.num_embeddings}")
        pos = torch.arange(t, device=input_ids.device)
        # BERT adds the segment-A token-type row to every token (token_type_ids = 0).
        x = self.word(input_ids) + self.position(pos)[None] + self.token_type.weight[0]
        return self.dropout(self.norm(x))  # (B, T, C)


class SelfAttention(nn.Module):
    """Post-norm BERT self-attention block: ``norm(x + out(attn(x)))``."""

    def __init__(self, width: int, heads: int, eps: float, dropout: float):
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(width, 3 * width)
        self.out = nn.Linear(width, width)
        self.norm = nn.LayerNorm(width, eps=eps)
        self.dropout = dropout

    def forward(self, x: torch.Tensor, key_mask: torch.Tensor | None) -> torch.Tensor:
        q, k, v = (_split_heads(t, self.heads) for t in self.qkv(x).chunk(3, dim=-1))
        p = self.dropout if self.training else 0.0
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=key_mask, dropout_p=p)
        return self.norm(x + F.dropout(self.out(_merge_heads(y)), p, self.training))


class CrossAttention(nn.Module):
    """Text queries attend to image tokens; key/value come from the image width."""

    def __init__(self, width: int, context_width: int, heads: int, eps: float, dropout: float):
        super().__init__()
        self.heads = heads
        self.q = nn.Linear(width, width)
        self.kv = nn.Linear(context_width, 2 * width)
        self.out = nn.Linear(width, width)
        self.norm = nn.LayerNorm(width, eps=eps)
        self.dropout = dropout

    def forward(
        self,
        x: torch.Tensor,
        context: torch.Tensor,
        context_index: torch.Tensor | None,
        context_mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """``context_mask`` (M, L) 1/0: padding of a text context (the VQA decoder attends to the
        question's fused states); None: every context token is valid (image tokens)."""
        # Key/value are projected once per distinct image and gathered per text row, so the
        # ITM positive/negative and MLM passes share one projection of each image (exact).
        kv = self.kv(context)  # (M, L, 2C)
        mask = None if context_mask is None else _key_mask(context_mask)  # (M, 1, 1, L)
        if context_index is not None:
            kv = kv.index_select(0, context_index)  # (B, L, 2C)
            mask = None if mask is None else mask.index_select(0, context_index)  # (B, 1, 1, L)
        k, v = (_split_heads(t, self.heads) for t in kv.chunk(2, dim=-1))
        q = _split_heads(self.q(x), self.heads)
        p = self.dropout if self.training else 0.0
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=p)
        return self.norm(x + F.dropout(self.out(_merge_heads(y)), p, self.training))


class FeedForward(nn.Module):
    def __init__(self, width: int, hidden: int, eps: float, dropout: float):
        super().__init__()
        self.fc1 = nn.Linear(width, hidden)
        self.fc2 = nn.Linear(hidden, width)
        self.norm = nn.LayerNorm(width, eps=eps)
        self.dropout = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.norm(x + self.dropout(self.fc2(F.gelu(self.fc1(x)))))  # exact (erf) GELU, as BERT


class BertLayer(nn.Module):
    """Self-attention, optional cross-attention (to image tokens unless ``context_width`` says
    otherwise: the VQA decoder's context is text states), feed-forward. A ``key_mask`` of shape
    (B, 1, T, T) instead of (B, 1, 1, T) gives causal self-attention (see :func:`causal_key_mask`)."""

    def __init__(self, arch: AlbefArch, dropout: float, cross: bool, context_width: int | None = None):
        super().__init__()
        c, eps = arch.text_width, arch.layer_norm_eps
        width = arch.vision_width if context_width is None else context_width
        self.self_attn = SelfAttention(c, arch.text_heads, eps, dropout)
        self.cross_attn = CrossAttention(c, width, arch.text_heads, eps, dropout) if cross else None
        self.ffn = FeedForward(c, arch.text_intermediate, eps, dropout)

    def forward(self, x, key_mask, context=None, context_index=None, context_mask=None):
        x = self.self_attn(x, key_mask)
        if self.cross_attn is not None:
            x = self.cross_attn(x, context, context_index, context_mask)
        return self.ffn(x)


def _key_mask(attention_mask: torch.Tensor) -> torch.Tensor:
    """(B, T) 1/0 padding mask -> (B, 1, 1, T) boolean "may attend" mask for SDPA."""
    return attention_mask.bool()[:, None, None, :]


def causal_key_mask(attention_mask: torch.Tensor) -> torch.Tensor:
    """(B, T) 1/0 padding mask -> (B, 1, T, T): token t may attend to valid tokens <= t.

    A decoder's self-attention mask (BERT's ``is_decoder``: causal AND padding). A row whose
    first token is padding would attend to nothing; callers pass sequences starting with [CLS].
    """
    t = attention_mask.shape[1]
    causal = torch.ones(t, t, dtype=torch.bool, device=attention_mask.device).tril()  # (T, T)
    return causal[None, None] & _key_mask(attention_mask)  # (B, 1, T, T)


class TextEncoder(nn.Module):
    """Embeddings + the first ``text_layers`` BERT layers: caption -> (B, T, C)."""

    def __init__(self, arch: AlbefArch, dropout: float = 0.1):
        super().__init__()
        self.embeddings = TextEmbeddings(arch, dropout)
        self.layers = nn.ModuleList(BertLayer(arch, dropout, cross=False) for _ in range(arch.text_layers))

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        x = self.embeddings(input_ids)
        mask = _key_mask(attention_mask)
        for layer in self.layers:
            x = layer(x, mask)
        return x


class FusionEncoder(nn.Module):
    """The last ``fusion_layers`` BERT layers with cross-attention to image tokens."""

    def __init__(self, arch: AlbefArch, dropout: float = 0.1):
        super().__init__()
        self.layers = nn.ModuleList(BertLayer(arch, dropout, cross=True) for _ in range(arch.fusion_layers))

    def forward(
        self,
        text: torch.Tensor,
        attention_mask: torch.Tensor,
        image: torch.Tensor,
        image_index: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Fuse text (B, T, C) with image tokens (M, L, Dv).

        Args:
            text: text-encoder output (B, T, C).
            attention_mask: (B, T) padding mask of the text.
            image: image tokens (M, L, Dv); M == B unless ``image_index`` is given.
            image_index: (B,) row of ``image`` that each text attends to.

        Returns:
            Multimodal hidden states (B, T, C).
        """
        mask = _key_mask(attention_mask)
        x = text
        for layer in self.layers:
            x = layer(x, mask, image, image_index)
        return x


class MLMHead(nn.Module):
    """BERT's prediction head; its decoder is the word-embedding matrix, passed in (tied)."""

    def __init__(self, arch: AlbefArch):
        super().__init__()
        self.dense = nn.Linear(arch.text_width, arch.text_width)
        self.norm = nn.LayerNorm(arch.text_width, eps=arch.layer_norm_eps)
        self.bias = nn.Parameter(torch.zeros(arch.vocab_size))

    def forward(self, x: torch.Tensor, word_weight: torch.Tensor) -> torch.Tensor:
        """(..., C) hidden states and the (vocab, C) word embeddings -> (..., vocab) logits."""
        x = self.norm(F.gelu(self.dense(x)))
        return F.linear(x, word_weight, self.bias)


def init_bert_weights(module: nn.Module, std: float = 0.02) -> None:
    """BERT's initialisation (normal 0.02, zero bias, unit LayerNorm) for fresh layers."""
    for m in module.modules():
        if isinstance(m, (nn.Linear, nn.Embedding)):
            nn.init.normal_(m.weight, std=std)
            if isinstance(m, nn.Linear) and m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.LayerNorm):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)
