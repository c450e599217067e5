"""Rows per CPU-second of decode + augment + tokenise: Ray Data over shards vs a torch DataLoader.

Datasets, generated once into ``--workdir`` (shards written by the builder's own writer:
256-row groups, image bytes uncompressed, files cut at 128 MiB):

- ``synth``: the embedded benchmark (``albef-ray data synth``, 64 px PNGs, 2-3 shapes).
- ``jpeg``: photo-like JPEGs (``--jpeg-size``, default 640x480, quality 90): smooth gradients,
  soft shapes, noise.

Each is read by readers producing the same batches (``image`` float32 (B, 3, 256, 256)
normalised, ``input_ids``, ``attention_mask``) with ALBEF's pretraining transform:

- ``ray``: the training path, :class:`albef_ray.launch.data.ShardStream` (the epoch's
  deterministic order, one decode task per window, ``preserve_order``), one pass per epoch
  as rank 0 of 1.
- ``ray-unordered``: :func:`albef_ray.launch.data.build_dataset` + ``CaptionCollate`` with a
  ``data.shuffle_buffer`` local shuffle buffer (Ray's file shuffle; not used for training).
- ``loader-official``: what the official code does: a JSON list of ``{image, caption}``, one
  JPEG/PNG file opened per sample (``Image.open(path).convert("RGB")``), torchvision's
  ``RandomResizedCrop`` / ``RandomHorizontalFlip`` / RandAugment / ``ToTensor`` / ``Normalize``
  per sample, default stacking + tokenisation in the DataLoader's collate.
- ``loader-ours``: the same DataLoader running albef-ray's functions (uint8 per sample,
  batch normalisation, JPEG draft), to separate the transform from the framework.

``--cpus N`` gives Ray ``num_cpus=N`` and the DataLoader ``num_workers=N``. ``--normalize
device`` leaves images uint8 in the batches of ``ray`` and ``loader-ours`` (as training on a
GPU does, normalising there; ``loader-official`` always normalises, as the official code).

Per core means per CPU-second actually used: the CPU time of this process and every
descendant (Ray's raylet, GCS and workers; the DataLoader's workers), read from /proc, so
other load on a shared machine does not count; split into the consumer (this process), the
workers (decode tasks / DataLoader workers) and Ray's daemons. Wall-clock rows/s and the time
to the first batch are printed too. Ray is imported only for the Ray readers: without it they
are reported as skipped. ``--json PATH`` writes every pass. Usage::

    python benchmarks/data.py [--cpus 2] [--rows 2000] [--datasets synth jpeg] [--jpeg-size 640 480] [--json out.json]
"""

from __future__ import annotations

import argparse
import copy
import io
import json
import os
import platform
import time
from multiprocessing import Pool
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch
from PIL import Image, ImageDraw, ImageFilter

RES, BATCH = 256, 64
SHARD_BYTES = 128 << 20  # the builder's default --shard-size
_TICK = os.sysconf("SC_CLK_TCK")
_RAY_DAEMONS = ("raylet", "gcs_server", "dashboard", "log_monitor", "monitor.py", "runtime_env", "ray_client_server")


# ----------------------------------------------------------------------------- CPU accounting


def _proc_stats() -> dict[int, tuple[int, float]]:
    out = {}
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        out[int(pid)] = (int(fields[1]), (int(fields[11]) + int(fields[12])) / _TICK)  # ppid, utime+stime
    return out


def tree_cpu_seconds() -> dict[int, float]:
    """CPU seconds of this process and all its live descendants, by pid."""
    stats, tree, frontier = _proc_stats(), {os.getpid()}, [os.getpid()]
    children: dict[int, list[int]] = {}
    for pid, (ppid, _) in stats.items():
        children.setdefault(ppid, []).append(pid)
    while frontier:
        for child in children.get(frontier.pop(), []):
            tree.add(child)
            frontier.append(child)
    return {pid: stats[pid][1] for pid in tree if pid in stats}


def _role(pid: int) -> str:
    """``consumer`` (this process), ``daemons`` (Ray's raylet, GCS, ...) or ``workers``."""
    if pid == os.getpid():
        return "consumer"
    try:
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return "workers"
    return "daemons" if any(name in cmdline for name in _RAY_DAEMONS) else "workers"


