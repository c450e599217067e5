"""A retrieval split read from caption shards: images, captions and who belongs to whom.

Rows of a shard are image-caption pairs; rows sharing ``(source, image_id)`` are the captions
of one image (a Karpathy test JSON converted by ``albef-ray data build``, or the synthetic
benchmark's test split with its several paraphrases per image). Each image is decoded once
with the evaluation transform (resize to R x R, no crop); captions are cleaned as in training.
"""

from __future__ import annotations

import logging
import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import torch

from ..config import AlbefConfig, ConfigError
from ..data.manifest import dataset_problem, shard_files
from ..data.transforms import eval_image, pre_caption

log = logging.getLogger(__name__)


@dataclass
class RetrievalSplit:
    """One evaluation split, in the layout the official ``evaluation()`` uses.

    Attributes:
        images: (N_img, 3, R, R) ``uint8`` after the evaluation resize (normalised later,
            batch by batch), or ``float32`` already normalised.
        captions: N_txt cleaned captions, grouped by image.
        txt2img: (N_txt,) int64, the image of each caption.
        img2txt: for each image, the indices of its captions.
        image_ids: ``source/image_id`` of each image.
        num_skipped: images left out because their bytes did not decode.
    """

    images: torch.Tensor
    captions: list[str]
    txt2img: torch.Tensor
    img2txt: list[list[int]]
    image_ids: list[str] = field(default_factory=list)
    num_skipped: int = 0

    @property
    def num_images(self) -> int:
        return int(self.images.shape[0])

    @property
    def num_texts(self) -> int:
        return len(self.captions)

    @classmethod
    def from_groups(
        cls, images: torch.Tensor, captions: list[list[str]], image_ids: list[str] | None = None, num_skipped: int = 0
    ) -> "RetrievalSplit":
        """From one image tensor and each image's list of captions (already cleaned)."""
        if len(captions) != images.shape[0]:
            raise ValueError(f"{images.shape[0]} images but {len(captions)} caption lists")
        flat, txt2img, img2txt = [], [], []
        for i, group in enumerate(captions):
            img2txt.append(list(range(len(flat), len(flat) + len(group))))
            flat += group
            txt2img += [i] * len(group)
        ids = image_ids if image_ids is not None else [str(i) for i in range(len(captions))]
        return cls(images, flat, torch.tensor(txt2img, dtype=torch.long), img2txt, ids, num_skipped)


def _parquet_sources(paths: list[str], split: str):
    """One pyarrow dataset per shard file (or plain Parquet folder) of ``split``."""
    import pyarrow.dataset as pads

    for root in paths:
        if problem := dataset_problem(root):  # e.g. an unfinished build would evaluate part of a split
            raise ConfigError(f"eval.shards: {problem}")
    try:
        files, _ = shard_files(paths, split)
    except KeyError as err:  # the manifest has no such split
        raise ConfigError(f"eval.split: {err.args[0]}") from None
    return [pads.dataset(f, format="parquet") for f in files]


def _image_keys(datasets, limit: int | None) -> list[tuple[str, str]]:
    """The first ``limit`` distinct (source, image_id) in row order (reads two columns only)."""
    seen: dict[tuple[str, str], None] = {}
    for ds in datasets:
        columns = [c for c in ("source", "image_id") if c in ds.schema.names]
        if "image_id" not in columns:
            raise ConfigError(f"eval.shards: {ds.files[:1]} has no image_id column")
        table = ds.to_table(columns=columns)
        ids = table.column("image_id").to_pylist()
        sources = table.column("source").to_pylist() if "source" in columns else [""] * len(ids)
        for key in zip(sources, ids):
            if key not in seen:
                if limit is not None and len(seen) >= limit:
                    return list(seen)
                seen[key] = None
    return list(seen)


def load_split(paths: list[str], split: str, cfg: AlbefConfig, threads: int | None = None) -> RetrievalSplit:
    """Read a retrieval split from caption shards.

    Args:
        paths: dataset roots (``eval.shards`` or ``data.shards``), listed as
            :func:`albef_ray.data.manifest.shard_files` does.
        split: e.g. ``"test"``.
        cfg: ``eval.max_images`` keeps the first N images in row order (undecodable ones among
            them are skipped and counted); ``data.max_words`` cleans captions; the model's
            resolution sets R; ``data.jpeg_draft`` lets JPEGs decode at a reduced scale.
        threads: decoding threads (default: all cores; PIL releases the GIL while decoding).

    Returns:
        The split, images in first-seen order, each image's captions in row order.
    """
    from ..model.registry import get_arch

    if not paths:
        raise ConfigError("eval.shards: no dataset paths (set eval.shards or data.shards)")
    res = get_arch(cfg.model.size, cfg.model.image_res).image_res
    datasets = _parquet_sources(paths, split)
    keys = _image_keys(datasets, cfg.eval.max_images)
    wanted = set(keys)
    encoded: dict[tuple[str, str], bytes] = {}
    captions: dict[tuple[str, str], list[str]] = {k: [] for k in keys}
    for ds in datasets:
        columns = [c for c in ("image", "caption", "image_id", "source") if c in ds.schema.names]
        for batch in ds.to_batches(columns=columns):
            ids = batch.column("image_id").to_pylist()
            sources = batch.column("source").to_pylist() if "source" in columns else [""] * len(ids)
            texts = batch.column("caption").to_pylist()
            images = batch.column("image")
            for row, key in enumerate(zip(sources, ids)):
                if key in wanted:
                    captions[key].append(pre_caption(str(texts[row]), cfg.data.max_words))
                    if key not in encoded:
                        encoded[key] = images[row].as_py()
    with ThreadPoolExecutor(threads or os.cpu_count() or 1) as pool:
        decoded = list(pool.map(lambda k: eval_image(encoded[k], res, cfg.data.jpeg_draft), keys))
    kept = [i for i, img in enumerate(decoded) if img is not None]
    skipped = len(keys) - len(kept)
    if skipped:
        log.warning("%d of %d images of split %r did not decode and are left out", skipped, len(keys), split)
    if not kept:
        raise ConfigError(f"eval.split: no decodable images in split {split!r} of {', '.join(paths)}")
    return RetrievalSplit.from_groups(
        torch.stack([decoded[i] for i in kept]),
        [captions[keys[i]] for i in kept],
        [f"{keys[i][0]}/{keys[i][1]}" if keys[i][0] else keys[i][1] for i in kept],
        skipped,
    )
