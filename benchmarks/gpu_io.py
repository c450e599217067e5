"""GPU suite parts around the step: retrieval evaluation, Ray Data feeding the GPU, Ray Train overhead.

Run by ``benchmarks/gpu_suite.py``, one part per process::

    python benchmarks/gpu_io.py PART --spec JSON --out RESULT.json

- ``retrieval``: zero-shot retrieval scoring of an N-image x 5N-caption split (random weights
  and inputs: the cost depends on shapes, not on what was learned), the batched re-rank
  (:func:`albef_ray.eval.retrieval_scores`) and, time allowing, the official per-query loop.
- ``data``: Parquet shards of photo-sized JPEGs (written here, in parallel), streamed by the
  training path (:func:`albef_ray.launch.data.build_stream`, what a Ray Train worker reads)
  with ``cpus`` Ray CPUs: rows/s with no consumer, then feeding ``train_step`` on the device;
  the GPU's idle share is the fed rate against the same step on batches already in memory.
- ``ray_train``: the same steps as a plain loop in this process and as a 1-worker TorchTrainer
  (:func:`albef_ray.launch.train.launch_pretrain`, tracking off: no MLflow needed); the
  worker's logged windows arrive through a Ray Train callback.
"""

from __future__ import annotations

import io
import json
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from gpu_step import _sync, main, queue_for, random_batch, save, step_kwargs  # noqa: E402

WORDS = ("a man woman dog cat red blue green small large wooden old young child bicycle street table "
         "sitting standing next to on in front of with holding two three near building water field tree "
         "car white black yellow playing running looking at the beach park room kitchen plate food").split()


# ----------------------------------------------------------------------------- retrieval


def part_retrieval(spec: dict) -> dict:
    import torch

    from albef_ray.config import EvalConfig
    from albef_ray.eval import retrieval_scores
    from albef_ray.model.albef import build_model

    t_part = time.perf_counter()
    device = torch.device(spec["device"])
    torch.set_num_threads(spec.get("threads", os.cpu_count()))
    torch.manual_seed(0)
    model = build_model(spec["size"], spec.get("image_res")).to(device).eval()
    n_img, per = spec["images"], spec.get("captions", 5)
    n_txt, max_len = n_img * per, spec.get("text_len", 30)
    g = torch.Generator().manual_seed(0)
    res = model.arch.image_res
    images = torch.randint(0, 256, (n_img, 3, res, res), dtype=torch.uint8, generator=g)
    lengths = torch.randint(8, max_len + 1, (n_txt,), generator=g)
    mask = (torch.arange(max_len)[None] < lengths[:, None]).long()
    ids = torch.randint(5, model.arch.vocab_size, (n_txt, max_len), generator=g) * mask
    ids[:, 0] = 101
    cfg = EvalConfig(k_test=spec["k"], batch_size=spec.get("batch", 256), rerank_batch=spec.get("rerank_batch", 256))
    precision = spec.get("precision", "bf16")

    def timed(images_, ids_, mask_, per_query=False):
        _sync(device)
        t0 = time.perf_counter()
        out = retrieval_scores(model, images_, ids_, mask_, cfg, device, precision, per_query=per_query)
        _sync(device)
        return time.perf_counter() - t0, out

    w = max(1, min(n_img, spec.get("warmup_images", 32)))
    timed(images[:w], ids[: w * per], mask[: w * per])  # kernels, allocator, autotuning
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    t_batched, (i2t, _) = timed(images, ids, mask)
    result = {"size": spec["size"], "image_res": res, "images": n_img, "captions": n_txt, "k_test": cfg.k_test,
              "rerank_batch": cfg.rerank_batch, "precision": precision, "device": str(device),
              "batched_s": t_batched, "images_per_s": n_img / t_batched}
    if device.type == "cuda":
        result["peak_allocated_gb"] = torch.cuda.max_memory_allocated(device) / 1e9
    save(result)
    embed_cfg = EvalConfig(k_test=1, batch_size=cfg.batch_size, rerank_batch=cfg.rerank_batch)
    _sync(device)
    t0 = time.perf_counter()
    retrieval_scores(model, images, ids, mask, embed_cfg, device, precision)
    _sync(device)
    result["embed_itc_s"] = time.perf_counter() - t0
    save(result)
    # the official loop re-projects every pair's image keys/values: several times the batched time
    left = spec.get("time_cap_s", 1e9) - (time.perf_counter() - t_part)
    if spec.get("per_query", True) and left > spec.get("per_query_factor", 4) * t_batched:
        t_loop, (i2t_loop, _) = timed(images, ids, mask, per_query=True)
        result.update(per_query_s=t_loop, speedup=t_loop / t_batched,
                      max_score_diff=float((i2t - i2t_loop).abs().max()))
    else:
        result["per_query_s"] = f"skipped: {left:.0f} s left < {spec.get('per_query_factor', 4)} x batched"
    return result


