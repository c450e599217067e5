"""VQA on the embedded benchmark, single process (no Ray): task vs the image-blanked baseline.

Fine-tunes a :class:`~albef_ray.objectives.vqa.VQATask` (``experiments/finetune_vqa_synth.yaml``)
from one pretrained checkpoint, once per seed, on the VQA set's train split held in memory (the
evaluation resize: the recipe has no augmentation), with the training step of the Ray workers
(:func:`~albef_ray.train.loop.train_step`). After every epoch it answers the val split by
ranking ``answer_list.json`` (:func:`~albef_ray.eval.vqa.answer_questions`, ``vqa.k_test``) and
keeps the best epoch's weights by VQA accuracy, whose test accuracy is reported. ``--blank``
replaces every image (train, val and test) by zeros after normalisation (the mean colour), so the
model sees only the question: the text-only baseline.

    .venv/bin/python benchmarks/vqa_synth.py --checkpoint CKPT --seeds 0 1 2 [--blank] [a.b=c ...]

Prints one JSON line per run (appended to ``--out``) and a summary: mean and standard deviation
of test VQA accuracy over the seeds.
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from albef_ray.config import load_config
from albef_ray.data.collate import load_tokenizer, tokenize
from albef_ray.eval.examples import iter_examples
from albef_ray.eval.vqa import (
    answer_list_path,
    answer_questions,
    load_answer_list,
    vqa_accuracy,
)
from albef_ray.tasks import build_task
from albef_ray.train.loop import Schedule, train_step
from albef_ray.train.optim import build_optimizer

CONFIG = "experiments/finetune_vqa_synth.yaml"


def _pad(t: torch.Tensor, shape: tuple[int, ...]) -> torch.Tensor:
    pads = []
    for have, want in zip(reversed(t.shape), reversed(shape)):
        pads += [0, want - have]
    return F.pad(t, pads)  # pad id 0, weight 0


def question_kind(text: str) -> str:
    """The embedded benchmark's question kind, from the question's words (for the breakdown)."""
    for prefix, kind in (("what color is the object", "spatial"), ("what shape is the object", "spatial"),
                         ("what color is on", "spatial"), ("what color is at", "spatial"), ("what shape is on", "spatial"),
                         ("what shape is at", "spatial"), ("what color", "colour"), ("what shape", "shape"),
                         ("what size", "size"), ("how many", "count"), ("is ", "yes/no")):
        if text.startswith(prefix):
            return kind
    return "other"


def load_rows(cfg, tokenizer, split: str, blank: bool) -> tuple[dict[str, torch.Tensor], list, list]:
    """Every row of ``split`` as one dict of tensors (padded), each row's human answers and question kind."""
    parts = list(iter_examples(cfg.data.shards, split, cfg, tokenizer, batch_size=512))
    t = max(p.tensors["input_ids"].shape[1] for p in parts)
    k = max(p.tensors["answer_ids"].shape[1] for p in parts)
    a = max(p.tensors["answer_ids"].shape[2] for p in parts)
    cat = lambda key, shape: torch.cat([_pad(p.tensors[key], (p.tensors[key].shape[0], *shape)) for p in parts])
    rows = {
        "image": torch.cat([p.tensors["image"] for p in parts]),
        "input_ids": cat("input_ids", (t,)),
        "attention_mask": cat("attention_mask", (t,)),
        "answer_ids": cat("answer_ids", (k, a)),
        "answer_mask": cat("answer_mask", (k, a)),
        "answer_weights": cat("answer_weights", (k,)),
    }
    if blank:
        rows["image"] = torch.zeros_like(rows["image"])
    return rows, [answers for p in parts for answers in p.answers], [question_kind(t) for p in parts for t in p.text]


def batches(rows: dict[str, torch.Tensor], size: int, order: torch.Tensor | None = None, drop_last: bool = False):
    n = rows["input_ids"].shape[0]
    order = torch.arange(n) if order is None else order
    stop = n - n % size if drop_last else n
    for start in range(0, stop, size):
        idx = order[start : start + size]
        yield {key: v[idx] for key, v in rows.items()}


