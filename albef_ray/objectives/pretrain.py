"""The pretraining task: runs the model and the enabled objectives, sums them into ``loss``.

One ``forward`` is one training micro-step (so DDP can wrap the task): EMA update of the
momentum encoders, ITC against batch + queue, ITM with sampled negatives, MLM, optional
momentum distillation, then enqueue. The schedule value ``alpha`` comes in as an argument.
Called directly in training mode it runs the EMA and the enqueue as the official forward
does; :func:`~albef_ray.train.loop.train_step` instead runs the EMA once per optimizer
step and enqueues only once the step is known good (``update_momentum`` / ``enqueue``).

The ITC / ITM parts, the temperature clamp, the EMA / enqueue protocol and the weighted sum
are the shared blocks of :mod:`albef_ray.objectives.blocks`; what is MLM's own stays here:
the masked caption riding along the clean one through the text encoder, its rows in the
same fusion pass as ITM's (sharing the image K/V), and the MoD soft targets.
"""

from __future__ import annotations

import torch
from torch import nn

from ..config import AlbefConfig
from ..model.albef import ALBEF
from ..model.momentum import MomentumEncoder
from .blocks import (
    FusionRows,
    clamp_temperature,
    finish_queue,
    fuse_rows,
    itc_step,
    itm_head,
    itm_rows,
    loss_weights,
    momentum_forward,
    weighted_loss,
)
from .mlm import IGNORE, SpecialTokens, mask_tokens, mlm_loss



