"""Tokenisation and batch collation: a numpy batch of rows -> a dict of tensors (no Ray).

The collated batch holds tensors only, so a Ray iterator can move it to the device whole::

    image           float32 (B, 3, R, R)   normalised (uint8 input is normalised here)
    input_ids       int64   (B, T)         [CLS] caption [PAD]..., T = longest <= max_text_len
                                           (official ALBEF form; ``append_sep``: [CLS] caption [SEP])
    attention_mask  int64   (B, T)
    num_dropped     int64   ()             rows of this batch whose image failed to decode
    image_idx       int64   (B,)           only when the input has it: the image index of each
                                           row (equal for captions of one image; retrieval)

Downstream-task columns, only when the input has them (:data:`~albef_ray.data.schema.TASK_FIELDS`)::

    label           int64   (B,)           class index (SNLI-VE, NLVR2)
    image2          float32 (B, 3, R, R)   NLVR2's second image, normalised
    answer_ids      int64   (B, K, A)      VQA: each question's K answers (padded), [CLS] answer [SEP]
    answer_mask     int64   (B, K, A)      0 on padding (a padded answer is all 0)
    answer_weights  float32 (B, K)         each answer's weight; 0 for padded answers

Captions arrive as text (``caption``, tokenised here) or already tokenised by the decode
task (:func:`pretokenize`: ``input_ids`` padded to ``max_text_len`` and ``num_tokens``; here
they are cut to the batch's longest, which is what tokenising the batch gives). With
``normalized=False`` ``image`` stays ``uint8`` (B, 3, R, R), to be normalised where it is used
(:func:`~albef_ray.data.transforms.normalize` on the GPU).

``num_dropped`` adds up two sources: rows flagged ``valid == False`` in the input batch (removed
here), and a ``num_dropped`` column already counted upstream (the Ray pipeline drops
undecodable rows before batching so that training batches stay full; see
:func:`albef_ray.data.transforms.transform_batch`).
"""

from __future__ import annotations

import warnings
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import torch

from .tokenizer import load_tokenizer  # noqa: F401  (hub name, tokenizer dir or dataset root)
from .transforms import normalize, pre_caption


def tokenize(
    tokenizer, captions: Sequence[str], max_text_len: int, append_sep: bool = False
) -> tuple[torch.Tensor, torch.Tensor]:
    """Tokenise captions as the official ALBEF tokenizer does: ``[CLS] caption``, padded to the longest.

    The official code's ``BertTokenizer`` builds ``[CLS] X`` for a single text (no [SEP]), so a
    caption keeps ``max_text_len - 1`` word pieces; the released weights were trained so.
    ``append_sep`` (``data.append_sep``) gives BERT's ``[CLS] X [SEP]`` instead.

    Returns:
        ``input_ids`` and ``attention_mask``, int64 (B, T) with T <= ``max_text_len``.
    """
    if not captions:
        empty = torch.zeros((0, 0), dtype=torch.int64)
        return empty, empty.clone()
    room = max_text_len - 1 - int(append_sep)
    if room < 1:
        raise ValueError(f"max_text_len {max_text_len} leaves no room for words")
    pieces = tokenizer(list(captions), add_special_tokens=False, truncation=True, max_length=room)["input_ids"]
    tail = [tokenizer.sep_token_id] if append_sep else []
    rows = [[tokenizer.cls_token_id, *ids, *tail] for ids in pieces]
    width = max(len(r) for r in rows)
    input_ids = torch.full((len(rows), width), tokenizer.pad_token_id, dtype=torch.int64)
    attention_mask = torch.zeros((len(rows), width), dtype=torch.int64)
    for i, row in enumerate(rows):
        input_ids[i, : len(row)] = torch.tensor(row, dtype=torch.int64)
        attention_mask[i, : len(row)] = 1
    return input_ids, attention_mask


