"""NLVR2 on the embedded benchmark, single process (no Ray): task vs the image-blanked baseline.

Optionally runs the text-assignment pre-step first (``--ta``: ``experiments/pretrain_nlvr_synth.yaml``,
one epoch on the caption benchmark's train split from ``--checkpoint``; its weights are saved to
``--ta-out`` and start every fine-tuning run, task and baseline alike). Then fine-tunes an
:class:`~albef_ray.objectives.nlvr.NLVRTask` (``experiments/finetune_nlvr_synth.yaml``) once per
seed on the NLVR2 set's train split held in memory (the evaluation resize: the recipe has no
augmentation), with the Ray workers' training step (:func:`~albef_ray.train.loop.train_step`).
After every epoch it measures val accuracy and keeps the best epoch's weights (the official
rule), whose test accuracy is reported. ``--blank`` replaces both images of every pair (train,
val and test) by zeros after normalisation (the mean colour), so the model sees only the
statement: the text-only baseline (chance, 50 %, by the generator's construction).

    .venv/bin/python benchmarks/nlvr_synth.py --checkpoint CKPT --ta --seeds 0 1 2 [--blank] [a.b=c ...]

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
from albef_ray.eval.examples import ExampleBatch, iter_examples
from albef_ray.eval.nlvr import evaluate
from albef_ray.tasks import build_task
from albef_ray.train.loop import Schedule, train_step
from albef_ray.train.optim import build_optimizer

CONFIG = "experiments/finetune_nlvr_synth.yaml"
TA_CONFIG = "experiments/pretrain_nlvr_synth.yaml"


def load_rows(cfg, tokenizer, split: str, blank: bool = False) -> dict[str, torch.Tensor]:
    """Every row of ``split`` as one dict of tensors (padded to the longest text)."""
    parts = [b.tensors for b in iter_examples(cfg.data.shards, split, cfg, tokenizer, batch_size=512)]
    width = max(p["input_ids"].shape[1] for p in parts)
    pad = lambda t: torch.nn.functional.pad(t, (0, width - t.shape[1]))
    keys = [k for k in ("image", "image2", "label") if k in parts[0]]
    rows = {k: torch.cat([p[k] for p in parts]) for k in keys}
    rows.update(input_ids=torch.cat([pad(p["input_ids"]) for p in parts]),
                attention_mask=torch.cat([pad(p["attention_mask"]) for p in parts]))
    if blank:
        for k in ("image", "image2"):
            rows[k] = torch.zeros_like(rows[k])
    return rows


def batches(rows: dict[str, torch.Tensor], size: int, order: torch.Tensor | None = None, drop_last: bool = False):
    n = rows["input_ids"].shape[0]
    order = torch.arange(n) if order is None else order
    stop = n - n % size if drop_last else n
    for start in range(0, stop, size):
        idx = order[start : start + size]
        yield {k: v[idx] for k, v in rows.items()}


def examples(rows, size: int):
    """Batches as the evaluator reads them (:class:`ExampleBatch`)."""
    for batch in batches(rows, size):
        n = batch["input_ids"].shape[0]
        yield ExampleBatch(batch, [str(i) for i in range(n)], [""] * n)


def train_epochs(task, cfg, rows, seed: int, on_epoch=None) -> int:
    optimizer = build_optimizer(task, cfg.optim)
    spe = rows["input_ids"].shape[0] // cfg.train.batch_size
    schedule = Schedule(cfg.train.epochs * spe, spe)
    generator = torch.Generator().manual_seed(seed)
    step = 0
    for epoch in range(cfg.train.epochs):
        order = torch.randperm(rows["input_ids"].shape[0], generator=generator)
        losses = []
        for batch in batches(rows, cfg.train.batch_size, order, drop_last=True):
            losses.append(train_step(task, optimizer, batch, step, cfg, schedule, generator)["loss"])
            step += 1
        if on_epoch is not None:
            on_epoch(epoch, sum(losses) / len(losses))
    return step


def text_assignment(checkpoint: str, out: Path, overrides: list[str]) -> dict:
    """The TA pre-step from ``checkpoint``; saves the task's state dict (albef-ray layout) to ``out``."""
    cfg = load_config(TA_CONFIG, [f"model.checkpoint={checkpoint}", "model.vit_init=null", "model.bert_init=null",
                                  *overrides])
    rows = load_rows(cfg, load_tokenizer(cfg.data.tokenizer), cfg.data.train_split)
    torch.manual_seed(cfg.seed)
    task = build_task(cfg).train()
    history = []
    start = time.perf_counter()
    steps = train_epochs(task, cfg, rows, cfg.seed, lambda e, loss: history.append({"epoch": e + 1, "loss": loss}))
    out.parent.mkdir(parents=True, exist_ok=True)
    torch.save(task.state_dict(), out)
    return {"run": "text-assignment", "steps": steps, "history": history, "checkpoint": str(out),
            "seconds": round(time.perf_counter() - start, 1)}


