"""Text and fusion encoders: BERT layers as plain PyTorch on ``scaled_dot_product_attention``.

ALBEF splits BERT-base in two: the first ``text_layers`` layers encode the caption alone
(self-attention), the remaining ``fusion_layers`` add cross-attention to the image tokens.
These modules are our own; Hugging Face BERT weights map onto them through
:mod:`albef_ray.model.adapters` (query/key/value are fused into one projection, so the
adapter concatenates them).
"""

from __future__ import annotations

from dataclasses import dataclass, replace

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

    def forward(self, x: torch.Tensor, key_mask: torch.Tensor | None, cls_only: bool = False) -> torch.Tensor:
        """(B, T, C) -> (B, T, C); ``cls_only``: (B, 1, C), the [CLS] row only (its query attends
        to every token's key and value, so it equals row 0 of the full output)."""
        if not cls_only:
            q, k, v = (_split_heads(t, self.heads) for t in self.qkv(x).chunk(3, dim=-1))
        else:
            c = x.shape[-1]
            w_q, w_kv = self.qkv.weight.split([c, 2 * c])
            b_q, b_kv = self.qkv.bias.split([c, 2 * c])
            k, v = (_split_heads(t, self.heads) for t in F.linear(x, w_kv, b_kv).chunk(2, dim=-1))  # (B, h, T, d)
            x = x[:, :1]
            q = _split_heads(F.linear(x, w_q, b_q), self.heads)  # (B, h, 1, d)
            if key_mask is not None and key_mask.shape[-2] > 1:  # causal (B, 1, T, T): row 0
                key_mask = key_mask[..., :1, :]
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
        context: torch.Tensor | None,
        context_index: torch.Tensor | None,
        context_mask: torch.Tensor | None = None,
        *,
        kv: torch.Tensor | None = None,
        groups: QueryGroups | None = None,
    ) -> torch.Tensor:
        """Text (B, T, C) attends to ``context`` (M, L, Cc) -> (B, T, C).

        Args:
            context_index: (B,) context row of each text row; None: row b attends to context b.
            context_mask: (M, L) 1/0 padding of a text context (the VQA decoder attends to the
                question's fused states); None: every context token is valid (image tokens).
            kv: ``self.kv(context)`` (M, L, 2C), computed before (see
                :meth:`FusionEncoder.project_image`); ``context`` is then not read.
            groups: instead of ``context_index``: the rows sharing a context row attend to it
                together (:class:`QueryGroups`, indices into ``context``); only without
                ``context_mask``.
        """
        # Key/value are projected once per distinct image and gathered per text row, so the
        # ITM positive/negative and MLM passes share one projection of each image (exact).
        kv = self.kv(context) if kv is None else kv  # (M, L, 2C)
        if groups is not None:
            if context_mask is not None or context_index is not None:
                raise ValueError("groups replace context_index and need a context without padding")
            return self._grouped(x, kv, groups)
        mask = None if context_mask is None else _key_mask(context_mask)  # (M, 1, 1, L)
        if context_index is not None:
            kv = kv.index_select(0, context_index)  # (B, L, 2C)
            mask = None if mask is None else mask.index_select(0, context_index)  # (B, 1, 1, L)
        k, v = (_split_heads(t, self.heads) for t in kv.chunk(2, dim=-1))
        q = _split_heads(self.q(x), self.heads)
        p = self.dropout if self.training else 0.0
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=p)
        return self.norm(x + F.dropout(self.out(_merge_heads(y)), p, self.training))

    def _grouped(self, x: torch.Tensor, kv: torch.Tensor, groups: QueryGroups) -> torch.Tensor:
        # Without a key mask each query's softmax runs over the same L keys whatever other rows
        # share the call, so the n rows of one image are one sequence of n*T queries against
        # that image's keys/values (exact), never a copy of them per row.
        b, t, c = x.shape
        k, v = (_split_heads(u, self.heads) for u in kv.chunk(2, dim=-1))  # (M, h, L, d)
        q = self.q(x)  # (B, T, C)
        if groups.order is not None:
            q = q.index_select(0, groups.order)  # rows of one image together
        p = self.dropout if self.training else 0.0
        if _per_image_calls(q):
            parts, start = [], 0
            for m, n in zip(groups.images, groups.counts):
                qm = _split_heads(q[start : start + n].reshape(1, n * t, c), self.heads)  # (1, h, n*T, d)
                ym = F.scaled_dot_product_attention(qm, k[m : m + 1], v[m : m + 1], dropout_p=p)
                parts.append(_merge_heads(ym).view(n, t, c))
                start += n
            y = torch.cat(parts)  # (B, T, C)
        else:
            g, size = len(groups.counts), max(groups.counts)
            kg, vg = k.index_select(0, groups.context_index), v.index_select(0, groups.context_index)  # (G, h, L, d)
            qg = q.new_zeros(g * size, t, c).index_copy_(0, groups.slots, q).view(g, size * t, c)
            yg = F.scaled_dot_product_attention(_split_heads(qg, self.heads), kg, vg, dropout_p=p)
            y = _merge_heads(yg).view(g * size, t, c).index_select(0, groups.slots)  # (B, T, C)
        if groups.order is not None:
            y = torch.empty_like(y).index_copy_(0, groups.order, y)  # back to the rows' order
        return self.norm(x + F.dropout(self.out(y), p, self.training))


