"""Single-process probe of a Table 1 recipe (no Ray): how the recipe search was run quickly.

Pretrains one variant on the synthetic train split held in memory (the evaluation resize, as
the demo's recipe has no augmentation), evaluates it zero-shot (ITC ranking alone, ITM re-rank
of the ITC top k, held-out ITM accuracy), then optionally fine-tunes it for retrieval on another
split (RetrievalTask, ITC + ITM) and evaluates again. Prints one JSON line per run and appends it
to ``--out``. The sweep ``ablations/recipe_search.yaml`` runs the same levers on the platform.

    .venv/bin/python benchmarks/recipe_probe.py experiments/table1_synth.yaml \\
        itm.hard_negatives=false mod.itc=false mod.mlm=false --steps 936 \\
        --ft-steps 312 --ft-overrides optim.lr=1e-3 optim.warmup_steps=20
"""

from __future__ import annotations

import argparse
import json
import time

import torch

from albef_ray.config import build_config, load_yaml, parse_override, set_dotted
from albef_ray.data.collate import load_tokenizer, tokenize
from albef_ray.data.transforms import normalize
from albef_ray.eval.itm import itm_accuracy
from albef_ray.eval.retrieval import evaluate
from albef_ray.eval.split import load_split
from albef_ray.objectives.mlm import SpecialTokens
from albef_ray.tasks import build_task
from albef_ray.train.loop import Schedule, train_step
from albef_ray.train.optim import build_optimizer

# The fine-tuning stage's task switches (experiments/table1_finetune_synth.yaml).
FINETUNE = {"task": "retrieval", "mlm.enabled": False, "mod.mlm": False, "itc.enabled": True,
            "model.vit_init": None, "model.bert_init": None}


def config(path: str, overrides: list[str], extra: dict | None = None):
    data = load_yaml(path)
    for text in overrides:
        set_dotted(data, *parse_override(text))
    for key, value in (extra or {}).items():
        set_dotted(data, key, value)
    return build_config(data)


def pairs(cfg, split: str):
    """(split, images (N_txt, 3, R, R) uint8 per caption, ids, mask, image index per caption)."""
    every_image = cfg.model_copy(update={"eval": cfg.eval.model_copy(update={"max_images": None})})
    loaded = load_split(cfg.data.shards, split, every_image)
    ids, mask = tokenize(load_tokenizer(cfg.data.tokenizer), loaded.captions, cfg.data.max_text_len)
    return loaded, loaded.images[loaded.txt2img], ids, mask, loaded.txt2img.clone()


def train(task, cfg, images, ids, mask, image_idx, steps: int, log_every: int = 100) -> float:
    """``steps`` optimizer steps over shuffled epochs of the pairs; returns seconds per step."""
    optimizer = build_optimizer(task, cfg.optim)
    batch = cfg.train.batch_size
    schedule = Schedule(total_steps=steps, steps_per_epoch=len(ids) // batch)
    generator = torch.Generator().manual_seed(cfg.seed)
    order, pos, window = torch.randperm(len(ids), generator=generator), 0, []
    start = time.perf_counter()
    task.train()
    for step in range(steps):
        if pos + batch > len(ids):
            order, pos = torch.randperm(len(ids), generator=generator), 0
        rows, pos = order[pos:pos + batch], pos + batch
        window.append(train_step(task, optimizer, {
            "image": normalize(images[rows]), "input_ids": ids[rows], "attention_mask": mask[rows],
            "image_idx": image_idx[rows],
        }, step, cfg, schedule, generator))
        if (step + 1) % log_every == 0:
            keys = [k for k in window[-1] if k.endswith(("_loss", "_acc")) or k == "temp"]
            print(f"  step {step + 1}: " + " ".join(f"{k} {sum(m[k] for m in window) / len(window):.3f}" for k in keys),
                  flush=True)
            window = []
    return (time.perf_counter() - start) / max(steps, 1)


def scores(task, cfg, test, tokenizer, ks: list[int], prefix: str) -> dict[str, float]:
    out = {}
    for score, k in [("itc", 1)] + [("itm", k) for k in ks]:
        c = cfg.model_copy(update={"eval": cfg.eval.model_copy(update={"score": score, "k_test": k})})
        m = evaluate(task, test, tokenizer, c)
        name = f"{prefix}/{score}" + (str(k) if score == "itm" else "")
        out.update({name: m["r_mean"], f"{name}_tr": m["txt_r_mean"], f"{name}_ir": m["img_r_mean"]})
    out[f"{prefix}/itm_acc"] = itm_accuracy(task, test, tokenizer, cfg, seed=cfg.seed)["itm_acc"]
    return {k: round(v, 3) for k, v in out.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("config", help="experiment YAML (e.g. experiments/table1_synth.yaml)")
    parser.add_argument("overrides", nargs="*", help="dotted overrides of the pretraining config")
    parser.add_argument("--steps", type=int, default=936, help="pretraining steps")
    parser.add_argument("--ft-steps", type=int, default=0, help="retrieval fine-tuning steps (0: none)")
    parser.add_argument("--ft-split", default="val", help="split to fine-tune on")
    parser.add_argument("--ft-overrides", nargs="*", default=[], help="dotted overrides of the fine-tuning config")
    parser.add_argument("--ks", default="26", help="ITM re-rank depths k_test, comma-separated")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", help="append the result line to this JSON-lines file")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    ks = [int(k) for k in args.ks.split(",")]

    cfg = config(args.config, args.overrides)
    tokenizer = load_tokenizer(cfg.data.tokenizer)
    _, images, ids, mask, image_idx = pairs(cfg, "train")
    test = load_split(cfg.data.shards, cfg.eval.split, cfg)
    torch.manual_seed(cfg.seed)
    task = build_task(cfg, SpecialTokens.from_tokenizer(tokenizer))
    result = {"pretrain_s_per_step": train(task, cfg, images, ids, mask, image_idx, args.steps)}
    result.update(scores(task, cfg, test, tokenizer, ks, "zeroshot"))
    if args.ft_steps:
        ft_cfg = config(args.config, args.overrides + args.ft_overrides, FINETUNE)
        finetune = build_task(ft_cfg, SpecialTokens.from_tokenizer(tokenizer))
        finetune.model.load_state_dict(task.model.state_dict())
        finetune.momentum.model.load_state_dict(task.model.state_dict(), strict=False)  # no heads, no temp
        _, images, ids, mask, image_idx = pairs(ft_cfg, args.ft_split)
        result["finetune_s_per_step"] = train(finetune, ft_cfg, images, ids, mask, image_idx, args.ft_steps, 50)
        result.update(scores(finetune, ft_cfg, test, tokenizer, ks, "finetuned"))
    line = json.dumps({"overrides": args.overrides, "steps": args.steps, "ft_steps": args.ft_steps,
                       "ft_overrides": args.ft_overrides, **result})
    print(line)
    if args.out:
        with open(args.out, "a") as f:
            f.write(line + "\n")


if __name__ == "__main__":
    main()
