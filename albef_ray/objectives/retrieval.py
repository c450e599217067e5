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
Both tasks are built from the same blocks (:mod:`albef_ray.objectives.blocks`): pretraining
gets the image-id-aware ITC and negatives when its batches carry ``image_idx``; here it is
required. The EMA / enqueue protocol is the blocks' (:func:`~albef_ray.objectives.blocks.momentum_forward`,
:func:`~albef_ray.objectives.blocks.finish_queue`).
"""

from __future__ import annotations

import torch
from torch import nn

from ..config import AlbefConfig
from ..model.albef import ALBEF
from ..model.momentum import MomentumEncoder
from .blocks import (
    clamp_temperature,
    finish_queue,
    itc_step,
    itm_step,
    loss_weights,
    momentum_forward,
    weighted_loss,
)
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
        out: dict[str, torch.Tensor] = {}
        temp = clamp_temperature(model, cfg)
        image_idx = image_idx.to(device=image.device, dtype=torch.long)

        image_tokens = model.encode_image(image)  # (B, 1+N, Dv)
        text_hidden = model.encode_text(input_ids, attention_mask)  # (B, T, C)
        keys = momentum_forward(  # EMA first, then the (B, E) ITC keys
            mom, model, image, input_ids, attention_mask, training=self.training, update_momentum=update_momentum,
        )

        # ---- ITC with every caption of the same image a positive (both directions share it)
        losses, itc = itc_step(
            model, mom, cfg, image_tokens, text_hidden, keys, temp, alpha, image_idx, return_outputs
        )
        out.update(losses)

        # ---- ITM: positives, then (text i, image neg_image[i]), then (text neg_text[i], image i)
        out.update(itm_step(
            model, cfg, image_tokens, text_hidden, attention_mask, itc, generator, image_idx, itm_negatives,
            return_outputs,
        ))  # one fusion pass over the 3B (B when B = 1) ITM rows

        finish_queue(mom, keys, image_idx, training=self.training, enqueue=enqueue)
        out["loss"] = weighted_loss(out, loss_weights(cfg))
        out["temp"] = temp.detach()
        return out