def measure(batches) -> dict:
    """One pass over ``batches``: rows, wall and first-batch seconds, CPU seconds by role."""
    cpu0, t0, rows, first = tree_cpu_seconds(), time.perf_counter(), 0, None
    for batch in batches:
        rows += batch["input_ids"].shape[0]
        first = time.perf_counter() - t0 if first is None else first
    wall, cpu1 = time.perf_counter() - t0, tree_cpu_seconds()
    by_role = {"consumer": 0.0, "workers": 0.0, "daemons": 0.0}
    for pid, seconds in cpu1.items():
        by_role[_role(pid)] += seconds - cpu0.get(pid, 0.0)
    cpu = sum(by_role.values())
    return {"rows": rows, "wall_s": wall, "first_batch_s": first, "cpu_s": cpu,
            "cpu_s_by_role": {k: round(v, 3) for k, v in by_role.items()}}


# ----------------------------------------------------------------------------- data


def photo_like(rng: np.random.Generator, w: int = 640, h: int = 480) -> np.ndarray:
    """A gradient background, a few soft ellipses and boxes, sensor-like noise: (h, w, 3) uint8."""
    y, x = np.mgrid[0:h, 0:w].astype(np.float32)
    c0, c1 = rng.uniform(0, 255, (2, 3))
    angle = rng.uniform(0, 2 * np.pi)
    t = ((np.cos(angle) * x / w + np.sin(angle) * y / h + 1) / 2)[..., None]
    base = c0 * (1 - t) + c1 * t + 30 * np.sin(x[..., None] / rng.uniform(20, 80)) * np.array([1, 0.5, 0.2])
    img = Image.fromarray(np.clip(base, 0, 255).astype(np.uint8))
    draw = ImageDraw.Draw(img)
    for _ in range(rng.integers(3, 8)):
        x0, y0, side = rng.uniform(0, w), rng.uniform(0, h), rng.uniform(20, 200)
        shape = draw.ellipse if rng.random() < 0.5 else draw.rectangle
        shape([x0, y0, x0 + side, y0 + side * rng.uniform(0.5, 1.5)], fill=tuple(rng.integers(0, 256, 3).tolist()))
    noisy = np.asarray(img.filter(ImageFilter.GaussianBlur(1.5)), np.float32) + rng.normal(0, 6, (h, w, 3))
    return np.clip(noisy, 0, 255).astype(np.uint8)


def _jpeg_rows(args: tuple[int, int, int, int]) -> list[tuple[int, bytes]]:
    """Rows ``base, base + 200, ...`` below ``rows``: one photo, re-encoded with fresh noise per row (q90)."""
    base, rows, w, h = args
    photo = photo_like(np.random.default_rng([0, base]), w, h).astype(np.int16)
    out = []
    for i in range(base, rows, 200):
        noise = np.random.default_rng([1, i]).integers(-3, 4, (h, w, 3))
        buf = io.BytesIO()
        Image.fromarray(np.clip(photo + noise, 0, 255).astype(np.uint8)).save(buf, "JPEG", quality=90)
        out.append((i, buf.getvalue()))
    return out


