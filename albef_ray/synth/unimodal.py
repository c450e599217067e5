"""Unimodal initial weights for the synthetic benchmark: its stand-ins for DeiT and BERT.

ALBEF never starts from random weights: the paper initialises the image encoder from DeiT
(supervised ImageNet classification) and the text and fusion encoders from bert-base (MLM on
text alone). From random weights a small ViT maps every synthetic scene to nearly the same
[CLS] feature (mean pairwise cosine 0.99 for ``albef_tiny``), and ITC against a queue then
collapses (see docs/results.md). This module makes the same kind of starting point for the
synthetic benchmark, from its training split only and with neither encoder seeing a pair:

* image encoder: multi-label object recognition on the training images, with labels from
  the generator's scenes (which (size, colour, shape) objects are present; clean labels,
  as ImageNet's are, whatever the caption says), saved as a timm ``VisionTransformer``
  state dict (``vit.pth``), the format of DeiT's released weights;
* text: a ``transformers`` ``BertForMaskedLM`` of the model size's text + fusion depth
  trained by MLM (the pretraining task's masking) on the training captions, saved with
  ``save_pretrained`` (``bert/``).

``model.vit_init`` / ``model.bert_init`` then load them through the same code paths as the
real checkpoints. Plain PyTorch; no Ray.
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from ..config import build_config
from .scenes import COLOURS, SHAPES, SIZES, Scene
from ..model.registry import AlbefArch, get_arch
from ..model.vision import ImageEncoder
from ..objectives.mlm import IGNORE, SpecialTokens, mask_tokens

log = logging.getLogger(__name__)

INIT_DIR = "init"
VIT_FILE = "vit.pth"
BERT_DIR = "bert"
REPORT_FILE = "report.json"
LABELS = [(size, colour, shape) for size in SIZES for colour in COLOURS for shape in SHAPES]


def scene_labels(scene: Scene) -> torch.Tensor:
    """(len(LABELS),) float multi-hot: 1 for each (size, colour, shape) present in ``scene``."""
    y = torch.zeros(len(LABELS))
    for thing in scene.things:
        y[LABELS.index((thing.size, thing.colour, thing.shape))] = 1.0
    return y


@dataclass
class InitSettings:
    """Steps and optimiser of the two unimodal runs (AdamW, constant lr after a short warm-up)."""

    size: str = "albef_tiny"
    vision_steps: int = 2000
    text_steps: int = 1000
    batch_size: int = 64
    lr: float = 2e-3
    weight_decay: float = 0.02
    seed: int = 0
    append_sep: bool = False  # captions as pretraining tokenises them (data.append_sep)


def _fit(params: list[torch.Tensor], batch_loss, steps: int, settings: InitSettings, warmup: int = 50) -> list[float]:
    """AdamW on ``batch_loss()`` for ``steps`` steps, lr warmed up linearly; the loss of each step."""
    optimizer = torch.optim.AdamW(params, lr=settings.lr, weight_decay=settings.weight_decay)
    losses = []
    for step in range(steps):
        loss = batch_loss()
        for group in optimizer.param_groups:
            group["lr"] = settings.lr * min(1.0, (step + 1) / warmup)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    return losses


def train_vision(
    arch: AlbefArch, images: torch.Tensor, labels: torch.Tensor, settings: InitSettings
) -> tuple[ImageEncoder, list[float]]:
    """Multi-label classification from the [CLS] token (a linear head, dropped afterwards).

    Args:
        images: (N, 3, R, R) normalised float32.
        labels: (N, len(LABELS)) multi-hot.

    Returns:
        The trained encoder and the loss of every step.
    """
    g = torch.Generator().manual_seed(settings.seed)
    torch.manual_seed(settings.seed)
    encoder = ImageEncoder(arch)
    head = nn.Linear(arch.vision_width, labels.shape[1])

    def batch_loss() -> torch.Tensor:
        idx = torch.randint(0, images.shape[0], (settings.batch_size,), generator=g)
        batch = images[idx]
        flip = torch.rand(batch.shape[0], generator=g) < 0.5  # object labels survive a flip
        batch = torch.where(flip[:, None, None, None], batch.flip(-1), batch)
        return F.binary_cross_entropy_with_logits(head(encoder(batch)[:, 0]), labels[idx])

    encoder.train()
    losses = _fit([*encoder.parameters(), *head.parameters()], batch_loss, settings.vision_steps, settings)
    encoder.eval()
    encoder.head = head  # kept for evaluate_vision; not saved
    return encoder, losses


@torch.no_grad()
def evaluate_vision(encoder: ImageEncoder, images: torch.Tensor, labels: torch.Tensor) -> dict[str, float]:
    """Object recall: the fraction of an image's n objects among its n highest-scoring labels.

    Also the fraction of images whose n objects are exactly the top n (``all_objects``).
    Chance is about n / len(LABELS).
    """
    scores = torch.cat([encoder.head(encoder(images[i : i + 256])[:, 0]) for i in range(0, len(images), 256)])
    truth = labels > 0.5
    hits, exact = [], []
    for score, present in zip(scores, truth):
        n = int(present.sum())
        found = int(present[score.topk(n).indices].sum())
        hits.append(found / n)
        exact.append(float(found == n))
    return {"object_recall": sum(hits) / len(hits), "all_objects": sum(exact) / len(exact)}


def bert_config(arch: AlbefArch, special: SpecialTokens):
    """A ``transformers`` BertConfig with the text + fusion depth and widths of ``arch``."""
    from transformers import BertConfig

    return BertConfig(
        vocab_size=arch.vocab_size,
        hidden_size=arch.text_width,
        num_hidden_layers=arch.text_layers + arch.fusion_layers,
        num_attention_heads=arch.text_heads,
        intermediate_size=arch.text_intermediate,
        max_position_embeddings=arch.max_position,
        type_vocab_size=arch.type_vocab_size,
        layer_norm_eps=arch.layer_norm_eps,
        pad_token_id=special.pad,
    )


def train_text(
    arch: AlbefArch, input_ids: torch.Tensor, attention_mask: torch.Tensor, special: SpecialTokens, settings: InitSettings
):
    """MLM with the pretraining task's masking (15 %, 80/10/10) on tokenised captions.

    Returns:
        The trained ``BertForMaskedLM`` and the loss of every step.
    """
    from transformers import BertForMaskedLM

    g = torch.Generator().manual_seed(settings.seed)
    torch.manual_seed(settings.seed)
    bert = BertForMaskedLM(bert_config(arch, special))

    def batch_loss() -> torch.Tensor:
        idx = torch.randint(0, input_ids.shape[0], (settings.batch_size,), generator=g)
        masked, labels = mask_tokens(input_ids[idx], arch.vocab_size, special, generator=g)
        return bert(input_ids=masked, attention_mask=attention_mask[idx], labels=labels).loss

    bert.train()
    losses = _fit(list(bert.parameters()), batch_loss, settings.text_steps, settings)
    bert.eval()
    return bert, losses


@torch.no_grad()
def evaluate_text(
    bert, input_ids: torch.Tensor, attention_mask: torch.Tensor, special: SpecialTokens, vocab_size: int, seed: int = 1
) -> dict[str, float]:
    """Accuracy of the masked-token predictions on held-out captions."""
    masked, labels = mask_tokens(input_ids, vocab_size, special, generator=torch.Generator().manual_seed(seed))
    logits = bert(input_ids=masked, attention_mask=attention_mask).logits
    chosen = labels != IGNORE
    return {"mlm_accuracy": float((logits[chosen].argmax(-1) == labels[chosen]).float().mean())}


def _split_with_labels(root: Path, split: str, size: str, scenes: dict[str, Scene]):
    from ..eval.split import load_split

    cfg = build_config({"model": {"size": size, "vit_init": None, "bert_init": None}})
    data = load_split([str(root)], split, cfg)
    try:
        labels = torch.stack([scene_labels(scenes[i.split("/", 1)[1]]) for i in data.image_ids])
    except KeyError as err:
        raise ValueError(f"{root}: image {err} of split {split!r} is not in the dataset's generator plan") from None
    return data, labels


def build_synth_init(
    root: str | Path, settings: InitSettings | None = None, out: str | Path | None = None
) -> dict[str, object]:
    """Train and save the unimodal initial weights of a synthetic benchmark dataset.

    Args:
        root: a dataset written by ``albef-ray data synth`` (its manifest's ``synth`` section
            regenerates the scenes, so the labels are the generator's, not the captions').
        settings: model size, steps, optimiser.
        out: output directory (default ``root/init``).

    Returns:
        The report also written to ``out/report.json``: file paths, final losses, held-out
        (val split) label accuracy and MLM accuracy, seconds taken.
    """
    from ..data.collate import tokenize
    from ..data.manifest import read_manifest
    from .benchmark import SynthConfig, plan
    from ..data.tokenizer import load_tokenizer
    from ..data.transforms import normalize

    settings = settings or InitSettings()
    root = Path(root)
    manifest = read_manifest(root)
    synth = manifest.get("synth")
    if not synth:
        raise ValueError(f"{root}: not a synthetic benchmark dataset (its manifest has no 'synth' section)")
    scenes = {
        image.image_id: image.scene
        for images in plan(SynthConfig(**synth["config"])).splits.values()
        for image in images
    }
    out = Path(out) if out else root / INIT_DIR
    out.mkdir(parents=True, exist_ok=True)
    arch = get_arch(settings.size)
    start = time.time()

    train, train_labels = _split_with_labels(root, "train", settings.size, scenes)
    encoder, vision_losses = train_vision(arch, normalize(train.images), train_labels, settings)
    report: dict[str, object] = {"settings": asdict(settings), "vision_loss": vision_losses[-1]}
    val_split = "val" if synth["images"].get("val") else "test"
    held_out, held_out_labels = _split_with_labels(root, val_split, settings.size, scenes)
    report["vision_" + val_split] = evaluate_vision(encoder, normalize(held_out.images), held_out_labels)
    torch.save(encoder.vit.state_dict(), out / VIT_FILE)

    tokenizer = load_tokenizer(str(root))
    special = SpecialTokens.from_tokenizer(tokenizer)
    if len(tokenizer) > arch.vocab_size:
        raise ValueError(f"{root}: tokenizer has {len(tokenizer)} tokens, more than {settings.size}'s {arch.vocab_size}")
    ids, mask = tokenize(tokenizer, train.captions, 30, settings.append_sep)
    bert, text_losses = train_text(arch, ids, mask, special, settings)
    report["text_loss"] = text_losses[-1]
    held_ids, held_mask = tokenize(tokenizer, held_out.captions, 30, settings.append_sep)
    report["text_" + val_split] = evaluate_text(bert, held_ids, held_mask, special, arch.vocab_size)
    bert.save_pretrained(out / BERT_DIR)

    report.update(vit_init=str(out / VIT_FILE), bert_init=str(out / BERT_DIR), seconds=round(time.time() - start, 1))
    (out / REPORT_FILE).write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
    return report
