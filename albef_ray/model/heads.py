"""Task heads on the fusion encoder's multimodal [CLS] (SNLI-VE, NLVR2)."""

from __future__ import annotations

from torch import nn


def classifier_head(width: int, classes: int) -> nn.Sequential:
    """The official ``cls_head``: Linear(C, C) -> ReLU -> Linear(C, classes) on the multimodal [CLS].

    A ``Sequential`` so parameter names (``0.weight``, ``2.weight``) are the official ones;
    PyTorch's default Linear initialisation, as the official head (it sits outside BertModel,
    whose BERT initialisation does not reach it).
    """
    return nn.Sequential(nn.Linear(width, width), nn.ReLU(), nn.Linear(width, classes))
