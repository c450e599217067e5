"""Image-text contrastive loss (ALBEF Eq. 1-2) against batch + queue, with optional MoD targets."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ..model.albef import full_precision


def soft_cross_entropy(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Mean over rows of -sum_j targets_ij log softmax(logits)_ij."""
    return -(F.log_softmax(logits.float(), dim=-1) * targets).sum(dim=-1).mean()


def index_positives(index: torch.Tensor, index_bank: torch.Tensor) -> torch.Tensor:
    """(B, B+K) bool: column j is a positive of row i when both pairs show the same image.

    Args:
        index: (B,) int64 image index of the batch's pairs.
        index_bank: (B+K,) int64 image index of every column: the batch, then the queue.
    """
    return index[:, None] == index_bank[None, :]


def itc_targets(
    sim: torch.Tensor,
    sim_m: torch.Tensor | None = None,
    alpha: float = 0.0,
    positives: torch.Tensor | None = None,
) -> torch.Tensor:
    """y = alpha * softmax(sim_m) + (1 - alpha) * y_hard, shaped like ``sim`` (B, B+K).

    ``y_hard`` is one-hot on column i (pretraining: the batch's own momentum features come
    first), or, given ``positives`` (B, B+K) bool, uniform over each row's positives
    (retrieval: every caption of the same image, in the batch or the queue).
    """
    if positives is None:
        hard = torch.zeros_like(sim, dtype=torch.float32)
        hard.fill_diagonal_(1.0)
    else:
        hard = positives.float()
        hard = hard / hard.sum(dim=1, keepdim=True)
    if sim_m is None or alpha == 0:
        return hard
    return alpha * F.softmax(sim_m.float(), dim=1) + (1 - alpha) * hard


def itc_loss(
    sim_i2t: torch.Tensor,
    sim_t2i: torch.Tensor,
    target_i2t: torch.Tensor,
    target_t2i: torch.Tensor,
    positives: torch.Tensor | None = None,
) -> dict[str, torch.Tensor]:
    """Both directions averaged: (L_i2t + L_t2i) / 2, plus image-to-text accuracy over batch + queue.

    Args:
        sim_i2t: (B, B+K) image-to-text similarities / temperature.
        sim_t2i: (B, B+K) text-to-image similarities / temperature.
        target_i2t, target_t2i: (B, B+K) target distributions.
        positives: (B, B+K) bool, the columns that count as a hit for the accuracy; None:
            column i only.
    """
    loss = (soft_cross_entropy(sim_i2t, target_i2t) + soft_cross_entropy(sim_t2i, target_t2i)) / 2
    top = sim_i2t.detach().argmax(dim=1)
    if positives is None:
        acc = (top == torch.arange(sim_i2t.shape[0], device=sim_i2t.device)).float().mean()
    else:
        acc = positives.gather(1, top[:, None]).float().mean()
    return {"itc_loss": loss, "itc_acc": acc}


def contrastive(
    image_feat: torch.Tensor,
    text_feat: torch.Tensor,
    m_image_feat: torch.Tensor,
    m_text_feat: torch.Tensor,
    image_queue: torch.Tensor,
    text_queue: torch.Tensor,
    temp: torch.Tensor,
    alpha: float = 0.0,
    image_idx: torch.Tensor | None = None,
    index_queue: torch.Tensor | None = None,
) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """ITC of a batch against its momentum keys + the queue, in fp32 with autocast off.

    The one ITC both tasks run. Without ``image_idx`` the target is column i (the official
    pretraining); with it, every column showing the same image is a positive (y uniform
    over them), in the batch and, through ``index_queue``, in the queue.

    Args:
        image_feat, text_feat: (B, E) online features (with grad).
        m_image_feat, m_text_feat: (B, E) momentum features, the batch's keys.
        image_queue, text_queue: (E, K) queued keys.
        temp: the learnable temperature (scalar).
        alpha: MoD weight; targets mix in softmax of the momentum similarities (Eq. 4).
        image_idx: (B,) int64 image index of each pair, or None.
        index_queue: (K,) image index of each queued key (-1: unknown); None: all unknown.

    Returns:
        ``(losses, details)``: ``itc_loss`` and ``itc_acc``; ``sim_i2t``, ``sim_t2i``
        (B, B+K) and ``target_i2t``, ``target_t2i``, ``positives`` (None without ``image_idx``).
    """
    with full_precision(image_feat):
        image_bank = torch.cat([m_image_feat.float().T, image_queue.float()], dim=1)  # (E, B+K)
        text_bank = torch.cat([m_text_feat.float().T, text_queue.float()], dim=1)
        temp = temp.float()
        sim_i2t = image_feat.float() @ text_bank / temp  # (B, B+K)
        sim_t2i = text_feat.float() @ image_bank / temp
        with torch.no_grad():
            positives = None
            if image_idx is not None:
                queued = index_queue if index_queue is not None else image_idx.new_full((image_queue.shape[1],), -1)
                positives = index_positives(image_idx, torch.cat([image_idx, queued]))  # (B, B+K)
            sim_i2t_m = m_image_feat.float() @ text_bank / temp if alpha > 0 else None
            sim_t2i_m = m_text_feat.float() @ image_bank / temp if alpha > 0 else None
            t_i2t = itc_targets(sim_i2t, sim_i2t_m, alpha, positives)
            t_t2i = itc_targets(sim_t2i, sim_t2i_m, alpha, positives)
        losses = itc_loss(sim_i2t, sim_t2i, t_i2t, t_t2i, positives)
    details = {"sim_i2t": sim_i2t, "sim_t2i": sim_t2i, "target_i2t": t_i2t, "target_t2i": t_t2i, "positives": positives}
    return losses, details
