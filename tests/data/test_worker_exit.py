"""Decode workers end with the build that started them, however it is killed."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

pytestmark = pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="reads /proc (Linux)")

# A build whose reader stalls after handing 6 chunks to 2 workers: the workers sit idle.
SCRIPT = """
import io, sys, time
from PIL import Image
from albef_ray.data.build.candidates import Candidate, IterableSource
from albef_ray.data.build.writer import write_dataset

buffer = io.BytesIO()
Image.new("RGB", (8, 8)).save(buffer, "PNG")

def candidates():
    for i in range(192):
        yield Candidate("s", f"in{i}", f"id{i}", ["a caption"], image=buffer.getvalue())
    print("stalled", flush=True)
    time.sleep(600)

if __name__ == "__main__":
    write_dataset(sys.argv[1], [IterableSource("s", candidates)], shard_rows=1000, workers=2, progress=False)
"""


def _children(pid: int) -> set[int]:
    found = set()
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
            except OSError:
                continue
            if int(fields[1]) == pid:
                found.add(int(entry.name))
    return found


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"  # a zombie has exited; only its parent's wait is missing


def _wait_for(condition, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(0.2)
    return condition()


@pytest.mark.parametrize("how", [signal.SIGKILL, signal.SIGTERM])
def test_workers_exit_when_the_build_is_killed(tmp_path, how):
    script = tmp_path / "build.py"
    script.write_text(SCRIPT)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(Path.cwd()), os.environ.get("PYTHONPATH", "")])}
    build = subprocess.Popen(
        [sys.executable, str(script), str(tmp_path / "out")], stdout=subprocess.PIPE, text=True, env=env
    )
    workers: set[int] = set()
    try:
        assert build.stdout.readline().strip() == "stalled"
        # two pool workers (plus multiprocessing's resource tracker)
        assert _wait_for(lambda: len(_children(build.pid)) >= 2, timeout=60)
        workers = _children(build.pid)
        build.send_signal(how)
        build.wait(timeout=60)
        assert _wait_for(lambda: not any(_alive(pid) for pid in workers), timeout=60), "workers outlived the build"
    finally:
        build.kill()
        for pid in workers:
            if _alive(pid):
                os.kill(pid, signal.SIGKILL)
