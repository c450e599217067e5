"""Image-text matching: negative sampling (hard or uniform) and the 2-way loss."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def _sample_rows(
    weights: torch.Tensor, generator: torch.Generator | None, exclude: torch.Tensor | None = None
) -> torch.Tensor:
    """One column per row, P(j) proportional to ``weights[i, j]``; never the diagonal.

    Robust where the official code raised "invalid multinomial distribution": non-finite or
    negative weights are zeroed, and a row with no mass left falls back to uniform over the
    columns it may take. ``exclude`` (B, B) bool forbids more columns (retrieval: the other
    captions of the same image); a row whose every other column is excluded (the whole
    batch shows one image) can only fall back to uniform over the off-diagonal columns.
    """
    b = weights.shape[0]
    w = torch.nan_to_num(weights.float(), nan=0.0, posinf=0.0, neginf=0.0).clamp_min(0.0)
    off_diag = ~torch.eye(b, dtype=torch.bool, device=w.device)
    allowed = off_diag if exclude is None else off_diag & ~exclude.to(w.device)
    allowed = torch.where(allowed.any(dim=1, keepdim=True), allowed, off_diag)
    w = w * allowed
    empty = w.sum(dim=1) <= 0
    w = torch.where(empty[:, None], allowed.float(), w)
    return torch.multinomial(w, 1, generator=generator).squeeze(1)


def sample_negatives(
    sim_i2t: torch.Tensor | None,
    sim_t2i: torch.Tensor | None,
    batch: int,
    hard: bool,
    generator: torch.Generator | None = None,
    device: torch.device | None = None,
    exclude: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """For each text a negative image, for each image a negative text.

    Args:
        sim_i2t, sim_t2i: (B, >=B) similarities; the first B columns are the batch. Used only
            when ``hard`` (negatives drawn from softmax over the allowed batch columns).
        batch: B (>= 2).
        hard: hard negatives; False samples uniformly among the allowed items.
        exclude: (B, B) bool, True where item j must not be row i's negative (retrieval:
            the same image, ``image_idx[i] == image_idx[j]``); the positive i is always excluded.

    Returns:
        ``neg_image`` (B,): image index for text i; ``neg_text`` (B,): text index for image i.
    """
    if batch < 2:
        raise ValueError("ITM negatives need a batch of at least 2")
    with torch.no_grad():
        if hard:
            # Softmax over the allowed columns only (= zero the rest and renormalise, without
            # underflowing when the excluded columns held all the mass).
            forbidden = torch.eye(batch, dtype=torch.bool, device=sim_t2i.device)
            if exclude is not None:
                forbidden = forbidden | exclude.to(sim_t2i.device)
            w_t2i = F.softmax(sim_t2i[:, :batch].float().masked_fill(forbidden, float("-inf")), dim=1)
            w_i2t = F.softmax(sim_i2t[:, :batch].float().masked_fill(forbidden, float("-inf")), dim=1)
        else:
            w_t2i = w_i2t = torch.ones(batch, batch, device=device)
        return _sample_rows(w_t2i, generator, exclude), _sample_rows(w_i2t, generator, exclude)


def same_image(image_idx: torch.Tensor | None) -> torch.Tensor | None:
    """(B, B) bool, True where pairs i and j show the same image; None without indices."""
    return None if image_idx is None else image_idx[:, None] == image_idx[None, :]


def itm_pairs(
    text_hidden: torch.Tensor,
    attention_mask: torch.Tensor,
    sim_i2t: torch.Tensor | None,
    sim_t2i: torch.Tensor | None,
    hard: bool,
    generator: torch.Generator | None = None,
    image_idx: torch.Tensor | None = None,
    negatives: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, tuple[torch.Tensor, torch.Tensor] | None]:
    """The ITM rows of one fusion pass, in the official order, for both tasks.

    Rows: (text i, image i) for every i, then (text i, image ``neg_image[i]``), then (text
    ``neg_text[i]``, image i); a batch of one has positives only. Negatives are drawn by
    :func:`sample_negatives` (hard: from the ITC similarities) unless given, never from a
    pair of the same image when ``image_idx`` is given (captions of one image are not
    negatives of each other).

    Args:
        text_hidden: (B, T, C) text encoder states; attention_mask: (B, T).
        sim_i2t, sim_t2i: (B, >=B) ITC similarities (used when ``hard``).
        image_idx: (B,) int64 image index of each pair, or None (every pair its own image).
        negatives: (neg_image (B,), neg_text (B,)) to use instead of sampling.

    Returns:
        ``text`` (P, T, C), ``mask`` (P, T), ``image_index`` (P,) into the batch's images,
        and the negatives used (None when B = 1); P = 3B (B when B = 1).
    """
    b = text_hidden.shape[0]
    arange = torch.arange(b, device=text_hidden.device)
    if b < 2:
        return text_hidden, attention_mask, arange, None
    if negatives is None:
        negatives = sample_negatives(
            sim_i2t.detach() if hard else None, sim_t2i.detach() if hard else None,
            b, hard, generator, text_hidden.device, exclude=same_image(image_idx),
        )
    neg_image, neg_text = negatives
    text = torch.cat([text_hidden, text_hidden, text_hidden[neg_text]])
    mask = torch.cat([attention_mask, attention_mask, attention_mask[neg_text]])
    return text, mask, torch.cat([arange, neg_image, arange]), negatives


def itm_loss(logits: torch.Tensor, num_positive: int) -> dict[str, torch.Tensor]:
    """Cross-entropy on (P + Nn, 2) logits whose first ``num_positive`` rows are matched pairs."""
    labels = torch.zeros(logits.shape[0], dtype=torch.long, device=logits.device)
    labels[:num_positive] = 1
    loss = F.cross_entropy(logits.float(), labels)
    acc = (logits.detach().argmax(dim=1) == labels).float().mean()
    return {"itm_loss": loss, "itm_acc": acc}
