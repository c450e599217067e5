"""Key-mapping adapters between foreign checkpoint layouts and albef-ray's native names.

* Hugging Face BERT (``bert.encoder.layer.3.attention.self.query.weight`` ...): layers below
  ``text_layers`` become ``text.layers.*``, the rest ``fusion.layers.*``; query/key/value are
  concatenated into our fused projections (and split again on export).
* Released ALBEF checkpoints (``visual_encoder.*``, ``text_encoder.bert.*``,
  ``text_encoder.cls.*``, ``*_m`` momentum copies, queues, ``temp``), and the fine-tuned
  layout whose ``text_encoder`` is a bare BertModel (no ``bert.`` prefix, no ``cls``).

Every function is pure: state dict in, state dict out, plus the keys it did not use.
"""

from __future__ import annotations

import re

import torch

# HF suffix inside ``encoder.layer.{i}.`` -> (native suffix, index in a fused projection)
_LAYER = {
    "attention.self.query": ("self_attn.qkv", 0),
    "attention.self.key": ("self_attn.qkv", 1),
    "attention.self.value": ("self_attn.qkv", 2),
    "attention.output.dense": ("self_attn.out", None),
    "attention.output.LayerNorm": ("self_attn.norm", None),
    "crossattention.self.query": ("cross_attn.q", None),
    "crossattention.self.key": ("cross_attn.kv", 0),
    "crossattention.self.value": ("cross_attn.kv", 1),
    "crossattention.output.dense": ("cross_attn.out", None),
    "crossattention.output.LayerNorm": ("cross_attn.norm", None),
    "intermediate.dense": ("ffn.fc1", None),
    "output.dense": ("ffn.fc2", None),
    "output.LayerNorm": ("ffn.norm", None),
}
_FUSED_PARTS = {"self_attn.qkv": 3, "cross_attn.kv": 2}
_EMBED = {
    "embeddings.word_embeddings": "text.embeddings.word",
    "embeddings.position_embeddings": "text.embeddings.position",
    "embeddings.token_type_embeddings": "text.embeddings.token_type",
    "embeddings.LayerNorm": "text.embeddings.norm",
}
_CLS = {
    "predictions.transform.dense": "mlm_head.dense",
    "predictions.transform.LayerNorm": "mlm_head.norm",
}
# Present in HF checkpoints, deliberately unused: the pooler and NSP head (ALBEF has neither),
# the decoder (tied to the word embeddings), BERT's position-id buffer.
_IGNORED = re.compile(
    r"^(pooler\.|cls\.seq_relationship\.|cls\.predictions\.decoder\.|embeddings\.position_ids$)"
)
_PARAM_ALIASES = {"gamma": "weight", "beta": "bias"}  # TF-era LayerNorm names
_LAYER_RE = re.compile(r"^encoder\.layer\.(\d+)\.(.+)\.(weight|bias|gamma|beta)$")


def _layer_prefix(i: int, text_layers: int) -> str:
    return f"text.layers.{i}" if i < text_layers else f"fusion.layers.{i - text_layers}"


def hf_bert_to_native(state: dict[str, torch.Tensor], text_layers: int) -> tuple[dict[str, torch.Tensor], list[str]]:
    """Map a HF BertModel / BertForMaskedLM / BertForPreTraining state dict to native names.

    Returns:
        (native state, foreign keys not used).
    """
    native: dict[str, torch.Tensor] = {}
    parts: dict[str, dict[int, torch.Tensor]] = {}
    unused = []
    for key, value in state.items():
        k = key[5:] if key.startswith("bert.") else key
        if _IGNORED.match(k):
            continue
        base, _, param = k.rpartition(".")
        param = _PARAM_ALIASES.get(param, param)
        if base in _EMBED:
            native[f"{_EMBED[base]}.{param}"] = value
        elif k.startswith("cls.") and base[4:] in _CLS:
            native[f"{_CLS[base[4:]]}.{param}"] = value
        elif k == "cls.predictions.bias":
            native["mlm_head.bias"] = value
        elif (m := _LAYER_RE.match(k)) and m.group(2) in _LAYER:
            suffix, idx = _LAYER[m.group(2)]
            name = f"{_layer_prefix(int(m.group(1)), text_layers)}.{suffix}.{_PARAM_ALIASES.get(m.group(3), m.group(3))}"
            if idx is None:
                native[name] = value
            else:
                parts.setdefault(name, {})[idx] = value
        else:
            unused.append(key)
    for name, pieces in parts.items():
        n = _FUSED_PARTS[name.split(".")[-3] + "." + name.split(".")[-2]]
        if sorted(pieces) != list(range(n)):
            raise ValueError(f"{name}: only parts {sorted(pieces)} of {n} (query/key/value) are present")
        native[name] = torch.cat([pieces[i] for i in range(n)], dim=0)
    return native, unused


