"""One optimizer step of a PretrainTask, in this process or on every rank of a gloo group.

Shared by tests/unit/test_ddp.py (whose spawned workers import this module by name, so it
must stay importable without pytest) and tests/unit/test_reference_step.py.
"""

from __future__ import annotations

import os
import traceback
from datetime import timedelta

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel

from albef_ray.config import build_config
from albef_ray.objectives.pretrain import PretrainTask
from albef_ray.tasks import build_task
from albef_ray.train.loop import Schedule, train_step
from albef_ray.train.optim import build_optimizer

SCHEDULE = Schedule(total_steps=10, steps_per_epoch=10)


def one_step(task: PretrainTask, cfg, micro: list[dict], generator=None, wrap=None) -> dict:
    """``train_step`` at step 0 on ``micro`` (a list of micro-batch dicts); what it left behind.

    Args:
        task: the (unwrapped) task; trained in place.
        wrap: e.g. DDP; the step runs through ``wrap(task)`` as the Ray worker runs it
            through ``prepare_model(task)``.

    Returns:
        ``metrics`` (train_step's floats), ``grads`` ({name: .grad} of the unwrapped task's
        parameters, as left after the step) and ``state`` (its state dict after the step).
    """
    module = wrap(task) if wrap is not None else task
    module.train()
    optimizer = build_optimizer(module, cfg.optim)
    metrics = train_step(module, optimizer, micro, 0, cfg, SCHEDULE, generator)
    return {
        "metrics": metrics,
        "grads": {n: p.grad.detach().clone() for n, p in task.named_parameters() if p.grad is not None},
        "state": {k: v.detach().clone() for k, v in task.state_dict().items()},
    }


def ddp_worker(rank: int, world: int, rdzv: str, spec_path: str, out_dir: str) -> None:
    """``torch.multiprocessing.spawn`` target: every scenario of ``spec_path`` under DDP.

    ``spec_path`` holds ``{"scenarios": [{"name", "config" (dict for build_config),
    "state" (the task's initial state dict), "micro" ([rank][micro-batch] dicts),
    "seed"}]}``. The task is built and wrapped as ``launch/train.py`` does (plain DDP with
    the ``prepare_model`` arguments used there). Each rank writes
    ``{out_dir}/{name}.rank{rank}.pt``: :func:`one_step`'s result, or ``{"error": traceback}``.
    """
    torch.set_num_threads(1)
    os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")
    dist.init_process_group(
        "gloo", init_method=f"file://{rdzv}", rank=rank, world_size=world, timeout=timedelta(seconds=120)
    )
    try:
        spec = torch.load(spec_path, weights_only=True)
        for sc in spec["scenarios"]:
            try:
                cfg = build_config(sc["config"])
                torch.manual_seed(cfg.seed)
                task = build_task(cfg)
                task.load_state_dict(sc["state"])
                all_on = cfg.itc.enabled and cfg.itm.enabled and cfg.mlm.enabled

                def wrap(module, all_on=all_on):
                    return DistributedDataParallel(
                        module, find_unused_parameters=not all_on, forward_sync_buffers=False
                    )

                generator = torch.Generator().manual_seed(sc["seed"] + 1000 * rank)
                result = one_step(task, cfg, sc["micro"][rank], generator, wrap)
            except Exception:  # reported by the test that reads this scenario
                result = {"error": traceback.format_exc()}
            torch.save(result, os.path.join(out_dir, f"{sc['name']}.rank{rank}.pt"))
            dist.barrier()
    finally:
        dist.destroy_process_group()
