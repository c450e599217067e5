"""Rows per CPU-second of decode + augment + tokenise: Ray Data over shards vs a torch DataLoader.

Two datasets, generated once into ``--workdir``:

- ``synth``: the embedded benchmark (``albef-ray data synth``, 64 px PNGs, 2-3 shapes).
- ``jpeg``: 640x480 photo-like JPEGs (quality 90): smooth gradients, soft shapes, noise.

Each is read three ways, all producing the same batches (``image`` float32 (B, 3, 256, 256)
normalised, ``input_ids``, ``attention_mask``) with ALBEF's pretraining transform:

- ``ray``: :func:`albef_ray.launch.data.build_dataset` + ``CaptionCollate`` (the training path).
- ``loader-official``: what the official code does: a JSON list of ``{image, caption}``, one
  JPEG/PNG file opened per sample (``Image.open(path).convert("RGB")``), torchvision's
  ``RandomResizedCrop`` / ``RandomHorizontalFlip`` / RandAugment / ``ToTensor`` / ``Normalize``
  per sample, default stacking + tokenisation in the DataLoader's collate.
- ``loader-ours``: the same DataLoader running albef-ray's functions (uint8 per sample,
  batch normalisation, JPEG draft), to separate the transform from the framework.

Per core means per CPU-second actually used: the CPU time of this process and every
descendant (Ray's raylet, GCS and workers; the DataLoader's workers), read from /proc, so
other load on a shared machine does not count. Wall-clock rows/s is printed too. Usage::

    python benchmarks/data.py [--cpus 2] [--rows 1200] [--datasets synth jpeg] [--jpeg-size 640 480]
"""

from __future__ import annotations

import argparse
import io
import json
import os
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch
from PIL import Image, ImageDraw, ImageFilter

from albef_ray.data.schema import ROW_SCHEMA

RES, BATCH = 256, 64
_TICK = os.sysconf("SC_CLK_TCK")


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


def measure(batches) -> tuple[int, float, float]:
    """(rows, wall seconds, CPU seconds of the process tree) for one pass over ``batches``."""
    cpu0, t0, rows = tree_cpu_seconds(), time.perf_counter(), 0
    for batch in batches:
        rows += batch["input_ids"].shape[0]
    wall, cpu1 = time.perf_counter() - t0, tree_cpu_seconds()
    return rows, wall, sum(v - cpu0.get(pid, 0.0) for pid, v in cpu1.items())


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


def _write_both(root: Path, images: list[bytes], captions: list[str], ext: str) -> None:
    """Parquet shards (``root/ds``) and one file per sample + a JSON list (``root/files``)."""
    files = root / "files"
    files.mkdir(parents=True, exist_ok=True)
    ann = []
    for i, (data, caption) in enumerate(zip(images, captions)):
        path = files / f"{i:06d}.{ext}"
        path.write_bytes(data)
        ann.append({"image": str(path), "caption": caption})
    (root / "ann.json").write_text(json.dumps(ann))
    (root / "ds" / "train").mkdir(parents=True, exist_ok=True)
    for part, start in enumerate(range(0, len(images), 400)):
        n = len(images[start:start + 400])
        table = pa.Table.from_pydict({
            "image": images[start:start + n], "caption": captions[start:start + n],
            "image_id": [str(i) for i in range(start, start + n)], "source": ["bench"] * n,
            "width": [0] * n, "height": [0] * n,
        }, schema=ROW_SCHEMA)
        pq.write_table(table, root / "ds" / "train" / f"part-{part:05d}.parquet")


def prepare(workdir: Path, name: str, rows: int, size: tuple[int, int] = (640, 480)) -> Path:
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
    else:  # 200 distinct photos, re-encoded with fresh noise so every row decodes in full
        rng = np.random.default_rng(0)
        w, h = size
        bases = [photo_like(rng, w, h) for _ in range(200)]
        images = []
        for i in range(rows):
            buf = io.BytesIO()
            noisy = np.clip(bases[i % 200].astype(np.int16) + rng.integers(-3, 4, (h, w, 3)), 0, 255)
            Image.fromarray(noisy.astype(np.uint8)).save(buf, "JPEG", quality=90)
            images.append(buf.getvalue())
    _write_both(root, images, captions, "png" if name == "synth" else "jpg")
    (root / "tokenizer").symlink_to(synth / "tokenizer")
    return root


