"""Generated image-caption batches for the CPU demo and tests, until real shards exist.

Each of K "classes" owns a fixed random image template and a fixed caption. A sample is
its class's template plus fresh Gaussian noise, paired with the class's caption, so image
and text share learnable information: ITC can align them, ITM can tell a pair from a
mismatch, and MLM can recover a masked word from the other words and the image. Classes
within one batch are distinct, so in-batch negatives are true negatives.

Everything is a function of ``(seed, batch index)``: batch ``i`` is the same whichever
order or process asks for it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterator

import torch

from ..config import AlbefConfig
from ..model.registry import get_arch
from ..objectives.mlm import SpecialTokens


@dataclass(frozen=True)
class SyntheticSpec:
    """Shape and difficulty of the generated data.

    Attributes:
        batch_size: B, pairs per batch; at most ``num_classes``.
        image_res: R, images are (3, R, R).
        vocab_size: token ids are drawn below this, above the special ids.
        max_text_len: T, captions are padded to this length.
        num_classes: K distinct (template, caption) pairs.
        min_words, max_words: caption length range, [CLS] and [SEP] not counted.
        noise: std of the per-sample Gaussian noise; templates have std 1.
        seed: fixes templates, captions and every batch.
    """

    batch_size: int
    image_res: int
    vocab_size: int
    max_text_len: int
    num_classes: int = 64
    min_words: int = 4
    max_words: int = 10
    noise: float = 0.5
    seed: int = 0

    def __post_init__(self) -> None:
        if self.batch_size > self.num_classes:
            raise ValueError(f"batch_size {self.batch_size} exceeds num_classes {self.num_classes}")
        if not 1 <= self.min_words <= self.max_words:
            raise ValueError(f"need 1 <= min_words <= max_words, got {self.min_words}, {self.max_words}")
        if self.max_words + 2 > self.max_text_len:
            raise ValueError(f"max_words {self.max_words} + [CLS] + [SEP] exceeds max_text_len {self.max_text_len}")

    @classmethod
    def from_config(cls, cfg: AlbefConfig, **kwargs) -> "SyntheticSpec":
        """Sizes from the config: per-worker batch, the model size's resolution and vocabulary."""
        arch = get_arch(cfg.model.size, cfg.model.image_res)
        max_text_len = min(cfg.data.max_text_len, arch.max_position)
        kwargs.setdefault("max_words", min(10, max_text_len - 2))
        kwargs.setdefault("min_words", min(4, kwargs["max_words"]))
        return cls(
            batch_size=cfg.train.batch_size,
            image_res=arch.image_res,
            vocab_size=arch.vocab_size,
            max_text_len=max_text_len,
            seed=cfg.seed,
            **kwargs,
        )


class SyntheticBatches:
    """``num_batches`` deterministic batches; indexable, sized and re-iterable like a loader.

    Each batch is a dict with ``image`` (B, 3, R, R) float32, ``input_ids`` (B, T) int64
    (``[CLS] w1 .. wn [SEP] [PAD] ..``) and ``attention_mask`` (B, T) int64, plus
    ``class_id`` (B,) for inspection.
    """

    def __init__(self, spec: SyntheticSpec, num_batches: int, special: SpecialTokens = SpecialTokens()):
        if num_batches < 1:
            raise ValueError(f"num_batches must be >= 1, got {num_batches}")
        self.spec = spec
        self.num_batches = num_batches
        self.special = special
        g = torch.Generator().manual_seed(spec.seed)
        k, r, t = spec.num_classes, spec.image_res, spec.max_text_len
        self.templates = torch.randn(k, 3, r, r, generator=g)  # (K, 3, R, R)
        self.input_ids, self.attention_mask = self._captions(g)  # (K, T) each
        assert self.input_ids.shape == (k, t)

    def _captions(self, g: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        spec, special = self.spec, self.special
        # Words avoid every special id; with bert-base-uncased ids those are all below 104.
        low = max(special.pad, special.cls, special.sep, special.mask, special.unk) + 1
        if low >= spec.vocab_size:
            raise ValueError(f"vocab_size {spec.vocab_size} leaves no room above the special ids")
        ids = torch.full((spec.num_classes, spec.max_text_len), special.pad, dtype=torch.long)
        mask = torch.zeros_like(ids)
        lengths = torch.randint(spec.min_words, spec.max_words + 1, (spec.num_classes,), generator=g)
        for c, n in enumerate(lengths.tolist()):
            words = torch.randint(low, spec.vocab_size, (n,), generator=g)
            ids[c, : n + 2] = torch.cat([torch.tensor([special.cls]), words, torch.tensor([special.sep])])
            mask[c, : n + 2] = 1
        return ids, mask

    def __len__(self) -> int:
        return self.num_batches

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        if not -self.num_batches <= index < self.num_batches:
            raise IndexError(f"batch {index} out of range({self.num_batches})")
        index %= self.num_batches
        spec = self.spec
        # A generator per batch (seeded apart from the templates') makes batch i random-access.
        g = torch.Generator().manual_seed(spec.seed * 1_000_003 + index + 1)
        classes = torch.randperm(spec.num_classes, generator=g)[: spec.batch_size]  # (B,) distinct
        noise = torch.randn(spec.batch_size, 3, spec.image_res, spec.image_res, generator=g)
        return {
            "image": self.templates[classes] + spec.noise * noise,  # (B, 3, R, R)
            "input_ids": self.input_ids[classes].clone(),  # (B, T)
            "attention_mask": self.attention_mask[classes].clone(),  # (B, T)
            "class_id": classes,
        }

    def __iter__(self) -> Iterator[dict[str, torch.Tensor]]:
        for i in range(self.num_batches):
            yield self[i]


def synthetic_batches(cfg: AlbefConfig, num_batches: int, **spec_kwargs) -> SyntheticBatches:
    """Batches shaped by ``cfg`` (see :meth:`SyntheticSpec.from_config`)."""
    return SyntheticBatches(SyntheticSpec.from_config(cfg, **spec_kwargs), num_batches)
