"""Named ALBEF sizes. A size is a few architecture numbers; everything else is config.

Register a new size with :func:`register_size`; the test suite runs over every registered
size, so a new one is shape-tested for free.
"""

from __future__ import annotations

from dataclasses import dataclass, replace


@dataclass(frozen=True)
class AlbefArch:
    """Architecture of one ALBEF size."""

    # Image encoder: a timm VisionTransformer.
    image_res: int = 256  # pretraining resolution (paper: 256)
    patch_size: int = 16
    vision_width: int = 768
    vision_depth: int = 12
    vision_heads: int = 12
    vision_mlp_ratio: float = 4.0
    # Text: BERT split into text layers (self-attention only) and fusion layers (+cross-attention).
    vocab_size: int = 30522
    text_width: int = 768
    text_layers: int = 6
    fusion_layers: int = 6
    text_heads: int = 12
    text_intermediate: int = 3072
    max_position: int = 512
    type_vocab_size: int = 2
    pad_token_id: int = 0
    layer_norm_eps: float = 1e-12  # BERT's; the ViT uses 1e-6

    def __post_init__(self) -> None:
        if self.image_res % self.patch_size:
            raise ValueError(f"image_res {self.image_res} is not a multiple of patch_size {self.patch_size}")
        if self.vision_width % self.vision_heads or self.text_width % self.text_heads:
            raise ValueError("widths must be divisible by their head counts")

    @property
    def num_patches(self) -> int:
        return (self.image_res // self.patch_size) ** 2


_REGISTRY: dict[str, AlbefArch] = {}


def register_size(name: str, arch: AlbefArch) -> None:
    if name in _REGISTRY:
        raise ValueError(f"model size {name!r} is already registered")
    _REGISTRY[name] = arch


def get_arch(name: str, image_res: int | None = None) -> AlbefArch:
    """The architecture of size ``name``, optionally at another input resolution."""
    if name not in _REGISTRY:
        raise KeyError(f"unknown model size {name!r}; registered: {', '.join(sorted(_REGISTRY))}")
    arch = _REGISTRY[name]
    return replace(arch, image_res=image_res) if image_res else arch


def list_sizes() -> list[str]:
    return sorted(_REGISTRY)


# The paper: ViT-B/16 at 256 px, BERT-base split 6 + 6.
register_size("albef_base", AlbefArch())

# For tests and the CPU demo: a few layers, 32 px, narrow widths, small vocabulary
# (the embedded benchmark's own WordPiece tokenizer stays well under 1,000 tokens).
register_size(
    "albef_tiny",
    AlbefArch(
        image_res=32,
        patch_size=8,
        vision_width=64,
        vision_depth=2,
        vision_heads=2,
        vocab_size=1000,
        text_width=64,
        text_layers=2,
        fusion_layers=2,
        text_heads=2,
        text_intermediate=128,
        max_position=64,
    ),
)

# The embedded benchmark's Table 1 demo (experiments/table1_synth.yaml): albef_tiny at the
# benchmark's full 64 px (8 x 8 patches of 8 px). At 32 px a small shape is 2-4 pixels wide and
# the ITM head cannot learn to tell hard negatives (one attribute or the order differs) in the
# demo's budget; docs/results.md has the measurements.
register_size("albef_tiny_64", replace(get_arch("albef_tiny"), image_res=64))