def _write_both(root: Path, images: list[bytes], captions: list[str], ext: str) -> None:
    """Shards as the builder writes them (``root/ds``) and one file per sample + a JSON list (``root/files``)."""
    from albef_ray.data.build.writer import write_shard

    files = root / "files"
    files.mkdir(parents=True, exist_ok=True)
    ann = []
    for i, (data, caption) in enumerate(zip(images, captions)):
        path = files / f"{i:06d}.{ext}"
        path.write_bytes(data)
        ann.append({"image": str(path), "caption": caption})
    (root / "ann.json").write_text(json.dumps(ann))
    (root / "ds" / "train").mkdir(parents=True, exist_ok=True)
    rows = [{"image": data, "caption": caption, "image_id": str(i), "source": "bench", "width": 0, "height": 0}
            for i, (data, caption) in enumerate(zip(images, captions))]
    per_shard = max(1, SHARD_BYTES // max(1, sum(map(len, images)) // max(1, len(images))))
    for part, start in enumerate(range(0, len(rows), per_shard)):
        write_shard(root / "ds" / "train" / f"part-{part:05d}.parquet", rows[start:start + per_shard])


def prepare(workdir: Path, name: str, rows: int, size: tuple[int, int] = (640, 480), cpus: int = 1) -> Path:
    root = workdir / (f"{name}-{rows}" if name == "synth" else f"{name}-{size[0]}x{size[1]}-{rows}")
    if (root / "ann.json").exists():
        return root
    synth = workdir / f"synth-source-{rows}"
    if not (synth / "manifest.json").exists():
        from albef_ray.cli import main

        main(["data", "synth", str(synth), "--train", str(rows), "--val", "8", "--test", "8", "--no-progress"])
    from albef_ray.data.manifest import shard_paths

    table = pa.concat_tables([pq.read_table(p, columns=["image", "caption"]) for p in shard_paths(synth, "train")])
    captions = table.column("caption").to_pylist()
    if name == "synth":
        images = table.column("image").to_pylist()
    else:
        images = [b""] * rows  # 200 distinct photos, each row re-encoded so that every row decodes in full
        with Pool(max(1, cpus)) as pool:
            for part in pool.imap_unordered(_jpeg_rows, [(b, rows, *size) for b in range(min(200, rows))]):
                for i, data in part:
                    images[i] = data
    _write_both(root, images, captions, "png" if name == "synth" else "jpg")
    (root / "tokenizer").symlink_to(synth / "tokenizer")
    return root


# ----------------------------------------------------------------------------- the readers


class _FileDataset(torch.utils.data.Dataset):
    """The official ``pretrain_dataset``: a JSON list, one image file opened per sample."""

    def __init__(self, ann_file: Path, official: bool):
        from albef_ray.data.transforms import AugmentSpec

        self.ann = json.loads(ann_file.read_text())
        self.official, self.spec = official, AugmentSpec(RES)
        if official:
            from torchvision import transforms

            from albef_ray.data.randaugment import rand_augment
            from albef_ray.data.transforms import MEAN, STD

            self.transform = transforms.Compose([
                transforms.RandomResizedCrop(RES, scale=(0.2, 1.0), interpolation=transforms.InterpolationMode.BICUBIC),
                transforms.RandomHorizontalFlip(),
                lambda img: rand_augment(img, 2, 7),
                transforms.ToTensor(),
                transforms.Normalize(MEAN, STD),
            ])

    def __len__(self):
        return len(self.ann)

    def __getitem__(self, i):
        from albef_ray.data.transforms import pre_caption, pretrain_image

        ann = self.ann[i]
        if self.official:
            return self.transform(Image.open(ann["image"]).convert("RGB")), pre_caption(ann["caption"], 30)
        return pretrain_image(Path(ann["image"]).read_bytes(), self.spec).numpy(), pre_caption(ann["caption"], 30)


class _Collate:
    def __init__(self, tokenizer: str, official: bool, normalized: bool):
        from albef_ray.data.collate import CaptionCollator

        self.collator, self.official = CaptionCollator(tokenizer, 25), official
        self.collator.normalized = normalized

    def __call__(self, samples):
        images, captions = zip(*samples)
        if self.official:  # default_collate's stack, then the official tokenizer call
            from albef_ray.data.collate import tokenize

            ids, mask = tokenize(self.collator.tokenizer, captions, 25)
            return {"image": torch.stack(images), "input_ids": ids, "attention_mask": mask}
        return self.collator({"image": np.stack(images), "caption": np.array(captions, dtype=object)})


def loader_epochs(root: Path, cpus: int, official: bool, epochs: int, normalized: bool = True) -> list[dict]:
    dataset = _FileDataset(root / "ann.json", official)
    loader = torch.utils.data.DataLoader(
        dataset, batch_size=BATCH, shuffle=True, num_workers=cpus, drop_last=True,
        collate_fn=_Collate(str(root / "tokenizer"), official, normalized or official), persistent_workers=True,
    )
    return [measure(loader) for _ in range(epochs + 1)][1:]  # the first pass starts the workers


def _init_ray(cpus: int, object_store_gb: float | None) -> None:
    import ray
    import ray.data

    store = None if object_store_gb is None else int(object_store_gb * (1 << 30))
    ray.init(num_cpus=cpus, object_store_memory=store, include_dashboard=False, log_to_driver=False,
             logging_level="WARNING")
    context = ray.data.DataContext.get_current()
    context.enable_progress_bars = False
    context.print_on_execution_start = False


def ray_epochs(root: Path, cpus: int, epochs: int, ordered: bool, normalized: bool = True,
               object_store_gb: float | None = None, overrides: dict | None = None) -> list[dict]:
    import ray

    from albef_ray.config import build_config
    from albef_ray.launch.data import (
        CaptionCollate,
        build_dataset,
        build_stream,
        iter_kwargs,
    )

    shards = str(root / "ds")
    cfg = build_config({"data": {"tokenizer": str(root / "tokenizer"), "shards": [shards], **(overrides or {})},
                        "train": {"batch_size": BATCH}})
    _init_ray(cpus, object_store_gb)
    try:
        if ordered:  # the training path: epoch e of rank 0 of 1
            stream = build_stream([shards], "train", cfg)
            collate = copy.copy(stream.collate)
            collate.collator = copy.copy(collate.collator)
            collate.collator.normalized = normalized
            stream.collate = collate
            return [measure(stream.epoch_batches(e, 0, 1, 0, BATCH, device="cpu")) for e in range(epochs + 1)][1:]
        collate = CaptionCollate.from_config(cfg)
        collate.collator.normalized = normalized
        passes = []
        for _ in range(epochs + 1):
            ds = build_dataset([shards], "train", cfg, training=True)
            passes.append(measure(ds.iter_torch_batches(collate_fn=collate, **iter_kwargs(cfg))))
        return passes[1:]
    finally:
        ray.shutdown()


def _field(text: str) -> tuple[str, object]:
    key, value = text.split("=", 1)
    try:
        return key, json.loads(value)
    except json.JSONDecodeError:
        return key, value


def _have_ray() -> bool:
    try:
        import ray.data  # noqa: F401
    except ImportError:
        return False
    return True


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--cpus", type=int, default=os.cpu_count(), help="Ray num_cpus and DataLoader num_workers")
    parser.add_argument("--rows", type=int, default=2000)
    parser.add_argument("--epochs", type=int, default=2, help="measured passes after one warm-up pass")
    parser.add_argument("--datasets", nargs="+", default=["synth", "jpeg"], choices=["synth", "jpeg"])
    parser.add_argument("--readers", nargs="+", default=["ray", "loader-official", "loader-ours"],
                        choices=["ray", "ray-unordered", "loader-official", "loader-ours"])
    parser.add_argument("--jpeg-size", type=int, nargs=2, default=[640, 480], metavar=("W", "H"))
    parser.add_argument("--normalize", choices=["cpu", "device"], default="cpu",
                        help="device: ray and loader-ours batches keep uint8 images (normalised on the GPU in training)")
    parser.add_argument("--object-store-gb", type=float, default=None, help="Ray's object store (default: Ray's)")
    parser.add_argument("--set", nargs="*", default=[], metavar="FIELD=VALUE",
                        help="data.* config fields for the Ray readers, e.g. map_batch_size=128")
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/albef-ray-bench-data"))
    parser.add_argument("--json", type=Path, default=None, help="write the results here")
    args = parser.parse_args()
    torch.set_num_threads(1)  # the consumer stands in for a training process; no OpenMP fights
    overrides = dict(_field(f) for f in args.set)
    normalized = args.normalize == "cpu"
    have_ray = _have_ray()
    report = {
        "cpus": args.cpus, "rows": args.rows, "batch": BATCH, "res": RES, "epochs": args.epochs,
        "normalize": args.normalize, "data_overrides": overrides, "host": {
            "machine": platform.machine(), "cpu_count": os.cpu_count(), "python": platform.python_version(),
            "torch": torch.__version__, "load_avg": os.getloadavg(),
        }, "results": [],
    }
    if have_ray:
        import ray

        report["host"]["ray"] = ray.__version__
    print(f"{args.cpus} CPUs, {args.rows} rows, batch {BATCH}, {RES} px, normalise on {args.normalize}; "
          f"best of {args.epochs} passes")
    print("| data | reader | rows/s (wall) | rows per CPU-second | CPU-s per pass (consumer / workers / daemons) | first batch s |")
    print("|---|---|---|---|---|---|")
    for name in args.datasets:
        root = prepare(args.workdir, name, args.rows, tuple(args.jpeg_size), args.cpus)
        label = name if name == "synth" else f"jpeg {args.jpeg_size[0]}x{args.jpeg_size[1]}"
        for reader in args.readers:
            entry = {"data": label, "reader": reader}
            if reader.startswith("ray") and not have_ray:
                entry["skipped"] = "ray is not installed"
                print(f"| {label} | {reader} | skipped: ray is not installed | | | |", flush=True)
                report["results"].append(entry)
                continue
            if reader.startswith("ray"):
                passes = ray_epochs(root, args.cpus, args.epochs, reader == "ray", normalized,
                                    args.object_store_gb, overrides)
            else:
                passes = loader_epochs(root, args.cpus, reader == "loader-official", args.epochs, normalized)
            best = max(passes, key=lambda p: p["rows"] / p["cpu_s"])
            roles = best["cpu_s_by_role"]
            entry.update(passes=passes, rows_per_s=best["rows"] / best["wall_s"], rows_per_cpu_s=best["rows"] / best["cpu_s"])
            report["results"].append(entry)
            print(f"| {label} | {reader} | {entry['rows_per_s']:.0f} | {entry['rows_per_cpu_s']:.0f} | "
                  f"{best['cpu_s']:.2f} ({roles['consumer']:.2f} / {roles['workers']:.2f} / {roles['daemons']:.2f}) | "
                  f"{best['first_batch_s']:.2f} |", flush=True)
    if args.json is not None:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(report, indent=1) + "\n")


if __name__ == "__main__":
    main()
