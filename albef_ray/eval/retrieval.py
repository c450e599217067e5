"""Zero-shot image-text retrieval: ITC ranks everything, the ITM head re-ranks each query's top k.

The procedure of the official ``Retrieval.py`` ``evaluation()``, computed differently:

1. Every image and caption is embedded once (batches of ``eval.batch_size``): image tokens
   (N_img, L, Dv), text hidden states (N_txt, T, C), and their ITC features.
2. ``sims = image_feat @ text_feat.T`` (cosine similarities); each image query keeps its
   ``k = eval.k_test`` most similar captions, each caption query its k most similar images.
3. The (image, caption) pairs of both directions are pooled and de-duplicated (a pair in
   both top-k lists is fused once) and scored by :func:`itm_scores`: each image's
   cross-attention keys and values are projected once per fusion layer, the pairs are sorted
   by caption length and fused ``eval.rerank_batch`` per call (padding beyond the call's
   longest caption cut), the captions of one image attend to it together (no copy of its
   keys and values per pair), and the last fusion layer computes only the [CLS] row the ITM
   head reads. The official code instead makes one fusion call of k pairs per query
   (N_img + N_txt calls), projecting a candidate image's keys and values again for every pair.
4. A re-ranked entry scores the ITM "match" logit (``eval.score: itm``, as ALBEF) or that
   plus its ITC similarity (``itm_itc``, as BLIP); ``itc`` skips the re-rank (ITC alone, for
   models or ablations without a trained ITM head). Entries outside a query's top k keep
   their ITC order but are shifted strictly below the query's lowest re-ranked score, so
   the re-rank only reorders the top k (the official code writes -100 there, which ties
   them all).

Eval mode and ``no_grad`` throughout; the model's train/eval mode is restored afterwards.
"""

from __future__ import annotations

import time
from collections.abc import Callable

import torch
from torch import nn

from ..config import AlbefConfig, ConfigError, EvalConfig
from ..data.collate import tokenize
from ..data.transforms import normalize
from ..model.albef import ALBEF
from ..model.text import group_queries
from ..precision import autocast_context
from .metrics import recall_metrics
from .split import RetrievalSplit


def as_albef(model: nn.Module) -> ALBEF:
    """The ALBEF inside a DDP wrapper or a task object (``task.model``)."""
    model = getattr(model, "module", model)
    if not isinstance(model, ALBEF) and isinstance(getattr(model, "model", None), ALBEF):
        model = model.model
    if not isinstance(model, ALBEF):
        raise TypeError(f"expected an ALBEF (or a task holding one), got {type(model).__name__}")
    return model


# ----------------------------------------------------------------------------- embedding


def embed_images(
    model: ALBEF, images: torch.Tensor, batch_size: int, device: torch.device, precision: str = "fp32"
) -> tuple[torch.Tensor, torch.Tensor]:
    """Images (N, 3, R, R), ``uint8`` or normalised float -> tokens (N, L, Dv), ITC features (N, E)."""
    tokens, feats = [], []
    for start in range(0, images.shape[0], batch_size):
        chunk = images[start : start + batch_size]
        chunk = normalize(chunk) if chunk.dtype == torch.uint8 else chunk.float()
        with autocast_context(precision, device):
            t = model.encode_image(chunk.to(device, non_blocking=True))  # (b, L, Dv)
        tokens.append(t)
        feats.append(model.image_features(t.float()))  # heads in fp32: no bf16 ties in the ranking
    return torch.cat(tokens), torch.cat(feats)


def embed_texts(
    model: ALBEF,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    batch_size: int,
    device: torch.device,
    precision: str = "fp32",
) -> tuple[torch.Tensor, torch.Tensor]:
    """Captions (N, T) -> text hidden states (N, T, C), ITC features (N, E)."""
    hidden, feats = [], []
    for start in range(0, input_ids.shape[0], batch_size):
        ids = input_ids[start : start + batch_size].to(device)
        mask = attention_mask[start : start + batch_size].to(device)
        with autocast_context(precision, device):
            h = model.encode_text(ids, mask)  # (b, T, C)
        hidden.append(h)
        feats.append(model.text_features(h.float()))
    return torch.cat(hidden), torch.cat(feats)