# ----------------------------------------------------------------------------- the three readers


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
    def __init__(self, tokenizer: str, official: bool):
        from albef_ray.data.collate import CaptionCollator

        self.collator, self.official = CaptionCollator(tokenizer, 25), official

    def __call__(self, samples):
        images, captions = zip(*samples)
        if self.official:  # default_collate's stack, then the official tokenizer call
            from albef_ray.data.collate import tokenize

            ids, mask = tokenize(self.collator.tokenizer, captions, 25)
            return {"image": torch.stack(images), "input_ids": ids, "attention_mask": mask}
        return self.collator({"image": np.stack(images), "caption": np.array(captions, dtype=object)})


def loader_epochs(root: Path, cpus: int, official: bool, epochs: int):
    dataset = _FileDataset(root / "ann.json", official)
    loader = torch.utils.data.DataLoader(
        dataset, batch_size=BATCH, shuffle=True, num_workers=cpus, drop_last=True,
        collate_fn=_Collate(str(root / "tokenizer"), official), persistent_workers=True,
    )
    return [measure(loader) for _ in range(epochs + 1)][1:]  # the first pass starts the workers


def ray_epochs(root: Path, cpus: int, epochs: int):
    import ray

    from albef_ray.config import build_config
    from albef_ray.launch.data import CaptionCollate, build_dataset, iter_kwargs

    cfg = build_config({"data": {"tokenizer": str(root / "tokenizer")}, "train": {"batch_size": BATCH}})
    ray.init(num_cpus=cpus, include_dashboard=False, log_to_driver=False)
    try:
        ds = build_dataset([str(root / "ds")], "train", cfg, training=True)
        collate = CaptionCollate.from_config(cfg)
        return [measure(ds.iter_torch_batches(collate_fn=collate, **iter_kwargs(cfg))) for _ in range(epochs + 1)][1:]
    finally:
        ray.shutdown()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--cpus", type=int, default=os.cpu_count())
    parser.add_argument("--rows", type=int, default=1200)
    parser.add_argument("--epochs", type=int, default=2, help="measured passes after one warm-up pass")
    parser.add_argument("--datasets", nargs="+", default=["synth", "jpeg"], choices=["synth", "jpeg"])
    parser.add_argument("--readers", nargs="+", default=["ray", "loader-official", "loader-ours"])
    parser.add_argument("--jpeg-size", type=int, nargs=2, default=[640, 480], metavar=("W", "H"))
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/albef-ray-bench-data"))
    args = parser.parse_args()
    torch.set_num_threads(1)  # the consumer stands in for a training process; no OpenMP fights
    print(f"{args.cpus} CPUs, {args.rows} rows, batch {BATCH}, {RES} px; best of {args.epochs} passes")
    print("| data | reader | rows/s (wall) | rows per CPU-second | CPU-seconds per pass |")
    print("|---|---|---|---|---|")
    for name in args.datasets:
        root = prepare(args.workdir, name, args.rows, tuple(args.jpeg_size))
        label = name if name == "synth" else f"jpeg {args.jpeg_size[0]}x{args.jpeg_size[1]}"
        for reader in args.readers:
            if reader == "ray":
                passes = ray_epochs(root, args.cpus, args.epochs)
            else:
                passes = loader_epochs(root, args.cpus, reader == "loader-official", args.epochs)
            rows, wall, cpu = max(passes, key=lambda p: p[0] / p[2])
            print(f"| {label} | {reader} | {rows / wall:.0f} | {rows / cpu:.0f} | {cpu:.1f} |", flush=True)


if __name__ == "__main__":
    main()
