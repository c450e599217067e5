"""SNLI-VE (visual entailment) fine-tuning: a 3-way classifier on the multimodal [CLS].

Official ``models/model_ve.py`` (ALBEF Sec. 5): the image and the hypothesis go through the
image, text and fusion encoders; the fusion encoder's [CLS] state feeds ``cls_head``
(Linear(C, C) -> ReLU -> Linear(C, 3)). Labels follow the official ``ve_dataset.py``:
0 contradiction, 1 neutral, 2 entailment (:data:`albef_ray.data.build.ve.VE_LABELS`), so a
released ``ve.pth`` head predicts the same ids here.

Loss (``ve.distill``, official ``distill: True``): momentum copies of the encoders and of the
head (EMA m = ``momentum.momentum``, 0.995) give soft targets, and

    L = (1 - alpha) * CE(p, y) - alpha * sum_k softmax(p_m)_k * log_softmax(p)_k

with ``alpha`` the trainer's schedule value (``mod.alpha``, ramped over
``mod.alpha_warmup_epochs``). Without distillation L = CE(p, y).

What the VE model does not have is removed from the ALBEF it is built on: the ITC
projections, the ITM head, the temperature and the MLM head (online and momentum), as
``model_ve.py`` has none of them. So every trainable parameter gets a gradient (DDP needs no
unused-parameter search), and the state dict has the official layout's parts one for one.
"""

from __future__ import annotations

import torch
from torch import nn

from ..config import AlbefConfig
from ..model.albef import ALBEF
from ..model.heads import classifier_head
from ..model.momentum import MomentumEncoder
from .blocks import distilled_cross_entropy, ema_module, momentum_forward
from .mlm import SpecialTokens

NUM_CLASSES = 3  # contradiction, neutral, entailment: the official cls_head's output rows
# ALBEF parts the VE model has no use for (official model_ve.py builds none of them).
UNUSED_PARTS = ("vision_proj", "text_proj", "itm_head", "temp", "mlm_head")
UNUSED_MOMENTUM_PARTS = ("vision_proj", "text_proj", "mlm_head")  # itm_head, temp: never copied
# The official checkpoint roots of the head and its momentum copy -> native module names.
_HEAD_KEYS = {"cls_head.": "head.", "cls_head_m.": "momentum_head."}


class VETask(nn.Module):
    """Visual entailment: classifier head on the fusion [CLS], optional momentum distillation.

    Args:
        model: the online ALBEF; the parts of :data:`UNUSED_PARTS` are deleted from it.
        cfg: reads ``ve.distill`` and ``momentum.momentum``.
        special: unused (the tasks' common constructor).

    Attributes:
        head: the classifier (official ``cls_head``).
        momentum: EMA copy of the encoders without queues (``ve.distill``), else None.
        momentum_head: EMA copy of ``head`` (official ``cls_head_m``), or None.
    """

    batch_keys = ("label",)

    def __init__(self, model: ALBEF, cfg: AlbefConfig, special: SpecialTokens | None = None):
        super().__init__()
        self.cfg = cfg
        self.head = classifier_head(model.arch.text_width, NUM_CLASSES)
        self.momentum = self.momentum_head = None
        if cfg.ve.distill:  # copied before the unused parts go (the copy reads the ITC width)
            self.momentum = MomentumEncoder(model, cfg.momentum.momentum, use_queue=False)
            for name in UNUSED_MOMENTUM_PARTS:
                delattr(self.momentum.model, name)
            self.momentum_head = classifier_head(model.arch.text_width, NUM_CLASSES)
            self.momentum_head.load_state_dict(self.head.state_dict())  # official copy_params()
            self.momentum_head.requires_grad_(False)
        for name in UNUSED_PARTS:
            delattr(model, name)
        self.model = model

    def logits(self, image: torch.Tensor, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """Online class logits (B, 3) of (image, hypothesis) pairs."""
        return _logits(self.model, self.head, image, input_ids, attention_mask)

    def forward(
        self,
        image: torch.Tensor,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        alpha: float = 0.0,
        generator: torch.Generator | None = None,
        label: torch.Tensor | None = None,
        update_momentum: bool = True,
        enqueue: bool = True,
        return_outputs: bool = False,
    ) -> dict[str, torch.Tensor]:
        """One step's loss and batch accuracy.

        Args:
            image: (B, 3, H, W) normalised images.
            input_ids, attention_mask: (B, T) tokenised hypotheses.
            alpha: distillation weight for this step (used in training mode with ``ve.distill``).
            generator: unused (no sampling).
            label: (B,) int64 class ids (0 contradiction, 1 neutral, 2 entailment).
            update_momentum: run the EMA (encoders and head) first (training mode only).
            enqueue: unused (no queue).
            return_outputs: also return ``logits`` (and ``momentum_logits``), detached.

        Returns:
            ``loss`` (= ``ve_loss``, :func:`~.blocks.distilled_cross_entropy`) and ``ve_batch_acc`` (fraction of the batch right).
        """
        if label is None:
            raise ValueError("SNLI-VE fine-tuning needs label (B,) with the batch")
        label = label.to(device=image.device, dtype=torch.long)
        logits = self.logits(image, input_ids, attention_mask)  # (B, 3)
        momentum_logits = None
        if self.momentum is not None and self.training:
            if update_momentum:
                ema_module(self.momentum_head, self.head, self.momentum.effective_momentum())  # with the encoders' EMA below
            keys = momentum_forward(
                self.momentum, self.model, image, input_ids, attention_mask,
                training=True, update_momentum=update_momentum, features=False,
            )
            if alpha > 0:  # at alpha = 0 the soft targets weigh nothing: skip the fusion pass
                with torch.no_grad():
                    fused = self.momentum.model.fuse(keys.text_hidden, attention_mask, keys.image_tokens)
                    momentum_logits = self.momentum_head(fused[:, 0]).float()  # (B, 3)
        loss = distilled_cross_entropy(logits, label, momentum_logits, alpha)
        out = {
            "ve_loss": loss,
            "ve_batch_acc": (logits.detach().argmax(dim=1) == label).float().mean(),
        }
        if return_outputs:
            out["logits"] = logits.detach()
            if momentum_logits is not None:
                out["momentum_logits"] = momentum_logits
        out["loss"] = loss
        return out

    def adapt_official_state(self, state: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
        """Take ``cls_head.*`` / ``cls_head_m.*`` out of an official ``ve.pth`` state.

        Returns:
            (the rest, for the ALBEF adapter; the head's tensors under native names). A state
            without ``cls_head_m`` (``distill: False``) gives the momentum head the online one,
            as the loader gives the momentum encoders the online weights; a ``cls_head_m`` with
            no momentum head here (``ve.distill=false``) is reported unused by the loader.
        """
        rest, native = {}, {}
        for key, value in state.items():
            prefix = next((p for p in _HEAD_KEYS if key.startswith(p)), None)
            if prefix is None:
                rest[key] = value
            else:
                native[_HEAD_KEYS[prefix] + key[len(prefix):]] = value
        if self.momentum_head is not None and not any(k.startswith("momentum_head.") for k in native):
            native.update({"momentum_" + k: v for k, v in list(native.items()) if k.startswith("head.")})
        return rest, native


def _logits(model: ALBEF, head: nn.Module, image, input_ids, attention_mask) -> torch.Tensor:
    image_tokens = model.encode_image(image)  # (B, 1+N, Dv)
    text_hidden = model.encode_text(input_ids, attention_mask)  # (B, T, C)
    fused = model.fuse(text_hidden, attention_mask, image_tokens)  # (B, T, C)
    return head(fused[:, 0]).float()  # (B, 3)
