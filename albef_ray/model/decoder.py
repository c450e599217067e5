"""The VQA answer decoder: a causal BERT decoder over answer tokens that cross-attends to text.

ALBEF's VQA model (paper Sec. 4.3, official ``model_vqa.py``) feeds the fusion encoder's
question states (the question fused with the image) to a 6-layer decoder: BERT layers whose
self-attention is causal and whose cross-attention reads the question states (with the
question's padding mask), followed by a language-modelling head over the vocabulary. It is
initialised from the fusion encoder: embeddings, the fusion layers (self-attention,
cross-attention, feed-forward) and the MLM head (:func:`decoder_state_from_encoder`), as the
official ``VQA.py`` does when it loads a pretrained checkpoint.

Built from the layers of :mod:`.text` (no forked BERT): :class:`~.text.TextEmbeddings`,
:class:`~.text.BertLayer` with ``context_width = text_width`` and a causal mask, and
:class:`~.text.MLMHead` tied to the decoder's own word embeddings.

Shapes: R answer rows, A answer tokens, Q questions, L question tokens, C text width, V vocabulary.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from .registry import AlbefArch
from .text import (
    BertLayer,
    MLMHead,
    TextEmbeddings,
    _merge_heads,
    _split_heads,
    causal_key_mask,
    init_bert_weights,
)


class StartCache(NamedTuple):
    """What the tokens after ``[CLS]`` need of it: per layer, its self-attention key and value.

    Attributes:
        keys, values: one (Q, h, 1, C/h) tensor per layer, for each question's ``[CLS]``.
        hidden: (Q, 1, C) the decoder's output at ``[CLS]`` (it predicts the first answer token).
    """

    keys: list[torch.Tensor]
    values: list[torch.Tensor]
    hidden: torch.Tensor


class AnswerDecoder(nn.Module):
    """Causal BERT decoder with cross-attention to question states, and its LM head.

    Args:
        arch: the ALBEF size; the decoder has ``arch.fusion_layers`` layers (the official 6).
        dropout: BERT hidden and attention dropout.
    """

    def __init__(self, arch: AlbefArch, dropout: float = 0.1):
        super().__init__()
        self.arch = arch
        self.embeddings = TextEmbeddings(arch, dropout)
        self.layers = nn.ModuleList(
            BertLayer(arch, dropout, cross=True, context_width=arch.text_width) for _ in range(arch.fusion_layers)
        )
        self.head = MLMHead(arch)
        init_bert_weights(self)

    def forward(
        self,
        answer_ids: torch.Tensor,
        answer_mask: torch.Tensor,
        question_states: torch.Tensor,
        question_mask: torch.Tensor,
        question_index: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Hidden states of the answer tokens.

        Args:
            answer_ids, answer_mask: (R, A) ``[CLS] answer [SEP]`` rows and their padding mask;
                every row starts with a valid token.
            question_states: (Q, L, C) fused question states.
            question_mask: (Q, L) padding mask of the questions.
            question_index: (R,) question of each answer row; None: R == Q, row i -> question i.
                Key/value of each question are projected once and gathered (no copies).

        Returns:
            (R, A, C) hidden states; position t predicts token t + 1.
        """
        x = self.embeddings(answer_ids)  # (R, A, C)
        mask = causal_key_mask(answer_mask)  # (R, 1, A, A)
        for layer in self.layers:
            x = layer(x, mask, question_states, question_index, question_mask)
        return x

    @torch.no_grad()
    def start(self, start_id: int, question_states: torch.Tensor, question_mask: torch.Tensor) -> StartCache:
        """Inference: ``[CLS]`` alone for each question, keeping each layer's key/value of it.

        Args:
            start_id: the ``[CLS]`` id; question_states (Q, L, C), question_mask (Q, L).
        """
        x = self.embeddings(torch.full((question_states.shape[0], 1), start_id, device=question_states.device))
        mask = torch.ones(x.shape[0], 1, 1, 1, dtype=torch.bool, device=x.device)
        keys, values = [], []
        for layer in self.layers:
            heads = layer.self_attn.heads
            _, k, v = (_split_heads(t, heads) for t in layer.self_attn.qkv(x).chunk(3, dim=-1))
            keys.append(k)
            values.append(v)
            x = layer(x, mask, question_states, None, question_mask)
        return StartCache(keys, values, x)

    @torch.no_grad()
    def after_start(
        self,
        answer_ids: torch.Tensor,
        cache: StartCache,
        question_states: torch.Tensor,
        question_mask: torch.Tensor,
        question_index: torch.Tensor,
    ) -> torch.Tensor:
        """Inference: hidden states of unpadded answer tokens 1.. given the cached ``[CLS]`` (exact).

        The same as :meth:`forward` on ``[CLS] + answer_ids`` without its position 0, whose
        self-attention key/value come from :meth:`start` instead of being recomputed per answer.

        Args:
            answer_ids: (R, T) tokens at positions 1..T, no padding.
            cache: :meth:`start` of the questions; question_states (Q, L, C), question_mask (Q, L).
            question_index: (R,) question of each row.

        Returns:
            (R, T, C); row t predicts the token at position t + 2.
        """
        e = self.embeddings
        t = answer_ids.shape[1]
        positions = torch.arange(1, t + 1, device=answer_ids.device)
        x = e.norm(e.word(answer_ids) + e.position(positions)[None] + e.token_type.weight[0])  # (R, T, C)
        causal = torch.ones(t, t, dtype=torch.bool, device=x.device).tril()
        mask = torch.cat([torch.ones(t, 1, dtype=torch.bool, device=x.device), causal], dim=1)  # (T, 1 + T)
        for layer, k0, v0 in zip(self.layers, cache.keys, cache.values):
            sa = layer.self_attn
            q, k, v = (_split_heads(u, sa.heads) for u in sa.qkv(x).chunk(3, dim=-1))
            k = torch.cat([k0.index_select(0, question_index), k], dim=2)  # (R, h, 1 + T, C/h)
            v = torch.cat([v0.index_select(0, question_index), v], dim=2)
            x = sa.norm(x + sa.out(_merge_heads(F.scaled_dot_product_attention(q, k, v, attn_mask=mask))))
            x = layer.cross_attn(x, question_states, question_index, question_mask)
            x = layer.ffn(x)
        return x

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """(..., C) hidden states -> (..., V) next-token logits (head tied to the decoder's word embeddings)."""
        return self.head(hidden, self.embeddings.word.weight)


# Native prefixes of the fusion encoder's parts -> the decoder's (official VQA.py: text_encoder
# layers 6..11 become text_decoder layers 0..5, embeddings and cls move with them).
ENCODER_TO_DECODER = (("text.embeddings.", "embeddings."), ("fusion.layers.", "layers."), ("mlm_head.", "head."))


def decoder_state_from_encoder(model_state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The decoder's initial weights from an ALBEF state dict (native names, no ``model.`` prefix).

    Args:
        model_state: an :class:`~.albef.ALBEF` state dict (text embeddings, fusion layers, MLM head).

    Returns:
        :class:`AnswerDecoder` state dict entries (those the model state provides).
    """
    out = {}
    for key, value in model_state.items():
        for source, target in ENCODER_TO_DECODER:
            if key.startswith(source):
                out[target + key[len(source):]] = value
    return out
