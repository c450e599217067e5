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
"""

from __future__ import annotations

import torch
from torch import nn

from ..config import AlbefConfig
from ..model.albef import ALBEF
from ..model.momentum import MomentumEncoder
from .itc import index_positives, itc_loss, itc_targets
from .itm import itm_loss, sample_negatives
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
        image_feat = model.image_features(image_tokens)  # (B, E)
        text_feat = model.text_features(text_hidden)

        with torch.no_grad():
            if self.training:
                mom.update(model)
            m = mom.model
            m_image_feat = m.image_features(m.encode_image(image))  # (B, E)
            m_text_feat = m.text_features(m.encode_text(input_ids, attention_mask))
            image_bank = torch.cat([m_image_feat.T, mom.image_queue.clone()], dim=1)  # (E, B+K)
            text_bank = torch.cat([m_text_feat.T, mom.text_queue.clone()], dim=1)
            index_bank = torch.cat([image_idx, mom.index_queue.clone()])  # (B+K,)
            positives = index_positives(image_idx, index_bank)  # (B, B+K) bool

        # ---- ITC with every caption of the same image a positive (both directions share it)
        sim_i2t = image_feat @ text_bank / temp  # (B, B+K)
        sim_t2i = text_feat @ image_bank / temp
        alpha_itc = alpha if cfg.mod.itc else 0.0
        with torch.no_grad():
            sim_i2t_m = m_image_feat @ text_bank / temp if alpha_itc > 0 else None
            sim_t2i_m = m_text_feat @ image_bank / temp if alpha_itc > 0 else None
            t_i2t = itc_targets(sim_i2t, sim_i2t_m, alpha_itc, positives)
            t_t2i = itc_targets(sim_t2i, sim_t2i_m, alpha_itc, positives)
        out.update(itc_loss(sim_i2t, sim_t2i, t_i2t, t_t2i, positives))

        # ---- ITM: positives, then (text i, image neg_image[i]), then (text neg_text[i], image i)
        arange = torch.arange(b, device=image.device)
        rows, masks, index = [text_hidden], [attention_mask], [arange]
        if b >= 2:
            if itm_negatives is None:
                same_image = image_idx[:, None] == image_idx[None, :]  # (B, B)
                itm_negatives = sample_negatives(
                    sim_i2t.detach(), sim_t2i.detach(), b, cfg.itm.hard_negatives, generator, image.device,
                    exclude=same_image,
                )
            neg_image, neg_text = itm_negatives
            rows += [text_hidden, text_hidden[neg_text]]
            masks += [attention_mask, attention_mask[neg_text]]
            index += [neg_image, arange]
        fused = model.fuse(torch.cat(rows), torch.cat(masks), image_tokens, torch.cat(index))
        logits = model.itm_logits(fused)  # (B or 3B, 2)
        out.update(itm_loss(logits, num_positive=b))

        if self.training:
            mom.enqueue(m_image_feat, m_text_feat, index=image_idx)

        if return_outputs:
            out.update(sim_i2t=sim_i2t.detach(), sim_t2i=sim_t2i.detach(), target_i2t=t_i2t, target_t2i=t_t2i,
                       itm_logits=logits.detach())
            if b >= 2:
                out.update(neg_image=itm_negatives[0], neg_text=itm_negatives[1])
        out["loss"] = cfg.itc.weight * out["itc_loss"] + cfg.itm.weight * out["itm_loss"]
        out["temp"] = temp.detach()
        return out