def pretokenize(
    tokenizer, captions: Sequence[str], max_text_len: int, append_sep: bool = False
) -> tuple[np.ndarray, np.ndarray]:
    """:func:`tokenize` per row, for a decode task: ids padded to ``max_text_len``, and lengths.

    :func:`collate_batch` cuts a batch of such rows to its longest (:func:`trim_tokens`), which
    gives exactly :func:`tokenize` of the batch's captions.

    Returns:
        ``input_ids`` int32 (N, max_text_len) (pad id after each row's tokens) and
        ``num_tokens`` int32 (N,).
    """
    ids, mask = tokenize(tokenizer, captions, max_text_len, append_sep)
    full = np.full((len(captions), max_text_len), tokenizer.pad_token_id, dtype=np.int32)
    full[:, : ids.shape[1]] = ids.numpy()
    return full, mask.sum(1).numpy().astype(np.int32)


def trim_tokens(input_ids: np.ndarray, num_tokens: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
    """Rows of :func:`pretokenize` -> ``input_ids``, ``attention_mask`` int64 (B, T), T = the longest."""
    lengths = np.asarray(num_tokens, dtype=np.int64)
    width = int(lengths.max()) if len(lengths) else 0
    ids = torch.from_numpy(np.asarray(input_ids)[:, :width].astype(np.int64))
    mask = torch.from_numpy((np.arange(width) < lengths[:, None]).astype(np.int64))
    return ids, mask


def _images_to_tensor(images: np.ndarray, normalized: bool = True) -> torch.Tensor:
    images = np.ascontiguousarray(images)
    if images.dtype != np.uint8:  # already normalised (e.g. by pretrain_transform): a writable copy
        return torch.tensor(images, dtype=torch.float32)
    with warnings.catch_warnings():  # Ray hands out read-only arrays; normalize only reads it
        warnings.filterwarnings("ignore", "The given NumPy array is not writable")
        return normalize(torch.from_numpy(images)) if normalized else torch.from_numpy(images.copy())


def collate_batch(
    batch: Mapping[str, np.ndarray],
    tokenizer,
    max_text_len: int,
    max_words: int | None = None,
    append_sep: bool = False,
    normalized: bool = True,
) -> dict[str, torch.Tensor]:
    """Turn a numpy batch into model inputs, dropping and counting invalid rows.

    Args:
        batch: ``image`` (N, 3, R, R) uint8 or float32, and ``caption`` (N,) strings or
            :func:`pretokenize`'s ``input_ids`` and ``num_tokens``; optional ``valid`` (N,)
            bool (False rows are dropped and counted) and ``num_dropped`` (N,) int (counts
            from upstream, summed).
        tokenizer: a Hugging Face fast tokenizer.
        max_text_len: token limit.
        max_words: clean captions with :func:`pre_caption` at this word limit first;
            ``None`` when they were cleaned upstream.
        append_sep: end captions with [SEP] (see :func:`tokenize`).
        normalized: normalise uint8 images to float32 here; False: ``image`` (and
            ``image2``) stay uint8 for the caller to normalise (on its device).

    Returns:
        ``image``, ``input_ids``, ``attention_mask``, ``num_dropped``, and ``image_idx`` when
        the batch has that column (see the module doc).
    """
    images = batch["image"]
    pretokenized = "input_ids" in batch
    captions = (batch["input_ids"], batch["num_tokens"]) if pretokenized else batch["caption"]
    image_idx = np.asarray(batch["image_idx"], dtype=np.int64) if "image_idx" in batch else None
    task = {k: batch[k] for k in ("label", "image2", "answers", "answer_weights") if k in batch}
    dropped = int(np.asarray(batch["num_dropped"]).sum()) if "num_dropped" in batch else 0
    if "valid" in batch:
        valid = np.asarray(batch["valid"], dtype=bool)
        dropped += int((~valid).sum())
        images = images[valid]
        captions = tuple(np.asarray(c)[valid] for c in captions) if pretokenized else np.asarray(captions, dtype=object)[valid]
        image_idx = None if image_idx is None else image_idx[valid]
        task = {k: np.asarray(v)[valid] for k, v in task.items()}
    if pretokenized:
        input_ids, attention_mask = trim_tokens(*captions)
    else:
        texts = [str(c) for c in captions]
        if max_words is not None:
            texts = [pre_caption(c, max_words) for c in texts]
        input_ids, attention_mask = tokenize(tokenizer, texts, max_text_len, append_sep)
    out = {
        "image": _images_to_tensor(images, normalized),
        "input_ids": input_ids,
        "attention_mask": attention_mask,
        "num_dropped": torch.tensor(dropped, dtype=torch.int64),
    }
    if image_idx is not None:
        out["image_idx"] = torch.from_numpy(image_idx.copy())
    if "label" in task:
        out["label"] = torch.as_tensor(np.asarray(task["label"], dtype=np.int64))
    if "image2" in task:
        out["image2"] = _images_to_tensor(task["image2"], normalized)
    if "answers" in task:
        weights = task.get("answer_weights")
        out.update(tokenize_answers(tokenizer, list(task["answers"]), None if weights is None else list(weights)))
    return out


def tokenize_answers(
    tokenizer, answers: Sequence[Sequence[str]], weights: Sequence[Sequence[float]] | None = None, max_len: int = 10
) -> dict[str, torch.Tensor]:
    """Each question's candidate answers as ``[CLS] answer [SEP]`` (the decoder's targets), padded.

    Args:
        answers: per question, its distinct answers (K_i of them).
        weights: per question, one weight per answer; None: equal weights 1 / K_i.
        max_len: token limit of an answer, [CLS] and [SEP] included.

    Returns:
        ``answer_ids``, ``answer_mask`` int64 (B, K, A) and ``answer_weights`` float32 (B, K),
        K = max K_i, A = the longest answer; padded answers are all 0 with weight 0.
    """
    b = len(answers)
    k = max((len(a) for a in answers), default=0)
    flat = [str(x) for a in answers for x in a]
    ids, mask = tokenize(tokenizer, flat, max_len, append_sep=True) if flat else (torch.zeros((0, 1), dtype=torch.int64),) * 2
    width = ids.shape[1] if flat else 1
    answer_ids = torch.zeros((b, max(k, 1), width), dtype=torch.int64)
    answer_mask = torch.zeros_like(answer_ids)
    answer_weights = torch.zeros((b, max(k, 1)), dtype=torch.float32)
    at = 0
    for i, row in enumerate(answers):
        n = len(row)
        answer_ids[i, :n] = ids[at:at + n]
        answer_mask[i, :n] = mask[at:at + n]
        given = None if weights is None else weights[i]
        answer_weights[i, :n] = torch.tensor(list(given) if given is not None else [1.0 / max(n, 1)] * n, dtype=torch.float32)
        at += n
    return {"answer_ids": answer_ids, "answer_mask": answer_mask, "answer_weights": answer_weights}


class CaptionCollator:
    """A picklable collate that loads its tokenizer on first use (in the process that collates).

    Args:
        tokenizer: ``data.tokenizer``, a hub name or a local directory.
        max_text_len: token limit.
        max_words: see :func:`collate_batch`.
        append_sep: ``data.append_sep``, see :func:`tokenize`.
        normalized: see :func:`collate_batch`.
    """

    def __init__(
        self, tokenizer: str, max_text_len: int = 25, max_words: int | None = None, append_sep: bool = False,
        normalized: bool = True,
    ):
        self.tokenizer_name = tokenizer
        self.max_text_len = max_text_len
        self.max_words = max_words
        self.append_sep = append_sep
        self.normalized = normalized
        self._tokenizer: Any = None

    @property
    def tokenizer(self):
        if self._tokenizer is None:
            self._tokenizer = load_tokenizer(self.tokenizer_name)
        return self._tokenizer

    def __getstate__(self) -> dict[str, Any]:
        # Ship the name, not the loaded vocabulary: each worker loads its own copy.
        return {**self.__dict__, "_tokenizer": None}

    def __call__(self, batch: Mapping[str, np.ndarray]) -> dict[str, torch.Tensor]:
        # A pre-tokenised batch needs no tokenizer: none is loaded where only such batches arrive.
        tokenizer = None if "input_ids" in batch and "answers" not in batch else self.tokenizer
        return collate_batch(batch, tokenizer, self.max_text_len, self.max_words, self.append_sep, self.normalized)
