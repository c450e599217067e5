"""Time and peak memory of one ALBEF pretraining step (forward, backward, AdamW, EMA, enqueue).

Each (size, precision) runs in a fresh subprocess so peak RSS is its own. Usage::

    python benchmarks/step.py                       # albef_base b=4 and albef_tiny b=32, fp32 + bf16
    python benchmarks/step.py --size albef_base --batch 64 --precision bf16 --device cuda

Prints one line per configuration: s/step, samples/s, peak RSS (CPU) or peak CUDA memory,
and on CUDA the model-FLOPs utilisation against --peak-tflops.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time
from pathlib import Path


def _flops_per_step(task, batch, text_len) -> float:
    """Model FLOPs of one step by counting matmul FLOPs with torch's FlopCounterMode."""
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as counter:
        _one_step(task, *batch)
    return float(counter.get_total_flops())


def _one_step(task, image, ids, att, optimizer=None, precision="fp32", device="cpu"):
    import torch

    ctx = torch.autocast(device_type=device, dtype=torch.bfloat16) if precision == "bf16" else torch.autocast(device, enabled=False)
    with ctx:
        out = task(image, ids, att, alpha=0.4)
    out["loss"].backward()
    if optimizer is not None:
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    return out


def _build(impl: str, size: str, batch: int, precision: str):
    from albef_ray.config import build_config
    from albef_ray.model.albef import build_model
    from albef_ray.model.registry import get_arch
    from albef_ray.objectives.pretrain import PretrainTask

    if impl == "official_like":
        sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
        from tests.reference_albef import ReferencePretrainStep

        return ReferencePretrainStep(get_arch(size)), get_arch(size)
    cfg = build_config({
        "model": {"size": size, "vit_init": None, "bert_init": None},
        "train": {"batch_size": batch, "num_workers": 1, "precision": precision},
    })
    task = PretrainTask(build_model(size), cfg)
    return task, task.model.arch


def run_one(impl: str, size: str, batch: int, precision: str, device: str, steps: int, threads: int, text_len: int) -> dict:
    import torch

    torch.set_num_threads(threads)
    torch.manual_seed(0)
    task, arch = _build(impl, size, batch, precision)
    task = task.to(device).train()
    if impl == "official_like":  # the official code: timm's create_optimizer -> plain torch AdamW
        optimizer = torch.optim.AdamW([p for p in task.parameters() if p.requires_grad], lr=1e-4, weight_decay=0.02)
    else:
        from albef_ray.train.optim import build_optimizer

        optimizer = build_optimizer(task, task.cfg.optim)
    image = torch.randn(batch, 3, arch.image_res, arch.image_res, device=device)
    ids = torch.randint(200, arch.vocab_size, (batch, text_len), device=device)  # above the special ids
    ids[:, 0], ids[:, -1] = 101, 102
    att = torch.ones_like(ids)
    args = (image, ids, att, optimizer, precision, device)
    for _ in range(2):  # warm-up: allocator, AdamW state, kernels
        _one_step(task, *args)
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    sync()
    t0 = time.perf_counter()
    for _ in range(steps):
        _one_step(task, *args)
    sync()
    dt = (time.perf_counter() - t0) / steps
    result = {
        "impl": impl, "size": size, "batch": batch, "precision": precision, "device": device, "threads": threads,
        "s_per_step": dt, "samples_per_s": batch / dt,
        "peak_rss_gb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6,
    }
    if device == "cuda":
        result["peak_cuda_gb"] = torch.cuda.max_memory_allocated() / 1e9
        flops = _flops_per_step(task, (image, ids, att, None, precision, device), text_len)
        result["tflops_per_step"] = flops / 1e12
        result["achieved_tflops"] = flops / dt / 1e12
    return result


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size", action="append", help="model size(s); default albef_base and albef_tiny")
    ap.add_argument("--batch", type=int, help="batch (default 4 for albef_base, 32 for albef_tiny)")
    ap.add_argument("--precision", action="append", choices=["fp32", "bf16"])
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--impl", action="append", choices=["albef_ray", "official_like"],
                    help="albef_ray (default) and/or official_like: the official forward re-stated on HF BERT layers")
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--text-len", type=int, default=25, help="caption tokens (official pretraining max 25)")
    ap.add_argument("--peak-tflops", type=float, default=989.0, help="dense bf16 peak for MFU (H100 SXM: 989)")
    ap.add_argument("--child", help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.child:
        print(json.dumps(run_one(**json.loads(a.child))))
        return
    combos = [(i, s, p) for s in a.size or ["albef_base", "albef_tiny"] for p in a.precision or ["fp32", "bf16"]
              for i in a.impl or ["albef_ray"]]
    for impl, size, precision in combos:
        batch = a.batch or (4 if size == "albef_base" else 32)
        spec = dict(impl=impl, size=size, batch=batch, precision=precision, device=a.device, steps=a.steps, threads=a.threads, text_len=a.text_len)
        proc = subprocess.run([sys.executable, __file__, "--child", json.dumps(spec)], capture_output=True, text=True)
        if proc.returncode:
            print(proc.stderr[-2000:], file=sys.stderr)
            continue
        r = json.loads(proc.stdout.strip().splitlines()[-1])
        line = (f"{r['impl']:<13} {r['size']:<11} b={r['batch']:<3} {r['precision']:<4} {r['device']}: {r['s_per_step']:.3f} s/step, "
                f"{r['samples_per_s']:.1f} samples/s, peak RSS {r['peak_rss_gb']:.2f} GB")
        if "achieved_tflops" in r:
            line += (f", peak CUDA {r['peak_cuda_gb']:.1f} GB, {r['tflops_per_step']:.2f} TFLOP/step, "
                     f"MFU {100 * r['achieved_tflops'] / a.peak_tflops:.1f}%")
        print(line, flush=True)


if __name__ == "__main__":
    main()
