"""TEST ONLY: a worker that dies once at a chosen step, as a lost node would (``run.fail_at_step``).

The Ray tests use it to check that Ray Train restarts the worker group from the last
checkpoint and that at most one checkpoint interval is lost. Nothing else may call it; the
worker loop calls :func:`maybe_inject_fault` once per step, which returns at once unless
``run.fail_at_step`` is set.
"""

from __future__ import annotations

import json
import logging
import os
import time
from pathlib import Path

from ..config import AlbefConfig

log = logging.getLogger(__name__)
FAULT_MARKER = "fault_injected"  # in the run directory once the fault has fired
RAY_CHECKPOINT_SNAPSHOT = "checkpoint_manager_snapshot.json"  # Ray Train's record of registered checkpoints


def _wait_until_registered(run_dir: Path, timeout_s: float = 120.0) -> None:
    """TEST ONLY: wait until Ray has registered the newest checkpoint written to ``run_dir``.

    ``ray.train.report`` returns once the checkpoint is on disk; the controller registers it
    when it next polls the workers, and a worker lost before that restarts the group from the
    checkpoint before. On a busy machine that poll can lag a step or more, so an injected
    fault waits for it: the restart point is then the last checkpoint, deterministically.
    """
    from ..train.checkpoint import STATE_FILE

    written = sorted(p.name for p in run_dir.glob("checkpoint_*") if (p / STATE_FILE).is_file())  # named by time
    if not written:
        return
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            latest = json.loads((run_dir / RAY_CHECKPOINT_SNAPSHOT).read_text()).get("latest_checkpoint_result") or {}
        except (OSError, ValueError):  # not written yet, or caught mid-write
            latest = {}
        if latest.get("checkpoint_dir_name") == written[-1]:
            return
        time.sleep(0.2)
    log.warning("Ray did not register checkpoint %s within %.0f s; injecting the fault anyway", written[-1], timeout_s)


def maybe_inject_fault(cfg: AlbefConfig, step: int, rank: int, world: int, run_dir: Path) -> None:
    """TEST ONLY (``run.fail_at_step``): one worker dies once, as a lost node would."""
    if cfg.run.fail_at_step is None or step != cfg.run.fail_at_step or rank != min(1, world - 1):
        return
    marker = run_dir / FAULT_MARKER
    if marker.exists():
        return
    _wait_until_registered(run_dir)
    marker.parent.mkdir(parents=True, exist_ok=True)
    marker.write_text(f"killed rank {rank} at step {step}\n")
    os._exit(1)
