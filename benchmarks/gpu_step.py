"""GPU suite parts about one training step: the machine, the step and its breakdown, the largest batch.

Run by ``benchmarks/gpu_suite.py``, one part per process::

    python benchmarks/gpu_step.py PART --spec JSON --out RESULT.json

Parts: ``env`` (device, packages, measured bf16 matmul rate), ``step`` (one configuration:
samples/s, peak memory, FLOPs and MFU, the profiler's step breakdown; ``impl`` ``albef_ray``
(the real :func:`~albef_ray.train.loop.train_step`) or ``official_like`` (the official forward
re-stated in ``tests/reference_albef.py``), optionally ``compile``) and ``max_batch`` (the
largest batch that fits, by a bounded search). Sizes come from the spec; see ``gpu_suite.py``.

Step breakdown: :mod:`gpu_profile`.
"""

from __future__ import annotations

import argparse
import inspect
import itertools
import json
import os
import resource
import sys
import time
from contextlib import nullcontext
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(Path(__file__).resolve().parent))
from gpu_profile import _ranged, add_missing_ranges, breakdown_from_profile  # noqa: E402

NOMINAL_PEAK_TFLOPS = 989.0  # dense bf16, H100/H200 SXM datasheet
MEASURED_PEAK_TFLOPS = 790.0  # bf16 8192^3 matmul measured on this workplace's H200 (KINDS.md)


# ----------------------------------------------------------------------------- helpers


