"""Everything one GPU machine can tell us about albef-ray, in one run of under 9 minutes.

Each part runs in its own process with a hard timeout, in order of value, and the JSON and
Markdown reports are rewritten after every part, so a crash, an OOM or a timeout loses that
part only. A part whose packages are missing (pydantic, ray; MLflow is never needed) is
recorded as ``skipped: <reason>``. Parts (GPU sizes; ``--rehearse`` runs all of them on the
CPU with albef_tiny and small data, same report shape):

 1. ``env``          device, packages, bf16 8192^3 matmul TFLOP/s (the MFU ceiling), copy GB/s
 2. ``step_b64``     albef_base 256 px bf16 batch 64, train_step: samples/s, peak memory, MFU
                     (989 TFLOP/s nominal and the measured matmul), profiler breakdown
 3. ``max_batch``    largest batch that fits (128 .. 2048, stop at the first OOM or 100 s)
 4. ``step_max``     step_b64's measurements at that batch
 5. ``official_b64`` the official structure (tests/reference_albef.py) under the same autocast
 6. ``compile_b64``  step_b64 with every transformer block torch.compile'd
 7. ``retrieval_1k`` zero-shot retrieval, 1,000 images x 5,000 captions at 384 px, k_test 128
 8. ``data``         Ray Data from Parquet shards of 640x480 JPEGs (15 CPUs) feeding train_step
 9. ``ray_train``    Ray Train (1 worker, 1 GPU) vs the same steps in a plain loop

Usage::

    bash benchmarks/gpu_suite.sh --rehearse          # here, on the CPU, 2-3 min
    bash benchmarks/gpu_suite.sh                      # on the GPU machine (see below)
    python benchmarks/gpu_suite.py --parts step_b64,data --budget 200

Reports: ``$OUT`` if set, else ``./gpu_suite_out``: ``gpu_suite.json``, ``gpu_suite.md`` and
``gpu_suite.log`` (every part's output, the last 100 KB of each); the table is printed last.

On a lent nvidia-h200 (no pydantic, ray or mlflow there): build ``.whl/`` once here with
``bash benchmarks/gpu_wheels.sh`` (about 45 MiB: pydantic, jsonschema and a ray 2.60.0 wheel
re-packed without its Java jars, RLlib, Serve and web UI), then call the device tool's ``run``
with ``carry: [".whl"]``, ``timeout_s: 600`` and the command::

    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site || exit; bash benchmarks/gpu_suite.sh

The suite's own budget (510 s) plus the install (~15 s) ends inside 9 minutes.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
LOG_TAIL = 100_000  # bytes of each part's output kept in gpu_suite.log


@dataclass
class Part:
    name: str
    module: str  # gpu_step.py or gpu_io.py
    kind: str  # the part function in that module
    spec: dict
    cap_s: float  # hard timeout
    needs: tuple[str, ...] = ("pydantic",)
    title: str = ""
    min_s: float = 25.0  # not started with less suite time left
    after: str | None = None  # a part whose result this one's spec needs
    extra: dict = field(default_factory=dict)


def plan(rehearse: bool) -> list[Part]:
    """The parts in order of value: full sizes on the GPU, tiny ones for the CPU rehearsal."""
    if rehearse:
        dev, size, b, prec = "cpu", "albef_tiny", 8, "bf16"
        step = {"device": dev, "size": size, "batch": b, "precision": prec, "warmup": 2, "steps": 3,
                "profile_steps": 2, "threads": 2}
        return [
            Part("env", "gpu_step.py", "env", {"device": dev, "matmul_n": 512, "matmul_reps": 5}, 60, needs=(),
                 title="machine"),
            Part("step_b64", "gpu_step.py", "step", {**step, "impl": "albef_ray"}, 120, title=f"{size} b{b} {prec}"),
            Part("max_batch", "gpu_step.py", "max_batch", {"device": dev, "size": size, "precision": prec,
                 "candidates": [16, 24, 32, 48, 64], "time_cap_s": 40, "threads": 2}, 60, title="largest batch"),
            Part("step_max", "gpu_step.py", "step", {**step, "impl": "albef_ray"}, 120, after="max_batch",
                 title="largest batch step"),
            Part("official_b64", "gpu_step.py", "step", {**step, "impl": "official_like"}, 120,
                 needs=("pydantic", "transformers"), title="official structure"),
            Part("compile_b64", "gpu_step.py", "step", {**step, "impl": "albef_ray", "compile": True}, 240,
                 title="torch.compile"),
            Part("retrieval_1k", "gpu_io.py", "retrieval", {"device": dev, "size": size, "images": 64, "k": 16,
                 "batch": 64, "rerank_batch": 64, "precision": prec, "threads": 2, "time_cap_s": 60}, 90,
                 title="retrieval 64 x 320"),
            Part("data", "gpu_io.py", "data", {"device": dev, "size": size, "batch": b, "precision": prec, "cpus": 2,
                 "rows": 384, "jpeg_size": [640, 480], "map_batch_size": 32, "shuffle_buffer": 64,
                 "memory_steps": 3, "skip_batches": 2}, 180, needs=("pydantic", "ray"), title="Ray Data -> step"),
            Part("ray_train", "gpu_io.py", "ray_train", {"device": dev, "size": size, "batch": b, "precision": prec,
                 "steps": 12, "log_every": 4, "cpus": 2, "cpus_per_worker": 1}, 240, needs=("pydantic", "ray"),
                 title="Ray Train vs plain"),
        ]
    dev, size, prec = "cuda", "albef_base", "bf16"
    step = {"device": dev, "size": size, "batch": 64, "precision": prec, "warmup": 3, "steps": 10, "profile_steps": 3}
    return [
        Part("env", "gpu_step.py", "env", {"device": dev, "matmul_n": 8192, "matmul_reps": 20}, 60, needs=(),
             title="machine"),
        Part("step_b64", "gpu_step.py", "step", {**step, "impl": "albef_ray"}, 120, title="albef_base b64 bf16"),
        Part("max_batch", "gpu_step.py", "max_batch", {"device": dev, "size": size, "precision": prec,
             "candidates": [128, 256, 384, 512, 768, 1024, 1536, 2048], "time_cap_s": 100}, 130,
             title="largest batch"),
        Part("step_max", "gpu_step.py", "step", {**step, "impl": "albef_ray", "steps": 5, "profile_steps": 2}, 100,
             after="max_batch", title="largest batch step"),
        Part("official_b64", "gpu_step.py", "step", {**step, "impl": "official_like"}, 120,
             needs=("pydantic", "transformers"), title="official structure b64"),
        Part("compile_b64", "gpu_step.py", "step", {**step, "impl": "albef_ray", "compile": True, "warmup": 4}, 160,
             title="torch.compile b64", min_s=90),
        Part("retrieval_1k", "gpu_io.py", "retrieval", {"device": dev, "size": size, "image_res": 384, "images": 1000,
             "k": 128, "batch": 256, "rerank_batch": 256, "precision": prec, "time_cap_s": 110}, 130,
             title="retrieval 1k x 5k, 384 px", min_s=40),
        Part("data", "gpu_io.py", "data", {"device": dev, "size": size, "batch": 64, "precision": prec, "cpus": 15,
             "rows": 15360, "jpeg_size": [640, 480], "threads": 1,
             # one 256-row block per decode task: 60 tasks, 4 waves over 15 CPUs, so the rate is a
             # steady state (the default 1,024-row windows make one wave of this small dataset)
             "shuffle_buffer": 256, "skip_batches": 4}, 150, needs=("pydantic", "ray"),
             title="Ray Data (15 CPUs) -> GPU", min_s=60),
        Part("ray_train", "gpu_io.py", "ray_train", {"device": dev, "size": size, "batch": 64, "precision": prec,
             "steps": 40, "log_every": 10, "cpus": 15, "cpus_per_worker": 4}, 180, needs=("pydantic", "ray"),
             title="Ray Train vs plain", min_s=60),
    ]


# ----------------------------------------------------------------------------- checks


def probe_packages(names: set[str], env: dict) -> dict[str, str | None]:
    """``{name: None}`` if it imports in a fresh interpreter like the parts', else the error."""
    code = (
        "import importlib, json, sys\n"
        "out = {}\n"
        "for n in sys.argv[1:]:\n"
        "    try:\n        importlib.import_module(n); out[n] = None\n"
        "    except BaseException as e:\n        out[n] = f'{type(e).__name__}: {e}'[:300]\n"
        "print(json.dumps(out))\n"
    )
    try:
        proc = subprocess.run([sys.executable, "-c", code, *sorted(names)], capture_output=True, text=True,
                              timeout=120, env=env)
        return json.loads(proc.stdout.strip().splitlines()[-1])
    except Exception as err:  # the probe itself broke: treat every package as unknown
        return {n: f"probe failed: {err}" for n in names}


