"""Momentum (EMA) encoders and the ITC feature queues, one component with ``update()``."""

from __future__ import annotations

import copy

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from .albef import ALBEF


def concat_all_gather(t: torch.Tensor) -> torch.Tensor:
    """Concatenate ``t`` from every process along dim 0 (identity in one process)."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return t
    parts = [torch.empty_like(t) for _ in range(dist.get_world_size())]
    dist.all_gather(parts, t.contiguous())
    return torch.cat(parts, dim=0)


# Sub-modules of ALBEF that have momentum copies (the official: visual_encoder, vision_proj,
# text_encoder incl. MLM head, text_proj). The ITM head and temperature have none.
MOMENTUM_PARTS = ("vision", "vision_proj", "text", "text_proj", "fusion", "mlm_head")


class MomentumEncoder(nn.Module):
    """EMA copy of the ALBEF encoders plus image/text feature queues of length K.

    Queues are stored (E, K) like the official code, so ``feat @ queue`` gives similarities.
    With ``index_queue`` a third queue (K,) holds each queued pair's image index, so a caption
    of the same image in the queue is a positive too; -1 marks a slot that holds no known
    image (never equal to a real index, which is >= 0). A checkpoint without it (a released
    ALBEF, or one saved before pretraining kept indices) loads with every slot -1.

    The training step (:func:`albef_ray.train.loop.train_step`) drives two more things:

    * ``ema_due``: the online weights moved since the last :meth:`update`. The step runs the
      EMA on its first micro-batch only when it is due, so the EMA runs once per applied
      optimizer step (not per micro-batch, and not again after a skipped step).
    * keys kept by :meth:`keep` wait for :meth:`commit` (the step was good) or :meth:`discard`
      (it was skipped), so a non-finite batch never reaches the queues.
    """

    def __init__(
        self,
        model: ALBEF,
        momentum: float = 0.995,
        queue_size: int = 65536,
        use_queue: bool = True,
        index_queue: bool = False,
    ):
        super().__init__()
        if not 0.0 <= momentum <= 1.0:
            raise ValueError(f"momentum must be in [0, 1], got {momentum}")
        self.momentum = momentum
        self.model = copy.deepcopy(model)
        del self.model.itm_head, self.model.temp
        self.model.requires_grad_(False)
        self.queue_size = queue_size if use_queue else 0
        embed_dim = model.vision_proj.out_features
        self.register_buffer("image_queue", F.normalize(torch.randn(embed_dim, self.queue_size), dim=0))
        self.register_buffer("text_queue", F.normalize(torch.randn(embed_dim, self.queue_size), dim=0))
        self.register_buffer("queue_ptr", torch.zeros(1, dtype=torch.long))
        # None keeps the key out of the state dict: pretraining checkpoints are unchanged.
        self.register_buffer(
            "index_queue", torch.full((self.queue_size,), -1, dtype=torch.long) if index_queue else None
        )
        self.ema_due = True  # the official step 0 runs an EMA on the initial weights too
        self.pending: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]] = []

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs):
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs)
        key = prefix + "index_queue"
        if self.index_queue is not None and key in missing_keys:  # no indices saved: no known image
            missing_keys.remove(key)
            self.index_queue.fill_(-1)

    def _pairs(self, model: ALBEF) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        online = dict(model.named_parameters())
        momentum, source = [], []
        for name, p_m in self.model.named_parameters():
            if name.split(".", 1)[0] in MOMENTUM_PARTS:
                momentum.append(p_m)
                source.append(online[name].detach())
        return momentum, source

    @torch.no_grad()
    def update(self, model: ALBEF, momentum: float | None = None) -> None:
        """p_m <- m * p_m + (1 - m) * p  (exact copy at m = 0, frozen at m = 1)."""
        m = self.momentum if momentum is None else momentum
        p_m, p = self._pairs(model)
        torch._foreach_mul_(p_m, m)
        torch._foreach_add_(p_m, p, alpha=1.0 - m)
        self.ema_due = False

    @torch.no_grad()
    def keep(self, image_feat: torch.Tensor, text_feat: torch.Tensor, index: torch.Tensor | None = None) -> None:
        """Hold one micro-batch's momentum keys (B, E) until :meth:`commit` or :meth:`discard`."""
        self.pending.append((image_feat.detach(), text_feat.detach(), None if index is None else index.detach()))

    @torch.no_grad()
    def pending_finite(self) -> bool:
        """Whether every kept key is finite (True when none are kept)."""
        if not self.pending:
            return True
        flags = torch.stack([torch.isfinite(t).all() for keys in self.pending for t in keys[:2]])
        return bool(flags.all())

    @torch.no_grad()
    def commit(self, gather=concat_all_gather) -> None:
        """Enqueue the kept keys, one :meth:`enqueue` per micro-batch in order (a collective per call)."""
        pending, self.pending = self.pending, []
        for image_feat, text_feat, index in pending:
            self.enqueue(image_feat, text_feat, gather, index)

    def discard(self) -> None:
        """Drop the kept keys (their step was skipped)."""
        self.pending = []

    @torch.no_grad()
    def enqueue(
        self, image_feat: torch.Tensor, text_feat: torch.Tensor, gather=concat_all_gather, index: torch.Tensor | None = None
    ) -> None:
        """Write the global batch's momentum features (B*world, E) at the pointer, wrapping.

        ``index`` (B,) int64, the image index of each pair, is required exactly when the
        encoder keeps an ``index_queue``.
        """
        if (index is None) != (self.index_queue is None):
            raise ValueError("enqueue: pass `index` if and only if the encoder has an index_queue")
        if index is not None:
            index = gather(index)
        image_feat, text_feat = gather(image_feat), gather(text_feat)
        n = image_feat.shape[0]
        if self.queue_size % n:
            raise ValueError(f"queue_size {self.queue_size} is not divisible by the global batch {n}")
        ptr = int(self.queue_ptr)
        self.image_queue[:, ptr : ptr + n] = image_feat.T.to(self.image_queue.dtype)
        self.text_queue[:, ptr : ptr + n] = text_feat.T.to(self.text_queue.dtype)
        if index is not None:
            self.index_queue[ptr : ptr + n] = index
        self.queue_ptr[0] = (ptr + n) % self.queue_size
