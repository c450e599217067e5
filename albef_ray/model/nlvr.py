"""NLVR2's two-image fusion encoder and the classifier head (ALBEF Sec. 5.3, Fig. 3b).

A statement is judged against a pair of images. ALBEF doubles every fusion layer: layer ``i``
of the pretrained fusion encoder becomes two consecutive layers, the first cross-attending to
image 1, the second to image 2, each with its own copy of the text self-attention and FFN.
The two layers of a pair share the cross-attention key/value projection (the official
``share_cross_attention``), so the text of both images is projected into one key/value space.

Layout: :class:`PairFusionEncoder` has ``2F`` :class:`~albef_ray.model.text.BertLayer` s;
layer ``2i`` attends to image 1 and ``2i + 1`` to image 2. It replaces ``ALBEF.fusion``, so
its parameters are ``fusion.layers.{0..2F-1}.*`` exactly as the official 18-layer
``text_encoder.encoder.layer.{6..17}`` map onto native names (:mod:`.adapters`), and a state
dict of a single-image fusion encoder (``F`` layers: a pretrained ALBEF) loads into it by
copying layer ``i`` into ``2i`` and ``2i + 1`` (the official ``Pretrain_nlvr.py``).
"""

from __future__ import annotations

import copy
import re

import torch
from torch import nn

from .registry import AlbefArch
from .text import BertLayer, FusionEncoder, _key_mask

_LAYER_KEY = re.compile(r"^layers\.(\d+)\.(.+)$")


def tie_cross_kv(layers: nn.ModuleList) -> None:
    """Make layer ``2i + 1`` use layer ``2i``'s cross-attention key/value projection (one module)."""
    for i in range(0, len(layers), 2):
        layers[i + 1].cross_attn.kv = layers[i].cross_attn.kv


class PairFusionEncoder(nn.Module):
    """``2F`` fusion layers over a text and two images (NLVR2); K/V tied within each pair.

    Args:
        arch: the model size (``arch.fusion_layers`` = F pairs).
        dropout: BERT hidden and attention dropout.
    """

    def __init__(self, arch: AlbefArch, dropout: float = 0.1):
        super().__init__()
        self.layers = nn.ModuleList(BertLayer(arch, dropout, cross=True) for _ in range(2 * arch.fusion_layers))
        tie_cross_kv(self.layers)

    @classmethod
    def from_fusion(cls, fusion: FusionEncoder) -> PairFusionEncoder:
        """The doubled encoder of a (pretrained) single-image one: layer i -> layers 2i, 2i+1.

        Both layers of a pair start as copies of layer ``i`` (weights and dropout settings);
        their key/value projection is then one module, initialised from layer ``i``'s.
        """
        pair = cls.__new__(cls)
        nn.Module.__init__(pair)
        pair.layers = nn.ModuleList(copy.deepcopy(layer) for layer in fusion.layers for _ in range(2))
        tie_cross_kv(pair.layers)
        return pair

    @property
    def num_pairs(self) -> int:
        return len(self.layers) // 2

    def forward(
        self,
        text: torch.Tensor,
        attention_mask: torch.Tensor,
        images: tuple[torch.Tensor, torch.Tensor],
        image_index: tuple[torch.Tensor | None, torch.Tensor | None] | None = None,
    ) -> torch.Tensor:
        """Fuse text (B, T, C) with two images' tokens.

        Args:
            text: text-encoder output (B, T, C).
            attention_mask: (B, T) padding mask of the text.
            images: image 1 and image 2 tokens, (M1, L, Dv) and (M2, L, Dv); M == B unless
                indexed. Both may be the same tensor (text assignment draws both images from
                one batch).
            image_index: per image, (B,) int64 rows each text attends to, or None.

        Returns:
            Multimodal hidden states (B, T, C); [CLS] is row 0.
        """
        mask = _key_mask(attention_mask)
        index = image_index or (None, None)
        x = text
        for i, layer in enumerate(self.layers):
            x = layer(x, mask, images[i % 2], index[i % 2])  # (B, T, C)
        return x

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs):
        expand_single_image_layers(state_dict, prefix, self.num_pairs)
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs)


def expand_single_image_layers(state: dict[str, torch.Tensor], prefix: str, pairs: int) -> bool:
    """In place: a single-image fusion encoder's ``layers.i.*`` become ``layers.2i.*`` and ``layers.2i+1.*``.

    Applied only when ``state`` holds layers below ``pairs`` and none at or above it under
    ``prefix`` (a pretrained ALBEF's F fusion layers); a doubled state dict is left alone.

    Returns:
        Whether the state was expanded.
    """
    found: dict[int, list[str]] = {}
    for key in state:
        if key.startswith(prefix) and (m := _LAYER_KEY.match(key[len(prefix):])):
            found.setdefault(int(m.group(1)), []).append(key)
    if not found or max(found) >= pairs:
        return False
    for i in sorted(found, reverse=True):  # high to low: 2i and 2i+1 never overwrite an unread i
        for key in found[i]:
            rest = _LAYER_KEY.match(key[len(prefix):]).group(2)
            value = state.pop(key)
            state[f"{prefix}layers.{2 * i}.{rest}"] = value
            state[f"{prefix}layers.{2 * i + 1}.{rest}"] = value
    return True