# ----------------------------------------------------------------------------- re-ranking


def _itm_logits(model, text_hidden, attention_mask, image_tokens, image_index, precision) -> torch.Tensor:
    with autocast_context(precision, image_tokens.device):
        fused = model.fuse(text_hidden, attention_mask, image_tokens, image_index)  # (b, T, C)
    return model.itm_logits(fused[:, :1].float())[:, 1]  # head in fp32


# Cross-attention keys/values (elements) of one image chunk held at a time: 2^28 is 1 GiB in
# fp32, 50 images of albef_base at 384 px (6 layers x 577 tokens x 1,536).
_KV_BUDGET = 2**28


def _image_chunks(images: torch.Tensor, per_image: int) -> list[torch.Tensor]:
    """Split the sorted distinct images into chunks whose keys/values fit in ``_KV_BUDGET``."""
    size = max(1, _KV_BUDGET // max(per_image, 1))
    return list(images.split(size))


def itm_scores(
    model: ALBEF,
    image_tokens: torch.Tensor,
    text_hidden: torch.Tensor,
    attention_mask: torch.Tensor,
    image_idx: torch.Tensor,
    text_idx: torch.Tensor,
    batch_size: int,
    precision: str = "fp32",
) -> torch.Tensor:
    """ITM "match" logits of the pairs (image_idx[p], text_idx[p]), in any order.

    The pairs are scored chunk of images by chunk (as many as ``_KV_BUDGET`` allows). Each
    image's cross-attention keys/values are projected once, for every fusion layer
    (:meth:`~albef_ray.model.text.FusionEncoder.project_image`); the chunk's pairs are sorted
    by caption length, then image, and fused ``batch_size`` per call with captions cut to the
    call's longest. Within a call the captions of one image attend to it together
    (:func:`~albef_ray.model.text.group_queries`: one copy of its keys/values, not one per
    pair), and the last fusion layer computes [CLS] only, the row the ITM head reads.

    Returns:
        (P,) float32.
    """
    device = image_tokens.device
    fusion = model.fusion
    out = torch.empty(image_idx.shape[0], dtype=torch.float32, device=device)
    # The plan (order, chunks, groups) is made on the host; only indices travel per call.
    image_idx, text_idx = image_idx.cpu(), text_idx.cpu()
    lengths = attention_mask.sum(dim=1).cpu()
    images = torch.unique(image_idx)
    per_image = len(fusion.layers) * image_tokens.shape[1] * 2 * model.arch.text_width
    for chunk in _image_chunks(images, per_image):
        in_chunk = torch.nonzero(torch.isin(image_idx, chunk)).squeeze(1)  # pairs of these images
        local = torch.searchsorted(chunk, image_idx[in_chunk])  # image row within the chunk
        order = torch.argsort(lengths[text_idx[in_chunk]] * chunk.numel() + local, stable=True)
        pairs, local = in_chunk[order], local[order]
        with autocast_context(precision, device):
            image_kv = fusion.project_image(image_tokens[chunk.to(device)])  # per layer (M, L, 2C)
        for start in range(0, pairs.numel(), batch_size):
            rows, img = pairs[start : start + batch_size], local[start : start + batch_size]
            by_image = torch.argsort(img, stable=True)  # the fusion encoder then needs no permutation
            rows, img = rows[by_image], img[by_image]
            txt = text_idx[rows]
            t = int(lengths[txt].max())  # right padding beyond the longest caption changes nothing
            groups = group_queries(img).to(device)
            txt = txt.to(device)
            with autocast_context(precision, device):
                fused = fusion(
                    text_hidden[txt, :t], attention_mask[txt, :t], None,
                    image_kv=image_kv, groups=groups, cls_only=True,
                )  # (b, 1, C)
            out[rows.to(device)] = model.itm_logits(fused.float())[:, 1]  # head in fp32
    return out


def _rerank_batched(model, image_tokens, text_hidden, mask, top_i2t, top_t2i, batch_size, precision):
    n_img, n_txt = image_tokens.shape[0], text_hidden.shape[0]
    k_i2t, k_t2i = top_i2t.shape[1], top_t2i.shape[1]
    keys_i2t = torch.arange(n_img, device=top_i2t.device)[:, None] * n_txt + top_i2t  # (N_img, k)
    keys_t2i = top_t2i * n_txt + torch.arange(n_txt, device=top_t2i.device)[:, None]  # (N_txt, k)
    keys, inverse = torch.unique(torch.cat([keys_i2t.reshape(-1), keys_t2i.reshape(-1)]), return_inverse=True)
    scores = itm_scores(model, image_tokens, text_hidden, mask, keys // n_txt, keys % n_txt, batch_size, precision)
    n_i2t = keys_i2t.numel()
    return scores[inverse[:n_i2t]].view(-1, k_i2t), scores[inverse[n_i2t:]].view(-1, k_t2i)


def _rerank_per_query(model, image_tokens, text_hidden, mask, top_i2t, top_t2i, precision):
    """The official loop: per image query one fusion call of its k captions with the image
    repeated k times, then per caption query one call of the caption repeated with its k
    images; captions keep the split's padding."""
    i2t = torch.stack([
        _itm_logits(model, text_hidden[idx], mask[idx], image_tokens[i].expand(len(idx), -1, -1), None, precision)
        for i, idx in enumerate(top_i2t)
    ])
    t2i = torch.stack([
        _itm_logits(
            model, text_hidden[j].expand(len(idx), -1, -1), mask[j].expand(len(idx), -1), image_tokens[idx], None,
            precision,
        )
        for j, idx in enumerate(top_t2i)
    ])
    return i2t, t2i


def fill_outside_topk(sims: torch.Tensor, top_idx: torch.Tensor, top_scores: torch.Tensor) -> torch.Tensor:
    """Scores of every candidate: the re-ranked ``top_scores`` at ``top_idx``, ITC order elsewhere.

    Args:
        sims: (Q, C) ITC similarities.
        top_idx: (Q, k) re-ranked candidates of each query.
        top_scores: (Q, k) their new scores.

    Returns:
        (Q, C): row q holds ``top_scores[q]`` at ``top_idx[q]``; every other entry is its
        similarity shifted by a per-row constant so that the largest lies 1 below the row's
        lowest re-ranked score (order among them kept, all ranked after the top k).
    """
    top_scores = torch.nan_to_num(top_scores.float(), nan=float("-inf"))
    outside = torch.ones_like(sims, dtype=torch.bool).scatter_(1, top_idx, False)
    highest_outside = sims.masked_fill(~outside, float("-inf")).amax(dim=1)  # (Q,)
    shift = top_scores.amin(dim=1) - 1 - highest_outside
    shift = torch.where(torch.isfinite(shift), shift, torch.zeros_like(shift))  # no outside entries
    return (sims + shift[:, None]).scatter_(1, top_idx, top_scores)


@torch.no_grad()
def retrieval_scores(
    model: nn.Module,
    images: torch.Tensor | RetrievalSplit,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    eval_cfg: EvalConfig,
    device: torch.device | str | None = None,
    precision: str = "fp32",
    per_query: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Score matrices of a split: ITC for everything, ITM (or ITM + ITC) for each query's top k.

    Args:
        model: an ALBEF (or a DDP wrapper / task holding one).
        images: (N_img, 3, R, R) ``uint8`` or normalised float, or a :class:`RetrievalSplit`.
        input_ids, attention_mask: (N_txt, T) tokenised captions, right-padded.
        eval_cfg: ``k_test``, ``score``, ``batch_size``, ``rerank_batch``.
        device: where to compute (default: the model's).
        precision: ``"bf16"`` autocasts the encoders; projections and heads stay fp32.
        per_query: the official loop (one fusion call per query), for reference and benchmarks.

    Returns:
        ``score_i2t`` (N_img, N_txt) and ``score_t2i`` (N_txt, N_img), float32 on ``device``.
    """
    albef = as_albef(model)
    device = torch.device(device) if device is not None else next(albef.parameters()).device
    if isinstance(images, RetrievalSplit):
        images = images.images
    was_training = albef.training
    albef.eval()
    try:
        image_tokens, image_feat = embed_images(albef, images, eval_cfg.batch_size, device, precision)
        text_hidden, text_feat = embed_texts(albef, input_ids, attention_mask, eval_cfg.batch_size, device, precision)
        mask = attention_mask.to(device)
        sims = image_feat @ text_feat.T  # (N_img, N_txt) cosine similarities
        if eval_cfg.score == "itc":  # ITC alone: no fusion pass
            return sims, sims.T.contiguous()
        top_i2t = sims.topk(min(eval_cfg.k_test, sims.shape[1]), dim=1).indices  # (N_img, k)
        top_t2i = sims.T.topk(min(eval_cfg.k_test, sims.shape[0]), dim=1).indices  # (N_txt, k)
        if per_query:
            itm_i2t, itm_t2i = _rerank_per_query(albef, image_tokens, text_hidden, mask, top_i2t, top_t2i, precision)
        else:
            itm_i2t, itm_t2i = _rerank_batched(
                albef, image_tokens, text_hidden, mask, top_i2t, top_t2i, eval_cfg.rerank_batch, precision
            )
        if eval_cfg.score == "itm_itc":
            itm_i2t = itm_i2t + sims.gather(1, top_i2t)
            itm_t2i = itm_t2i + sims.T.gather(1, top_t2i)
        return fill_outside_topk(sims, top_i2t, itm_i2t), fill_outside_topk(sims.T.contiguous(), top_t2i, itm_t2i)
    finally:
        albef.train(was_training)


def evaluate(
    model: nn.Module,
    split: RetrievalSplit,
    tokenizer,
    cfg: AlbefConfig,
    device: torch.device | str | None = None,
    log_fn: Callable[[str], None] | None = None,
) -> dict[str, float]:
    """Recall@1/5/10 of ``model`` on ``split`` (see :func:`~albef_ray.eval.metrics.recall_metrics`).

    Args:
        model: an ALBEF (or a DDP wrapper / task holding one).
        split: from :func:`~albef_ray.eval.split.load_split`.
        tokenizer: a Hugging Face tokenizer (``data.tokenizer``).
        cfg: reads ``eval``, ``data.max_text_len`` and ``train.precision``.
        device: default: the model's.
        log_fn: receives one line with the timing, if given.

    Returns:
        The recall metrics, ``num_images``, ``num_texts`` and ``eval_seconds``.
    """
    albef = as_albef(model)
    if len(tokenizer) > albef.arch.vocab_size:
        raise ConfigError(
            f"data.tokenizer: {len(tokenizer)} tokens, more than the model's vocabulary of {albef.arch.vocab_size}"
        )
    start = time.perf_counter()
    input_ids, attention_mask = tokenize(tokenizer, split.captions, cfg.data.max_text_len, cfg.data.append_sep)
    score_i2t, score_t2i = retrieval_scores(
        albef, split.images, input_ids, attention_mask, cfg.eval, device, cfg.train.precision
    )
    metrics = recall_metrics(score_i2t, score_t2i, split.txt2img.to(score_i2t.device), split.img2txt)
    seconds = time.perf_counter() - start
    if log_fn is not None:
        log_fn(f"retrieval: {split.num_images} images x {split.num_texts} captions in {seconds:.1f} s")
    return {**metrics, "num_images": split.num_images, "num_texts": split.num_texts, "eval_seconds": seconds}
