"""NLVR2: is a statement true of a pair of images? Fine-tuning and its text-assignment pre-step.

ALBEF Sec. 5.3 (official ``model_nlvr.py``, ``model_pretrain_nlvr.py``). Both tasks run the same
two-image model: the ALBEF image and text encoders and a :class:`~albef_ray.model.nlvr.PairFusionEncoder`
whose 2F layers alternate between the two images, on the multimodal [CLS].

* :class:`NLVRTask` (``nlvr``): a two-way head (official ``cls_head``) on (statement, image 1,
  image 2); cross-entropy against ``label`` (1 = true), with momentum distillation of the logits
  (official: momentum copies of the encoders and the head; loss
  ``(1 - alpha) CE(p, y) + alpha CE(p, softmax(p_m))``, switch ``nlvr.distill``).
* :class:`TextAssignmentTask` (``nlvr_pretrain``): one epoch on caption data before fine-tuning.
  Each caption's image is paired with another image of the batch, drawn by image-image
  similarity; the three-way head (official ``ta_head``) says whether the caption describes
  image 1 (label 0), image 2 (1) or neither (2, two other images), each with probability 1/3.

Neither task has ITC, ITM or MLM: the ALBEF parts that serve only them (projections, ITM and MLM
heads, temperature) are removed, or frozen where text assignment keeps them as the official
does, so every trainable parameter gets a gradient (DDP needs no unused-parameter search).
"""

from __future__ import annotations

import copy
import math

import torch
import torch.nn.functional as F
from torch import nn

from ..config import AlbefConfig
from ..model.albef import ALBEF
from ..model.momentum import MomentumEncoder
from ..model.heads import classifier_head
from ..model.nlvr import PairFusionEncoder
from .blocks import distilled_cross_entropy, ema_module
from .mlm import SpecialTokens

# ALBEF parts that no NLVR2 model has (official model_nlvr.py: ViT, 18-layer BERT, cls_head).
PRETRAINING_PARTS = ("vision_proj", "text_proj", "itm_head", "mlm_head", "temp")
TA_LABELS = ("image 1", "image 2", "neither")


def pair_model(model: ALBEF, drop: tuple[str, ...] = PRETRAINING_PARTS) -> ALBEF:
    """In place: double ``model``'s fusion encoder for two images and remove the parts ``drop``."""
    if not isinstance(model.fusion, PairFusionEncoder):
        model.fusion = PairFusionEncoder.from_fusion(model.fusion)
    for name in drop:
        if hasattr(model, name):
            delattr(model, name)
    return model


def logit_momentum(model: ALBEF, momentum: float) -> MomentumEncoder:
    """A queue-less momentum encoder of ``model``'s image, text and (paired) fusion encoders.

    Its copy keeps only what the logits need (``vision``, ``text``, ``fusion``: the official
    ``visual_encoder_m`` and ``text_encoder_m``); no ITC, so no queues are stored either.
    Build it before :func:`pair_model` drops the projections (the encoder reads their width).
    """
    mom = MomentumEncoder(model, momentum, use_queue=False)
    for name in ("image_queue", "text_queue", "queue_ptr"):
        setattr(mom, name, None)  # a None buffer is no part of the state dict
    for name in PRETRAINING_PARTS:
        if hasattr(mom.model, name):
            delattr(mom.model, name)
    return mom


