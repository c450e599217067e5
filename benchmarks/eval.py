"""Time of zero-shot retrieval evaluation: batched ITM re-rank versus the official per-query loop.

N images x 5N captions, random weights and inputs (the cost does not depend on what the model
has learned, only the overlap of the two directions' top-k lists does: see --overlap).
Both paths share the embedding pass and the ITC ranking; they differ in the re-rank:

* per-query (official ``evaluation()``): one fusion call of k pairs per image query, then
  one per caption query: N + 5N calls, the same pair fused again when it is in both lists;
* batched (:func:`albef_ray.eval.retrieval_scores`): the pairs of both directions pooled and
  de-duplicated; each image's cross-attention keys/values projected once per fusion layer;
  pairs sorted by caption length, ``--rerank-batch`` per call, the captions of one image
  attending to it together (one copy of its keys/values), the last fusion layer on [CLS] only.

Usage::

    python benchmarks/eval.py                                    # albef_tiny, N=200, k=128
    python benchmarks/eval.py --size albef_base --image-res 384 --images 16 --k 8   # ALBEF's eval resolution
    python benchmarks/eval.py --size albef_base --image-res 384 --images 1000 --k 128 \
        --device cuda --precision bf16 --json results.json

Prints the seconds of each path (best of --repeat), the speed-up, the number of fusion calls
and pairs, and the largest difference between the two score matrices; the last line is
``RESULT {json}`` (the same figures ``--json PATH`` writes). ``--skip-loop`` times the batched
path alone (large N on a slow device).
"""

from __future__ import annotations

import argparse
import json
import time


def _inputs(arch, n_img: int, n_txt: int, max_len: int, seed: int = 0):
    import torch

    g = torch.Generator().manual_seed(seed)
    images = torch.randint(0, 256, (n_img, 3, arch.image_res, arch.image_res), dtype=torch.uint8, generator=g)
    lengths = torch.randint(8, max_len + 1, (n_txt,), generator=g)  # [CLS] words [SEP], right-padded
    ids = torch.randint(5, arch.vocab_size, (n_txt, max_len), generator=g)
    positions = torch.arange(max_len)[None]
    mask = (positions < lengths[:, None]).long()
    ids = ids * mask
    ids[:, 0] = 2
    ids[torch.arange(n_txt), lengths - 1] = 3
    return images, ids, mask


def _pooled_pairs(model, images, ids, mask, cfg, device, precision) -> int:
    """Distinct (image, caption) pairs in the union of both directions' top-k lists."""
    import torch

    from albef_ray.eval.retrieval import embed_images, embed_texts

    with torch.no_grad():
        _, image_feat = embed_images(model, images, cfg.batch_size, device, precision)
        _, text_feat = embed_texts(model, ids, mask, cfg.batch_size, device, precision)
    sims = image_feat @ text_feat.T
    n_txt = sims.shape[1]
    top_i2t = sims.topk(min(cfg.k_test, n_txt), dim=1).indices
    top_t2i = sims.T.topk(min(cfg.k_test, sims.shape[0]), dim=1).indices
    keys_i2t = torch.arange(sims.shape[0], device=sims.device)[:, None] * n_txt + top_i2t
    keys_t2i = top_t2i * n_txt + torch.arange(n_txt, device=sims.device)[:, None]
    return int(torch.unique(torch.cat([keys_i2t.reshape(-1), keys_t2i.reshape(-1)])).numel())


