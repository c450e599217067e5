"""Momentum (EMA) encoders and the ITC feature queues, one component with ``update()``."""

from __future__ import annotations

import copy
from typing import NamedTuple

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


class GatedMomentum(NamedTuple):
    """An EMA's two weights as 0-d device tensors: ``keep`` = m and ``take`` = 1 - m where the
    EMA is due, 1 and 0 where not. Both are cast from Python doubles, so they equal the float
    update's weights bit for bit."""

    keep: torch.Tensor
    take: torch.Tensor


def ema_(copies: list[torch.Tensor], sources: list[torch.Tensor], m: "float | GatedMomentum") -> None:
    """``c <- m * c + (1 - m) * s`` for each pair, in place, without a host sync.

    ``m`` a float: the plain update. A :class:`GatedMomentum` (from
    :meth:`MomentumEncoder.effective_momentum`): the same update decided on the device; where
    no EMA is due (m = 1) every copy keeps its value exactly.
    """
    if not copies:
        return
    if isinstance(m, GatedMomentum):
        torch._foreach_mul_(copies, m.keep)
        torch._foreach_add_(copies, torch._foreach_mul(sources, m.take))
    else:
        torch._foreach_mul_(copies, m)
        torch._foreach_add_(copies, sources, alpha=1.0 - m)


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

    * ``ema_due``: the online weights moved since the last :meth:`update`, so the EMA runs
      once per applied optimizer step (not per micro-batch, and not again after a skipped
      step). A Python bool (before the first step, or driven by hand): the caller decides
      whether to call :meth:`update`. A 0-d bool tensor (set by the step: whether it was
      applied): :meth:`update` always runs and the tensor gates it on the device
      (:meth:`effective_momentum`), so no host sync decides it.
    * keys kept by :meth:`keep` wait for :meth:`commit` (the step was good; with ``applied``
      the step's device flag decides each write) or :meth:`discard` (it was skipped), so a
      non-finite batch never reaches the queues.
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
        self.ema_due: bool | torch.Tensor = True  # the official step 0 runs an EMA on the initial weights too
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

    def effective_momentum(self, momentum: float | None = None) -> float | GatedMomentum:
        """The m of this step's EMA: ``momentum`` (default ``self.momentum``) as a float, or,
        when ``ema_due`` is a device flag, a :class:`GatedMomentum` (m where due, 1 where not).
        A task's extra momentum modules (heads, decoder) use it too."""
        m = self.momentum if momentum is None else momentum
        if not isinstance(self.ema_due, torch.Tensor):
            return m
        # Python scalars travel as kernel arguments (no host-to-device copy); 1 - m is taken
        # in double precision, as the float update's alpha is.
        return GatedMomentum(torch.where(self.ema_due, m, 1.0), torch.where(self.ema_due, 1.0 - m, 0.0))

    @torch.no_grad()
    def update(self, model: ALBEF, momentum: float | None = None) -> None:
        """p_m <- m * p_m + (1 - m) * p  (exact copy at m = 0, frozen at m = 1).

        With a device ``ema_due`` flag the update is gated by it (see :meth:`effective_momentum`)
        and the flag stays for the step to reset; otherwise ``ema_due`` becomes False.
        """
        p_m, p = self._pairs(model)
        with torch.profiler.record_function("albef.ema"):
            ema_(p_m, p, self.effective_momentum(momentum))
        if not isinstance(self.ema_due, torch.Tensor):
            self.ema_due = False

    @torch.no_grad()
    def keep(self, image_feat: torch.Tensor, text_feat: torch.Tensor, index: torch.Tensor | None = None) -> None:
        """Hold one micro-batch's momentum keys (B, E) until :meth:`commit` or :meth:`discard`."""
        self.pending.append((image_feat.detach(), text_feat.detach(), None if index is None else index.detach()))

    @torch.no_grad()
    def pending_finite(self, device: torch.device | None = None) -> torch.Tensor:
        """0-d bool tensor: every kept key is finite (True when none are kept); no host sync."""
        if not self.pending:
            return torch.ones((), dtype=torch.bool, device=device or self.queue_ptr.device)
        return torch.stack([torch.isfinite(t).all() for keys in self.pending for t in keys[:2]]).all()

    @torch.no_grad()
    def commit(self, gather=concat_all_gather, applied: torch.Tensor | None = None) -> None:
        """Enqueue the kept keys, one :meth:`enqueue` per micro-batch in order (a collective per call).

        ``applied`` (0-d bool tensor): the step's device-side verdict; where False the queues and
        pointer keep their values (the same collectives run either way)."""
        pending, self.pending = self.pending, []
        with torch.profiler.record_function("albef.enqueue"):
            for image_feat, text_feat, index in pending:
                self.enqueue(image_feat, text_feat, gather, index, applied)

    def discard(self) -> None:
        """Drop the kept keys (their step was skipped)."""
        self.pending = []

    @torch.no_grad()
    def enqueue(
        self,
        image_feat: torch.Tensor,
        text_feat: torch.Tensor,
        gather=concat_all_gather,
        index: torch.Tensor | None = None,
        applied: torch.Tensor | None = None,
    ) -> None:
        """Write the global batch's momentum features (B*world, E) at the pointer, wrapping.

        ``index`` (B,) int64, the image index of each pair, is required exactly when the
        encoder keeps an ``index_queue``. ``applied`` (0-d bool tensor) gates the write and
        the pointer's advance on the device (no host sync); None writes unconditionally.
        """
        if (index is None) != (self.index_queue is None):
            raise ValueError("enqueue: pass `index` if and only if the encoder has an index_queue")
        if index is not None:
            index = gather(index)
        image_feat, text_feat = gather(image_feat), gather(text_feat)
        n = image_feat.shape[0]
        if self.queue_size % n:
            raise ValueError(f"queue_size {self.queue_size} is not divisible by the global batch {n}")
        if applied is None:
            ptr = int(self.queue_ptr)
            self.image_queue[:, ptr : ptr + n] = image_feat.T.to(self.image_queue.dtype)
            self.text_queue[:, ptr : ptr + n] = text_feat.T.to(self.text_queue.dtype)
            if index is not None:
                self.index_queue[ptr : ptr + n] = index
            self.queue_ptr[0] = (ptr + n) % self.queue_size
            return
        # The pointer stays on the device: columns ptr..ptr+n-1 (no wrap inside, K % n == 0).
        cols = self.queue_ptr + torch.arange(n, device=self.queue_ptr.device)  # (n,)

        def write(queue: torch.Tensor, dim: int, new: torch.Tensor) -> None:
            queue.index_copy_(dim, cols, torch.where(applied, new.to(queue.dtype), queue.index_select(dim, cols)))

        write(self.image_queue, 1, image_feat.T)
        write(self.text_queue, 1, text_feat.T)
        if index is not None:
            write(self.index_queue, 0, index)
        self.queue_ptr.copy_(torch.where(applied, (self.queue_ptr + n) % self.queue_size, self.queue_ptr))