class NLVRTask(nn.Module):
    """NLVR2 fine-tuning: two-image fusion, two-way head, momentum distillation on the logits.

    Args:
        model: a (pretrained) ALBEF; its fusion encoder is doubled in place (layer i -> 2i, 2i+1)
            and its ITC/ITM/MLM parts removed.
        cfg: reads ``nlvr.distill``, ``momentum.momentum``.
        special: unused (the constructor every task has).
    """

    batch_keys = ("image2", "label")

    def __init__(self, model: ALBEF, cfg: AlbefConfig, special: SpecialTokens | None = None):
        super().__init__()
        self.cfg = cfg
        pair_model(model, drop=())  # doubled fusion first, so the momentum copy has it too
        self.momentum = logit_momentum(model, cfg.momentum.momentum) if cfg.nlvr.distill else None
        self.model = pair_model(model)  # then without the pretraining parts
        self.head = classifier_head(model.arch.text_width, 2)
        self.momentum_head = None
        if cfg.nlvr.distill:
            self.momentum_head = copy.deepcopy(self.head).requires_grad_(False)
        self.register_load_state_dict_post_hook(_copy_missing_momentum_head)

    def logits(
        self, image: torch.Tensor, input_ids: torch.Tensor, attention_mask: torch.Tensor, image2: torch.Tensor,
        momentum: bool = False,
    ) -> torch.Tensor:
        """(B, 2) logits (index 1 = true) of the online (or momentum) model.

        Args:
            image, image2: (B, 3, H, W) the left and the right image.
            input_ids, attention_mask: (B, T) the statement.
            momentum: use the momentum encoders and head (no grad).
        """
        model, head = (self.momentum.model, self.momentum_head) if momentum else (self.model, self.head)
        b = image.shape[0]
        tokens = model.encode_image(torch.cat([image, image2]))  # (2B, 1+N, Dv): one ViT pass, as official
        text = model.encode_text(input_ids, attention_mask)  # (B, T, C)
        fused = model.fuse(text, attention_mask, (tokens[:b], tokens[b:]))  # (B, T, C)
        return head(fused[:, 0])  # (B, 2)

    def forward(
        self,
        image: torch.Tensor,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        alpha: float = 0.0,
        generator: torch.Generator | None = None,
        image2: torch.Tensor | None = None,
        label: torch.Tensor | None = None,
        update_momentum: bool = True,
        enqueue: bool = True,
    ) -> dict[str, torch.Tensor]:
        """One step's loss.

        Args:
            image, image2: (B, 3, H, W) the pair; input_ids, attention_mask: (B, T) the statement.
            alpha: distillation weight of this step (``mod.alpha``, ramped).
            generator: unused (no sampling).
            label: (B,) int64, 1 = the statement is true of the pair.
            update_momentum: run the EMA (encoders and head) first; training mode only.
            enqueue: unused (no queues).

        Returns:
            ``loss`` = ``nlvr_loss`` and ``nlvr_batch_acc`` (fraction of the batch right).
        """
        if image2 is None or label is None:
            raise ValueError("NLVR2 needs image2 (B, 3, H, W) and label (B,) with the batch")
        label = label.to(device=image.device, dtype=torch.long)
        logits = self.logits(image, input_ids, attention_mask, image2)  # (B, 2)
        momentum_logits = None
        if self.momentum is not None and self.training:
            if update_momentum:  # the official order: EMA, then the momentum forward
                self.momentum.update(self.model)
                ema_module(self.momentum_head, self.head, self.momentum.effective_momentum())
            if alpha > 0:
                with torch.no_grad():
                    momentum_logits = self.logits(image, input_ids, attention_mask, image2, momentum=True)
        loss = distilled_cross_entropy(logits, label, momentum_logits, alpha)
        acc = (logits.detach().argmax(dim=1) == label).float().mean()
        return {"loss": loss, "nlvr_loss": loss, "nlvr_batch_acc": acc}

    def adapt_official_state(self, state: dict[str, torch.Tensor]) -> tuple[dict, dict]:
        """Take the official ``cls_head.*`` / ``cls_head_m.*`` out as ``head.*`` / ``momentum_head.*``.

        The 18-layer text encoder needs nothing here: its layers 6..17 are ``fusion.layers.0..11``
        under the ALBEF adapter, and a pretrained 12-layer one is doubled on load
        (:func:`~albef_ray.model.nlvr.expand_single_image_layers`). A release without
        ``cls_head_m`` starts the momentum head as a copy of ``cls_head``.
        """
        native = {}
        for key in [k for k in state if k.startswith(("cls_head.", "cls_head_m."))]:
            head, _, rest = key.partition(".")
            native[("momentum_head." if head.endswith("_m") else "head.") + rest] = state.pop(key)
        if self.momentum_head is not None:
            for key in [k for k in native if k.startswith("head.")]:
                native.setdefault("momentum_" + key, native[key])
        return state, native


def _copy_missing_momentum_head(task: NLVRTask, incompatible) -> None:
    """After a load without momentum-head weights, the momentum head copies the online head."""
    missing = [k for k in incompatible.missing_keys if ".momentum_head." in f".{k}"]
    if task.momentum_head is not None and missing:
        task.momentum_head.load_state_dict(task.head.state_dict())
        for key in missing:
            incompatible.missing_keys.remove(key)


