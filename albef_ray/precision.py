"""Device and numeric precision: where a model runs and under which autocast.

Training (:mod:`albef_ray.train.loop`), evaluation (:mod:`albef_ray.eval`) and the launchers
all ask these two questions; they live here so no layer imports another one for them.
"""

from __future__ import annotations

import contextlib

import torch

from .config import AlbefConfig


def resolve_device(cfg: AlbefConfig) -> torch.device:
    """CUDA when ``train.use_gpu`` and a GPU is visible, else CPU."""
    return torch.device("cuda" if cfg.train.use_gpu and torch.cuda.is_available() else "cpu")


def autocast_context(precision: str, device: torch.device) -> contextlib.AbstractContextManager:
    """bf16 autocast for ``precision == "bf16"`` where the device supports it, else a no-op."""
    if precision != "bf16" or not torch.amp.is_autocast_available(device.type):
        return contextlib.nullcontext()
    if device.type == "cuda" and not torch.cuda.is_bf16_supported():
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=torch.bfloat16)
