"""Weight loading: timm ViT, Hugging Face BERT, released ALBEF checkpoints.

Each loader maps foreign names through :mod:`.adapters`, resizes the ViT position embedding
when resolutions differ, loads non-strictly and returns a :class:`LoadReport` naming what
was missing, unused or resized. Shape mismatches (other than the resizable ones) raise.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from .adapters import albef_to_native, hf_bert_to_native
from .albef import ALBEF, build_model
from .vision import interpolate_pos_embed, read_timm_vit_state
from .weights_file import CheckpointError, read_weights_file

log = logging.getLogger(__name__)


@dataclass
class LoadReport:
    source: str
    loaded: list[str] = field(default_factory=list)
    missing: list[str] = field(default_factory=list)  # native keys the source did not provide
    unused: list[str] = field(default_factory=list)  # source keys with no native place
    notes: list[str] = field(default_factory=list)  # resizes, skipped queues, ...
    # Every target key the load left unset, in or out of scope (after the modules' own load
    # hooks, e.g. NLVR2's doubling of single-image fusion layers).
    unloaded: list[str] = field(default_factory=list, repr=False)

    def __str__(self) -> str:
        def short(keys: list[str]) -> str:
            return ", ".join(keys[:8]) + (f" ... (+{len(keys) - 8})" if len(keys) > 8 else "")

        lines = [f"loaded {len(self.loaded)} tensors from {self.source}"]
        if self.missing:
            lines.append(f"  missing ({len(self.missing)}): {short(self.missing)}")
        if self.unused:
            lines.append(f"  unused ({len(self.unused)}): {short(self.unused)}")
        lines += [f"  note: {n}" for n in self.notes]
        return "\n".join(lines)


def _resize_pos_embeds(state: dict[str, torch.Tensor], target: dict[str, torch.Tensor], report: LoadReport) -> None:
    for key, value in list(state.items()):
        if key.endswith("vit.pos_embed") and key in target and value.shape != target[key].shape:
            state[key] = interpolate_pos_embed(value, target[key].shape[1] - 1)
            report.notes.append(f"{key}: position embedding resized {tuple(value.shape)} -> {tuple(state[key].shape)}")


def load_native(module: nn.Module, state: dict[str, torch.Tensor], report: LoadReport, scope: str = "") -> LoadReport:
    """Load native-named ``state`` into ``module``; ``missing`` counts only keys under ``scope``."""
    target = module.state_dict()
    _resize_pos_embeds(state, target, report)
    for key in [k for k in state if k.endswith("_queue") and k in target]:
        if state[key].shape != target[key].shape:
            report.notes.append(f"{key}: queue {tuple(state[key].shape)} does not fit {tuple(target[key].shape)}; kept fresh")
            del state[key]
            state.pop(key.rsplit(".", 1)[0] + ".queue_ptr", None)
    bad = [f"{k}: {tuple(v.shape)} vs {tuple(target[k].shape)}" for k, v in state.items() if k in target and v.shape != target[k].shape]
    if bad:
        raise ValueError(f"{report.source}: shape mismatch for {len(bad)} tensors: " + "; ".join(bad[:5]))
    result = module.load_state_dict(state, strict=False)
    report.loaded = [k for k in state if k in target]
    report.unused += list(result.unexpected_keys)
    report.missing = [k for k in result.missing_keys if k.startswith(scope)]
    report.unloaded = list(result.missing_keys)
    return report


def load_vit(model: ALBEF, source: str) -> LoadReport:
    """timm / DeiT ViT weights (file or timm tag) into ``model.vision``."""
    state = {f"vit.{k}": v for k, v in read_timm_vit_state(source).items() if not k.startswith("head")}
    return load_native(model.vision, state, LoadReport(source))


def read_hf_bert_state(source: str) -> dict[str, torch.Tensor]:
    """A ``save_pretrained`` directory's weights, read directly; otherwise a hub name via transformers."""
    path = Path(source)
    if path.is_dir():
        for name in ("model.safetensors", "pytorch_model.bin"):
            if (path / name).exists():
                return read_weights_file(path / name)
        raise FileNotFoundError(f"{source}: no model.safetensors or pytorch_model.bin")
    from transformers import BertForMaskedLM

    return BertForMaskedLM.from_pretrained(source).state_dict()


