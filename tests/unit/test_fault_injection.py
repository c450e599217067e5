"""The test-only fault (run.fail_at_step) fires after Ray has registered the last checkpoint.

Otherwise, on a busy machine, the restart point is a race between the worker's death and the
Ray controller's next poll (tests/ray/test_finetune.py once resumed from the checkpoint before).
"""

import json
import threading

import pytest

from albef_ray.config import build_config
from albef_ray.launch import faults
from albef_ray.launch.faults import FAULT_MARKER, RAY_CHECKPOINT_SNAPSHOT
from albef_ray.launch.faults import maybe_inject_fault as _maybe_inject_fault


class _Exited(Exception):
    pass


def _checkpoint(run_dir, name):
    (run_dir / name).mkdir(parents=True)
    (run_dir / name / "state.pt").write_bytes(b"x")


def _snapshot(run_dir, name):
    (run_dir / RAY_CHECKPOINT_SNAPSHOT).write_text(json.dumps({"latest_checkpoint_result": {"checkpoint_dir_name": name}}))


def test_the_fault_waits_until_ray_registered_the_newest_checkpoint(tmp_path, monkeypatch):
    run_dir = tmp_path / "run"
    _checkpoint(run_dir, "checkpoint_2026-01-01_00-00-01.000000")
    _checkpoint(run_dir, "checkpoint_2026-01-01_00-00-02.000000")
    _snapshot(run_dir, "checkpoint_2026-01-01_00-00-01.000000")  # Ray is one report behind
    seen = {}

    def exit_(code):
        seen["registered"] = json.loads((run_dir / RAY_CHECKPOINT_SNAPSHOT).read_text())["latest_checkpoint_result"]
        raise _Exited

    monkeypatch.setattr(faults.os, "_exit", exit_)
    catch_up = threading.Timer(0.3, _snapshot, (run_dir, "checkpoint_2026-01-01_00-00-02.000000"))
    catch_up.start()
    cfg = build_config({"run": {"fail_at_step": 5}})
    try:
        with pytest.raises(_Exited):
            _maybe_inject_fault(cfg, step=5, rank=1, world=2, run_dir=run_dir)
    finally:
        catch_up.join()
    assert seen["registered"]["checkpoint_dir_name"] == "checkpoint_2026-01-01_00-00-02.000000"
    assert (run_dir / FAULT_MARKER).exists()
    _maybe_inject_fault(cfg, step=5, rank=1, world=2, run_dir=run_dir)  # fires once: the restart goes on


def test_without_checkpoints_or_past_the_timeout_the_fault_still_fires(tmp_path, monkeypatch, caplog):
    monkeypatch.setattr(faults.os, "_exit", lambda code: (_ for _ in ()).throw(_Exited()))
    cfg = build_config({"run": {"fail_at_step": 1}})
    with pytest.raises(_Exited):
        _maybe_inject_fault(cfg, step=1, rank=1, world=2, run_dir=tmp_path / "fresh")  # nothing to wait for
    run_dir = tmp_path / "stuck"
    _checkpoint(run_dir, "checkpoint_a")
    faults._wait_until_registered(run_dir, timeout_s=0.0)
    assert "did not register checkpoint checkpoint_a" in caplog.text
