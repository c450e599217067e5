"""SNLI-VE on the embedded benchmark, single process (no Ray): task vs the image-blanked baseline.

Fine-tunes a :class:`~albef_ray.objectives.ve.VETask` (``experiments/finetune_ve_synth.yaml``)
from one pretrained checkpoint, once per seed, on the VE set's train split held in memory (the
evaluation resize: the recipe has no augmentation), with the training step of the Ray workers
(:func:`~albef_ray.train.loop.train_step`). After every epoch it measures val accuracy and keeps
the best epoch's weights (the official ``checkpoint_best.pth`` rule), whose test accuracy is
reported. ``--blank`` replaces every image (train, val and test) by zeros after normalisation
(the mean colour), so the model sees only the hypothesis: the text-only baseline.

    .venv/bin/python benchmarks/ve_synth.py --checkpoint CKPT --seeds 0 1 2 [--blank] [a.b=c ...]

Prints one JSON line per run (appended to ``--out``) and a summary: mean and standard deviation
of test accuracy over the seeds.
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import time
from pathlib import Path

import torch

from albef_ray.config import load_config
from albef_ray.data.collate import load_tokenizer
from albef_ray.data.transforms import pre_caption
from albef_ray.eval.examples import iter_examples
from albef_ray.eval.ve import ve_accuracy
from albef_ray.synth.tasks import SynthTaskSettings
from albef_ray.synth.ve import FACT_KINDS, FORMS, MAX_WORDS, plan_ve
from albef_ray.tasks import build_task
from albef_ray.train.loop import Schedule, train_step
from albef_ray.train.optim import build_optimizer

CONFIG = "experiments/finetune_ve_synth.yaml"


def load_rows(cfg, tokenizer, split: str, blank: bool) -> dict[str, torch.Tensor]:
    """Every row of ``split`` as one dict of tensors (padded to the longest hypothesis), and
    ``kind``: each row's (form, fact kind) index into :data:`KINDS` (from the generator's plan)."""
    examples = list(iter_examples(cfg.data.shards, split, cfg, tokenizer, batch_size=512))
    parts = [b.tensors for b in examples]
    width = max(p["input_ids"].shape[1] for p in parts)
    pad = lambda t: torch.nn.functional.pad(t, (0, width - t.shape[1]))
    rows = {
        "image": torch.cat([p["image"] for p in parts]),
        "input_ids": torch.cat([pad(p["input_ids"]) for p in parts]),
        "attention_mask": torch.cat([pad(p["attention_mask"]) for p in parts]),
        "label": torch.cat([p["label"] for p in parts]),
    }
    if blank:
        rows["image"] = torch.zeros_like(rows["image"])
    kinds = _kinds_of(cfg.data.shards[0], split)
    rows["kind"] = torch.tensor([KINDS.index(kinds[text]) for b in examples for text in b.text])
    return rows


KINDS = [(form, kind) for form in FORMS for kind in FACT_KINDS]


def _kinds_of(root: str, split: str) -> dict[str, tuple[str, str]]:
    """Cleaned hypothesis text -> (form, fact kind), from the plan of the settings in the manifest."""
    recorded = json.loads((Path(root) / "manifest.json").read_text())["synth_task"]
    settings = SynthTaskSettings(**{k: v for k, v in recorded.items() if k != "task"})
    return {pre_caption(h.text(item.scene), MAX_WORDS): (h.form, h.fact.kind)
            for item in plan_ve(settings)[split] for h in item.hypotheses}


@torch.no_grad()
def accuracy_by_kind(task, rows: dict[str, torch.Tensor]) -> dict[str, float]:
    """Test accuracy (percent) per fact kind and per form."""
    task.eval()
    pred = torch.cat([task.logits(b["image"], b["input_ids"], b["attention_mask"]).argmax(1)
                      for b in batches(rows, 256)])
    hit = (pred == rows["label"]).float()
    out = {}
    for axis, names in ((0, FORMS), (1, FACT_KINDS)):
        for name in names:
            mask = torch.tensor([KINDS[k][axis] == name for k in rows["kind"].tolist()])
            out[name] = round(100.0 * float(hit[mask].mean()), 2)
    return out


def batches(rows: dict[str, torch.Tensor], size: int, order: torch.Tensor | None = None, drop_last: bool = False):
    n = rows["label"].shape[0]
    order = torch.arange(n) if order is None else order
    stop = n - n % size if drop_last else n
    for start in range(0, stop, size):
        idx = order[start : start + size]
        yield {k: v[idx] for k, v in rows.items()}


def train(cfg, data, seed: int):
    """Fine-tune from ``model.checkpoint``; returns (task with the best epoch's weights, record)."""
    cfg = cfg.model_copy(update={"seed": seed})
    torch.manual_seed(seed)
    task = build_task(cfg).train()
    optimizer = build_optimizer(task, cfg.optim)
    spe = data["train"]["label"].shape[0] // cfg.train.batch_size
    schedule = Schedule(cfg.train.epochs * spe, spe)
    generator = torch.Generator().manual_seed(seed)
    best, best_state, history, step = -1.0, None, [], 0
    start = time.perf_counter()
    for epoch in range(cfg.train.epochs):
        order = torch.randperm(data["train"]["label"].shape[0], generator=generator)
        losses = []
        for batch in batches(data["train"], cfg.train.batch_size, order, drop_last=True):
            metrics = train_step(task, optimizer, batch, step, cfg, schedule)
            losses.append(metrics["loss"])
            step += 1
        val = ve_accuracy(task, batches(data["val"], 256))["ve_acc"]
        history.append({"epoch": epoch + 1, "loss": sum(losses) / len(losses), "val_acc": val})
        if val > best:
            best, best_state = val, copy.deepcopy(task.state_dict())
    task.load_state_dict(best_state)
    return task, {"seed": seed, "steps": step, "best_val_acc": best, "history": history,
                  "seconds": round(time.perf_counter() - start, 1)}


def run(cfg, data, seed: int) -> dict:
    """One seed: :func:`train`, then the best epoch's test accuracy."""
    task, record = train(cfg, data, seed)
    return {**record, "test": ve_accuracy(task, batches(data["test"], 256)), "test_by_kind": accuracy_by_kind(task, data["test"])}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("overrides", nargs="*", help="dotted config overrides")
    parser.add_argument("--config", default=CONFIG)
    parser.add_argument("--checkpoint", required=True, help="pretrained weights (model.checkpoint)")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--blank", action="store_true", help="image-blanked baseline: every image is zeros")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", help="append one JSON line per run to this file")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    cfg = load_config(args.config, [f"model.checkpoint={args.checkpoint}", "model.vit_init=null",
                                    "model.bert_init=null", *args.overrides])
    tokenizer = load_tokenizer(cfg.data.tokenizer)
    data = {split: load_rows(cfg, tokenizer, split, args.blank) for split in ("train", "val", "test")}
    name = "image-blanked" if args.blank else "ve"
    accs = []
    for seed in args.seeds:
        result = {"run": name, "overrides": args.overrides, **run(cfg, data, seed)}
        accs.append(result["test"]["ve_acc"])
        line = json.dumps(result)
        print(line, flush=True)
        if args.out:
            with open(args.out, "a") as handle:
                handle.write(line + "\n")
    std = statistics.stdev(accs) if len(accs) > 1 else 0.0
    print(f"{name}: test ve_acc {statistics.mean(accs):.2f} +- {std:.2f} over seeds {args.seeds}: "
          + ", ".join(f"{a:.2f}" for a in accs))


if __name__ == "__main__":
    main()