def _per_image_calls(q: torch.Tensor) -> bool:
    """How grouped cross-attention runs: on the CPU one attention call per image on views of its
    keys/values (copying them costs more there than the calls do); elsewhere one call, each
    image's rows padded to the largest count and one key/value copy per image (on a GPU kernel
    launches cost more than the copies and the padding)."""
    return q.device.type == "cpu"


@dataclass(frozen=True)
class QueryGroups:
    """The rows of a fusion batch grouped by the context row (image) they attend to.

    Cross-attention to image tokens has no key mask, so the rows of one image can attend as one
    sequence of (rows x T) queries to a single copy of its keys/values; gathering per row (the
    ``context_index`` path) copies an image's L x 2C keys/values once per row. Build with
    :func:`group_queries`.

    Attributes:
        order: (B,) the rows sorted by image (stable), or None when they already are.
        context_index: (G,) the distinct context rows, ascending; ``images`` the same on the host.
        counts: rows of each image (host), in that order.
        slots: (B,) sorted row i's place in a (G * max(counts)) layout padded per image.
    """

    order: torch.Tensor | None
    context_index: torch.Tensor
    images: tuple[int, ...]
    counts: tuple[int, ...]
    slots: torch.Tensor

    def to(self, device: torch.device | str) -> QueryGroups:
        return replace(
            self,
            order=None if self.order is None else self.order.to(device),
            context_index=self.context_index.to(device),
            slots=self.slots.to(device),
        )


def group_queries(context_index: torch.Tensor) -> QueryGroups:
    """Group the rows of a fusion batch by the context row (image) each attends to.

    Args:
        context_index: (B,) int64 context row of each row, in any order (sorted rows skip a
            permutation in every layer).

    Returns:
        The :class:`QueryGroups`; its run lengths are read to the host once here.
    """
    b = context_index.shape[0]
    order = torch.argsort(context_index, stable=True)
    images, counts = torch.unique_consecutive(context_index[order], return_counts=True)  # (G,), (G,)
    host_counts = counts.tolist()
    run = torch.repeat_interleave(torch.arange(len(host_counts), device=counts.device), counts)  # (B,)
    pos = torch.arange(b, device=counts.device) - (torch.cumsum(counts, 0) - counts)[run]
    slots = run * max(host_counts) + pos
    if torch.equal(order, torch.arange(b, device=order.device)):
        order = None
    return QueryGroups(order, images, tuple(images.tolist()), tuple(host_counts), slots)


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

    def forward(
        self, x, key_mask, context=None, context_index=None, context_mask=None, *, kv=None, groups=None, cls_only=False
    ):
        """``cls_only``: compute the [CLS] row only, (B, 1, C) (self-attention keys/values from all rows)."""
        x = self.self_attn(x, key_mask, cls_only)
        if self.cross_attn is not None:
            if kv is None and groups is None:
                x = self.cross_attn(x, context, context_index, context_mask)
            else:
                x = self.cross_attn(x, context, context_index, context_mask, kv=kv, groups=groups)
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

    def project_image(self, image: torch.Tensor) -> list[torch.Tensor]:
        """Image tokens (M, L, Dv) -> each layer's cross-attention keys/values (M, L, 2C).

        They depend on the image only: project once, then pass ``image_kv`` to any number of
        :meth:`forward` calls over texts paired with these images (retrieval re-ranking).
        """
        return [layer.cross_attn.kv(image) for layer in self.layers]

    def forward(
        self,
        text: torch.Tensor,
        attention_mask: torch.Tensor,
        image: torch.Tensor | None,
        image_index: torch.Tensor | None = None,
        *,
        image_kv: list[torch.Tensor] | None = None,
        groups: QueryGroups | None = None,
        cls_only: bool = False,
    ) -> torch.Tensor:
        """Fuse text (B, T, C) with image tokens (M, L, Dv).

        Args:
            text: text-encoder output (B, T, C).
            attention_mask: (B, T) padding mask of the text.
            image: image tokens (M, L, Dv); M == B unless ``image_index`` or ``groups`` is given.
            image_index: (B,) row of ``image`` that each text attends to (keys/values gathered per row).
            image_kv: :meth:`project_image` of the images, used instead of ``image``.
            groups: instead of ``image_index``: :func:`group_queries` of it; the texts of one
                image attend to its keys/values together (same result, no per-row copy).
            cls_only: the last layer computes the [CLS] row only (all an ITM head reads).

        Returns:
            Multimodal hidden states (B, T, C); (B, 1, C) with ``cls_only``.
        """
        mask = _key_mask(attention_mask)
        x = text
        last = len(self.layers) - 1
        for i, layer in enumerate(self.layers):
            kv = None if image_kv is None else image_kv[i]
            x = layer(x, mask, image, image_index, kv=kv, groups=groups, cls_only=cls_only and i == last)
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
