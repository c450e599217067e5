"""The pretraining task: runs the model and the enabled objectives, sums them into ``loss``.

One ``forward`` is one training micro-step (so DDP can wrap the task): EMA update of the
momentum encoders, ITC against batch + queue, ITM with sampled negatives, MLM, optional
momentum distillation, then enqueue. The schedule value ``alpha`` comes in as an argument.
Called directly in training mode it runs the EMA and the enqueue as the official forward
does; :func:`~albef_ray.train.loop.train_step` instead runs the EMA once per optimizer
step and enqueues only once the step is known good (``update_momentum`` / ``enqueue``).
"""

from __future__ import annotations

import logging

import torch
from torch import nn

from ..config import AlbefConfig
from ..model.albef import ALBEF
from ..model.momentum import MomentumEncoder
from .itc import contrastive
from .itm import itm_loss, itm_pairs
from .mlm import IGNORE, SpecialTokens, mask_tokens, mlm_loss

log = logging.getLogger(__name__)


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

        Returns:
            ``loss`` (weighted sum), each enabled ``*_loss``, and detached metrics.
        """
        cfg, model, mom = self.cfg, self.model, self.momentum
        b = image.shape[0]
        out: dict[str, torch.Tensor] = {}
        with torch.no_grad():
            model.temp.clamp_(cfg.model.temp_min, cfg.model.temp_max)
        temp = model.temp
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

        # ---- momentum encoders (no grad): EMA first, as the official code does each step
        alpha_itc = alpha if cfg.mod.itc else 0.0
        alpha_mlm = alpha if (cfg.mod.mlm and cfg.mlm.enabled) else 0.0
        if mom is not None:
            if self.training and update_momentum:
                mom.update(model)
            with torch.no_grad():
                m = mom.model
                m_image_tokens = m.encode_image(image)
                m_ids = ids_all if cfg.itc.enabled else ids_all[b:]
                m_mask = mask_all if cfg.itc.enabled else mask_all[b:]
                m_text_all = m.encode_text(m_ids, m_mask) if (cfg.itc.enabled or alpha_mlm > 0) else None
                if cfg.itc.enabled:
                    m_image_feat = m.image_features(m_image_tokens)  # (B, E) fp32
                    m_text_feat = m.text_features(m_text_all[:b])

        # ---- ITC (Eq. 1-2; MoD targets Eq. 4), fp32
        sim_i2t = sim_t2i = None
        if cfg.itc.enabled:
            losses, itc = contrastive(
                model.image_features(image_tokens), model.text_features(text_hidden), m_image_feat, m_text_feat,
                mom.image_queue, mom.text_queue, temp, alpha_itc, image_idx, mom.index_queue,
            )
            out.update(losses)
            sim_i2t, sim_t2i = itc["sim_i2t"], itc["sim_t2i"]
            if return_outputs:
                out.update(sim_i2t=sim_i2t.detach(), sim_t2i=sim_t2i.detach(),
                           target_i2t=itc["target_i2t"], target_t2i=itc["target_t2i"])

        # ---- one fusion pass for ITM positives, ITM negatives and MLM (rows share image K/V)
        rows, masks, index = [], [], []
        n_itm = 0
        if cfg.itm.enabled:
            text, mask, image_index, itm_negatives = itm_pairs(
                text_hidden, attention_mask, sim_i2t, sim_t2i, cfg.itm.hard_negatives, generator,
                image_idx, itm_negatives,
            )
            rows.append(text); masks.append(mask); index.append(image_index)
            n_itm = text.shape[0]
            if return_outputs and itm_negatives is not None:
                out.update(neg_image=itm_negatives[0], neg_text=itm_negatives[1])
        if cfg.mlm.enabled:
            rows.append(text_all[b:]); masks.append(attention_mask); index.append(torch.arange(b, device=image.device))
        if rows:
            fused = model.fuse(torch.cat(rows), torch.cat(masks), image_tokens, torch.cat(index))

        if cfg.itm.enabled:
            logits = model.itm_logits(fused[:n_itm])  # (B or 3B, 2)
            out.update(itm_loss(logits, num_positive=b))
            if return_outputs:
                out["itm_logits"] = logits.detach()

        if cfg.mlm.enabled:
            fused_mlm = fused[n_itm:]  # (B, T, C)
            chosen = labels != IGNORE
            soft = None
            if alpha_mlm > 0:
                with torch.no_grad():
                    m_fused = m.fuse(m_text_all[-b:], attention_mask, m_image_tokens)
                    soft = torch.softmax(m.mlm_logits(m_fused[chosen]).float(), dim=-1)
            # The vocabulary projection runs on the masked positions only (same loss, less work).
            out.update(mlm_loss(model.mlm_logits(fused_mlm[chosen]), labels[chosen], soft, alpha_mlm))
            if return_outputs:
                out["mlm_logits"] = model.mlm_logits(fused_mlm).detach()

        if cfg.itc.enabled and self.training:
            index_keys = image_idx if image_idx is not None else torch.full((b,), -1, device=image.device)
            (mom.enqueue if enqueue else mom.keep)(m_image_feat, m_text_feat, index=index_keys)

        weights = {"itc_loss": cfg.itc.weight, "itm_loss": cfg.itm.weight, "mlm_loss": cfg.mlm.weight}
        out["loss"] = sum(weights[k] * out[k] for k in weights if k in out)
        out["temp"] = temp.detach()
        return out


def build_task(cfg: AlbefConfig, special: SpecialTokens = SpecialTokens()) -> nn.Module:
    """Model from ``cfg.model`` (weights loaded per config) wrapped in the task ``cfg.task`` names.

    ``pretrain``: :class:`PretrainTask`; ``retrieval``:
    :class:`~albef_ray.objectives.retrieval.RetrievalTask`.
    """
    from ..model.loading import build_model_from_config, load_albef_checkpoint
    from .retrieval import RetrievalTask

    task_class = RetrievalTask if cfg.task == "retrieval" else PretrainTask
    task = task_class(build_model_from_config(cfg), cfg, special)
    if cfg.model.checkpoint:
        log.info("%s", load_albef_checkpoint(task, cfg.model.checkpoint))
    return task
