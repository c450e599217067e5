"""The training step and a single-process loop around it, in plain PyTorch.

:func:`train_step` is the unit a Ray Train worker will call too: one optimizer step made of
``optim.grad_accum`` micro-batches, with the lr and alpha schedules evaluated from the step
number, optional bf16 autocast, optional clipping, and non-finite steps skipped.
:func:`run_local` drives it over batches in this process, with a progress bar.
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn
from torch.profiler import record_function
from tqdm.auto import tqdm

from ..config import AlbefConfig, ConfigError
from ..precision import autocast_context, resolve_device
from .metrics import MetricWindow, materialise
from .optim import alpha_at, build_optimizer, lr_at, set_lr

log = logging.getLogger(__name__)

Batch = Mapping[str, object]
# Optional micro-batch entries handed to ``PretrainTask.forward`` as they are (tests and
# fidelity checks fix masks and negatives with them).
FORWARD_KEYS = ("mlm_input", "itm_negatives")
# Optional per-row tensors split with the batch and handed to the task's forward
# (``image_idx``: each pair's image index; pretraining and retrieval keep captions of one
# image apart). A task module names its own in a ``batch_keys`` class attribute (e.g. SNLI-VE
# ``("label",)``, NLVR2 ``("image2", "label")``); these are the default.
ROW_KEYS = ("image_idx",)


def batch_keys(task: nn.Module) -> tuple[str, ...]:
    """The optional batch entries ``task``'s forward takes (its ``batch_keys``, else :data:`ROW_KEYS`)."""
    return tuple(getattr(_unwrap(task), "batch_keys", ROW_KEYS))


@dataclass(frozen=True)
class Schedule:
    """The step counts the lr and alpha schedules need.

    Attributes:
        total_steps: optimizer steps of the whole run (``train.epochs x steps_per_epoch``).
        steps_per_epoch: optimizer steps per epoch (alpha warm-up is counted in epochs).
    """

    total_steps: int
    steps_per_epoch: int

    @classmethod
    def from_config(cls, cfg: AlbefConfig, steps_per_epoch: int | None = None) -> "Schedule":
        """``train.steps_per_epoch`` if set, else ``steps_per_epoch`` (e.g. the data's length)."""
        spe = cfg.train.steps_per_epoch or steps_per_epoch
        if not spe:
            raise ConfigError("train.steps_per_epoch: must be set when the number of batches is unknown")
        return cls(total_steps=cfg.train.epochs * spe, steps_per_epoch=spe)


def split_batch(batch: Batch, parts: int) -> list[dict[str, object]]:
    """Split every tensor of ``batch`` along dim 0 into ``parts`` equal micro-batches."""
    if parts == 1:
        return [dict(batch)]
    fixed = [k for k in FORWARD_KEYS if k in batch]
    if fixed:
        raise ValueError(f"cannot split a batch carrying {fixed}: pass a list of micro-batches instead")
    size = batch["input_ids"].shape[0]
    if size % parts:  # equal parts keep every micro-batch's enqueue a divisor of the ITC queue
        raise ConfigError(f"optim.grad_accum: a batch of {size} does not split into {parts} equal micro-batches")
    chunks = {k: torch.tensor_split(v, parts) for k, v in batch.items() if isinstance(v, torch.Tensor)}
    return [{k: v[i] for k, v in chunks.items()} for i in range(parts)]


def _unwrap(task: nn.Module) -> nn.Module:
    while hasattr(task, "module"):  # DDP (and test wrappers) keep the task as .module
        task = task.module
    return task


