"""The ITC / ITM building blocks every task forward is made of.

A task's ``forward`` (:class:`~albef_ray.objectives.pretrain.PretrainTask`,
:class:`~albef_ray.objectives.retrieval.RetrievalTask`, and the fine-tuning tasks to come)
is a short sequence of these calls::

    temp = clamp_temperature(model, cfg)                      # learnable temp into its bounds
    image_tokens, text_hidden = online encoders               # (B, 1+N, Dv), (B, T, C)
    keys = momentum_forward(mom, model, image, ids, mask, ...)  # EMA (once), momentum keys
    losses, itc = itc_step(model, mom, cfg, ..., keys, temp, alpha, image_idx)
    out.update(itm_step(model, cfg, ..., itc, ...))           # or itm_rows / fuse_rows / itm_head
    finish_queue(mom, keys, image_idx, training=..., enqueue=...)
    out["loss"] = weighted_loss(out, loss_weights(cfg))

Each block returns its ``*_loss`` / ``*_acc`` entries (plus, with ``return_outputs``, the
detached tensors the fidelity checks compare) and what the next block needs. None of them
draws random numbers except through the ``generator`` handed to :func:`itm_rows`, so the
order of generator draws is the order a task calls them in.

The EMA / enqueue protocol (:func:`momentum_forward`, :func:`finish_queue`): called directly
in training mode a task runs the EMA before its momentum forward and enqueues its keys at
the end, as the official forward does; :func:`~albef_ray.train.loop.train_step` instead
passes ``update_momentum`` (True on the first micro-batch of an optimizer step only) and
``enqueue=False``, so the keys are kept (:meth:`MomentumEncoder.keep`) until the step is
known good. In eval mode neither happens.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from ..config import AlbefConfig
from ..model.albef import ALBEF
from ..model.momentum import GatedMomentum, MomentumEncoder, ema_
from .itc import contrastive, soft_cross_entropy
from .itm import itm_loss, itm_pairs


def clamp_temperature(model: ALBEF, cfg: AlbefConfig) -> torch.Tensor:
    """Clamp the learnable ITC temperature in place to ``[cfg.model.temp_min, temp_max]``.

    Runs under ``no_grad`` (the official ``self.temp.clamp_(0.001, 0.5)``), so the clamp is
    no part of the graph; the returned parameter carries the gradient of the similarities.

    Returns:
        ``model.temp``, the scalar parameter after clamping.
    """
    with torch.no_grad():
        model.temp.clamp_(cfg.model.temp_min, cfg.model.temp_max)
    return model.temp


class MomentumOutputs(NamedTuple):
    """What the momentum encoders computed for one batch (all without grad).

    Attributes:
        image_tokens: (B, 1+N, Dv) momentum image tokens.
        text_hidden: (R, T, C) momentum text states of the rows passed in, or None.
        image_feat: (B, E) fp32 momentum image features (the ITC keys), or None.
        text_feat: (B, E) fp32 momentum text features of the first B text rows, or None.
    """

    image_tokens: torch.Tensor
    text_hidden: torch.Tensor | None
    image_feat: torch.Tensor | None
    text_feat: torch.Tensor | None


def momentum_forward(
    mom: MomentumEncoder,
    model: ALBEF,
    image: torch.Tensor,
    input_ids: torch.Tensor | None = None,
    attention_mask: torch.Tensor | None = None,
    *,
    training: bool,
    update_momentum: bool,
    features: bool = True,
) -> MomentumOutputs:
    """EMA (when due), then the momentum encoders on the batch: the ITC keys.

    The EMA runs first, as the official code does each step, and only in training mode with
    ``update_momentum`` (:func:`~albef_ray.train.loop.train_step` sets it on the first
    micro-batch of an optimizer step, so it runs once per applied step).

    Args:
        mom: the momentum encoder and its queues.
        model: the online ALBEF (source of the EMA).
        image: (B, 3, H, W) normalised images.
        input_ids, attention_mask: (R, T) text rows for the momentum text encoder (R >= B
            when ``features``: the first B rows are the clean captions); None skips it.
        training: the task's ``self.training``.
        update_momentum: the step asks for the EMA.
        features: also project the ITC keys (image rows and the first B text rows).

    Returns:
        The momentum image tokens, text states and (with ``features``) ITC keys.
    """
    if training and update_momentum:
        mom.update(model)
    with torch.no_grad():
        m = mom.model
        image_tokens = m.encode_image(image)  # (B, 1+N, Dv)
        text_hidden = m.encode_text(input_ids, attention_mask) if input_ids is not None else None  # (R, T, C)
        image_feat = text_feat = None
        if features:
            image_feat = m.image_features(image_tokens)  # (B, E) fp32
            text_feat = m.text_features(text_hidden[: image.shape[0]])  # (B, E) fp32
    return MomentumOutputs(image_tokens, text_hidden, image_feat, text_feat)


def itc_step(
    model: ALBEF,
    mom: MomentumEncoder,
    cfg: AlbefConfig,
    image_tokens: torch.Tensor,
    text_hidden: torch.Tensor,
    keys: MomentumOutputs,
    temp: torch.Tensor,
    alpha: float = 0.0,
    image_idx: torch.Tensor | None = None,
    return_outputs: bool = False,
) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """ITC (Eq. 1-2, MoD targets Eq. 4) of the batch against its momentum keys + the queue.

    Args:
        model: the online ALBEF (its projections give the queries).
        mom: the momentum encoder (its queues are the extra columns).
        cfg: reads ``mod.itc`` (MoD of ITC on or off).
        image_tokens: (B, 1+N, Dv) online image tokens.
        text_hidden: (B, T, C) online text states of the clean captions.
        keys: :func:`momentum_forward` output with ``image_feat`` / ``text_feat``.
        temp: the (clamped) temperature parameter.
        alpha: this step's MoD weight; used only when ``cfg.mod.itc``.
        image_idx: (B,) int64 image index of each pair, or None (each pair its own image).
        return_outputs: also return ``sim_i2t``, ``sim_t2i`` (detached) and the targets.

    Returns:
        ``(out, itc)``: ``out`` holds ``itc_loss``, ``itc_acc`` (and the outputs above);
        ``itc`` is :func:`~albef_ray.objectives.itc.contrastive`'s details, whose
        ``sim_i2t`` / ``sim_t2i`` (B, B+K) the hard-negative sampling reads.
    """
    out, itc = contrastive(
        model.image_features(image_tokens), model.text_features(text_hidden), keys.image_feat, keys.text_feat,
        mom.image_queue, mom.text_queue, temp, alpha if cfg.mod.itc else 0.0, image_idx, mom.index_queue,
    )
    if return_outputs:
        out.update(sim_i2t=itc["sim_i2t"].detach(), sim_t2i=itc["sim_t2i"].detach(),
                   target_i2t=itc["target_i2t"], target_t2i=itc["target_t2i"])
    return out, itc


class FusionRows(NamedTuple):
    """One group of rows for the fusion encoder.

    Attributes:
        text: (P, T, C) text states.
        mask: (P, T) padding mask.
        image_index: (P,) int64 row of the batch's image tokens each text attends to.
    """

    text: torch.Tensor
    mask: torch.Tensor
    image_index: torch.Tensor


def itm_rows(
    cfg: AlbefConfig,
    text_hidden: torch.Tensor,
    attention_mask: torch.Tensor,
    itc: Mapping[str, torch.Tensor] | None,
    generator: torch.Generator | None = None,
    image_idx: torch.Tensor | None = None,
    negatives: tuple[torch.Tensor, torch.Tensor] | None = None,
    return_outputs: bool = False,
    hard: bool | None = None,
) -> tuple[FusionRows, dict[str, torch.Tensor]]:
    """The ITM rows: positives, (text i, image neg_image[i]), (text neg_text[i], image i).

    Negatives are sampled here (hard: from the ITC similarities, ``cfg.itm.hard_negatives``)
    unless given; this is the only generator use of the ITC / ITM blocks.

    Args:
        cfg: reads ``itm.hard_negatives``.
        text_hidden: (B, T, C) online text states; attention_mask: (B, T).
        itc: :func:`itc_step`'s details (``sim_i2t``, ``sim_t2i``), or None without ITC.
        generator: RNG for negative sampling.
        image_idx: (B,) int64 image index of each pair, or None.
        negatives: (neg_image (B,), neg_text (B,)) to use instead of sampling.
        return_outputs: also return ``neg_image`` / ``neg_text`` (when there are negatives).
        hard: hard negatives for this step; None: ``cfg.itm.hard_negatives``.

    Returns:
        ``(rows, out)``: the (P, ...) rows, P = 3B (B when B = 1), and the outputs.
    """
    sim_i2t, sim_t2i = (itc["sim_i2t"], itc["sim_t2i"]) if itc is not None else (None, None)
    hard = cfg.itm.hard_negatives if hard is None else hard
    text, mask, image_index, negatives = itm_pairs(
        text_hidden, attention_mask, sim_i2t, sim_t2i, hard, generator, image_idx, negatives,
    )
    out = {}
    if return_outputs and negatives is not None:
        out.update(neg_image=negatives[0], neg_text=negatives[1])
    return FusionRows(text, mask, image_index), out


def fuse_rows(model: ALBEF, groups: list[FusionRows], image_tokens: torch.Tensor) -> list[torch.Tensor]:
    """One fusion pass over several row groups (they share the image K/V), split per group.

    Args:
        model: the ALBEF whose fusion encoder runs.
        groups: row groups, concatenated in this order (the order of rows in the batch).
        image_tokens: (B, 1+N, Dv) image tokens the groups' ``image_index`` point into.

    Returns:
        (P_g, T, C) fused states of each group, in the order given.
    """
    if not groups:
        return []
    if len(groups) == 1:
        rows = groups[0]
    else:
        rows = FusionRows(*(torch.cat(parts) for parts in zip(*groups)))
    fused = model.fuse(rows.text, rows.mask, image_tokens, rows.image_index)  # (sum P_g, T, C)
    parts, start = [], 0
    for group in groups:
        n = group.text.shape[0]
        parts.append(fused[start : start + n])
        start += n
    return parts


def itm_head(
    model: ALBEF, fused: torch.Tensor, num_positive: int, return_outputs: bool = False
) -> dict[str, torch.Tensor]:
    """ITM head and loss on fused ITM rows.

    Args:
        model: the online ALBEF.
        fused: (P, T, C) fused states of :func:`itm_rows`' rows.
        num_positive: B, the matched pairs at the front.
        return_outputs: also return ``itm_logits`` (P, 2), detached.

    Returns:
        ``itm_loss``, ``itm_acc`` (and ``itm_logits``).
    """
    logits = model.itm_logits(fused)  # (P, 2)
    out = itm_loss(logits, num_positive=num_positive)
    if return_outputs:
        out["itm_logits"] = logits.detach()
    return out


def itm_step(
    model: ALBEF,
    cfg: AlbefConfig,
    image_tokens: torch.Tensor,
    text_hidden: torch.Tensor,
    attention_mask: torch.Tensor,
    itc: Mapping[str, torch.Tensor] | None,
    generator: torch.Generator | None = None,
    image_idx: torch.Tensor | None = None,
    negatives: tuple[torch.Tensor, torch.Tensor] | None = None,
    return_outputs: bool = False,
) -> dict[str, torch.Tensor]:
    """ITM in its own fusion pass: :func:`itm_rows` -> :func:`fuse_rows` -> :func:`itm_head`.

    Args:
        image_tokens: (B, 1+N, Dv) online image tokens.
        text_hidden: (B, T, C) online text states; attention_mask: (B, T).
        The rest as in :func:`itm_rows`.

    Returns:
        ``itm_loss``, ``itm_acc`` (with ``return_outputs`` also ``neg_image``, ``neg_text``,
        ``itm_logits``).
    """
    rows, out = itm_rows(cfg, text_hidden, attention_mask, itc, generator, image_idx, negatives, return_outputs)
    (fused,) = fuse_rows(model, [rows], image_tokens)  # (P, T, C)
    out.update(itm_head(model, fused, text_hidden.shape[0], return_outputs))
    return out


def finish_queue(
    mom: MomentumEncoder | None,
    keys: MomentumOutputs | None,
    image_idx: torch.Tensor | None = None,
    *,
    training: bool,
    enqueue: bool,
) -> None:
    """Enqueue the batch's ITC keys now (``enqueue``) or keep them for ``commit()``.

    Only in training mode and only when :func:`momentum_forward` produced keys; without
    ``image_idx`` an index queue gets -1 (no known image) for each key.

    Args:
        mom: the momentum encoder, or None (no momentum: nothing to do).
        keys: :func:`momentum_forward` output, or None.
        image_idx: (B,) int64 image index of each pair, or None.
        training: the task's ``self.training``.
        enqueue: True writes the keys to the queues; False holds them in ``mom.keep``.
    """
    if not training or mom is None or keys is None or keys.image_feat is None:
        return
    index = image_idx
    if index is None and mom.index_queue is not None:
        index = torch.full((keys.image_feat.shape[0],), -1, dtype=torch.long, device=keys.image_feat.device)
    (mom.enqueue if enqueue else mom.keep)(keys.image_feat, keys.text_feat, index=index)


@torch.no_grad()
def ema_module(copy: nn.Module, online: nn.Module, momentum: float | GatedMomentum) -> None:
    """p_m <- m * p_m + (1 - m) * p over the parameters of a task's extra momentum module.

    The same update :meth:`~albef_ray.model.momentum.MomentumEncoder.update` applies to the
    encoders, for a module outside them (a head, a decoder) and its EMA copy; a task calls it
    at the moment of the encoders' EMA with the encoders'
    :meth:`~albef_ray.model.momentum.MomentumEncoder.effective_momentum`, so both are gated
    alike.

    Args:
        copy: the momentum copy (parameters updated in place).
        online: the online module, with the same parameters in the same order.
        momentum: m (``cfg.momentum.momentum``), or its gated form.
    """
    ema_(list(copy.parameters()), [p.detach() for p in online.parameters()], momentum)


def distill_mix(hard: torch.Tensor, soft: torch.Tensor, alpha: float) -> torch.Tensor:
    """``(1 - alpha) * hard + alpha * soft``: a loss mixed with its momentum-distillation term.

    Args:
        hard: the loss against the ground truth.
        soft: the same loss against the momentum model's soft targets (same shape).
        alpha: this step's MoD weight.
    """
    return (1 - alpha) * hard + alpha * soft


def distilled_cross_entropy(
    logits: torch.Tensor, targets: torch.Tensor, momentum_logits: torch.Tensor | None = None, alpha: float = 0.0
) -> torch.Tensor:
    """A classifier's loss with momentum distillation of its logits (SNLI-VE, NLVR2):
    ``(1 - alpha) CE(logits, targets) + alpha CE(logits, softmax(momentum_logits))``, fp32, mean.

    Args:
        logits: (B, K) online logits.
        targets: (B,) int64 class indices.
        momentum_logits: (B, K) momentum-model logits (no grad), or None: plain cross-entropy.
        alpha: weight of the momentum targets.
    """
    logits = logits.float()
    loss = F.cross_entropy(logits, targets)
    if momentum_logits is None or alpha == 0:
        return loss
    return distill_mix(loss, soft_cross_entropy(logits, F.softmax(momentum_logits.float(), dim=1)), alpha)


def loss_weights(cfg: AlbefConfig) -> dict[str, float]:
    """The configured weight of each pretraining-family loss, keyed by its ``*_loss`` name."""
    return {"itc_loss": cfg.itc.weight, "itm_loss": cfg.itm.weight, "mlm_loss": cfg.mlm.weight}


def weighted_loss(out: Mapping[str, torch.Tensor], weights: Mapping[str, float]) -> torch.Tensor:
    """sum_k weights[k] * out[k] over the ``*_loss`` entries present in ``out``.

    The sum runs in the order of ``weights``; a disabled objective (no entry) adds nothing.
    Every ``*_loss`` in ``out`` must have a weight, so a new objective cannot silently drop
    out of the total.

    Args:
        out: a task's outputs; its ``*_loss`` entries are scalars.
        weights: loss name -> weight.

    Returns:
        The scalar total (the one value the training loop reads, as ``loss``).

    Raises:
        KeyError: an ``*_loss`` entry of ``out`` has no weight.
    """
    unweighted = [k for k in out if k.endswith("_loss") and k not in weights]
    if unweighted:
        raise KeyError(f"no weight configured for {unweighted}")
    return sum(weights[k] * out[k] for k in weights if k in out)