def load_bert(model: ALBEF, source: str) -> LoadReport:
    """HF BERT weights into the text encoder, fusion encoder (self-attn and FFN) and MLM head.

    Cross-attention has no BERT counterpart and stays freshly initialised (as in ALBEF).
    """
    native, unused = hf_bert_to_native(read_hf_bert_state(source), model.arch.text_layers)
    report = LoadReport(source, unused=unused)
    load_native(model, native, report, scope="text.")
    report.missing += [k for k in model.state_dict() if k.startswith(("fusion.", "mlm_head.")) and k not in native]
    return report


def read_albef_checkpoint(path: str) -> dict[str, torch.Tensor]:
    ckpt = read_weights_file(path)
    if isinstance(ckpt, dict) and isinstance(ckpt.get("model"), dict):
        ckpt = ckpt["model"]
    if not isinstance(ckpt, dict):
        raise CheckpointError(f"{path}: expected a state dict or a dict with a 'model' state dict")
    return ckpt


def load_albef_checkpoint(target: nn.Module, path: str) -> LoadReport:
    """A released ALBEF (or albef-ray) ``.pth`` into a task (online + momentum + queues) or an ALBEF.

    A task is any module holding the online ALBEF as ``.model`` and its momentum encoder (or
    None) as ``.momentum``, as every task of :mod:`albef_ray.tasks` does; this layer names none.
    Without ``*_m`` keys (fine-tuned releases) the momentum encoder copies the online weights.
    A task with keys of its own in the official layout (a classifier head, the VQA decoder,
    NLVR2's doubled fusion layers) defines ``adapt_official_state(state) -> (rest, native)``:
    it takes its keys out of the official state and returns them under native names.
    An albef-ray checkpoint (``model.*``, ``momentum.*`` and the task's own native keys) loads as is.
    """
    state = read_albef_checkpoint(path)
    if state and not any(_is_official(k) for k in state):
        native, unused = dict(state), []  # already albef-ray's own layout
    else:
        task_native: dict[str, torch.Tensor] = {}
        adapt = getattr(target, "adapt_official_state", None)
        if adapt is not None:  # a task's own keys (heads, decoder, extra fusion layers) first
            state, task_native = adapt(dict(state))
        native, unused = albef_to_native(state, _arch_of(target).text_layers)
        native.update(task_native)
    report = LoadReport(path, unused=unused)
    if not isinstance(target, ALBEF):  # a task: online model + momentum encoder
        if target.momentum is None:
            report.unused += [k for k in native if k.startswith("momentum.")]
            native = {k: v for k, v in native.items() if not k.startswith("momentum.")}
        load_native(target, native, report, scope="model.")
        if target.momentum is not None:
            copied = not any(k.startswith("momentum.model.") for k in native)
            if copied:
                target.momentum.update(target.model, momentum=0.0)
                report.notes.append("no momentum weights in checkpoint: momentum encoder copied from online")
            report.missing += [
                f"momentum.{k}" for k in target.momentum.state_dict()
                if f"momentum.{k}" in report.unloaded and not (copied and k.startswith("model.")) and k != "index_queue"
            ]
            if target.momentum.index_queue is not None and "momentum.index_queue" not in native:
                report.notes.append("no image index queue in checkpoint: queued keys belong to no known image (-1)")
        return report
    online = {k[len("model."):]: v for k, v in native.items() if k.startswith("model.")}
    report.unused += [k for k in native if not k.startswith("model.")]
    return load_native(target, online, report)


_OFFICIAL_ROOTS = ("visual_encoder", "text_encoder", "vision_proj", "text_proj", "itm_head", "cls_head", "text_decoder")


def _is_official(key: str) -> bool:
    root = key.split(".", 1)[0]
    return root.removesuffix("_m") in _OFFICIAL_ROOTS or root in ("temp", "image_queue", "text_queue", "queue_ptr", "idx_queue")


def _arch_of(target: nn.Module):
    return target.arch if isinstance(target, ALBEF) else target.model.arch


def build_model_from_config(cfg) -> ALBEF:
    """Build ``cfg.model.size`` and load the configured initial weights (ViT, BERT, checkpoint)."""
    m = cfg.model
    model = build_model(m.size, m.image_res, embed_dim=m.embed_dim, temp=m.temp, text_dropout=m.text_dropout, drop_path=m.drop_path)
    if m.vit_init:
        log.info("%s", load_vit(model, m.vit_init))
    if m.bert_init:
        log.info("%s", load_bert(model, m.bert_init))
    return model