# ----------------------------------------------------------------------------- JPEG shards


def _photo(rng, w: int, h: int):
    """A smooth gradient, soft shapes and sensor-like noise: (h, w, 3) uint8, JPEG-realistic to decode."""
    import numpy as np
    from PIL import Image, ImageDraw, ImageFilter

    y, x = np.mgrid[0:h, 0:w].astype(np.float32)
    c0, c1 = rng.uniform(0, 255, (2, 3))
    t = ((x / w + y / h) / 2)[..., None]
    img = Image.fromarray(np.clip(c0 * (1 - t) + c1 * t, 0, 255).astype(np.uint8))
    draw = ImageDraw.Draw(img)
    for _ in range(rng.integers(3, 8)):
        x0, y0, side = rng.uniform(0, w), rng.uniform(0, h), rng.uniform(w / 30, w / 3)
        shape = draw.ellipse if rng.random() < 0.5 else draw.rectangle
        shape([x0, y0, x0 + side, y0 + side * rng.uniform(0.5, 1.5)], fill=tuple(rng.integers(0, 256, 3).tolist()))
    return np.asarray(img.filter(ImageFilter.GaussianBlur(1.5)), dtype=np.int16)


def _write_shard(args) -> int:
    """One Parquet file of ``n`` JPEG rows (row groups of ``group`` rows), every image its own noise (~95 KB at 640x480)."""
    import numpy as np
    import pyarrow as pa
    import pyarrow.parquet as pq
    from PIL import Image

    from albef_ray.data.schema import ROW_SCHEMA

    path, first, n, (w, h), group, seed = args
    rng = np.random.default_rng(seed)
    images, captions = [], []
    base = None
    for i in range(n):
        if i % 16 == 0:
            base = _photo(rng, w, h)
        noisy = np.clip(base + rng.integers(-16, 17, (h, w, 3), dtype=np.int16), 0, 255).astype(np.uint8)
        buf = io.BytesIO()
        Image.fromarray(noisy).save(buf, "JPEG", quality=90)
        images.append(buf.getvalue())
        captions.append(" ".join(rng.choice(WORDS, rng.integers(6, 16))))
    table = pa.Table.from_pydict({
        "image": images, "caption": captions, "image_id": [str(first + i) for i in range(n)],
        "source": ["gpu_suite"] * n, "width": [w] * n, "height": [h] * n,
    }, schema=ROW_SCHEMA)
    pq.write_table(table, path, row_group_size=group, use_dictionary=False)
    return sum(len(b) for b in images)


def make_jpeg_dataset(root: Path, rows: int, size: tuple[int, int], cpus: int, group: int, rows_per_file: int = 1024):
    """``root/train/part-*.parquet`` and ``root/tokenizer``; returns (seconds, mean JPEG KB)."""
    import multiprocessing

    t0 = time.perf_counter()
    (root / "train").mkdir(parents=True, exist_ok=True)
    jobs = [(str(root / "train" / f"part-{i:05d}.parquet"), s, min(rows_per_file, rows - s), size, group, 1000 + i)
            for i, s in enumerate(range(0, rows, rows_per_file))]
    with multiprocessing.get_context("fork").Pool(max(1, cpus)) as pool:  # before torch starts threads
        total = sum(pool.map(_write_shard, jobs, chunksize=1))
    from albef_ray.data.tokenizer import train_wordpiece

    train_wordpiece([" ".join(WORDS)] * 4, root / "tokenizer")
    return time.perf_counter() - t0, total / rows / 1024


# ----------------------------------------------------------------------------- Ray Data -> GPU


def _steady_rate(times: list[float], batch: int, skip: int) -> float | None:
    """Rows/s between the arrival of batch ``skip`` and the last one (start-up excluded)."""
    if len(times) <= skip + 1:
        return None
    return (len(times) - 1 - skip) * batch / (times[-1] - times[skip])