def missing_reason(needs: tuple[str, ...], probe: dict[str, str | None]) -> str | None:
    """``"skipped: ..."`` naming the packages a part needs that do not import, else None."""
    bad = [f"{n} ({probe[n]})" if probe.get(n) and "No module named" not in probe[n] else n
           for n in needs if probe.get(n, "not probed")]
    return f"skipped: package {', '.join(bad)} not importable" if bad else None


def resolve(part: Part, results: dict) -> tuple[dict | None, str | None]:
    """The part's spec with values from earlier parts, or a skip reason."""
    spec = dict(part.spec)
    env = results.get("env", {}).get("result") or {}
    if env.get("cuda_available") and env.get("matmul", {}).get("tflops"):
        spec.setdefault("measured_peak_tflops", env["matmul"]["tflops"])
    if part.after == "max_batch":
        found = results.get("max_batch", {}).get("result") or {}
        largest = found.get("largest_fitting")
        if not largest:
            return None, f"skipped: no batch found by max_batch ({results.get('max_batch', {}).get('status', 'not run')})"
        spec["batch"] = largest
    return spec, None


# ----------------------------------------------------------------------------- running


def run_part(part: Part, spec: dict, timeout: float, work: Path, log_path: Path, env: dict) -> dict:
    out_file, part_log = work / f"{part.name}.json", work / f"{part.name}.log"
    out_file.unlink(missing_ok=True)
    cmd = [sys.executable, str(HERE / part.module), part.kind, "--spec", json.dumps(spec), "--out", str(out_file)]
    t0 = time.perf_counter()
    with open(part_log, "wb") as log:
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, cwd=ROOT, env=env, start_new_session=True)
        try:
            rc = proc.wait(timeout=timeout)
            status = "ok" if rc == 0 and out_file.exists() else "failed"
        except subprocess.TimeoutExpired:
            for sig in (signal.SIGTERM, signal.SIGKILL):  # the part's whole process group (Ray's too)
                try:
                    os.killpg(proc.pid, sig)
                    proc.wait(timeout=10)
                    break
                except (ProcessLookupError, subprocess.TimeoutExpired):
                    continue
            rc, status = None, "timeout"
    entry = {"status": status, "title": part.title, "wall_s": round(time.perf_counter() - t0, 1),
             "timeout_s": round(timeout), "spec": spec}
    text = part_log.read_bytes()
    with open(log_path, "ab") as log:
        log.write(f"\n===== {part.name} ({status}, {entry['wall_s']} s) =====\n".encode())
        log.write(text[-LOG_TAIL:])
    if out_file.exists():  # final, or what the part had measured when it stopped
        entry["result"] = json.loads(out_file.read_text())
    if status == "ok":
        pass
    elif status == "timeout":
        entry["error"] = f"timeout after {timeout:.0f} s"
    else:
        lines = [ln for ln in text.decode(errors="replace").splitlines() if ln.strip()]
        errors = [ln for ln in lines if ("Error" in ln or "error:" in ln) and not ln.startswith(" ")]
        entry["error"] = f"exit {rc}: " + (errors[-1] if errors else (lines[-1] if lines else "no output"))[:400]
    return entry