class PretrainTask(nn.Module):
    """ALBEF pretraining (ITC + ITM + MLM, optional MoD) as configured by the switches.

    Args:
        model: the online ALBEF.
        cfg: the config tree; reads ``itc``, ``itm``, ``mlm``, ``mod``, ``momentum``, ``model``.
        special: special token ids of the tokenizer (for masking).
    """

    def __init__(self, model: ALBEF, cfg: AlbefConfig, special: SpecialTokens = SpecialTokens()):
        super().__init__()
        self.model = model
        self.cfg = cfg
        self.special = special
        self.momentum = (
            MomentumEncoder(
                model, cfg.momentum.momentum, cfg.momentum.queue_size,
                use_queue=cfg.itc.enabled, index_queue=cfg.itc.enabled,
            )
            if cfg.uses_momentum
            else None
        )

    def forward(
        self,
        image: torch.Tensor,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        alpha: float = 0.0,
        generator: torch.Generator | None = None,
        mlm_input: tuple[torch.Tensor, torch.Tensor] | None = None,
        itm_negatives: tuple[torch.Tensor, torch.Tensor] | None = None,
        return_outputs: bool = False,
        image_idx: torch.Tensor | None = None,
        update_momentum: bool = True,
        enqueue: bool = True,
        hard_negatives: bool | None = None,
    ) -> dict[str, torch.Tensor]:
        """One pretraining step's losses.

        Args:
            image: (B, 3, H, W) normalised images.
            input_ids, attention_mask: (B, T) tokenised captions.
            alpha: momentum-distillation weight for this step (the schedule lives outside).
            generator: RNG for masking and negative sampling (reproducible steps).
            mlm_input: (masked_ids, labels) to use instead of sampling a mask.
            itm_negatives: (neg_image (B,), neg_text (B,)) instead of sampling negatives.
            return_outputs: also return similarities, ITC targets, negatives and full ITM /
                MLM logits (fidelity checks).
            image_idx: (B,) int64 image index of each pair (shard batches carry it): captions
                of one image are ITC positives of each other (in the batch and the queue) and
                never each other's ITM negatives. None: every pair is its own image, as the
                official pretraining assumes.
            update_momentum: run the EMA before the momentum forward (training mode only).
            enqueue: write the momentum keys to the queues at the end (training mode only);
                False keeps them for ``momentum.commit()`` / ``momentum.discard()``.
            hard_negatives: ITM negatives of this step hard (True) or uniform; None:
                ``itm.hard_negatives`` (the schedule, ``itm.hard_negatives_from_step``, lives outside).

        Returns:
            ``loss`` (weighted sum), each enabled ``*_loss``, and detached metrics.
        """
        cfg, model, mom = self.cfg, self.model, self.momentum
        b = image.shape[0]
        out: dict[str, torch.Tensor] = {}
        temp = clamp_temperature(model, cfg)
        if image_idx is not None:
            image_idx = image_idx.to(device=image.device, dtype=torch.long)

        # ---- masking: the masked caption rides along with the clean one through the text encoder
        if cfg.mlm.enabled:
            if mlm_input is None:
                mlm_input = mask_tokens(
                    input_ids, model.arch.vocab_size, self.special, cfg.mlm.probability,
                    cfg.mlm.mask_fraction, cfg.mlm.random_fraction, generator,
                )
            masked_ids, labels = mlm_input
            ids_all = torch.cat([input_ids, masked_ids])  # (2B, T)
            mask_all = torch.cat([attention_mask, attention_mask])
        else:
            ids_all, mask_all = input_ids, attention_mask

        image_tokens = model.encode_image(image)  # (B, 1+N, Dv)
        text_all = model.encode_text(ids_all, mask_all)  # (B or 2B, T, C)
        text_hidden = text_all[:b]

        # ---- momentum encoders (no grad, EMA first): ITC keys from the clean captions, MoD-MLM
        # targets from the masked ones; the text encoder runs on the rows that are needed only
        alpha_mlm = alpha if (cfg.mod.mlm and cfg.mlm.enabled) else 0.0
        keys = None
        if mom is not None:
            if cfg.itc.enabled:
                m_text = ids_all, mask_all  # (B or 2B, T)
            elif alpha_mlm > 0:
                m_text = ids_all[b:], mask_all[b:]  # (B, T) masked captions
            else:
                m_text = None, None
            keys = momentum_forward(
                mom, model, image, *m_text,
                training=self.training, update_momentum=update_momentum, features=cfg.itc.enabled,
            )

        # ---- ITC (Eq. 1-2; MoD targets Eq. 4), fp32
        itc = None
        if cfg.itc.enabled:
            losses, itc = itc_step(
                model, mom, cfg, image_tokens, text_hidden, keys, temp, alpha, image_idx, return_outputs
            )
            out.update(losses)

        # ---- one fusion pass: ITM positives, ITM negatives, then MLM rows (all share image K/V)
        groups = []
        if cfg.itm.enabled:
            itm, extra = itm_rows(
                cfg, text_hidden, attention_mask, itc, generator, image_idx, itm_negatives, return_outputs,
                hard_negatives,
            )
            out.update(extra)
            groups.append(itm)
        if cfg.mlm.enabled:
            groups.append(FusionRows(text_all[b:], attention_mask, torch.arange(b, device=image.device)))
        fused = fuse_rows(model, groups, image_tokens)  # (3B or B, T, C) ITM, then (B, T, C) MLM

        if cfg.itm.enabled:
            out.update(itm_head(model, fused[0], b, return_outputs))

        if cfg.mlm.enabled:
            fused_mlm = fused[-1]  # (B, T, C)
            chosen = labels != IGNORE
            soft = None
            if alpha_mlm > 0:
                with torch.no_grad():
                    m = mom.model
                    m_fused = m.fuse(keys.text_hidden[-b:], attention_mask, keys.image_tokens)
                    soft = torch.softmax(m.mlm_logits(m_fused[chosen]).float(), dim=-1)
            # The vocabulary projection runs on the masked positions only (same loss, less work).
            out.update(mlm_loss(model.mlm_logits(fused_mlm[chosen]), labels[chosen], soft, alpha_mlm))
            if return_outputs:
                out["mlm_logits"] = model.mlm_logits(fused_mlm).detach()

        finish_queue(mom, keys, image_idx, training=self.training, enqueue=enqueue)
        out["loss"] = weighted_loss(out, loss_weights(cfg))
        out["temp"] = temp.detach()
        return out
