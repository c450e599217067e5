"""Image-text contrastive loss (ALBEF Eq. 1-2) against batch + queue, with optional MoD targets."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def soft_cross_entropy(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Mean over rows of -sum_j targets_ij log softmax(logits)_ij."""
    return -(F.log_softmax(logits.float(), dim=-1) * targets).sum(dim=-1).mean()


def itc_targets(sim: torch.Tensor, sim_m: torch.Tensor | None = None, alpha: float = 0.0) -> torch.Tensor:
    """y = alpha * softmax(sim_m) + (1 - alpha) * one-hot, shaped like ``sim`` (B, B+K).

    The positive of row i is column i: the batch's own momentum features come first.
    """
    onehot = torch.zeros_like(sim, dtype=torch.float32)
    onehot.fill_diagonal_(1.0)
    if sim_m is None or alpha == 0:
        return onehot
    return alpha * F.softmax(sim_m.float(), dim=1) + (1 - alpha) * onehot


def itc_loss(
    sim_i2t: torch.Tensor, sim_t2i: torch.Tensor, target_i2t: torch.Tensor, target_t2i: torch.Tensor
) -> dict[str, torch.Tensor]:
    """Both directions averaged: (L_i2t + L_t2i) / 2, plus image-to-text accuracy over batch + queue.

    Args:
        sim_i2t: (B, B+K) image-to-text similarities / temperature.
        sim_t2i: (B, B+K) text-to-image similarities / temperature.
        target_i2t, target_t2i: (B, B+K) target distributions.
    """
    loss = (soft_cross_entropy(sim_i2t, target_i2t) + soft_cross_entropy(sim_t2i, target_t2i)) / 2
    labels = torch.arange(sim_i2t.shape[0], device=sim_i2t.device)
    acc = (sim_i2t.detach().argmax(dim=1) == labels).float().mean()
    return {"itc_loss": loss, "itc_acc": acc}