def native_to_hf_bert(state: dict[str, torch.Tensor], text_layers: int, prefix: str = "bert.") -> dict[str, torch.Tensor]:
    """Inverse of :func:`hf_bert_to_native` for the text, fusion and MLM-head weights."""
    inv_embed = {v: k for k, v in _EMBED.items()}
    inv_cls = {v: k for k, v in _CLS.items()}
    inv_layer: dict[str, list[tuple[str, int | None]]] = {}
    for hf, (nat, idx) in _LAYER.items():
        inv_layer.setdefault(nat, []).append((hf, idx))
    out: dict[str, torch.Tensor] = {}
    layer_re = re.compile(r"^(text|fusion)\.layers\.(\d+)\.(\w+\.\w+)\.(weight|bias)$")
    for key, value in state.items():
        base, _, param = key.rpartition(".")
        if base in inv_embed:
            out[f"{prefix}{inv_embed[base]}.{param}"] = value
        elif base in inv_cls:
            out[f"cls.{inv_cls[base]}.{param}"] = value
        elif key == "mlm_head.bias":
            out["cls.predictions.bias"] = value
        elif m := layer_re.match(key):
            i = int(m.group(2)) + (text_layers if m.group(1) == "fusion" else 0)
            targets = inv_layer[m.group(3)]
            chunks = value.chunk(len(targets), dim=0) if targets[0][1] is not None else [value]
            for hf, idx in targets:
                out[f"{prefix}encoder.layer.{i}.{hf}.{m.group(4)}"] = chunks[idx or 0]
    if "text.embeddings.word.weight" in state and "mlm_head.bias" in state:
        out["cls.predictions.decoder.weight"] = state["text.embeddings.word.weight"]
        out["cls.predictions.decoder.bias"] = state["mlm_head.bias"]
    return out


# ---------------------------------------------------------------------------- ALBEF layout

_ALBEF_DIRECT = ("vision_proj", "text_proj", "itm_head")


def albef_to_native(state: dict[str, torch.Tensor], text_layers: int) -> tuple[dict[str, torch.Tensor], list[str]]:
    """Map an official ALBEF ``model`` dict onto a :class:`PretrainTask` state dict.

    Online weights go to ``model.*``, the ``*_m`` copies to ``momentum.model.*``, queues and
    pointer to ``momentum.*``. Works for the pretraining layout (``text_encoder.bert.*`` and
    ``text_encoder.cls.*``) and the fine-tuned one (``text_encoder.*`` a bare BertModel).

    Returns:
        (native state, foreign keys not used).
    """
    native: dict[str, torch.Tensor] = {}
    unused: list[str] = []
    text: dict[str, dict[str, torch.Tensor]] = {"": {}, "_m": {}}
    for key, value in state.items():
        head, _, rest = key.partition(".")
        momentum = head.endswith("_m")
        root = "momentum.model." if momentum else "model."
        stem = head[:-2] if momentum else head
        if stem == "visual_encoder":
            native[f"{root}vision.vit.{rest}"] = value
        elif stem == "text_encoder":
            text["_m" if momentum else ""][rest] = value
        elif stem in _ALBEF_DIRECT:
            native[f"{root}{stem}.{rest}"] = value
        elif key == "temp":
            native["model.temp"] = value
        elif key in ("image_queue", "text_queue", "queue_ptr"):
            native[f"momentum.{key}"] = value
        elif key == "idx_queue":  # fine-tuned retrieval releases: (1, K) image ids of the queue
            native["momentum.index_queue"] = value.reshape(-1).long()
        else:
            unused.append(key)
    for suffix, sub in text.items():
        if not sub:
            continue
        mapped, rest = hf_bert_to_native(sub, text_layers)
        root = "momentum.model." if suffix else "model."
        native.update({root + k: v for k, v in mapped.items()})
        unused += [f"text_encoder{suffix}.{k}" for k in rest]
    return native, unused


def native_to_albef(state: dict[str, torch.Tensor], text_layers: int, finetuned: bool = False) -> dict[str, torch.Tensor]:
    """Export a :class:`PretrainTask` state dict in the official ALBEF key layout."""
    out: dict[str, torch.Tensor] = {}
    for root, suffix in (("model.", ""), ("momentum.model.", "_m")):
        sub = {k[len(root):]: v for k, v in state.items() if k.startswith(root)}
        if not sub:
            continue
        prefix = "" if finetuned else "bert."
        for k, v in native_to_hf_bert(sub, text_layers, prefix=prefix).items():
            if finetuned and k.startswith("cls."):
                continue
            out[f"text_encoder{suffix}.{k}"] = v
        for k, v in sub.items():
            if k.startswith("vision.vit."):
                out[f"visual_encoder{suffix}.{k[len('vision.vit.'):]}"] = v
            elif k.split(".")[0] in _ALBEF_DIRECT:
                out[f"{k.split('.')[0]}{suffix}.{k.split('.', 1)[1]}"] = v
    if "model.temp" in state:
        out["temp"] = state["model.temp"]
    for name in ("image_queue", "text_queue", "queue_ptr"):
        if f"momentum.{name}" in state:
            out[name] = state[f"momentum.{name}"]
    if "momentum.index_queue" in state:
        out["idx_queue"] = state["momentum.index_queue"].reshape(1, -1)
    return out
