"""The GPU suite's plumbing (benchmarks/gpu_*.py) without a GPU: plan, skips, arithmetic, report."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[2] / "benchmarks"
sys.path.insert(0, str(BENCH))

import gpu_profile  # noqa: E402
import gpu_report  # noqa: E402
import gpu_step  # noqa: E402
import gpu_suite  # noqa: E402


def test_mfu_and_queue_arithmetic():
    # 1.2 PFLOP per step in 2 s is 600 TFLOP/s: 60 % of a 1,000 TFLOP/s peak
    assert gpu_step.mfu(1.2e15, 2.0, 1000.0) == pytest.approx(0.6)
    assert gpu_step.mfu(12.4e12, 0.05, 989.0) == pytest.approx(12.4e12 / 0.05 / 989e12)
    assert gpu_step.queue_for(64) == 65536
    assert gpu_step.queue_for(384) == 65280 and 65280 % 384 == 0  # the largest multiple under the paper's queue
    assert gpu_step.queue_for(100_000) == 100_000  # never smaller than one batch


def test_attribute_nested_ranges_and_kernel_launches():
    # step [0, 100]: data_wait [0, 2], forward [2, 40] holding ema [5, 10], backward [40, 80]
    ranges = [("albef.step", 0, 100), ("albef.data_wait", 0, 2), ("albef.forward", 2, 40),
              ("albef.ema", 5, 10), ("albef.backward", 40, 80)]
    # launches: forward 3 + 4, ema 6, backward (from another thread, by time) 20, other 1, outside 9
    launches = [(3, 3.0), (30, 4.0), (7, 6.0), (50, 20.0), (90, 1.0), (150, 9.0)]
    out = gpu_profile.attribute(ranges, launches)
    assert out["albef.forward"] == {"cpu": 38 - 5, "device": 7.0, "count": 1}  # EMA's span not counted twice
    assert out["albef.ema"]["device"] == 6.0 and out["albef.ema"]["cpu"] == 5
    assert out["albef.backward"]["device"] == 20.0
    assert out["albef.step"] == {"cpu": 100 - 2 - 38 - 40, "device": 1.0, "count": 1}
    assert out["(none)"]["device"] == 9.0


def test_missing_packages_give_skip_reasons():
    probe = {"pydantic": None, "ray": "ModuleNotFoundError: No module named 'ray'",
             "transformers": "ImportError: libfoo.so missing"}
    assert gpu_suite.missing_reason(("pydantic",), probe) is None
    assert gpu_suite.missing_reason(("pydantic", "ray"), probe) == "skipped: package ray not importable"
    reason = gpu_suite.missing_reason(("transformers",), probe)
    assert reason.startswith("skipped: package transformers (ImportError: libfoo.so missing)")
    assert gpu_suite.missing_reason(("mlflow",), probe) == "skipped: package mlflow not importable"  # not probed


def test_plans_have_the_same_parts_and_rehearsal_stays_on_cpu():
    gpu, cpu = gpu_suite.plan(False), gpu_suite.plan(True)
    assert [p.name for p in gpu] == [p.name for p in cpu]
    assert [p.name for p in gpu][:3] == ["env", "step_b64", "max_batch"]  # order of value
    assert all(p.spec["device"] == "cpu" for p in cpu)
    assert {p.name for p in gpu if "ray" in p.needs} == {"data", "ray_train"}
    assert not any("mlflow" in p.needs for p in gpu)
    step = next(p for p in gpu if p.name == "step_b64").spec
    assert (step["size"], step["batch"], step["precision"]) == ("albef_base", 64, "bf16")
    assert sum(p.cap_s for p in gpu) > 510  # caps bound a part; the suite budget bounds the sum


def test_resolve_takes_the_largest_batch_and_the_measured_peak():
    part = next(p for p in gpu_suite.plan(False) if p.name == "step_max")
    results = {"env": {"status": "ok", "result": {"cuda_available": True, "matmul": {"tflops": 771.0}}},
               "max_batch": {"status": "ok", "result": {"largest_fitting": 512}}}
    spec, reason = gpu_suite.resolve(part, results)
    assert reason is None and spec["batch"] == 512 and spec["measured_peak_tflops"] == 771.0
    spec, reason = gpu_suite.resolve(part, {"max_batch": {"status": "timeout"}})
    assert spec is None and reason.startswith("skipped: no batch found by max_batch (timeout)")


def _report() -> dict:
    step = {"impl": "albef_ray", "size": "albef_base", "image_res": 256, "batch": 64, "precision": "bf16",
            "compile": False, "samples_per_s": 2000.0, "s_per_step": 0.032, "peak_allocated_gb": 41.5,
            "peak_reserved_gb": 44.0, "flops_per_step": 12.4e12, "mfu_nominal": 0.39, "mfu_measured": 0.49,
            "measured_peak_tflops": 790.0,
            "breakdown": {"source": "train_step", "step_device_ms": 30.0, "step_cpu_ms": 33.0, "phases": {
                "forward": {"cpu_ms": 9.0, "device_ms": 10.0}, "backward": {"cpu_ms": 2.0, "device_ms": 16.0},
                "optimizer": {"cpu_ms": 1.0, "device_ms": 2.5}, "ema": {"cpu_ms": 0.1, "device_ms": 0.9},
                "enqueue": {"cpu_ms": 0.1, "device_ms": 0.1}, "data_wait": {"cpu_ms": 0.0, "device_ms": 0.0},
                "other": {"cpu_ms": 20.8, "device_ms": 0.5}}}}
    return {"suite": {"mode": "gpu", "started": "2026-12-01 10:00:00", "budget_s": 510, "elapsed_s": 480.2},
            "parts": {
                "env": {"status": "ok", "wall_s": 9.0, "result": {"device_name": "NVIDIA H200", "memory_gb": 150.0,
                        "matmul": {"n": 8192, "dtype": "bfloat16", "tflops": 780.0}, "torch": "2.11.0", "cpus": 16}},
                "step_b64": {"status": "ok", "title": "albef_base b64 bf16", "wall_s": 40.0, "result": step},
                "max_batch": {"status": "ok", "result": {"largest_fitting": 512, "stopped_by": "oom", "search_s": 50,
                              "candidates": [{"batch": 512, "samples_per_s": 2400.0, "s_per_step": 0.21,
                                              "peak_allocated_gb": 120.0},
                                             {"batch": 768, "oom": "OutOfMemoryError: CUDA out of memory"}]}},
                "compile_b64": {"status": "timeout", "title": "torch.compile b64", "wall_s": 200.0,
                                "error": "timeout after 200 s"},
                "retrieval_1k": {"status": "timeout", "title": "retrieval", "wall_s": 130.0, "error": "timeout after 130 s",
                                 "result": {"size": "albef_base", "image_res": 384, "images": 1000, "captions": 5000,
                                            "k_test": 128, "precision": "bf16", "batched_s": 12.5, "partial": True}},
                "data": {"status": "skipped", "title": "Ray Data", "reason": "skipped: package ray not importable"},
                "ray_train": {"status": "failed", "wall_s": 3.0, "error": "exit 1: RuntimeError: boom | bang"},
            }}


def test_markdown_report_from_a_hand_made_json():
    md = gpu_report.markdown(_report())
    assert md.startswith("# GPU suite: NVIDIA H200, 150 GB, bfloat16 8192^3 matmul 780 TFLOP/s")
    assert "| step_b64 | albef_ray | albef_base 256 px | 64 | bf16 | no | 2000.0 | 0.0320 | 41.5 (44.0 reserved) | 12.40 | 39.0 % | 49.0 % of 790 |" in md
    assert "| step_b64 | kernels | 10.0 | 16.0 | 2.5 | 0.9 | 0.1 | 0.0 | 0.5 | 30.0 | 32.0 | train_step |" in md
    assert "## Largest batch: 512 (search stopped by oom" in md
    assert "| 768 | – | – | – | OutOfMemoryError: CUDA out of memory |" in md
    assert "| data | Ray Data | skipped | – | skipped: package ray not importable |" in md
    assert "| ray_train |  | failed | 3 | exit 1: RuntimeError: boom / bang |" in md  # a '|' cannot break the table
    assert "| compile_b64 | torch.compile b64 | timeout | 200 | timeout after 200 s |" in md
    # a timed-out part shows what it had saved; parts without any result have no section
    assert "| albef_base 384 px | 1000 x 5000 | 128 | bf16 | 12.50 | – | – | – |" in md
    assert "| retrieval_1k | retrieval | timeout | 130 | timeout after 130 s (what it measured before is in the tables above) |" in md
    assert "## Ray Data" not in md and "## Ray Train" not in md and "Rehearsal" not in md


def test_markdown_of_a_rehearsal_says_so_and_survives_an_empty_report():
    report = _report()
    report["suite"]["mode"] = "rehearsal (CPU, tiny sizes: not results)"
    assert "the numbers are not results" in gpu_report.markdown(report)
    assert gpu_report.markdown({}).startswith("# GPU suite: device unknown")


def test_device_command_fits_the_tool():
    command = next(line.strip() for line in gpu_suite.__doc__.splitlines() if "pip install" in line)
    assert len(command) < 2000 and ".whl/*.whl" in command and command.endswith("bash benchmarks/gpu_suite.sh")
    assert command in (BENCH / "gpu_suite.sh").read_text()


def test_a_part_runs_in_its_own_process_and_a_timeout_loses_only_it(tmp_path):
    import os

    part = gpu_suite.Part("env", "gpu_step.py", "env", {"device": "cpu", "matmul_n": 64, "matmul_reps": 1}, 60, needs=())
    env = {**os.environ, "PYTHONPATH": str(BENCH.parent)}
    log = tmp_path / "suite.log"
    entry = gpu_suite.run_part(part, part.spec, 120, tmp_path, log, env)
    assert entry["status"] == "ok" and entry["result"]["matmul"]["n"] == 64 and not entry["result"]["partial"]
    entry = gpu_suite.run_part(part, part.spec, 0.2, tmp_path, log, env)  # killed while importing torch
    assert entry["status"] == "timeout" and "result" not in entry
    assert log.read_text().count("===== env") == 2
