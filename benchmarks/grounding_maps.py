"""Which ITM attention map grounds: variants of the ALBEF_itm map on one checkpoint (no Ray).

For every expression of a grounding split, maps at each fusion layer of the cross-attention:
``gc`` (the official Grad-CAM: attention x positive gradient of the ITM match logit, mean over
heads), ``raw`` (attention alone) and ``grad`` (positive gradient alone), each averaged over
``all`` tokens, ``content`` tokens (no [CLS], [SEP], [PAD], "the") or the ``cls`` row only; each
map picks a proposal as the evaluation does. Prints one JSON line of accuracies (%, IoU >= 0.5)
beside the random-box baseline (docs/results.md, grounding section).

    .venv/bin/python benchmarks/grounding_maps.py CHECKPOINT testA
"""

import json
import sys

import torch

from albef_ray.config import load_config, with_overrides
from albef_ray.data.collate import load_tokenizer
from albef_ray.eval.attention import capture_cross_attention
from albef_ray.eval.examples import iter_examples
from albef_ray.eval.gradcam import attention_gradcam
from albef_ray.eval.grounding import _columns, box_iou, pick_box
from albef_ray.eval.retrieval import as_albef
from albef_ray.objectives.mlm import SpecialTokens
from albef_ray.tasks import build_task


def main() -> None:
    torch.set_num_threads(1)
    ck, split = sys.argv[1], sys.argv[2] if len(sys.argv) > 2 else "testA"
    cfg = with_overrides(load_config("experiments/finetune_grounding_synth.yaml", []), {"model.checkpoint": ck})
    tok = load_tokenizer(cfg.data.tokenizer)
    m = as_albef(build_task(cfg, SpecialTokens.from_tokenizer(tok)))
    m.eval()
    stop_ids = set(tok.convert_tokens_to_ids(["[CLS]", "[SEP]", "[PAD]", "the"]))
    hits, total = {}, 0
    for batch in iter_examples(cfg.data.shards, split, cfg, tok):
        if not batch.text:
            continue
        boxes, proposals, widths, heights, _ = _columns(batch, split)
        t = batch.tensors
        img, ids, mask = t["image"], t["input_ids"], t["attention_mask"]
        content = mask.clone().float()
        for s in stop_ids:
            content[ids == s] = 0
        cls = torch.zeros_like(content)
        cls[:, 0] = 1
        maps = {}
        for layer in range(len(m.fusion.layers)):
            with torch.enable_grad(), capture_cross_attention(m, layer) as rec:
                fused = m.fuse(m.encode_text(ids, mask), mask, m.encode_image(img), None)
                (g,) = torch.autograd.grad(m.itm_logits(fused.float())[:, 1].sum(), rec.attn)
            a = rec.attn.detach()
            grid = attention_gradcam(a, g).shape[-1]
            shape = (a.shape[0], a.shape[2], grid, grid)
            kinds = {"gc": attention_gradcam(a, g), "raw": a.mean(1)[..., 1:].reshape(shape),
                     "grad": g.clamp(min=0).mean(1)[..., 1:].reshape(shape)}
            for name, x in kinds.items():
                for rows, w in (("all", mask.float()), ("content", content), ("cls", cls)):
                    maps[f"L{layer}_{name}_{rows}"] = (x * w[:, :, None, None]).sum(1) / w.sum(1).clamp(min=1)[:, None, None]
        for k, (box, props) in enumerate(zip(boxes, proposals)):
            props = torch.tensor([list(p)[:4] for p in props], dtype=torch.float64).reshape(-1, 4)
            correct = torch.tensor([box_iou(p.tolist(), box) >= 0.5 for p in props])
            total += 1
            hits["random"] = hits.get("random", 0) + float(correct.double().mean())
            for name, cam in maps.items():
                hits[name] = hits.get(name, 0) + float(correct[pick_box(cam[k], props, int(heights[k]), int(widths[k]))])
    print(json.dumps({"checkpoint": ck, "split": split, **{k: round(100 * v / total, 1) for k, v in hits.items()}}))


if __name__ == "__main__":
    main()
