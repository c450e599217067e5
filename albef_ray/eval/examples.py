"""A downstream task's evaluation split, read in row order as model-ready batches (no Ray).

SNLI-VE, NLVR2 and VQA evaluate example by example (a label or a question per row), unlike
retrieval's image/caption banks (:mod:`.split`). Rows are read from the split's shards in
file order, images decoded with the evaluation transform (resize to R x R, no crop), texts
cleaned as in training, and collated by :func:`~albef_ray.data.collate.collate_batch` with
the task's columns (``label``, ``image2``, ``answer_ids`` ...). Undecodable rows are skipped
and counted, never a crash.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from dataclasses import dataclass, field

import numpy as np
import pyarrow.dataset as pads
import torch

from ..config import AlbefConfig, ConfigError
from ..data.collate import collate_batch
from ..data.manifest import dataset_problem, shard_files
from ..data.schema import TASK_FIELDS
from ..data.stream import task_arrays
from ..data.transforms import eval_image, pre_caption

log = logging.getLogger(__name__)


@dataclass
class ExampleBatch:
    """One evaluation batch: the collated tensors plus what a result file needs.

    Attributes:
        tensors: ``image``, ``input_ids``, ``attention_mask`` and the task's columns.
        question_id: each row's ``question_id`` (VQA), else its row number in the split.
        text: each row's cleaned text (question, hypothesis or statement).
        answers: VQA: each row's answers with their weights, else empty lists.
        columns: each kept row's stored values by column as read (``image`` bytes, ``width``,
            ``height``, the task columns), for evaluations that need more than tensors
            (grounding: boxes in the original image's pixels).
    """

    tensors: dict[str, torch.Tensor]
    question_id: list[str]
    text: list[str]
    answers: list[list[tuple[str, float]]] = field(default_factory=list)
    columns: dict[str, list] = field(default_factory=dict)


def _datasets(paths: list[str], split: str) -> list[pads.Dataset]:
    for path in paths:
        if problem := dataset_problem(path):
            raise ConfigError(f"eval.shards: {problem}")
    files, _ = shard_files(paths, split)
    try:
        return [pads.dataset(f, format="parquet") for f in files]
    except (FileNotFoundError, OSError) as err:
        raise ConfigError(f"eval.split: no split {split!r} in {', '.join(paths)} ({err})") from None


def iter_examples(
    paths: list[str], split: str, cfg: AlbefConfig, tokenizer, batch_size: int | None = None,
    max_rows: int | None = None,
) -> Iterator[ExampleBatch]:
    """The rows of ``split`` under ``paths`` as evaluation batches, in order.

    Args:
        paths: dataset roots (``eval.shards`` or ``data.shards``).
        split: e.g. ``eval.split``.
        cfg: the model size and resolution, ``data.max_words`` / ``max_text_len`` /
            ``append_sep``, ``eval.batch_size`` (the default batch size).
        tokenizer: a loaded tokenizer.
        batch_size: rows per batch (default ``eval.batch_size``).
        max_rows: stop after this many rows (None: all).

    Yields:
        :class:`ExampleBatch`; a batch may be shorter than ``batch_size`` where rows did not
        decode (counted in its ``num_dropped``).
    """
    from ..model.registry import get_arch

    res = get_arch(cfg.model.size, cfg.model.image_res).image_res
    size = batch_size or cfg.eval.batch_size
    seen = 0
    for ds in _datasets(paths, split):
        names = ds.schema.names
        columns = ["image", "caption"] + [c for c in ("width", "height", *TASK_FIELDS) if c in names]
        for record in ds.to_batches(columns=columns, batch_size=size):
            if max_rows is not None and seen >= max_rows:
                return
            table = record.to_pydict()
            n = len(table["caption"]) if max_rows is None else min(len(table["caption"]), max_rows - seen)
            yield _batch(table, range(seen, seen + n), res, cfg, tokenizer)
            seen += n


def _batch(table: dict[str, list], rows: range, res: int, cfg: AlbefConfig, tokenizer) -> ExampleBatch:
    n = len(rows)
    images = [eval_image(table["image"][k], res, cfg.data.jpeg_draft) for k in range(n)]
    second = [eval_image(table["image2"][k], res, cfg.data.jpeg_draft) for k in range(n)] if "image2" in table else None
    valid = np.array([img is not None and (second is None or second[k] is not None) for k, img in enumerate(images)])
    if not valid.all():
        log.warning("%d of %d evaluation rows did not decode and are skipped", int((~valid).sum()), n)
    blank = torch.zeros((3, res, res), dtype=torch.uint8)
    batch = {
        "image": torch.stack([img if img is not None else blank for img in images]).numpy(),
        "caption": np.array([pre_caption(str(table["caption"][k]), cfg.data.max_words) for k in range(n)], dtype=object),
        "valid": valid,
        **task_arrays(table, list(range(n))),
    }
    if second is not None:
        batch["image2"] = torch.stack([img if img is not None else blank for img in second]).numpy()
    tensors = collate_batch(batch, tokenizer, cfg.data.max_text_len, append_sep=cfg.data.append_sep)
    keep = np.flatnonzero(valid).tolist()
    ids = [str(table["question_id"][k]) for k in keep] if "question_id" in table else [str(rows[k]) for k in keep]
    answers = []
    if "answers" in table:
        for k in keep:
            given = list(table["answers"][k] or [])
            weights = list(table.get("answer_weights", [None] * n)[k] or [1.0 / max(len(given), 1)] * len(given))
            answers.append(list(zip(given, weights)))
    columns = {c: [values[k] for k in keep] for c, values in table.items() if c != "caption"}
    return ExampleBatch(tensors, ids, [str(batch["caption"][k]) for k in keep], answers, columns)