def write_reports(report: dict, out: Path) -> None:
    from gpu_report import markdown

    for name, text in (("gpu_suite.json", json.dumps(report, indent=1, default=str)),
                       ("gpu_suite.md", markdown(report))):
        tmp = out / f".{name}.tmp"
        tmp.write_text(text)
        tmp.replace(out / name)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rehearse", action="store_true", help="every part on the CPU with tiny sizes")
    ap.add_argument("--parts", help="comma-separated subset, in the suite's order")
    ap.add_argument("--budget", type=float, help="seconds for the whole suite (default 510 GPU, 900 rehearsal)")
    ap.add_argument("--out", help="report folder (default $OUT, else ./gpu_suite_out)")
    a = ap.parse_args(argv)
    sys.path.insert(0, str(HERE))
    t_start = time.perf_counter()
    budget = a.budget or (900.0 if a.rehearse else 510.0)
    out = Path(a.out or os.environ.get("OUT") or ROOT / "gpu_suite_out")
    out.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix="gpu_suite_"))
    log_path = out / "gpu_suite.log"
    log_path.write_bytes(b"")
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT)] + [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p])
    env.update(PYTHONUNBUFFERED="1", HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", TOKENIZERS_PARALLELISM="false",
               RAY_USAGE_STATS_ENABLED="0", RAY_DISABLE_DOCKER_CPU_WARNING="1", TQDM_DISABLE="1")
    parts = plan(a.rehearse)
    if a.parts:
        wanted = set(a.parts.split(","))
        unknown = wanted - {p.name for p in parts}
        if unknown:
            ap.error(f"unknown parts {sorted(unknown)}; known: {', '.join(p.name for p in parts)}")
        parts = [p for p in parts if p.name in wanted]
    probe = probe_packages({n for p in parts for n in p.needs} | {"torch", "mlflow"}, env)
    if not a.rehearse:
        cuda = subprocess.run([sys.executable, "-c", "import torch; print(torch.cuda.is_available())"],
                              capture_output=True, text=True, env=env).stdout.strip()
        if cuda != "True":
            print("no CUDA device here; use --rehearse for the CPU rehearsal", file=sys.stderr)
            return 2
    report = {"suite": {"mode": "rehearsal (CPU, tiny sizes: not results)" if a.rehearse else "gpu",
                        "started": time.strftime("%Y-%m-%d %H:%M:%S"), "budget_s": budget,
                        "python": sys.version.split()[0], "packages_missing": {k: v for k, v in probe.items() if v}},
              "parts": {}}
    for part in parts:
        left = budget - (time.perf_counter() - t_start)
        spec, reason = resolve(part, report["parts"])
        reason = missing_reason(part.needs, probe) or reason
        if reason is None and left < part.min_s:
            reason = f"skipped: {left:.0f} s of the suite's {budget:.0f} s left (needs {part.min_s:.0f})"
        if reason:
            report["parts"][part.name] = {"status": "skipped", "title": part.title, "reason": reason}
        else:
            print(f"[{time.perf_counter() - t_start:6.1f} s] {part.name}: {part.title} (timeout {min(part.cap_s, left):.0f} s)",
                  flush=True)
            report["parts"][part.name] = run_part(part, spec, min(part.cap_s, left), work, log_path, env)
            print(f"           -> {report['parts'][part.name]['status']} in {report['parts'][part.name]['wall_s']} s"
                  + (f": {report['parts'][part.name].get('error')}" if report['parts'][part.name].get("error") else ""),
                  flush=True)
        report["suite"]["elapsed_s"] = round(time.perf_counter() - t_start, 1)
        write_reports(report, out)
    from gpu_report import markdown

    print(markdown(report))
    print(f"reports: {out}/gpu_suite.json, gpu_suite.md, gpu_suite.log ({report['suite']['elapsed_s']} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
