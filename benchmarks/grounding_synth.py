"""Grounding on the embedded benchmark in one process (no Ray): fine-tune, then rank boxes by Grad-CAM.

Starts from a pretrained checkpoint (``--checkpoint``), evaluates it as it is (no grounding
fine-tuning), then for each seed fine-tunes a copy with the grounding objective (the
retrieval losses on image-expression pairs: :class:`~albef_ray.objectives.grounding.GroundingTask`,
``train_step`` over shuffled epochs of the training split held in memory, the evaluation
resize as the recipe has no augmentation) and evaluates it. With ``--blank`` each seed is also
fine-tuned on blank images (every pixel the normalisation's zero: the model sees only the
text), then evaluated on the real images. Every evaluation reports, per split, the accuracy
of ALBEF_itm and ALBEF_itc beside the random-box and largest-box baselines; the summary gives
mean ± std over seeds. One JSON line per evaluation goes to ``--out``.

    .venv/bin/python benchmarks/grounding_synth.py --checkpoint PRETRAINED --seeds 0 1 2 --blank \\
        --out runs/grounding_synth.jsonl
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch

from albef_ray.config import load_config, with_overrides
from albef_ray.data.collate import load_tokenizer, tokenize
from albef_ray.data.transforms import normalize
from albef_ray.eval.grounding import evaluate_split, grounding_maps
from albef_ray.eval.split import load_split
from albef_ray.objectives.mlm import SpecialTokens
from albef_ray.tasks import build_task
from albef_ray.train.loop import Schedule, train_step
from albef_ray.train.optim import build_optimizer


def training_pairs(cfg):
    """(images (N_img, 3, R, R) uint8, ids, mask, image index per expression) of ``data.train_split``."""
    every = cfg.model_copy(update={"eval": cfg.eval.model_copy(update={"max_images": None})})
    split = load_split(cfg.data.shards, cfg.data.train_split, every)
    ids, mask = tokenize(load_tokenizer(cfg.data.tokenizer), split.captions, cfg.data.max_text_len, cfg.data.append_sep)
    return split.images, ids, mask, split.txt2img.clone()


def finetune(task, cfg, pairs, blank: bool) -> float:
    """``train.epochs`` shuffled epochs of ``train.batch_size``; returns seconds per step."""
    images, ids, mask, image_idx = pairs
    batch = cfg.train.batch_size
    schedule = Schedule(total_steps=cfg.train.epochs * (len(ids) // batch), steps_per_epoch=len(ids) // batch)
    optimizer = build_optimizer(task, cfg.optim)
    generator = torch.Generator().manual_seed(cfg.seed)
    task.train()
    start, step = time.perf_counter(), 0
    for _ in range(cfg.train.epochs):
        order = torch.randperm(len(ids), generator=generator)
        for first in range(0, len(ids) - batch + 1, batch):
            rows = order[first:first + batch]
            pixels = normalize(images[image_idx[rows]])
            if blank:
                pixels = torch.zeros_like(pixels)  # the normalised mean colour: no image content
            metrics = train_step(task, optimizer, {"image": pixels, "input_ids": ids[rows], "attention_mask": mask[rows],
                                                   "image_idx": image_idx[rows]}, step, cfg, schedule, generator)
            step += 1
            if step % 100 == 0:
                print(f"  step {step}: loss {metrics['loss']:.3f} itc {metrics['itc_loss']:.3f} "
                      f"itm {metrics['itm_loss']:.3f} itm_acc {metrics['itm_acc']:.3f}", flush=True)
    return (time.perf_counter() - start) / max(step, 1)


def itm_layers_maps(cfg, layers: list[int]):
    """A ``maps_fn`` for evaluate_split: ALBEF_itm at each of ``layers`` (``itm_L<layer>``) and ALBEF_itc."""
    layer_cfgs = {layer: with_overrides(cfg, {"grounding.itm_layer": layer}) for layer in layers}

    def maps_fn(model, tensors):
        out = {f"itm_L{layer}": grounding_maps(model, tensors, ["itm"], c, "cpu", c.train.precision)["itm"]
               for layer, c in layer_cfgs.items()}
        out.update(grounding_maps(model, tensors, ["itc"], cfg, "cpu", cfg.train.precision))
        return out

    return maps_fn


def evaluate(task, cfg, tokenizer, splits, itm_layers: list[int] | None = None) -> dict[str, float]:
    """``{split/method: accuracy}``; with ``itm_layers`` ALBEF_itm once per layer (``itm_L<layer>``)."""
    out = {}
    maps_fn = itm_layers_maps(cfg, itm_layers) if itm_layers else None
    for split in splits:
        metrics, _ = evaluate_split(task, cfg.data.shards, split, cfg, tokenizer, "cpu", maps_fn=maps_fn)
        out.update({f"{split}/{k[4:]}": round(v, 2) for k, v in metrics.items() if k.startswith("acc_") and k != "acc_upper"})
    return out


def summary(rows: list[dict], splits) -> str:
    """A markdown table: per run kind and split, mean ± std over seeds of each method."""
    methods = list(dict.fromkeys(k.split("/", 1)[1] for k in rows[0] if "/" in k))
    names = {"itm": "ALBEF_itm", "itc": "ALBEF_itc", "random": "random box", "largest": "largest box"}
    header = [names.get(m, "ALBEF_" + m) for m in methods]
    lines = ["| start | split | seeds | " + " | ".join(header) + " |", "|---" * (3 + len(methods)) + "|"]
    for kind in dict.fromkeys(r["run"] for r in rows):
        group = [r for r in rows if r["run"] == kind]
        for split in splits:
            cells = []
            for m in methods:
                values = [r[f"{split}/{m}"] for r in group]
                std = statistics.stdev(values) if len(values) > 1 else 0.0
                cells.append(f"{statistics.mean(values):.1f} ± {std:.1f}" if len(values) > 1 else f"{values[0]:.1f}")
            lines.append(f"| {kind} | {split} | {len(group)} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", default="experiments/finetune_grounding_synth.yaml")
    parser.add_argument("--checkpoint", required=True, help="pretrained weights (model.checkpoint)")
    parser.add_argument("--seeds", type=int, nargs="*", default=[0, 1, 2], help="fine-tuning seeds (none: evaluate the checkpoint only)")
    parser.add_argument("--blank", action="store_true", help="also fine-tune each seed on blank images")
    parser.add_argument("--splits", nargs="+", default=["val", "testA", "testB"])
    parser.add_argument("--skip-pretrained", action="store_true", help="do not evaluate the checkpoint as it is")
    parser.add_argument("--itm-layers", type=int, nargs="*", help="ALBEF_itm at each of these fusion layers (itm_L<n>) "
                        "instead of grounding.itm_layer alone")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", help="append one JSON line per evaluation")
    parser.add_argument("overrides", nargs="*", help="dotted overrides of the config")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    cfg = with_overrides(load_config(args.config, args.overrides), {"model.checkpoint": args.checkpoint})
    tokenizer = load_tokenizer(cfg.data.tokenizer)
    special = SpecialTokens.from_tokenizer(tokenizer)
    rows = []

    def record(row: dict) -> None:
        row = {"checkpoint": args.checkpoint, **row}
        rows.append(row)
        print(json.dumps(row), flush=True)
        if args.out:
            with open(args.out, "a") as f:
                f.write(json.dumps(row) + "\n")

    if not args.skip_pretrained:
        record({"run": "pretrained, no fine-tuning", "seed": None,
                **evaluate(build_task(cfg, special), cfg, tokenizer, args.splits, args.itm_layers)})
    pairs = training_pairs(cfg)
    for blank in (False, True) if args.blank else (False,):
        for seed in args.seeds:
            seed_cfg = with_overrides(cfg, {"seed": seed})
            torch.manual_seed(seed)
            task = build_task(seed_cfg, special)
            s_per_step = finetune(task, seed_cfg, pairs, blank)
            kind = "grounding fine-tuned" + (" on blank images" if blank else "")
            record({"run": kind, "seed": seed, "s_per_step": round(s_per_step, 3),
                    **evaluate(task, seed_cfg, tokenizer, args.splits, args.itm_layers)})
    if rows:
        print(summary(rows, args.splits))


if __name__ == "__main__":
    main()
