"""Where the fusion encoder's cross-attention looks: on the referred object, the others, or the background.

For the first ``--refs`` expressions of a grounding split (the embedded benchmark: every object's
exact box is a proposal), each fusion layer's cross-attention (mean over heads, image [CLS]
column dropped) is summed over the patches of the referred object's box, of the other objects'
boxes and of the rest (a patch belongs to a box it overlaps; the referred object wins over
another), per query row: the text [CLS], "the", and the other words. Printed per layer and row
as attention share / area share: 1 is attention spread evenly, above 1 drawn to that region.
This is what decides whether a layer's Grad-CAM map can pick the referred box
(docs/results.md, grounding section).

    .venv/bin/python benchmarks/grounding_attention.py CHECKPOINT [--split testA] [--refs 200]
"""

import argparse
import collections
import json

import torch

from albef_ray.config import load_config, with_overrides
from albef_ray.data.collate import load_tokenizer
from albef_ray.eval.attention import capture_cross_attention
from albef_ray.eval.examples import iter_examples
from albef_ray.eval.retrieval import as_albef
from albef_ray.objectives.mlm import SpecialTokens
from albef_ray.tasks import build_task

REGIONS = ("target", "other", "background")


def regions(box, proposals, width: int, height: int, grid: int) -> torch.Tensor:
    """(grid * grid,) region index of each patch: 0 the referred box, 1 another box, 2 background."""
    out = torch.full((grid, grid), 2, dtype=torch.long)
    for value, boxes in ((1, [p for p in proposals if list(p)[:4] != list(box)]), (0, [box])):
        for b in boxes:
            x0, y0 = int(b[0] * grid / width), int(b[1] * grid / height)
            x1, y1 = int((b[0] + b[2] - 1) * grid / width), int((b[1] + b[3] - 1) * grid / height)
            patch = out[y0:y1 + 1, x0:x1 + 1]
            patch[patch != 0] = value  # the referred object's patches stay its own
    return out.flatten()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("checkpoint")
    parser.add_argument("--split", default="testA")
    parser.add_argument("--refs", type=int, default=200)
    parser.add_argument("--config", default="experiments/finetune_grounding_synth.yaml")
    parser.add_argument("overrides", nargs="*", help="dotted overrides of the config")
    args = parser.parse_args()
    torch.set_num_threads(1)
    cfg = with_overrides(load_config(args.config, args.overrides), {"model.checkpoint": args.checkpoint})
    tok = load_tokenizer(cfg.data.tokenizer)
    model = as_albef(build_task(cfg, SpecialTokens.from_tokenizer(tok)))
    model.eval()
    mass = collections.defaultdict(lambda: torch.zeros(3, dtype=torch.float64))
    area = collections.defaultdict(lambda: torch.zeros(3, dtype=torch.float64))
    seen = 0
    for batch in iter_examples(cfg.data.shards, args.split, cfg, tok, max_rows=args.refs):
        t, cols = batch.tensors, batch.columns
        ids, mask = t["input_ids"], t["attention_mask"]
        with torch.no_grad():  # the unimodal encoders do not depend on the captured layer: once per batch
            text_hidden, image_tokens = model.encode_text(ids, mask), model.encode_image(t["image"])
        attns = []
        for layer in range(len(model.fusion.layers)):
            with torch.no_grad(), capture_cross_attention(model, layer) as record:
                model.fuse(text_hidden, mask, image_tokens, None)
            attns.append(record.attn.double().mean(1)[..., 1:])  # (B, T, N)
        grid = int(attns[0].shape[-1] ** 0.5)
        for k in range(len(batch.text)):
            where = regions(cols["box"][k], cols["proposals"][k], int(cols["width"][k]), int(cols["height"][k]), grid)
            share = torch.stack([(where == r).double().mean() for r in range(3)])
            rows = ["word" if token not in ("[CLS]", "the") else token
                    for token in tok.convert_ids_to_tokens(ids[k][mask[k].bool()].tolist())]
            for layer, attn in enumerate(attns):
                for q, row in enumerate(rows):
                    mass[(layer, row)] += torch.stack([attn[k, q][where == r].sum() for r in range(3)])
                    area[(layer, row)] += share
        seen += len(batch.text)
    result = {"checkpoint": args.checkpoint, "split": args.split, "refs": seen}
    for (layer, row), m in sorted(mass.items()):
        ratio = m / area[(layer, row)]
        result[f"L{layer} {row}"] = {r: round(float(x), 2) for r, x in zip(REGIONS, ratio)}
    print(json.dumps(result))


if __name__ == "__main__":
    main()