def _timed(fn, repeat: int, sync) -> tuple[float, object]:
    best, out = float("inf"), None
    for _ in range(repeat):
        sync()
        start = time.perf_counter()
        out = fn()
        sync()
        best = min(best, time.perf_counter() - start)
    return best, out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--size", default="albef_tiny")
    parser.add_argument("--image-res", type=int, help="input resolution (default: the size's; ALBEF evaluates at 384)")
    parser.add_argument("--images", type=int, default=200, help="N: images (captions: 5N)")
    parser.add_argument("--captions", type=int, default=5, help="captions per image")
    parser.add_argument("--k", type=int, default=128, help="eval.k_test")
    parser.add_argument("--rerank-batch", type=int, default=256, help="eval.rerank_batch")
    parser.add_argument("--batch", type=int, default=64, help="eval.batch_size (embedding)")
    parser.add_argument("--text-len", type=int, default=30, help="longest caption in tokens")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--precision", default="fp32", choices=("fp32", "bf16"))
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeat", type=int, default=2)
    parser.add_argument("--skip-loop", action="store_true", help="do not run the per-query loop")
    parser.add_argument("--json", metavar="PATH", help="also write the figures to PATH as JSON")
    args = parser.parse_args()

    import torch

    from albef_ray.config import EvalConfig
    from albef_ray.eval import retrieval_scores
    from albef_ray.model.albef import build_model

    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    device = torch.device(args.device)
    model = build_model(args.size, args.image_res).to(device).eval()
    n_txt = args.images * args.captions
    images, ids, mask = _inputs(model.arch, args.images, n_txt, args.text_len)
    cfg = EvalConfig(k_test=args.k, batch_size=args.batch, rerank_batch=args.rerank_batch)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)

    def run(per_query: bool):
        return retrieval_scores(model, images, ids, mask, cfg, device, args.precision, per_query=per_query)

    run(False)  # warm-up (allocator, kernels)
    t_batched, batched = _timed(lambda: run(False), args.repeat, sync)
    t_loop, loop = _timed(lambda: run(True), args.repeat, sync) if not args.skip_loop else (None, None)
    embed_only = EvalConfig(k_test=1, batch_size=args.batch, rerank_batch=args.rerank_batch)
    t_embed, _ = _timed(
        lambda: retrieval_scores(model, images, ids, mask, embed_only, device, args.precision), args.repeat, sync
    )
    k_img, k_txt = min(args.k, n_txt), min(args.k, args.images)
    pairs = args.images * k_img + n_txt * k_txt
    unique = _pooled_pairs(model, images, ids, mask, cfg, device, args.precision)
    diff = None if loop is None else max(float((a - b).abs().max()) for a, b in zip(batched, loop))
    rerank_batched = max(t_batched - t_embed, 1e-9)
    print(
        f"{args.size} @ {model.arch.image_res} px, {args.device} {args.precision} threads={args.threads}: N={args.images} images x "
        f"{n_txt} captions, k_test={args.k}, rerank_batch={args.rerank_batch}"
    )
    print(f"  embedding + ITC (k=1 run)  {t_embed:8.2f} s")
    if t_loop is not None:
        print(f"  per-query loop (official)  {t_loop:8.2f} s   {args.images + n_txt} fusion calls, {pairs} pairs")
    print(f"  batched re-rank            {t_batched:8.2f} s   {unique} distinct pairs, {args.rerank_batch} per call")
    if t_loop is not None:
        print(f"  speed-up                   {t_loop / t_batched:8.2f} x   (re-rank only: "
              f"{(t_loop - t_embed) / rerank_batched:.2f} x)")
        print(f"  max |batched - per-query| score difference: {diff:.2e}")
    result = {
        "size": args.size, "image_res": model.arch.image_res, "device": args.device, "precision": args.precision,
        "threads": args.threads, "images": args.images, "captions": n_txt, "k_test": args.k,
        "rerank_batch": args.rerank_batch, "pairs_per_query": pairs, "pairs_distinct": unique,
        "embed_s": t_embed, "batched_s": t_batched, "rerank_batched_s": rerank_batched,
        "batched_pairs_per_s": unique / rerank_batched, "per_query_s": t_loop,
        "rerank_per_query_s": None if t_loop is None else t_loop - t_embed,
        "speedup": None if t_loop is None else t_loop / t_batched,
        "speedup_rerank": None if t_loop is None else (t_loop - t_embed) / rerank_batched,
        "max_abs_diff": diff,
    }
    print("RESULT " + json.dumps(result))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=1)


if __name__ == "__main__":
    main()