def run(cfg, data, seed: int) -> dict:
    cfg = cfg.model_copy(update={"seed": seed})
    torch.manual_seed(seed)
    task = build_task(cfg).train()
    state = {"best": -1.0, "weights": None}
    history = []

    def on_epoch(epoch, loss):
        val = evaluate(task, examples(data["val"], 256))["nlvr_acc"]
        history.append({"epoch": epoch + 1, "loss": loss, "val_acc": val})
        if val > state["best"]:
            state.update(best=val, weights=copy.deepcopy(task.state_dict()))

    start = time.perf_counter()
    steps = train_epochs(task, cfg, data["train"], seed, on_epoch)
    task.load_state_dict(state["weights"])
    test = evaluate(task, examples(data["test"], 256))
    return {"seed": seed, "steps": steps, "best_val_acc": state["best"], "test": test, "history": history,
            "seconds": round(time.perf_counter() - start, 1)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("overrides", nargs="*", help="dotted overrides of the fine-tuning config")
    parser.add_argument("--config", default=CONFIG)
    parser.add_argument("--checkpoint", required=True, help="pretrained weights (model.checkpoint)")
    parser.add_argument("--ta", action="store_true", help="run the text-assignment step first and start from it")
    parser.add_argument("--ta-out", default="runs/nlvr_synth/ta_state.pt", help="where the TA weights go")
    parser.add_argument("--ta-override", action="append", default=[], help="dotted override of the TA config")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--blank", action="store_true", help="image-blanked baseline: every image is zeros")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", help="append one JSON line per run to this file")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    def emit(record: dict) -> None:
        line = json.dumps(record)
        print(line, flush=True)
        if args.out:
            with open(args.out, "a") as handle:
                handle.write(line + "\n")

    start = args.checkpoint
    if args.ta:
        record = text_assignment(args.checkpoint, Path(args.ta_out), args.ta_override)
        emit({**record, "from": args.checkpoint})
        start = record["checkpoint"]
    cfg = load_config(args.config, [f"model.checkpoint={start}", "model.vit_init=null", "model.bert_init=null",
                                    *args.overrides])
    tokenizer = load_tokenizer(cfg.data.tokenizer)
    data = {split: load_rows(cfg, tokenizer, split, args.blank) for split in ("train", "val", "test")}
    name = "image-blanked" if args.blank else "nlvr"
    accs = []
    for seed in args.seeds:
        result = {"run": name, "from": start, "overrides": args.overrides, **run(cfg, data, seed)}
        accs.append(result["test"]["nlvr_acc"])
        emit(result)
    std = statistics.stdev(accs) if len(accs) > 1 else 0.0
    print(f"{name}: test nlvr_acc {statistics.mean(accs):.2f} +- {std:.2f} over seeds {args.seeds}: "
          + ", ".join(f"{a:.2f}" for a in accs))


if __name__ == "__main__":
    main()