def _sync(device):
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _peak_memory_gb(device) -> dict:
    import torch

    if device.type == "cuda":
        return {"peak_allocated_gb": torch.cuda.max_memory_allocated(device) / 1e9,
                "peak_reserved_gb": torch.cuda.max_memory_reserved(device) / 1e9}
    return {"peak_rss_gb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6}


def _reset_peak(device):
    import torch

    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


def mfu(flops_per_step: float, s_per_step: float, peak_tflops: float) -> float:
    """Model-FLOPs utilisation: achieved FLOP/s over the peak (``peak_tflops`` x 1e12)."""
    return flops_per_step / s_per_step / (peak_tflops * 1e12)


def queue_for(batch: int, queue: int = 65536) -> int:
    """The largest ITC queue <= ``queue`` that the batch divides (the queue is written a batch at a time)."""
    return max(batch, queue // batch * batch)


def random_batch(arch, batch: int, text_len: int, device, seed: int) -> dict:
    """Random normalised images and captions ``[CLS] w ... [PAD]`` of 8..text_len tokens (bert ids)."""
    import torch

    g = torch.Generator().manual_seed(seed)
    image = torch.randn(batch, 3, arch.image_res, arch.image_res, generator=g)
    ids = torch.randint(1000, arch.vocab_size, (batch, text_len), generator=g) if arch.vocab_size > 2000 else \
        torch.randint(200, arch.vocab_size, (batch, text_len), generator=g)
    lengths = torch.randint(min(8, text_len), text_len + 1, (batch,), generator=g)
    mask = (torch.arange(text_len)[None] < lengths[:, None]).long()
    ids = ids * mask
    ids[:, 0] = 101  # [CLS] (bert-base-uncased ids, SpecialTokens' defaults)
    return {"image": image.to(device), "input_ids": ids.to(device), "attention_mask": mask.to(device)}


def step_kwargs() -> dict:
    """``sync=False`` where ``train_step`` takes it: metrics stay on the device, as the training loops run."""
    from albef_ray.train.loop import train_step

    return {"sync": False} if "sync" in inspect.signature(train_step).parameters else {}


# ----------------------------------------------------------------------------- building


def build_albef_ray(size: str, batch: int, precision: str, queue: int, device):
    import torch

    from albef_ray.config import build_config
    from albef_ray.tasks import build_task
    from albef_ray.train.loop import Schedule
    from albef_ray.train.optim import build_optimizer

    cfg = build_config({
        "model": {"size": size, "vit_init": None, "bert_init": None},
        "train": {"batch_size": batch, "num_workers": 1, "precision": precision},
        "momentum": {"queue_size": queue_for(batch, queue)},
    })
    torch.manual_seed(0)
    task = build_task(cfg).to(device).train()
    optimizer = build_optimizer(task, cfg.optim)
    return task, optimizer, cfg, Schedule(total_steps=10_000, steps_per_epoch=1_000)


def build_official(size: str, queue: int, batch: int, device):
    import torch

    from albef_ray.model.registry import get_arch

    import tests.reference_albef as ref
    torch.manual_seed(0)
    task = ref.ReferencePretrainStep(get_arch(size), queue_size=queue_for(batch, queue)).to(device).train()
    # the official code: timm's create_optimizer -> plain (unfused) AdamW
    optimizer = torch.optim.AdamW([p for p in task.parameters() if p.requires_grad], lr=1e-4, weight_decay=0.02)
    task.arch = get_arch(size)
    return task, optimizer


def official_step(task, optimizer, batch, precision, device):
    """The official training step: forward (EMA and enqueue inside), backward, AdamW."""
    import torch
    from torch.profiler import record_function

    ctx = torch.autocast(device.type, dtype=torch.bfloat16) if precision == "bf16" else nullcontext()
    with record_function("albef.forward"), ctx:
        out = task(batch["image"], batch["input_ids"], batch["attention_mask"], alpha=0.4)
    with record_function("albef.backward"):
        out["loss"].backward()
    with record_function("albef.optimizer"):
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    return {"loss": out["loss"].detach().item()}  # the official loop's metric logger reads loss.item()


def compile_layers(task) -> int:
    """``torch.compile`` every transformer block (ViT blocks, text / fusion layers, momentum copies too).

    The task's forward keeps its data-dependent parts (masking, negative sampling, masked-token
    MLM) eager; each block is a fixed-shape graph, compiled once per distinct input shape.
    """
    import torch
    from timm.models.vision_transformer import Block

    from albef_ray.model.text import BertLayer

    for name in ("cache_size_limit", "recompile_limit"):
        if hasattr(torch._dynamo.config, name):
            setattr(torch._dynamo.config, name, 64)
    n = 0
    for module in task.modules():
        if isinstance(module, (Block, BertLayer)):
            module.compile()
            n += 1
    return n


# ----------------------------------------------------------------------------- parts


def part_env(spec: dict) -> dict:
    import importlib.metadata as md
    import importlib.util

    import torch

    out = {"python": sys.version.split()[0], "torch": torch.__version__, "cpus": os.cpu_count(),
           "cuda_available": torch.cuda.is_available(), "packages": {}}
    for pkg in ("pydantic", "ray", "mlflow", "transformers", "timm", "tokenizers", "pyarrow", "triton"):
        try:
            out["packages"][pkg] = md.version(pkg) if importlib.util.find_spec(pkg) else None
        except md.PackageNotFoundError:
            out["packages"][pkg] = "present (no metadata)"
    device = torch.device(spec.get("device", "cuda" if torch.cuda.is_available() else "cpu"))
    if device.type == "cuda":
        p = torch.cuda.get_device_properties(device)
        out.update(device_name=p.name, capability=f"{p.major}.{p.minor}", memory_gb=p.total_memory / 1e9,
                   cuda=torch.version.cuda, sms=p.multi_processor_count)
    n, reps = spec.get("matmul_n", 8192), spec.get("matmul_reps", 50)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    for _ in range(3):
        a @ b
    _sync(device)
    t0 = time.perf_counter()
    for _ in range(reps):
        a @ b
    _sync(device)
    dt = (time.perf_counter() - t0) / reps
    out["matmul"] = {"n": n, "dtype": str(dtype).removeprefix("torch."), "tflops": 2 * n**3 / dt / 1e12}
    if device.type == "cuda":
        x = torch.empty(2 * 1024**3, dtype=torch.uint8, device=device)
        y = torch.empty_like(x)
        y.copy_(x)
        _sync(device)
        t0 = time.perf_counter()
        for _ in range(10):
            y.copy_(x)
        _sync(device)
        out["copy_tb_s"] = 2 * x.numel() * 10 / (time.perf_counter() - t0) / 1e12  # read + write
    return out


def _batches(arch, batch, text_len, device, count=3):
    return [random_batch(arch, batch, text_len, device, seed) for seed in range(count)]


def _count_flops(run_one) -> float:
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as counter:
        run_one()
    return float(counter.get_total_flops())


def count_syncs(run_one) -> dict:
    """Host syncs of one call of ``run_one`` on CUDA: torch's sync debug mode warns at each
    synchronising operation; returns their count and the distinct messages' first lines."""
    import warnings

    import torch

    torch.cuda.synchronize()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            run_one()
        finally:
            torch.cuda.set_sync_debug_mode("default")
    hits = [str(w.message).splitlines()[0] for w in caught if "synchroniz" in str(w.message)]
    return {"count": len(hits), "kinds": sorted(set(hits))[:10]}


def part_step(spec: dict) -> dict:
    """One configuration: timing, memory, FLOPs/MFU, and (``profile_steps`` > 0) the breakdown."""
    import torch
    from torch.profiler import ProfilerActivity, profile, record_function

    from albef_ray.train.loop import train_step

    device = torch.device(spec["device"])
    torch.set_num_threads(spec.get("threads", os.cpu_count()))
    impl, size, batch, precision = spec["impl"], spec["size"], spec["batch"], spec["precision"]
    text_len, warmup, steps = spec.get("text_len", 25), spec.get("warmup", 3), spec.get("steps", 10)
    if impl == "official_like":
        task, optimizer = build_official(size, spec.get("queue", 65536), batch, device)
        arch = task.arch
        source = "suite ranges around the official step (EMA and enqueue are inline in its forward)"
        task._momentum_update = _ranged("albef.ema", task._momentum_update)

        def step_fn(b, i):
            return official_step(task, optimizer, b, precision, device)
    else:
        task, optimizer, cfg, schedule = build_albef_ray(size, batch, precision, spec.get("queue", 65536), device)
        arch = task.model.arch
        generator = torch.Generator(device=device).manual_seed(0)
        kwargs = step_kwargs()

        def step_fn(b, i):
            return train_step(task, optimizer, b, i, cfg, schedule, generator, **kwargs)

        source = None
    batches = _batches(arch, batch, text_len, device)
    result = {"impl": impl, "size": size, "image_res": arch.image_res, "batch": batch, "precision": precision,
              "compile": bool(spec.get("compile")), "text_len": text_len, "device": str(device)}
    result["flops_per_step"] = _count_flops(lambda: step_fn(batches[0], 0))  # eager, before any compile
    if spec.get("compile"):
        result["compiled_blocks"] = compile_layers(task)
    if impl != "official_like":
        source = add_missing_ranges(task, optimizer)
    it = itertools.cycle(batches)
    t0 = time.perf_counter()
    for i in range(warmup):
        step_fn(next(it), i)
        _sync(device)
        if i == 0:
            result["first_step_s"] = time.perf_counter() - t0  # includes compilation when compiled
    result["warmup_s"] = time.perf_counter() - t0
    save(result)  # a timeout from here on still reports the compile time
    _reset_peak(device)
    wait = 0.0
    _sync(device)
    t0 = time.perf_counter()
    for i in range(steps):
        tw = time.perf_counter()
        b = next(it)
        wait += time.perf_counter() - tw
        step_fn(b, warmup + i)
    _sync(device)
    dt = (time.perf_counter() - t0) / steps
    result.update(steps=steps, s_per_step=dt, samples_per_s=batch / dt, data_wait_frac=wait / steps / dt)
    result.update(_peak_memory_gb(device))
    result["tflops_achieved"] = result["flops_per_step"] / dt / 1e12
    peak = spec.get("measured_peak_tflops") or MEASURED_PEAK_TFLOPS
    result["mfu_nominal"] = mfu(result["flops_per_step"], dt, NOMINAL_PEAK_TFLOPS)
    result["mfu_measured"] = mfu(result["flops_per_step"], dt, peak)
    result["measured_peak_tflops"] = peak
    save(result)
    if device.type == "cuda":  # what still waits for the GPU inside a step (train_step aims at none)
        result["host_syncs_per_step"] = count_syncs(lambda: step_fn(next(it), warmup + steps))
        save(result)
    n_prof = spec.get("profile_steps", 0)
    if n_prof:
        activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
        with profile(activities=activities) as prof:
            for i in range(n_prof):
                with record_function("albef.step"):
                    with record_function("albef.data_wait"):
                        b = next(it)
                    step_fn(b, warmup + steps + i)
            _sync(device)
        result["breakdown"] = breakdown_from_profile(prof, n_prof, source)
    return result


def part_max_batch(spec: dict) -> dict:
    """Largest batch that fits: each candidate runs 1 + 2 steps; stop at the first OOM or the time cap."""
    import gc

    import torch

    from albef_ray.train.loop import train_step

    device = torch.device(spec["device"])
    torch.set_num_threads(spec.get("threads", os.cpu_count()))
    t_start, cap = time.perf_counter(), spec.get("time_cap_s", 90)
    tried, largest, last_dt = [], None, None
    task = optimizer = None

    def summary():
        return {"size": spec["size"], "precision": spec["precision"], "candidates": tried, "largest_fitting": largest,
                "stopped_by": next((k for k in ("oom", "error", "skipped") if tried and k in tried[-1]), "end of candidates"),
                "search_s": time.perf_counter() - t_start}

    for batch in spec["candidates"]:
        if last_dt is not None and tried:
            predicted = 3 * last_dt * batch / tried[-1]["batch"] + 5
            if time.perf_counter() - t_start + predicted > cap:
                tried.append({"batch": batch, "skipped": f"time cap {cap} s"})
                break
        entry = {"batch": batch}
        try:
            # a fresh task per candidate: the queue must be a multiple of the batch
            del task, optimizer
            gc.collect()
            if device.type == "cuda":
                torch.cuda.empty_cache()
            task, optimizer, cfg, schedule = build_albef_ray(spec["size"], batch, spec["precision"], spec.get("queue", 65536), device)
            b = random_batch(task.model.arch, batch, spec.get("text_len", 25), device, 0)
            generator = torch.Generator(device=device).manual_seed(0)
            train_step(task, optimizer, b, 0, cfg, schedule, generator, **step_kwargs())
            _sync(device)
            _reset_peak(device)
            t0 = time.perf_counter()
            for i in range(2):
                train_step(task, optimizer, b, 1 + i, cfg, schedule, generator, **step_kwargs())
            _sync(device)
            last_dt = (time.perf_counter() - t0) / 2
            entry.update(s_per_step=last_dt, samples_per_s=batch / last_dt, **_peak_memory_gb(device))
            largest = batch
            del b
        except Exception as err:  # OOM (or cuBLAS failing to allocate its workspace): the search ends here
            text = f"{type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}"[:300]
            oom = isinstance(err, torch.cuda.OutOfMemoryError) or "out of memory" in text.lower() or "ALLOC" in text
            entry["oom" if oom else "error"] = text
            tried.append(entry)
            task = optimizer = None
            gc.collect()
            if device.type == "cuda":
                torch.cuda.empty_cache()
            break
        tried.append(entry)
        save(summary())
    return summary()


PARTS = {"env": part_env, "step": part_step, "max_batch": part_max_batch}


_OUT: Path | None = None


def save(result: dict, final: bool = False) -> None:
    """Write the part's result so far (``"partial": true``) or its final one: a timeout keeps it."""
    if _OUT is not None:
        tmp = _OUT.with_suffix(".tmp")
        tmp.write_text(json.dumps({**result, "partial": not final}, indent=1, default=str))
        tmp.replace(_OUT)


def main(parts=None) -> None:
    global _OUT
    parts = parts or PARTS
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("part", choices=sorted(parts))
    ap.add_argument("--spec", default="{}", help="the part's settings as JSON")
    ap.add_argument("--out", required=True, help="where to write the result JSON")
    a = ap.parse_args()
    _OUT = Path(a.out)
    save(parts[a.part](json.loads(a.spec)), final=True)


if __name__ == "__main__":
    main()
