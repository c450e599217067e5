"""Which ITM attention map grounds: variants of the ALBEF_itm map on one checkpoint (no Ray).

For every expression of a grounding split, maps at each fusion layer of the cross-attention:
``gc`` (the official Grad-CAM: attention x positive gradient of the ITM match logit, mean over
heads), ``raw`` (attention alone) and ``grad`` (positive gradient alone), each averaged over
``all`` tokens, ``content`` tokens (no [CLS], [SEP], [PAD], "the") or the ``cls`` row only; the
maps rank the proposals through the evaluation's own scoring
(:func:`albef_ray.eval.grounding.evaluate_split` with a map function). Prints one JSON line of
accuracies (%, IoU >= 0.5) per split beside the random-box baseline (docs/results.md, grounding
section).

    .venv/bin/python benchmarks/grounding_maps.py CHECKPOINT [SPLIT ...]
"""

import json
import sys

import torch

from albef_ray.config import load_config, with_overrides
from albef_ray.data.collate import load_tokenizer
from albef_ray.eval.attention import capture_cross_attention
from albef_ray.eval.gradcam import attention_gradcam
from albef_ray.eval.grounding import evaluate_split
from albef_ray.objectives.mlm import SpecialTokens
from albef_ray.tasks import build_task


def map_variants(stop_ids: set[int]):
    """A ``maps_fn`` for evaluate_split: every (layer, kind, rows) map of the ITM cross-attention."""

    def maps_fn(m, tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        img, ids, mask = tensors["image"], tensors["input_ids"], tensors["attention_mask"]
        content = mask.clone().float()
        for s in stop_ids:
            content[ids == s] = 0
        cls = torch.zeros_like(content)
        cls[:, 0] = 1
        maps = {}
        with torch.no_grad():  # the unimodal encoders do not depend on the captured layer: once per batch
            text_hidden, image_tokens = m.encode_text(ids, mask), m.encode_image(img)
        for layer in range(len(m.fusion.layers)):
            with torch.enable_grad(), capture_cross_attention(m, layer) as rec:
                fused = m.fuse(text_hidden, mask, image_tokens, None)
                (g,) = torch.autograd.grad(m.itm_logits(fused.float())[:, 1].sum(), rec.attn)
            a = rec.attn.detach()
            gc = attention_gradcam(a, g)
            shape = gc.shape
            kinds = {"gc": gc, "raw": a.mean(1)[..., 1:].reshape(shape), "grad": g.clamp(min=0).mean(1)[..., 1:].reshape(shape)}
            for name, x in kinds.items():
                for rows, w in (("all", mask.float()), ("content", content), ("cls", cls)):
                    maps[f"L{layer}_{name}_{rows}"] = (x * w[:, :, None, None]).sum(1) / w.sum(1).clamp(min=1)[:, None, None]
        return maps

    return maps_fn


def main() -> None:
    torch.set_num_threads(1)
    ck, splits = sys.argv[1], sys.argv[2:] or ["testA"]
    cfg = with_overrides(load_config("experiments/finetune_grounding_synth.yaml", []), {"model.checkpoint": ck})
    tok = load_tokenizer(cfg.data.tokenizer)
    task = build_task(cfg, SpecialTokens.from_tokenizer(tok))
    maps_fn = map_variants(set(tok.convert_tokens_to_ids(["[CLS]", "[SEP]", "[PAD]", "the"])))
    for split in splits:
        metrics, _ = evaluate_split(task, cfg.data.shards, split, cfg, tok, "cpu", maps_fn=maps_fn)
        accs = {k[4:]: round(v, 1) for k, v in metrics.items() if k.startswith("acc_") and k != "acc_upper"}
        print(json.dumps({"checkpoint": ck, "split": split, **accs}), flush=True)


if __name__ == "__main__":
    main()