def assign_images(
    sim: torch.Tensor, generator: torch.Generator | None = None, image_idx: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Text-assignment examples of a batch: which images each caption is shown with.

    For caption b, with probability 2/3 its own image and one other, drawn with weights
    softmax(sim[b]) over the other images, in random order (label 0: its image is image 1,
    1: image 2); with probability 1/3 two other images drawn the same way, without
    replacement (label 2: neither). Official ``model_pretrain_nlvr.py``; the draws are
    Gumbel-top-2 of the log-weights, i.e. sampling without replacement.

    Args:
        sim: (B, B) image-image similarities (already divided by the temperature).
        generator: RNG on ``sim``'s device.
        image_idx: (B,) int64 image index of each row: rows showing the same image are not
            "other" images of each other (a row with no other image falls back to any other row).

    Returns:
        ``(first, second, label)``, each (B,) int64: rows of the batch's images shown as image
        1 and image 2, and the label. A row with a single other image is never "neither".
    """
    b, device = sim.shape[0], sim.device
    if b < 2:
        raise ValueError("text assignment pairs each image with another: a batch needs at least 2 rows")
    other = ~torch.eye(b, dtype=torch.bool, device=device)
    if image_idx is not None:
        image_idx = image_idx.to(device)
        distinct = image_idx[:, None] != image_idx[None, :]
        other = torch.where(distinct.any(dim=1, keepdim=True), distinct, other)
    log_w = sim.detach().float().masked_fill(~other, -math.inf).log_softmax(dim=1)
    uniform = torch.rand(b, b, generator=generator, device=device).clamp_min(torch.finfo(torch.float32).tiny)
    draws = (log_w - torch.log(-torch.log(uniform))).topk(2, dim=1).indices  # (B, 2) without replacement
    coin, side = torch.rand(2, b, generator=generator, device=device)
    rows = torch.arange(b, device=device)
    neither = (coin < 1 / 3) & (other.sum(dim=1) >= 2)
    own_first = side >= 0.5
    first = torch.where(neither | ~own_first, draws[:, 0], rows)
    second = torch.where(neither, draws[:, 1], torch.where(own_first, draws[:, 0], rows))
    label = torch.where(neither, 2, torch.where(own_first, 0, 1))
    return first, second, label


class TextAssignmentTask(nn.Module):
    """NLVR2's text-assignment pre-step on caption data (task ``nlvr_pretrain``).

    The official model keeps ``vision_proj`` (image-image similarities for the draws, no grad),
    ``text_proj`` and ``temp`` (unused); here they are frozen, so its checkpoint round-trips.

    Args:
        model: a pretrained ALBEF; its fusion encoder is doubled in place.
        cfg: reads ``nlvr.ta_temp``.
        special: unused.
    """

    batch_keys = ("image_idx",)

    def __init__(self, model: ALBEF, cfg: AlbefConfig, special: SpecialTokens | None = None):
        super().__init__()
        self.cfg = cfg
        self.model = pair_model(model, drop=("itm_head", "mlm_head"))
        for part in (model.vision_proj, model.text_proj):
            part.requires_grad_(False)
        model.temp.requires_grad_(False)
        self.momentum = None
        self.ta_head = nn.Linear(model.arch.text_width, len(TA_LABELS))

    def forward(
        self,
        image: torch.Tensor,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        alpha: float = 0.0,
        generator: torch.Generator | None = None,
        image_idx: torch.Tensor | None = None,
        assignment: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None,
        update_momentum: bool = True,
        enqueue: bool = True,
    ) -> dict[str, torch.Tensor]:
        """One step's loss on a caption batch.

        Args:
            image: (B, 3, H, W); input_ids, attention_mask: (B, T) each image's caption.
            alpha, update_momentum, enqueue: unused (no momentum model).
            generator: RNG for the image draws (:func:`assign_images`).
            image_idx: (B,) image index of each row (rows of one image are not "other" images).
            assignment: ``(first, second, label)`` to use instead of drawing (tests).

        Returns:
            ``loss`` = ``ta_loss`` and ``ta_batch_acc`` (fraction of the batch right).
        """
        model = self.model
        tokens = model.encode_image(image)  # (B, 1+N, Dv)
        if assignment is None:
            with torch.no_grad():
                feat = model.image_features(tokens)  # (B, E) fp32, normalised
                assignment = assign_images(feat @ feat.T / self.cfg.nlvr.ta_temp, generator, image_idx)
        first, second, label = (t.to(image.device) for t in assignment)
        text = model.encode_text(input_ids, attention_mask)  # (B, T, C)
        fused = model.fuse(text, attention_mask, (tokens, tokens), (first, second))  # (B, T, C)
        logits = self.ta_head(fused[:, 0])  # (B, 3)
        loss = F.cross_entropy(logits.float(), label)
        acc = (logits.detach().argmax(dim=1) == label).float().mean()
        return {"loss": loss, "ta_loss": loss, "ta_batch_acc": acc}

    def adapt_official_state(self, state: dict[str, torch.Tensor]) -> tuple[dict, dict]:
        """Take the official ``ta_head.*`` out (same native name); the rest is ALBEF's layout."""
        native = {k: state.pop(k) for k in [k for k in state if k.startswith("ta_head.")]}
        return state, native
