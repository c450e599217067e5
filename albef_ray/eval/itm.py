"""Held-out image-text matching accuracy: does the ITM head tell a caption's image from others?

Pretraining's ``itm_acc`` is measured on the training batch's own pairs (one positive and two
negatives per pair, so always answering "no match" scores 2/3). This is the same question on a
held-out split: every caption is paired with its own image (positive), with another image and
its image with another image's caption (two negatives), negatives drawn uniformly at random
and never another caption of the same image. The prior of the three-way mix is again 2/3, so
a model that has not learned ITM scores 0.667; random rather than hard negatives keep the
number comparable between variants with and without ITC.
"""

from __future__ import annotations

import torch
from torch import nn

from ..config import AlbefConfig
from ..data.collate import tokenize
from ..data.transforms import normalize
from .retrieval import as_albef
from .split import RetrievalSplit

ITM_PRIOR = 2 / 3  # accuracy of always answering "no match" on 1 positive : 2 negatives


def sample_mismatches(txt2img: torch.Tensor, num_images: int, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """For each caption: another image, and another image's caption (uniform, never its own image).

    Args:
        txt2img: (N_txt,) the image of each caption.
        num_images: N_img (at least 2).
        generator: the draws' RNG.

    Returns:
        ``neg_image`` (N_txt,) image indices and ``neg_text`` (N_txt,) caption indices.
    """
    if num_images < 2:
        raise ValueError("held-out ITM accuracy needs at least two images")
    n = txt2img.shape[0]
    neg_image = (txt2img + torch.randint(1, num_images, (n,), generator=generator)) % num_images
    # A caption of another image: draw the image first, then one of its captions.
    other = (txt2img + torch.randint(1, num_images, (n,), generator=generator)) % num_images
    order = torch.argsort(txt2img, stable=True)
    counts = torch.bincount(txt2img, minlength=num_images)
    starts = torch.cumsum(counts, 0) - counts
    pick = (torch.rand(n, generator=generator) * counts[other]).long().clamp(max=counts[other] - 1)
    neg_text = order[starts[other] + pick]
    return neg_image, neg_text


@torch.no_grad()
def itm_accuracy(
    model: nn.Module,
    split: RetrievalSplit,
    tokenizer,
    cfg: AlbefConfig,
    device: torch.device | str | None = None,
    seed: int = 0,
    batch_size: int = 128,
) -> dict[str, float]:
    """ITM accuracy on ``split``: 1 positive and 2 random negatives per caption.

    Returns:
        ``itm_acc`` (all pairs), ``itm_acc_pos`` and ``itm_acc_neg`` (per class).
    """
    albef = as_albef(model)
    device = torch.device(device) if device is not None else next(albef.parameters()).device
    was_training = albef.training
    albef.eval()
    generator = torch.Generator().manual_seed(seed)
    neg_image, neg_text = sample_mismatches(split.txt2img, split.num_images, generator)
    input_ids, attention_mask = tokenize(tokenizer, split.captions, cfg.data.max_text_len)
    pos_right = neg_right = 0
    try:
        for start in range(0, split.num_texts, batch_size):
            rows = torch.arange(start, min(split.num_texts, start + batch_size))
            own = split.txt2img[rows]
            images = torch.cat([own, neg_image[rows], own])  # (3b,) image of each pair
            texts = torch.cat([rows, rows, neg_text[rows]])  # (3b,) caption of each pair
            pixels = split.images[images]
            pixels = normalize(pixels) if pixels.dtype == torch.uint8 else pixels
            ids, mask = input_ids[texts].to(device), attention_mask[texts].to(device)
            fused = albef.fuse(albef.encode_text(ids, mask), mask, albef.encode_image(pixels.to(device)))
            matched = albef.itm_logits(fused).argmax(-1).cpu() == 1  # (3b,)
            b = rows.shape[0]
            pos_right += int(matched[:b].sum())
            neg_right += int((~matched[b:]).sum())
    finally:
        albef.train(was_training)
    n = split.num_texts
    return {
        "itm_acc": (pos_right + neg_right) / (3 * n),
        "itm_acc_pos": pos_right / n,
        "itm_acc_neg": neg_right / (2 * n),
    }