def part_data(spec: dict) -> dict:
    cpus, batch, size = spec["cpus"], spec["batch"], spec["size"]
    work = Path(spec.get("workdir") or tempfile.mkdtemp(prefix="gpu_suite_data_"))
    root = work / "jpeg_ds"
    gen_s, kb = make_jpeg_dataset(root, spec["rows"], tuple(spec.get("jpeg_size", (640, 480))), cpus,
                                  spec.get("map_batch_size", 256))
    import ray
    import torch

    from albef_ray.config import build_config
    from albef_ray.data.collate import load_tokenizer
    from albef_ray.launch.data import build_stream
    from albef_ray.model.registry import get_arch
    from albef_ray.objectives.mlm import SpecialTokens
    from albef_ray.tasks import build_task
    from albef_ray.train.loop import Schedule, train_step
    from albef_ray.train.optim import build_optimizer

    device = torch.device(spec["device"])
    torch.set_num_threads(spec.get("threads", 1))
    cfg = build_config({
        "model": {"size": size, "vit_init": None, "bert_init": None},
        "data": {"shards": [str(root)], "tokenizer": str(root / "tokenizer"),
                 "map_batch_size": spec.get("map_batch_size", 256), "shuffle_buffer": spec.get("shuffle_buffer", 1024)},
        "train": {"batch_size": batch, "num_workers": 1, "precision": spec.get("precision", "bf16")},
        "momentum": {"queue_size": queue_for(batch)},
    })
    result = {"rows": spec["rows"], "jpeg_size": list(spec.get("jpeg_size", (640, 480))), "jpeg_kb": kb,
              "generate_s": gen_s, "ray_cpus": cpus, "batch": batch, "size": size, "device": str(device),
              "image_res": get_arch(size, cfg.model.image_res).image_res}
    skip = spec.get("skip_batches", 3)
    ray.init(address="local", num_cpus=cpus, num_gpus=1 if device.type == "cuda" else 0, include_dashboard=False,
             log_to_driver=False, configure_logging=False,
             _node_ip_address="127.0.0.1")  # one node; no network there
    try:
        stream = build_stream(cfg.data.shards, "train", cfg)
        # 1. the pipeline alone (CPU tensors, nothing consumes them)
        t0, arrivals = time.perf_counter(), []
        for _ in stream.epoch_batches(0, 0, 1, 0, batch):
            arrivals.append(time.perf_counter() - t0)
        result["pipeline"] = {"batches": len(arrivals), "first_batch_s": arrivals[0] if arrivals else None,
                              "rows_per_s": _steady_rate(arrivals, batch, skip),
                              "rows_per_s_whole_epoch": len(arrivals) * batch / arrivals[-1] if arrivals else None}
        save(result)
        # 2. the same stream feeding train_step on the device
        tokenizer = load_tokenizer(cfg.data.tokenizer)
        torch.manual_seed(0)
        task = build_task(cfg, SpecialTokens.from_tokenizer(tokenizer)).to(device).train()
        optimizer = build_optimizer(task, cfg.optim)
        schedule = Schedule(total_steps=10_000, steps_per_epoch=1_000)
        generator = torch.Generator(device=device).manual_seed(0)
        kwargs = step_kwargs()
        mem = random_batch(task.model.arch, batch, cfg.data.max_text_len, device, 0)
        for i in range(3):  # warm-up, then the step on a batch in memory: what the GPU can take
            train_step(task, optimizer, mem, i, cfg, schedule, generator, **kwargs)
        _sync(device)
        n_mem = spec.get("memory_steps", 10)
        t0 = time.perf_counter()
        for i in range(n_mem):
            train_step(task, optimizer, mem, 3 + i, cfg, schedule, generator, **kwargs)
        _sync(device)
        step_mem = (time.perf_counter() - t0) / n_mem
        result["in_memory"] = {"s_per_step": step_mem, "samples_per_s": batch / step_mem}
        save(result)
        it = iter(stream.epoch_batches(1, 0, 1, 0, batch, device))
        t0, arrivals, waits, step = time.perf_counter(), [], [], 0
        while True:
            tw = time.perf_counter()
            b = next(it, None)
            waits.append(time.perf_counter() - tw)
            if b is None:
                break
            arrivals.append(time.perf_counter() - t0)
            b.pop("position", None)
            b.pop("num_dropped", None)
            train_step(task, optimizer, b, 20 + step, cfg, schedule, generator, **kwargs)
            step += 1
        _sync(device)
        end = time.perf_counter() - t0
        fed = None
        if len(arrivals) > skip + 1:
            fed = (len(arrivals) - skip) * batch / (end - arrivals[skip])  # steady state, steps included
        steady_wall = end - arrivals[skip] if len(arrivals) > skip else None
        result["fed"] = {
            "batches": len(arrivals), "first_batch_s": arrivals[0] if arrivals else None, "rows_per_s": fed,
            "data_wait_frac": sum(waits[skip + 1:]) / steady_wall if steady_wall else None,
            # the GPU's work of those steps, measured on batches in memory, over the wall time
            "gpu_idle_frac_est": 1 - (len(arrivals) - skip) * step_mem / steady_wall if steady_wall else None,
        }
        result["gpu_waits"] = bool(fed and fed < 0.95 * batch / step_mem)
    finally:
        ray.shutdown()
    return result


# ----------------------------------------------------------------------------- Ray Train vs plain