def accuracy(task, cfg, rows, humans, kinds, answer_list, by_kind: bool = False):
    """VQA accuracy (percent) of the task's answers to every row (and per question kind)."""
    scores, at = [], 0
    for batch in batches(rows, 256):
        ranking = answer_questions(task, batch["image"], batch["input_ids"], batch["attention_mask"],
                                   *answer_list["tensors"], cfg.vqa.k_test)
        for best in ranking.best.tolist():
            scores.append(vqa_accuracy(answer_list["answers"][best], humans[at], cfg.vqa.annotators,
                                       cfg.vqa.accuracy == "leave_one_out"))
            at += 1
    total = 100.0 * sum(scores) / len(scores)
    if not by_kind:
        return total
    groups: dict[str, list[float]] = {}
    for kind, score in zip(kinds, scores):
        groups.setdefault(kind, []).append(score)
    return total, {k: round(100.0 * sum(v) / len(v), 2) for k, v in sorted(groups.items())}


def run(cfg, data, answer_list, seed: int) -> dict:
    cfg = cfg.model_copy(update={"seed": seed})
    torch.manual_seed(seed)
    task = build_task(cfg).train()
    optimizer = build_optimizer(task, cfg.optim)
    train_rows = data["train"][0]
    spe = train_rows["input_ids"].shape[0] // cfg.train.batch_size
    schedule = Schedule(cfg.train.epochs * spe, spe)
    generator = torch.Generator().manual_seed(seed)
    best, best_state, history, step = -1.0, None, [], 0
    start = time.perf_counter()
    for epoch in range(cfg.train.epochs):
        order = torch.randperm(train_rows["input_ids"].shape[0], generator=generator)
        losses, token_acc = [], []
        for batch in batches(train_rows, cfg.train.batch_size, order, drop_last=True):
            metrics = train_step(task, optimizer, batch, step, cfg, schedule)
            losses.append(metrics["loss"])
            token_acc.append(metrics["vqa_token_acc"])
            step += 1
        val = accuracy(task, cfg, *data["val"], answer_list)
        history.append({"epoch": epoch + 1, "loss": round(sum(losses) / len(losses), 4),
                        "token_acc": round(sum(token_acc) / len(token_acc), 4), "val_vqa_acc": round(val, 2)})
        print(json.dumps({"seed": seed, **history[-1]}), flush=True)
        if val > best:
            best, best_state = val, copy.deepcopy(task.state_dict())
    task.load_state_dict(best_state)
    test, kinds = accuracy(task, cfg, *data["test"], answer_list, by_kind=True)
    return {"seed": seed, "steps": step, "best_val_vqa_acc": round(best, 2), "test_vqa_acc": round(test, 2),
            "test_by_kind": kinds, "history": history, "seconds": round(time.perf_counter() - start, 1)}


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
    answers = load_answer_list(answer_list_path(cfg, cfg.data.shards))
    answer_list = {"answers": answers, "tensors": tokenize(tokenizer, answers, cfg.vqa.max_answer_len, append_sep=True)}
    data = {split: load_rows(cfg, tokenizer, split, args.blank) for split in ("train", "val", "test")}
    name = "image-blanked" if args.blank else "vqa"
    accs = []
    for seed in args.seeds:
        result = {"run": name, "overrides": args.overrides, **run(cfg, data, answer_list, seed)}
        accs.append(result["test_vqa_acc"])
        line = json.dumps(result)
        print(line, flush=True)
        if args.out:
            Path(args.out).parent.mkdir(parents=True, exist_ok=True)
            with open(args.out, "a") as handle:
                handle.write(line + "\n")
    std = statistics.stdev(accs) if len(accs) > 1 else 0.0
    print(f"{name}: test vqa_acc {statistics.mean(accs):.2f} +- {std:.2f} over seeds {args.seeds}: "
          + ", ".join(f"{a:.2f}" for a in accs))


if __name__ == "__main__":
    main()
