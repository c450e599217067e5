"""Generated image-caption batches for the CPU demo and tests, until real shards exist.

An image is a ``grid x grid`` layout of regions; region ``a`` shows one of ``values`` fixed
random patterns (plus fresh Gaussian noise), and the caption names each region's pattern
with one word, in region order: ``[CLS] w(0, v0) w(1, v1) ... [PAD] ...`` (the official
ALBEF form; ``[SEP]`` after the words with ``data.append_sep``).

So the pairing is learnable yet compositional, as real captions are: ITC and ITM must see
every region to tell a pair from a mismatch, and a masked word can only be recovered from
the image (the text alone says which region it describes, not which pattern). With the
defaults there are 16^4 = 65,536 combinations, so two identical pairs in one batch or in a
small ITC queue are rare.

Everything is a function of ``(seed, batch index)``: batch ``i`` is the same whichever
order or process asks for it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterator

import torch

from ..config import AlbefConfig, ConfigError
from ..model.registry import get_arch
from ..objectives.mlm import SpecialTokens


@dataclass(frozen=True)
class SyntheticSpec:
    """Shape and difficulty of the generated data.

    Attributes:
        batch_size: B, pairs per batch.
        image_res: R, images are (3, R, R); a multiple of ``grid``.
        vocab_size: word ids are drawn below this, above the special ids.
        max_text_len: T, captions are padded to this length (at least ``grid**2 + 1``,
            ``+ 2`` with ``append_sep``).
        grid: the image has ``grid x grid`` regions, the caption one word per region.
        values: patterns (and words) per region.
        noise: std of the per-sample Gaussian noise; patterns have std 1.
        seed: fixes patterns, words and every batch.
        append_sep: end each caption with [SEP] (``data.append_sep``).
    """

    batch_size: int
    image_res: int
    vocab_size: int
    max_text_len: int
    grid: int = 2
    values: int = 16
    noise: float = 0.5
    seed: int = 0
    append_sep: bool = False

    @property
    def regions(self) -> int:
        return self.grid * self.grid

    def __post_init__(self) -> None:
        if self.image_res % self.grid:
            raise ValueError(f"image_res {self.image_res} is not a multiple of grid {self.grid}")
        if self.regions + 1 + self.append_sep > self.max_text_len:
            raise ValueError(f"{self.regions} words + special tokens exceed max_text_len {self.max_text_len}")

    @classmethod
    def from_config(cls, cfg: AlbefConfig, **kwargs) -> "SyntheticSpec":
        """Sizes from the config: per-worker batch, the model size's resolution and vocabulary."""
        arch = get_arch(cfg.model.size, cfg.model.image_res)
        grid = kwargs.get("grid", 2)
        need = grid * grid + 1 + cfg.data.append_sep
        if min(cfg.data.max_text_len, arch.max_position) < need:
            raise ConfigError(f"data.max_text_len: generated captions need {need} tokens")
        return cls(
            batch_size=cfg.train.batch_size,
            image_res=arch.image_res,
            vocab_size=arch.vocab_size,
            max_text_len=min(cfg.data.max_text_len, arch.max_position),
            seed=cfg.seed,
            append_sep=cfg.data.append_sep,
            **kwargs,
        )


class SyntheticBatches:
    """``num_batches`` deterministic batches; indexable, sized and re-iterable like a loader.

    Each batch is a dict with ``image`` (B, 3, R, R) float32, ``input_ids`` (B, T) int64,
    ``attention_mask`` (B, T) int64 and ``values`` (B, grid**2), each region's pattern index.
    """

    def __init__(self, spec: SyntheticSpec, num_batches: int, special: SpecialTokens = SpecialTokens()):
        if num_batches < 1:
            raise ValueError(f"num_batches must be >= 1, got {num_batches}")
        self.spec = spec
        self.num_batches = num_batches
        self.special = special
        g = torch.Generator().manual_seed(spec.seed)
        side = spec.image_res // spec.grid
        self.patterns = torch.randn(spec.regions, spec.values, 3, side, side, generator=g)  # (A, V, 3, S, S)
        # Words avoid every special id; with bert-base-uncased ids those are all below 104.
        low = max(special.pad, special.cls, special.sep, special.mask, special.unk) + 1
        if spec.vocab_size - low < spec.regions * spec.values:
            raise ValueError(f"vocab_size {spec.vocab_size} has too few ids for {spec.regions} x {spec.values} words")
        ids = low + torch.randperm(spec.vocab_size - low, generator=g)[: spec.regions * spec.values]
        self.words = ids.view(spec.regions, spec.values)  # (A, V) distinct ids

    def __len__(self) -> int:
        return self.num_batches

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        if not -self.num_batches <= index < self.num_batches:
            raise IndexError(f"batch {index} out of range({self.num_batches})")
        index %= self.num_batches
        spec, special = self.spec, self.special
        b, t, a = spec.batch_size, spec.max_text_len, spec.regions
        # A generator per batch (seeded apart from the patterns') makes batch i random-access.
        g = torch.Generator().manual_seed(spec.seed * 1_000_003 + index + 1)
        values = torch.randint(spec.values, (b, a), generator=g)  # (B, A)
        tiles = self.patterns[torch.arange(a), values]  # (B, A, 3, S, S)
        side, grid, res = tiles.shape[-1], spec.grid, spec.image_res
        # (B, gy, gx, 3, S, S) -> (B, 3, gy, S, gx, S) -> (B, 3, R, R): region a = (a // grid, a % grid)
        image = tiles.view(b, grid, grid, 3, side, side).permute(0, 3, 1, 4, 2, 5).reshape(b, 3, res, res)
        image = image + spec.noise * torch.randn(image.shape, generator=g)
        input_ids = torch.full((b, t), special.pad, dtype=torch.long)
        input_ids[:, 0] = special.cls
        input_ids[:, 1 : a + 1] = self.words[torch.arange(a), values]  # (B, A)
        if spec.append_sep:
            input_ids[:, a + 1] = special.sep
        attention_mask = (torch.arange(t) < a + 1 + spec.append_sep).long().expand(b, t).clone()
        return {"image": image, "input_ids": input_ids, "attention_mask": attention_mask, "values": values}

    def __iter__(self) -> Iterator[dict[str, torch.Tensor]]:
        for i in range(self.num_batches):
            yield self[i]


def synthetic_batches(cfg: AlbefConfig, num_batches: int, **spec_kwargs) -> SyntheticBatches:
    """Batches shaped by ``cfg`` (see :meth:`SyntheticSpec.from_config`)."""
    return SyntheticBatches(SyntheticSpec.from_config(cfg, **spec_kwargs), num_batches)
