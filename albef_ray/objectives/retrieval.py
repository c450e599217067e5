"""The retrieval fine-tuning task: image-id-aware ITC and ITM, summed into ``loss``.

Fine-tuning for image-text retrieval (ALBEF Sec. 4, official ``model_retrieval.py``) trains
on every caption of every image, so a batch or the queue often holds several captions of one
image. Two things change from pretraining:

* ITC targets: every pair showing the same image is a positive, y_ij = [idx_i = idx_j] / n_i
  over batch + queue (the queue keeps each entry's image index beside its features); with
  momentum distillation y = alpha * softmax(s_m) + (1 - alpha) * y.
* ITM hard negatives are drawn from the ITC similarities with every same-image item
  excluded, so a "negative" is never another caption of the positive's image.

There is no MLM. ``image_idx`` (B,) int64 comes with the batch (a stable hash of
``(source, image_id)``, :func:`albef_ray.data.schema.image_indices`); ``alpha`` is an argument.
Pretraining runs the same two functions (:func:`~albef_ray.objectives.itc.contrastive`,
:func:`~albef_ray.objectives.itm.itm_pairs`) when its batches carry ``image_idx``; here it is
required. The EMA / enqueue protocol is :class:`~albef_ray.objectives.pretrain.PretrainTask`'s.
"""

from __future__ import annotations

import torch
from torch import nn

from ..config import AlbefConfig
from ..model.albef import ALBEF
from ..model.momentum import MomentumEncoder
from .itc import contrastive
from .itm import itm_loss, itm_pairs
from .mlm import SpecialTokens


class RetrievalTask(nn.Module):
    """Retrieval fine-tuning (ITC + ITM, image-id-aware, optional MoD of ITC).

    Args:
        model: the online ALBEF.
        cfg: the config tree; reads ``itc``, ``itm``, ``mod``, ``momentum``, ``model``.
            The config checks guarantee ``itc`` and ``itm`` are enabled and ``mlm`` is not.
        special: unused (same constructor as :class:`~albef_ray.objectives.pretrain.PretrainTask`).
    """

    def __init__(self, model: ALBEF, cfg: AlbefConfig, special: SpecialTokens = SpecialTokens()):
        super().__init__()
        self.model = model
        self.cfg = cfg
        self.momentum = MomentumEncoder(model, cfg.momentum.momentum, cfg.momentum.queue_size, index_queue=True)

    def forward(
        self,
        image: torch.Tensor,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        alpha: float = 0.0,
        generator: torch.Generator | None = None,
        image_idx: torch.Tensor | None = None,
        itm_negatives: tuple[torch.Tensor, torch.Tensor] | None = None,
        return_outputs: bool = False,
        update_momentum: bool = True,
        enqueue: bool = True,
    ) -> dict[str, torch.Tensor]:
        """One fine-tuning step's losses.

        Args:
            image: (B, 3, H, W) normalised images.
            input_ids, attention_mask: (B, T) tokenised captions.
            alpha: momentum-distillation weight for this step.
            generator: RNG for negative sampling.
            image_idx: (B,) int64 image index of each pair; equal for captions of one image.
            itm_negatives: (neg_image (B,), neg_text (B,)) instead of sampling negatives.
            return_outputs: also return similarities, targets and ITM logits.
            update_momentum: run the EMA before the momentum forward (training mode only).
            enqueue: enqueue the momentum keys at the end (training mode only); False keeps
                them for ``momentum.commit()`` / ``momentum.discard()``.

        Returns:
            ``loss`` (weighted sum), ``itc_loss``, ``itm_loss``, accuracies and ``temp``.
        """
        if image_idx is None:
            raise ValueError("retrieval fine-tuning needs image_idx (B,) with the batch")
        cfg, model, mom = self.cfg, self.model, self.momentum
        b = image.shape[0]
        out: dict[str, torch.Tensor] = {}
        with torch.no_grad():
            model.temp.clamp_(cfg.model.temp_min, cfg.model.temp_max)
        temp = model.temp
        image_idx = image_idx.to(device=image.device, dtype=torch.long)

        image_tokens = model.encode_image(image)  # (B, 1+N, Dv)
        text_hidden = model.encode_text(input_ids, attention_mask)  # (B, T, C)

        with torch.no_grad():
            if self.training and update_momentum:
                mom.update(model)
            m = mom.model
            m_image_feat = m.image_features(m.encode_image(image))  # (B, E) fp32
            m_text_feat = m.text_features(m.encode_text(input_ids, attention_mask))

        # ---- ITC with every caption of the same image a positive (both directions share it)
        losses, itc = contrastive(
            model.image_features(image_tokens), model.text_features(text_hidden), m_image_feat, m_text_feat,
            mom.image_queue, mom.text_queue, temp, alpha if cfg.mod.itc else 0.0, image_idx, mom.index_queue,
        )
        out.update(losses)

        # ---- ITM: positives, then (text i, image neg_image[i]), then (text neg_text[i], image i)
        text, mask, image_index, itm_negatives = itm_pairs(
            text_hidden, attention_mask, itc["sim_i2t"], itc["sim_t2i"], cfg.itm.hard_negatives, generator,
            image_idx, itm_negatives,
        )
        logits = model.itm_logits(model.fuse(text, mask, image_tokens, image_index))  # (B or 3B, 2)
        out.update(itm_loss(logits, num_positive=b))

        if self.training:
            (mom.enqueue if enqueue else mom.keep)(m_image_feat, m_text_feat, index=image_idx)

        if return_outputs:
            out.update(sim_i2t=itc["sim_i2t"].detach(), sim_t2i=itc["sim_t2i"].detach(),
                       target_i2t=itc["target_i2t"], target_t2i=itc["target_t2i"], itm_logits=logits.detach())
            if itm_negatives is not None:
                out.update(neg_image=itm_negatives[0], neg_text=itm_negatives[1])
        out["loss"] = cfg.itc.weight * out["itc_loss"] + cfg.itm.weight * out["itm_loss"]
        out["temp"] = temp.detach()
        return out
