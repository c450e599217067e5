"""Masked language modelling conditioned on the image, with optional MoD soft targets."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

IGNORE = -100


@dataclass(frozen=True)
class SpecialTokens:
    """Token ids the masking must know (defaults: bert-base-uncased)."""

    pad: int = 0
    cls: int = 101
    sep: int = 102
    mask: int = 103
    unk: int = 100

    @classmethod
    def from_tokenizer(cls, tokenizer) -> "SpecialTokens":
        return cls(
            pad=tokenizer.pad_token_id,
            cls=tokenizer.cls_token_id,
            sep=tokenizer.sep_token_id,
            mask=tokenizer.mask_token_id,
            unk=tokenizer.unk_token_id,
        )


def mask_tokens(
    input_ids: torch.Tensor,
    vocab_size: int,
    special: SpecialTokens,
    probability: float = 0.15,
    mask_fraction: float = 0.8,
    random_fraction: float = 0.1,
    generator: torch.Generator | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """BERT masking: choose ``probability`` of the maskable tokens, then 80/10/10.

    Padding and special tokens ([CLS], [SEP], [MASK], [UNK]) are never chosen.

    Returns:
        ``masked_ids`` (B, T) and ``labels`` (B, T): the original id where chosen, -100 elsewhere.
    """
    dev = input_ids.device

    def rand(shape):
        return torch.rand(shape, generator=generator, device=generator.device if generator else dev).to(dev)

    maskable = torch.ones_like(input_ids, dtype=torch.bool)
    for tok in (special.pad, special.cls, special.sep, special.mask, special.unk):
        maskable &= input_ids != tok
    chosen = (rand(input_ids.shape) < probability) & maskable
    labels = torch.where(chosen, input_ids, torch.full_like(input_ids, IGNORE))
    u = rand(input_ids.shape)
    to_mask = chosen & (u < mask_fraction)
    to_random = chosen & (u >= mask_fraction) & (u < mask_fraction + random_fraction)
    randoms = (rand(input_ids.shape) * vocab_size).long().clamp_(max=vocab_size - 1)
    masked = torch.where(to_mask, torch.full_like(input_ids, special.mask), input_ids)
    masked = torch.where(to_random, randoms, masked)
    return masked, labels


def mlm_loss(
    logits: torch.Tensor,
    labels: torch.Tensor,
    soft_targets: torch.Tensor | None = None,
    alpha: float = 0.0,
) -> dict[str, torch.Tensor]:
    """(1 - alpha) CE(logits, labels) + alpha * CE(logits, soft_targets) over masked tokens.

    Args:
        logits: (M, V) logits of the M masked positions only.
        labels: (M,) their original token ids.
        soft_targets: (M, V) momentum-model probabilities, or None.

    A batch with no masked token (M = 0) gives a zero loss that still backpropagates.
    """
    if logits.shape[0] == 0:
        zero = logits.sum() * 0.0
        return {"mlm_loss": zero, "mlm_acc": zero.detach()}
    logp = F.log_softmax(logits.float(), dim=-1)
    loss = F.nll_loss(logp, labels)
    if soft_targets is not None and alpha > 0:
        distill = -(logp * soft_targets.float()).sum(dim=-1).mean()
        loss = (1 - alpha) * loss + alpha * distill
    acc = (logits.detach().argmax(dim=-1) == labels).float().mean()
    return {"mlm_loss": loss, "mlm_acc": acc}
