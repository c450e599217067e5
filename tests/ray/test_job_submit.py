"""`ray job submit` of a short pretraining run against a head node started here."""

import os
import socket
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

pytestmark = pytest.mark.ray
ROOT = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def head_node():
    env = {**os.environ, "PATH": f"{BIN}:{os.environ['PATH']}"}
    if (Path.home() / ".ray" / "auth_token").exists():
        env["RAY_AUTH_MODE"] = "token"  # `ray start` turns token auth on once a token exists
    port, dash = _free_port(), _free_port()
    subprocess.run(
        [BIN / "ray", "start", "--head", "--num-cpus=2", f"--port={port}", f"--dashboard-port={dash}",
         "--dashboard-host=127.0.0.1", "--disable-usage-stats"],
        env=env, check=True, capture_output=True, timeout=120,
    )
    try:
        yield f"http://127.0.0.1:{dash}", env
    finally:
        _stop_head(port)


def _stop_head(port: int) -> None:
    """Kill this head's processes only: `ray stop` would also kill any other Ray on the machine
    (a developer's running job or sweep)."""
    import signal

    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        if f":{port}" in cmdline or f"port={port}" in cmdline:  # gcs_server, raylet, dashboard, workers
            try:
                os.kill(int(entry.name), signal.SIGKILL)
            except OSError:
                pass
    # `ray start` recorded this head as the machine's current cluster; left behind, it makes every
    # later plain `ray.init()` (e.g. `albef-ray pretrain`) wait for a head that is gone.
    current = Path(tempfile.gettempdir()) / "ray" / "ray_current_cluster"
    try:
        if current.read_text().strip().endswith(f":{port}"):
            current.unlink()
    except OSError:
        pass


def _submit(cmd, env, attempts: int = 10):
    """`ray job submit`, again while the head's job agent is still starting (a slow machine)."""
    import time

    for _ in range(attempts):
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600, cwd=ROOT)
        if proc.returncode == 0 or "No available agent" not in proc.stdout + proc.stderr:
            return proc
        time.sleep(6)
    return proc


def test_job_submit_runs_pretrain(head_node, tmp_path):
    address, env = head_node
    cmd = [
        BIN / "ray", "job", "submit", "--address", address, "--working-dir", str(ROOT),
        "--runtime-env-json", '{"excludes": [".venv", "runs", ".git"]}', "--",
        "albef-ray", "pretrain", "--config", "experiments/demo_cpu.yaml",
        "train.max_steps=6", "train.log_every_steps=3", "train.checkpoint_every_steps=3",
        f"run.storage_path={tmp_path}", "run.name=submitted",
    ]
    proc = _submit(cmd, env)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-4000:]
    assert "finished at step 6" in out
    assert any((tmp_path / "submitted").glob("checkpoint_*/state.pt"))
    assert (tmp_path / "mlflow.db").exists()
