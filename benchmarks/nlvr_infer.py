"""NLVR2 inference time per (statement, image pair): the forward of :class:`NLVRTask.logits`.

Random weights and inputs (statements of 20 tokens), eval mode, no grad; one warm-up batch,
then the best of ``--repeats`` timed batches. Usage::

    python benchmarks/nlvr_infer.py                                   # albef_tiny_64 and albef_base @ 384, CPU
    python benchmarks/nlvr_infer.py --size albef_base --image-res 384 --batch 64 --device cuda --precision bf16

Prints one line per configuration: ms per pair and pairs per second.
"""

from __future__ import annotations

import argparse
import time

import torch

from albef_ray.config import build_config
from albef_ray.model.albef import build_model
from albef_ray.objectives.nlvr import NLVRTask
from albef_ray.precision import autocast_context


def time_pairs(size: str, image_res: int | None, batch: int, device: str, precision: str, repeats: int) -> dict:
    cfg = build_config({"task": "nlvr", "model": {"size": size, "vit_init": None, "bert_init": None},
                        "nlvr": {"distill": False}})
    task = NLVRTask(build_model(size, image_res), cfg).eval().to(device)
    arch = task.model.arch
    g = torch.Generator().manual_seed(0)
    image, image2 = (torch.randn(batch, 3, arch.image_res, arch.image_res, generator=g).to(device) for _ in range(2))
    ids = torch.randint(200, arch.vocab_size, (batch, 20), generator=g).to(device)
    mask = torch.ones_like(ids)
    dev = torch.device(device)
    best = float("inf")
    with torch.no_grad():
        for i in range(repeats + 1):
            start = time.perf_counter()
            with autocast_context(precision, dev):
                task.logits(image, ids, mask, image2)
            if dev.type == "cuda":
                torch.cuda.synchronize(dev)
            if i:  # the first batch warms up
                best = min(best, time.perf_counter() - start)
    return {"size": size, "image_res": arch.image_res, "batch": batch, "device": device, "precision": precision,
            "threads": torch.get_num_threads(), "ms_per_pair": 1000 * best / batch, "pairs_per_s": batch / best}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", action="append", help="model size (repeat; default albef_tiny_64 and albef_base)")
    parser.add_argument("--image-res", type=int, help="resolution for every size (default: tiny 64, base 384)")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--precision", default="fp32", choices=("fp32", "bf16"))
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    for size in args.size or ["albef_tiny_64", "albef_base"]:
        res = args.image_res or (384 if size == "albef_base" else None)
        r = time_pairs(size, res, args.batch, args.device, args.precision, args.repeats)
        print(f"{r['size']} @ {r['image_res']} px, batch {r['batch']}, {r['device']} {r['precision']} "
              f"({r['threads']} threads): {r['ms_per_pair']:.1f} ms per pair, {r['pairs_per_s']:.1f} pairs/s")


if __name__ == "__main__":
    main()
