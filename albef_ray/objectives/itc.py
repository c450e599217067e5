"""Image-text contrastive loss (ALBEF Eq. 1-2) against batch + queue, with optional MoD targets."""

from __future__ import annotations

import torch
import torch.nn.functional as F


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