def all_ranks_agree(ok: torch.Tensor) -> torch.Tensor:
    """0-d bool tensor ``ok``, AND-ed over ranks on the device (an all-reduce under
    torch.distributed, else ``ok`` itself); no host sync."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return ok
    flag = ok.float().reshape(1)
    dist.all_reduce(flag, op=dist.ReduceOp.MIN)
    return flag[0] > 0


def optimizer_step_if(optimizer: torch.optim.Optimizer, ok: torch.Tensor) -> None:
    """``optimizer.step()`` where the 0-d bool ``ok`` is True, decided on the device.

    A fused Adam/AdamW (what :func:`~albef_ray.train.optim.build_optimizer` builds) takes the
    verdict as its ``found_inf`` input (the hook AMP's GradScaler uses): where set, the kernel
    leaves weights, moments and step count as they were. Any other optimizer falls back to a
    host sync (``bool(ok)``).
    """
    if optimizer.defaults.get("fused") and getattr(optimizer, "_step_supports_amp_scaling", False):
        optimizer.found_inf = (~ok).float()
        try:
            optimizer.step()
        finally:
            del optimizer.found_inf
    elif bool(ok):
        optimizer.step()


def to_device(batch: Batch, device: torch.device) -> dict[str, object]:
    """Tensors of ``batch`` moved to ``device``; other entries unchanged."""
    return {k: v.to(device, non_blocking=True) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}


def train_step(
    task: nn.Module,
    optimizer: torch.optim.Optimizer,
    batch: Batch | Sequence[Batch],
    step: int,
    cfg: AlbefConfig,
    schedule: Schedule,
    generator: torch.Generator | None = None,
    sync: bool = True,
) -> dict[str, float]:
    """One optimizer step, decided on the device: no host sync inside it.

    Args:
        task: a ``PretrainTask`` (or a DDP wrapper of one) on the batch's device; its
            train/eval mode is the caller's choice.
        optimizer: built by :func:`~albef_ray.train.optim.build_optimizer`.
        batch: a dict with ``image`` (B, 3, H, W), ``input_ids`` and ``attention_mask``
            (B, T), split into ``cfg.optim.grad_accum`` micro-batches; or a list of such
            micro-batch dicts, used as given (these may carry ``mlm_input`` /
            ``itm_negatives`` for the task). An ``image_idx`` (B,) entry is passed on too.
        step: 0-based optimizer step; sets lr (:func:`lr_at`), alpha (:func:`alpha_at`) and,
            before ``itm.hard_negatives_from_step``, uniform ITM negatives.
        cfg: the config tree (reads ``optim``, ``mod``, ``train.precision``).
        schedule: step counts of the run.
        generator: RNG for masking and negative sampling, on the batch's device.
        sync: return floats (one host sync, at the end). False returns the metrics as 0-d
            device tensors, so a loop can run ahead of the GPU and read them at its logging
            interval (:func:`materialise`).

    Returns:
        ``loss``, each ``*_loss`` and metric averaged over micro-batches (weighted by their
        size), ``grad_norm`` (before clipping) and ``skipped`` (1.0 when the loss or the
        gradient was non-finite and no update was made): floats, or 0-d tensors without
        ``sync``; ``lr`` and ``alpha`` are floats.

    Momentum encoder and queues (when the task has ``momentum``, a
    :class:`~albef_ray.model.momentum.MomentumEncoder`): the EMA runs once per optimizer
    step, before the first micro-batch's momentum forward (the official order), and only
    if the previous step changed the weights (``momentum.ema_due``). Every micro-batch's
    momentum keys are kept and enqueued after the step, one micro-batch after another,
    only when the step is applied; so all micro-batches of a step see the same momentum
    encoder and the queue as the previous step left it.

    Every micro-batch runs backward even after a non-finite loss, so DDP ranks stay in
    step. Whether the step is applied is agreed across ranks (:func:`all_ranks_agree`):
    every loss, the gradient norm and every momentum key must be finite on every rank;
    otherwise no rank updates weights, optimizer state, EMA or queues. The verdict is a
    device tensor: the fused AdamW skips on it (:func:`optimizer_step_if`), the queues'
    writes and pointer are gated by it, and the next step's EMA by ``momentum.ema_due``.
    Profiler ranges ``albef.forward``, ``albef.backward``, ``albef.optimizer`` (with
    ``albef.ema`` and ``albef.enqueue`` from the momentum encoder) split the step's time.
    """
    micro = list(batch) if isinstance(batch, Sequence) else split_batch(batch, cfg.optim.grad_accum)
    sizes = [int(mb["input_ids"].shape[0]) for mb in micro]
    lr = lr_at(step, cfg.optim, schedule.total_steps)
    alpha = alpha_at(step, schedule.steps_per_epoch, cfg.mod)
    set_lr(optimizer, lr)
    optimizer.zero_grad(set_to_none=True)

    device = micro[0]["input_ids"].device
    momentum = getattr(_unwrap(task), "momentum", None)
    if momentum is not None:
        momentum.discard()  # keys of an interrupted step
        # The EMA flag lives on the device (a resumed or new run starts from a Python bool), so
        # every step runs the same gated arithmetic: the straight and the resumed run agree.
        if not isinstance(momentum.ema_due, torch.Tensor):
            momentum.ema_due = torch.full((), bool(momentum.ema_due), device=device)
    row_keys = batch_keys(task)
    sums: dict[str, torch.Tensor] = {}
    for i, mb in enumerate(micro):
        weight = sizes[i] / sum(sizes)
        # DDP: all-reduce gradients only on the last micro-batch.
        last = i == len(micro) - 1
        sync_grads = contextlib.nullcontext() if last or not hasattr(task, "no_sync") else task.no_sync()
        step_kwargs = {} if momentum is None else {"update_momentum": i == 0, "enqueue": False}
        if cfg.itm.enabled and cfg.itm.hard_negatives and step < cfg.itm.hard_negatives_from_step:
            step_kwargs["hard_negatives"] = False  # uniform negatives until the switch step
        with sync_grads:
            with record_function("albef.forward"), autocast_context(cfg.train.precision, device):
                out = task(
                    mb["image"], mb["input_ids"], mb["attention_mask"], alpha=alpha, generator=generator,
                    **{k: mb[k] for k in FORWARD_KEYS + row_keys if k in mb}, **step_kwargs,
                )
            with record_function("albef.backward"):
                (out["loss"] * weight).backward()
        for k, v in out.items():
            if isinstance(v, torch.Tensor) and v.numel() == 1:
                v = weight * v.detach().float().reshape(())
                sums[k] = sums[k] + v if k in sums else v

    with record_function("albef.optimizer"):
        params = [p for group in optimizer.param_groups for p in group["params"] if p.grad is not None]
        grad_norm = torch.nn.utils.get_total_norm([p.grad for p in params]) if params else torch.zeros((), device=device)
        finite = torch.isfinite(sums["loss"]) & torch.isfinite(grad_norm)
        if momentum is not None:
            finite = finite & momentum.pending_finite(device)
        finite = all_ranks_agree(finite)  # every rank applies the step or none does
        if cfg.optim.grad_clip is not None:  # a non-finite norm spoils the gradients of a skipped step only
            torch.nn.utils.clip_grads_with_norm_(params, cfg.optim.grad_clip, grad_norm)
        optimizer_step_if(optimizer, finite)
    if momentum is not None:
        momentum.commit(applied=finite)
        momentum.ema_due = finite  # the weights moved: the next step starts with an EMA
    metrics: dict[str, object] = {**sums, "grad_norm": grad_norm.detach().float(), "skipped": (~finite).float()}
    if sync:
        metrics = materialise([metrics])[0]
    return {**metrics, "lr": lr, "alpha": alpha}


def format_metrics(step: int, total: int, metrics: Mapping[str, float]) -> str:
    """``step 10/150 | loss 12.4 | itc_loss 5.1 | ... | lr 1.00e-04`` for a log line."""
    losses = ["loss"] + sorted(k for k in metrics if k.endswith("_loss"))
    others = [k for k in metrics if k not in losses and k not in ("lr", "skipped")]
    parts = [f"step {step}/{total}"] + [f"{k} {metrics[k]:.4g}" for k in losses + others if k in metrics]
    parts.append(f"lr {metrics['lr']:.2e}")
    if metrics.get("skipped"):
        parts.append(f"skipped {int(metrics['skipped'])}")
    return " | ".join(parts)


def run_local(
    cfg: AlbefConfig,
    batches: Iterable[Batch],
    task: nn.Module | None = None,
    device: torch.device | None = None,
    progress: bool = True,
    log_fn: Callable[[str], None] = tqdm.write,
) -> list[dict[str, float]]:
    """Train in this process for ``train.epochs`` passes over ``batches`` (or ``train.max_steps``).

    Args:
        cfg: the config tree.
        batches: re-iterable batch dicts (see :func:`train_step`), one pass per epoch; an
            epoch ends after ``train.steps_per_epoch`` batches when that is set.
        task: the pretraining task; built from ``cfg`` (seeded by ``cfg.seed``) when None.
        device: defaults to :func:`resolve_device`.
        progress: show a tqdm progress bar.
        log_fn: receives a line of window-averaged metrics every ``train.log_every_steps``.

    Returns:
        One metric dict per step (:func:`train_step`'s, plus ``step`` and ``epoch``).
    """
    from ..tasks import build_task

    torch.manual_seed(cfg.seed)
    device = device or resolve_device(cfg)
    task = (task if task is not None else build_task(cfg)).to(device).train()
    optimizer = build_optimizer(task, cfg.optim)
    schedule = Schedule.from_config(cfg, len(batches) if hasattr(batches, "__len__") else None)
    stop = min(schedule.total_steps, cfg.train.max_steps or schedule.total_steps)
    generator = torch.Generator(device=device).manual_seed(cfg.seed)

    history: list[dict[str, float]] = []
    window = MetricWindow()
    step = 0
    start = time.perf_counter()
    bar = tqdm(total=stop, desc="pretrain", unit="step", disable=not progress, dynamic_ncols=True)
    with bar:
        for epoch in range(cfg.train.epochs):
            for i, batch in enumerate(batches):
                if i >= schedule.steps_per_epoch or step >= stop:
                    break
                # Metrics stay on the device until the logging interval: no sync per step.
                metrics = train_step(task, optimizer, to_device(batch, device), step, cfg, schedule, generator, sync=False)
                history.append({**metrics, "step": float(step), "epoch": float(epoch)})
                window.add(metrics)
                step += 1
                bar.update(1)
                if step % cfg.train.log_every_steps == 0 or step == stop:
                    summary = window.flush()
                    summary["s_per_step"] = (time.perf_counter() - start) / step
                    bar.set_postfix(loss=f"{summary['loss']:.3f}", refresh=False)
                    log_fn(format_metrics(step, stop, summary))
            if step >= stop:
                break
    history = materialise(history)
    skipped = int(sum(h["skipped"] for h in history))
    if skipped:
        log.warning("%d of %d steps were skipped for a non-finite loss or gradient", skipped, step)
    return history
