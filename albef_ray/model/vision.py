"""Image encoder: timm's VisionTransformer returning the whole token sequence."""

from __future__ import annotations

import math
from functools import partial
from pathlib import Path

import torch
import torch.nn.functional as F
from timm.models.vision_transformer import VisionTransformer
from torch import nn

from .registry import AlbefArch


class ImageEncoder(nn.Module):
    """ViT producing ``(B, 1 + N, D)`` tokens: [CLS] then N patch tokens, after the final norm.

    Parameter names are timm's under ``vit.`` (``vit.blocks.0.attn.qkv.weight``), so timm,
    DeiT and ALBEF ``visual_encoder.*`` weights map on by prefix only.
    """

    def __init__(self, arch: AlbefArch, drop_path: float = 0.0):
        super().__init__()
        self.vit = VisionTransformer(
            img_size=arch.image_res,
            patch_size=arch.patch_size,
            embed_dim=arch.vision_width,
            depth=arch.vision_depth,
            num_heads=arch.vision_heads,
            mlp_ratio=arch.vision_mlp_ratio,
            qkv_bias=True,
            norm_layer=partial(nn.LayerNorm, eps=1e-6),
            num_classes=0,
            drop_path_rate=drop_path,
        )
        self.width = arch.vision_width

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        """``image`` (B, 3, H, W) -> tokens (B, 1 + N, D)."""
        return self.vit.forward_features(image)


def interpolate_pos_embed(pos_embed: torch.Tensor, num_patches: int, num_extra_tokens: int = 1) -> torch.Tensor:
    """Resize a ViT position embedding ``(1, extra + G*G, D)`` to ``num_patches`` grid cells.

    The [CLS] (extra) rows are kept; the patch grid is resampled bicubically, as in ALBEF,
    so 224-px weights load at 256 px and 256-px weights at 384 px.
    """
    old_grid = pos_embed.shape[1] - num_extra_tokens
    if old_grid == num_patches:
        return pos_embed
    old_side, new_side = math.isqrt(old_grid), math.isqrt(num_patches)
    if old_side * old_side != old_grid or new_side * new_side != num_patches:
        raise ValueError(f"cannot interpolate a non-square patch grid ({old_grid} -> {num_patches})")
    extra, grid = pos_embed[:, :num_extra_tokens], pos_embed[:, num_extra_tokens:]
    dim = pos_embed.shape[-1]
    grid = grid.reshape(1, old_side, old_side, dim).permute(0, 3, 1, 2).float()  # (1, D, G, G)
    grid = F.interpolate(grid, size=(new_side, new_side), mode="bicubic", align_corners=False)
    grid = grid.permute(0, 2, 3, 1).reshape(1, new_side * new_side, dim).to(pos_embed.dtype)
    return torch.cat([extra, grid], dim=1)


def read_timm_vit_state(source: str) -> dict[str, torch.Tensor]:
    """ViT weights from a file (timm/DeiT ``.pth``/``.bin``/``.safetensors``) or a timm tag.

    A tag such as ``deit_base_patch16_224.fb_in1k`` is resolved by timm (its cache or hub);
    nothing else in albef-ray downloads.
    """
    from .weights_file import read_weights_file

    path = Path(source)
    if path.exists():
        state = read_weights_file(path)
        for key in ("model", "state_dict", "module"):  # DeiT releases wrap weights in "model"
            if isinstance(state, dict) and key in state and isinstance(state[key], dict):
                state = state[key]
        return dict(state)
    import timm

    return timm.create_model(source, pretrained=True, num_classes=0).state_dict()