def _step_logger(path: str):
    import ray.train

    class StepLog(ray.train.UserCallback):
        """Appends each report's rank-0 metrics to a JSON-lines file (runs in the Train controller)."""

        def __init__(self, target):
            self.target = target

        def after_report(self, run_context, metrics, checkpoint):
            with open(self.target, "a") as f:
                f.write(json.dumps({k: v for k, v in metrics[0].items() if isinstance(v, (int, float))}) + "\n")

    return StepLog(path)


def part_ray_train(spec: dict) -> dict:
    import ray
    import ray.data
    import torch

    from albef_ray.config import build_config
    from albef_ray.launch.train import launch_pretrain
    from albef_ray.model.registry import get_arch
    from albef_ray.train.loop import Schedule, to_device, train_step
    from albef_ray.train.metrics import MetricWindow

    device = torch.device(spec["device"])
    batch, steps, every, size = spec["batch"], spec["steps"], spec["log_every"], spec["size"]
    torch.set_num_threads(max(1, int(spec.get("cpus_per_worker", 4))))
    tmp = Path(tempfile.mkdtemp(prefix="gpu_suite_ray_"))
    cfg = build_config({
        "model": {"size": size, "vit_init": None, "bert_init": None},
        "train": {"batch_size": batch, "num_workers": 1, "use_gpu": device.type == "cuda", "precision": spec.get("precision", "bf16"),
                  "epochs": 1, "max_steps": steps, "steps_per_epoch": steps, "log_every_steps": every,
                  "checkpoint_every_steps": 100 * steps, "cpus_per_worker": spec.get("cpus_per_worker", 4)},
        "momentum": {"queue_size": queue_for(batch)},
        "tracking": {"enabled": False},
        "run": {"storage_path": str(tmp), "name": "ray_train", "max_failures": 0},
    })
    arch = get_arch(size)
    cpu_batches = [random_batch(arch, batch, cfg.data.max_text_len, torch.device("cpu"), s) for s in range(steps)]
    # 1. plain loop: the worker's loop without Ray (batch to the device, train_step, a sync per window)
    from albef_ray.tasks import build_task
    from albef_ray.train.optim import build_optimizer

    torch.manual_seed(cfg.seed)
    task = build_task(cfg).to(device).train()
    optimizer = build_optimizer(task, cfg.optim)
    schedule = Schedule(steps, steps)
    generator = torch.Generator(device=device).manual_seed(cfg.seed)
    kwargs = step_kwargs()
    window, plain, t0 = MetricWindow(), [], time.perf_counter()
    for i, b in enumerate(cpu_batches):
        window.add(train_step(task, optimizer, to_device(b, device), i, cfg, schedule, generator, **kwargs))
        if (i + 1) % every == 0:
            window.flush()
            plain.append({"step": i + 1, "step_time_s": (time.perf_counter() - t0) / every})
            t0 = time.perf_counter()
    del task, optimizer
    if device.type == "cuda":
        torch.cuda.empty_cache()
    save({"size": size, "batch": batch, "steps": steps, "device": str(device), "plain_windows": plain})
    # 2. Ray Train, 1 worker: generated rows through Ray Data, as `albef-ray pretrain` without shards
    log_path = tmp / "windows.jsonl"
    ray.init(address="local", num_cpus=spec["cpus"], num_gpus=1 if device.type == "cuda" else 0, include_dashboard=False,
             log_to_driver=False, configure_logging=False,
             _node_ip_address="127.0.0.1")  # one node; no network there
    try:
        rows = [{k: b[k][j].numpy() for k in ("image", "input_ids", "attention_mask")}
                for b in cpu_batches for j in range(batch)]
        t0 = time.perf_counter()
        launch_pretrain(cfg, {"train": ray.data.from_items(rows)}, steps, callbacks=[_step_logger(str(log_path))])
        ray_wall = time.perf_counter() - t0
    finally:
        ray.shutdown()
    windows = [json.loads(line) for line in log_path.read_text().splitlines()] if log_path.exists() else []
    warm = spec.get("warmup_steps", every)
    p = [w["step_time_s"] for w in plain if w["step"] > warm]
    r = [w["step_time_s"] for w in windows if w.get("step", 0) > warm and "step_time_s" in w]
    result = {"size": size, "batch": batch, "steps": steps, "log_every": every, "warmup_steps": warm,
              "device": str(device), "plain_windows": plain, "ray_windows": windows, "ray_fit_wall_s": ray_wall}
    if p and r:
        ps, rs = sum(p) / len(p), sum(r) / len(r)
        waits = [w["data_wait_frac"] for w in windows if w.get("step", 0) > warm and "data_wait_frac" in w]
        result.update(plain_s_per_step=ps, ray_s_per_step=rs, overhead=rs / ps - 1,
                      ray_data_wait_frac=sum(waits) / len(waits) if waits else None)
    return result


PARTS = {"retrieval": part_retrieval, "data": part_data, "ray_train": part_ray_train}

if __name__ == "__main__":
    main(PARTS)
