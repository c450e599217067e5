"""Reading weights files safely: every ``.pt`` / ``.pth`` / ``.bin`` / ``.safetensors`` albef-ray opens.

Pickled files go through torch's weights-only unpickler, so a file cannot run code. This
module has no model imports: the ViT loader (:mod:`.vision`), the checkpoint loader
(:mod:`.loading`) and training checkpoints (:mod:`albef_ray.train.checkpoint`) all use it.
"""

from __future__ import annotations

import pickle
import re
import zipfile
from pathlib import Path
from typing import Any

import torch


class CheckpointError(ValueError):
    """A weights file that cannot be read safely: empty, corrupt, or pickling more than tensors."""


def _looks_like_torch_file(path: Path) -> bool:
    # torch.save writes a zip archive; the legacy format starts with a pickle (protocol >= 2: 0x80)
    with open(path, "rb") as handle:
        first = handle.read(1)
    return first == b"\x80" or zipfile.is_zipfile(path)


def _weights_only_refusal(message: str) -> str:
    """What the weights-only unpickler refused, without torch's advice to load unsafely."""
    found = re.search(r"Unsupported global: GLOBAL (\S+)", message)
    if found:
        return f"it pickles {found.group(1)}, which a weights-only load refuses"
    found = re.search(r"WeightsUnpickler error:\s*([^\n]+)", message)
    return found.group(1).strip().rstrip(".") if found else "it pickles more than tensors and plain containers"


def read_weights_file(path: str | Path) -> Any:
    """The contents of a ``.pt`` / ``.pth`` / ``.bin`` or ``.safetensors`` weights file, on CPU.

    Every weights file albef-ray reads goes through here. Pickled files are read with torch's
    weights-only unpickler (tensors, numbers, strings and containers), so a file cannot run code;
    one that needs more is refused and never loaded another way.

    Raises:
        FileNotFoundError: no such file.
        CheckpointError: ``FILE: empty``, ``FILE: not a PyTorch checkpoint (...)`` or
            ``FILE: not a weights-only checkpoint (...)``.
    """
    path = Path(path)
    if path.is_file() and path.stat().st_size == 0:
        raise CheckpointError(f"{path}: empty")
    if path.suffix == ".safetensors":
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        try:
            return load_file(str(path))
        except SafetensorError as err:
            raise CheckpointError(f"{path}: not a safetensors file ({err})") from None
    if path.is_file() and not _looks_like_torch_file(path):
        raise CheckpointError(f"{path}: not a PyTorch checkpoint (neither a torch.save zip archive nor a pickle)")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        raise CheckpointError(f"{path}: not a weights-only checkpoint ({_weights_only_refusal(str(err))})") from None
    except (RuntimeError, EOFError, KeyError, ValueError, AttributeError, ImportError) as err:
        first = re.sub(r"^\[enforce fail at [^\]]*\]\s*\.?\s*", "", str(err)).split(". ")[0].strip()
        raise CheckpointError(f"{path}: not a PyTorch checkpoint (corrupt or truncated: {first or type(err).__name__})") from None
