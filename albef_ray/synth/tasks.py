"""What every downstream task's embedded version shares: its settings and how it is written.

A task's generator (``synth/<task>.py``, registered as ``TaskSpec.synth``) draws scenes with
:mod:`.scenes`, renders them like the caption benchmark, and writes examples whose text and
label (or answers) follow from the scene's ground truth. :func:`write_task_dataset` writes
them as a dataset (Parquet shards + manifest, the task's columns of
:data:`~albef_ray.data.schema.TASK_FIELDS`) and copies the caption benchmark's tokenizer in,
so a model pretrained on ``albef-ray data synth`` reads the task's texts with its own
vocabulary (words it never saw split into word pieces).
"""

from __future__ import annotations

import shutil
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass
from pathlib import Path

from ..data.build.candidates import Candidate, IterableSource
from ..data.build.writer import write_dataset
from ..data.schema import TOKENIZER_DIR


@dataclass(frozen=True)
class SynthTaskSettings:
    """Sizes and seed of a task's embedded version (``albef-ray data synth-task`` flags).

    Attributes:
        tokenizer_from: a dataset written by ``albef-ray data synth`` (its tokenizer is copied).
        seed: generator seed (each split draws from its own stream).
        train, val, test: examples per split.
        image_size: rendered scene size in pixels (the caption benchmark's default: 64).
    """

    tokenizer_from: str
    seed: int = 0
    train: int = 4000
    val: int = 500
    test: int = 1000
    image_size: int = 64

    def split_sizes(self) -> dict[str, int]:
        return {"train": self.train, "val": self.val, "test": self.test}


def write_task_dataset(
    out: str | Path, task: str, settings: SynthTaskSettings,
    candidates: Callable[[str, int], Iterable[Candidate]], *, shard_rows: int = 2048,
    progress: bool = True, overwrite: bool = False,
) -> dict:
    """Write ``candidates(split, n)`` of each split as a dataset in ``out`` with the tokenizer.

    Args:
        out: output dataset directory.
        task: the task's registered name (recorded in the manifest).
        settings: sizes, seed, and the caption dataset whose tokenizer is copied.
        candidates: yields a split's candidates, the same ones on every call (resumable).

    Raises:
        FileNotFoundError: ``settings.tokenizer_from`` has no tokenizer.
    """
    source_tokenizer = Path(settings.tokenizer_from) / TOKENIZER_DIR
    if not source_tokenizer.is_dir():
        raise FileNotFoundError(f"{settings.tokenizer_from}: no {TOKENIZER_DIR}/ (write it with `albef-ray data synth`)")
    sources = [
        IterableSource(f"synth_{task}", lambda split=split, n=n: candidates(split, n), split=split,
                       description={"task": task, **asdict(settings)})
        for split, n in settings.split_sizes().items() if n > 0
    ]
    target = Path(out) / TOKENIZER_DIR
    manifest = write_dataset(
        out, sources, shard_rows=shard_rows, progress=progress, overwrite=overwrite,
        extra={"tokenizer": TOKENIZER_DIR, "synth_task": {"task": task, **asdict(settings)}},
    )
    if not target.exists():
        shutil.copytree(source_tokenizer, target)
    return manifest
