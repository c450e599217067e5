"""Recall@K of image-text retrieval from score matrices (plain PyTorch).

Ties are broken pessimistically: a correct item tied with wrong ones ranks after all of them,
so a model that scores every pair alike gets recall 0 rather than 100 (``argsort`` in the
official ``itm_eval`` breaks ties by position, which rewards whatever order the split has).
With several correct items (the captions of an image), the query's rank is that of its
best-ranked correct item: the number of *wrong* items scored at least as high as the best
correct one. A NaN score counts as the lowest possible.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

RECALL_AT = (1, 5, 10)
ROW_CHUNK = 1024  # query rows per step: bounds the (rows, candidates) masks in memory


def best_ranks(scores: torch.Tensor, positives: torch.Tensor) -> torch.Tensor:
    """0-based rank of each query's best correct candidate, ties pessimistic.

    Args:
        scores: (Q, C) higher is better.
        positives: (Q, C) bool, True where the candidate is correct; every row needs one.

    Returns:
        (Q,) int64: for row q, the number of wrong candidates scored >= its best correct one.
    """
    if not bool(positives.any(dim=1).all()):
        raise ValueError("every query needs at least one correct candidate")
    scores = torch.nan_to_num(scores.float(), nan=float("-inf"))
    best = scores.masked_fill(~positives, float("-inf")).amax(dim=1)  # (Q,)
    return ((scores >= best[:, None]) & ~positives).sum(dim=1)


def _ranks_in_chunks(scores: torch.Tensor, positive_lists: Sequence[Sequence[int]]) -> torch.Tensor:
    ranks = []
    for start in range(0, scores.shape[0], ROW_CHUNK):
        rows = scores[start : start + ROW_CHUNK]
        mask = torch.zeros(rows.shape, dtype=torch.bool, device=rows.device)
        lists = positive_lists[start : start + ROW_CHUNK]
        r = torch.tensor([i for i, pos in enumerate(lists) for _ in pos], dtype=torch.long)
        c = torch.tensor([j for pos in lists for j in pos], dtype=torch.long)
        if c.numel() and (int(c.min()) < 0 or int(c.max()) >= rows.shape[1]):
            raise ValueError(f"a correct index lies outside the {rows.shape[1]} candidates")
        mask[r.to(rows.device), c.to(rows.device)] = True
        ranks.append(best_ranks(rows, mask))
    return torch.cat(ranks) if ranks else torch.zeros(0, dtype=torch.long)


def _recalls(ranks: torch.Tensor, prefix: str) -> dict[str, float]:
    out = {f"{prefix}_r{k}": 100.0 * int((ranks < k).sum()) / max(len(ranks), 1) for k in RECALL_AT}
    out[f"{prefix}_r_mean"] = sum(out[f"{prefix}_r{k}"] for k in RECALL_AT) / len(RECALL_AT)
    return out


def recall_metrics(
    score_i2t: torch.Tensor,
    score_t2i: torch.Tensor,
    txt2img: torch.Tensor | Sequence[int],
    img2txt: Sequence[Sequence[int]],
) -> dict[str, float]:
    """Recall@1/5/10 (percent) of text retrieval (image queries) and image retrieval (text queries).

    Args:
        score_i2t: (N_img, N_txt) score of every caption for each image query.
        score_t2i: (N_txt, N_img) score of every image for each caption query.
        txt2img: (N_txt,) the image each caption belongs to.
        img2txt: for each image, the indices of its captions (at least one each).

    Returns:
        ``txt_r1, txt_r5, txt_r10, txt_r_mean, img_r1, img_r5, img_r10, img_r_mean, r_mean``
        where ``txt_*`` is text retrieval (an image finds its captions; a hit is its
        best-ranked caption within K) and ``r_mean`` is the mean of the two means, as in
        the official ``itm_eval``.
    """
    n_img, n_txt = score_i2t.shape
    txt2img = torch.as_tensor(txt2img, dtype=torch.long).reshape(-1)
    if tuple(score_t2i.shape) != (n_txt, n_img):
        raise ValueError(f"score_t2i is {tuple(score_t2i.shape)}, expected {(n_txt, n_img)}")
    if len(txt2img) != n_txt or len(img2txt) != n_img:
        raise ValueError(f"txt2img has {len(txt2img)} entries and img2txt {len(img2txt)}; need {n_txt} and {n_img}")
    txt_ranks = _ranks_in_chunks(score_i2t, img2txt)
    img_ranks = _ranks_in_chunks(score_t2i, [[int(i)] for i in txt2img])
    out = {**_recalls(txt_ranks, "txt"), **_recalls(img_ranks, "img")}
    out["r_mean"] = (out["txt_r_mean"] + out["img_r_mean"]) / 2
    return out
