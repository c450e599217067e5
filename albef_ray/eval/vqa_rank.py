"""VQA inference: rank a fixed answer list with the answer decoder, batched over questions.

The official procedure (``model_vqa.py`` ``rank_answer``), for each question:

1. run the decoder on ``[CLS]`` alone: p(first token) over the vocabulary;
2. keep the ``k`` answers of the list whose first token is most likely (``k_test`` 128);
3. run the decoder over each of them in full and score it
   ``log p(first token) + sum_t log p(token t | tokens < t)``, where the sum starts at the first
   answer token, so the first token's log-probability is counted twice (as the official does);
4. answer with the best-scoring one.

:func:`rank_answers` computes exactly those scores for a whole batch of questions at once, and
faster than the official layout of the work:

* the decoder's cross-attention key/value of each question are projected once, not once per
  candidate (the official tiles the question states k times);
* ``[CLS]`` is run once per question (step 1) and its per-layer self-attention key/value are
  reused by every candidate (:meth:`~albef_ray.model.decoder.AnswerDecoder.after_start`), where
  the official runs it again in each candidate;
* candidates are grouped by length and each group runs the decoder over its own tokens only
  (the official pads every candidate to the longest answer of the list);
* the vocabulary projection (the largest cost: V x C per position) runs only at positions whose
  next token is part of the answer, and not at position 0, whose prediction is step 1's;
* row chunks bound the memory.

:func:`rank_answers_reference` is the official procedure question by question (tiled states,
full-width candidates, every position projected); ``benchmarks/vqa.py`` times the two and
``tests/unit/test_vqa.py`` checks they choose the same answers. Ties among first-token scores
(answers sharing a first token) are broken by list order in both.

Shapes: N questions, L question tokens, C width, M answers in the list, A their padded length,
k candidates per question, V vocabulary.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F

from ..model.decoder import AnswerDecoder


class Ranking(NamedTuple):
    """Ranked answers of N questions.

    Attributes:
        best: (N,) index into the answer list of each question's answer.
        candidates: (N, k) the answers scored in full, in first-token order.
        scores: (N, k) their log-probability scores (see the module doc).
    """

    best: torch.Tensor
    candidates: torch.Tensor
    scores: torch.Tensor


def first_token_candidates(first_logp: torch.Tensor, first_tokens: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The ``k`` answers with the most likely first token, ties broken by list order.

    Args:
        first_logp: (N, V) log p(first answer token | question).
        first_tokens: (M,) first token of each answer of the list.
        k: candidates per question (at most M).

    Returns:
        (N, k) answer indices and (N, k) their first-token log-probabilities.
    """
    scores = first_logp[:, first_tokens]  # (N, M)
    order = torch.sort(scores, dim=1, descending=True, stable=True).indices[:, :k]  # (N, k)
    return order, scores.gather(1, order)


def _first_token_logp(decoder: AnswerDecoder, start: torch.Tensor, states: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    n = states.shape[0]
    ids = start.reshape(1, 1).expand(n, 1)  # (N, 1): [CLS]
    hidden = decoder(ids, torch.ones_like(ids), states, mask)  # (N, 1, C)
    return F.log_softmax(decoder.logits(hidden[:, 0]).float(), dim=-1)  # (N, V)


def _token_logp(decoder: AnswerDecoder, hidden: torch.Tensor, targets: torch.Tensor, chunk: int) -> torch.Tensor:
    """log p(targets) of (P, C) hidden states, the (P, V) logits made ``chunk`` rows at a time."""
    out = []
    for h, t in zip(hidden.split(chunk), targets.split(chunk)):
        logits = decoder.logits(h).float()  # (p, V)
        out.append(logits.gather(1, t[:, None]).squeeze(1) - torch.logsumexp(logits, dim=1))
    return torch.cat(out) if out else hidden.new_zeros(0)


@torch.no_grad()
def rank_answers(
    decoder: AnswerDecoder,
    question_states: torch.Tensor,
    question_mask: torch.Tensor,
    answer_ids: torch.Tensor,
    answer_mask: torch.Tensor,
    k: int,
    chunk_tokens: int = 8192,
) -> Ranking:
    """Rank the answer list for N questions at once (the official scores, batched).

    Args:
        decoder: the answer decoder (in eval mode for deterministic scores).
        question_states: (N, L, C) fused question states; question_mask: (N, L).
        answer_ids, answer_mask: (M, A) the answer list as ``[CLS] answer [SEP]``, padded.
        k: answers scored in full per question (``vqa.k_test``; at most M are).
        chunk_tokens: decoder and vocabulary-projection work per call, in token positions.

    Returns:
        :class:`Ranking`.
    """
    k = min(k, answer_ids.shape[0])
    cache = decoder.start(int(answer_ids[0, 0]), question_states, question_mask)  # [CLS]: key/value per layer
    first_logp = F.log_softmax(decoder.logits(cache.hidden[:, 0]).float(), dim=-1)  # (N, V)
    candidates, first = first_token_candidates(first_logp, answer_ids[:, 1], k)  # (N, k)
    scores = 2.0 * first  # step 1's term + the sequence's first term (the same prediction)
    lengths = answer_mask.sum(1)[candidates]  # (N, k) tokens incl. [CLS] and [SEP]
    for length in torch.unique(lengths).tolist():
        if length <= 2:  # [CLS] [SEP]: no term after the first
            continue
        qi, ki = (lengths == length).nonzero(as_tuple=True)  # (R,) question and slot of each candidate
        ids = answer_ids[candidates[qi, ki], :length]  # (R, length): no padding inside
        rows = max(1, chunk_tokens // (length - 2))
        for start in range(0, qi.shape[0], rows):
            q, part = qi[start:start + rows], ids[start:start + rows]
            # positions 1..length-2 (position 0 is the cached [CLS]); position t predicts token t + 1
            hidden = decoder.after_start(part[:, 1 : length - 1], cache, question_states, question_mask, q)
            logp = _token_logp(decoder, hidden.reshape(-1, hidden.shape[-1]), part[:, 2:].reshape(-1), chunk_tokens)
            scores[q, ki[start:start + rows]] += logp.view(part.shape[0], length - 2).sum(1)
    best = candidates.gather(1, scores.argmax(1, keepdim=True)).squeeze(1)
    return Ranking(best, candidates, scores)


@torch.no_grad()
def rank_answers_reference(
    decoder: AnswerDecoder,
    question_states: torch.Tensor,
    question_mask: torch.Tensor,
    answer_ids: torch.Tensor,
    answer_mask: torch.Tensor,
    k: int,
    pad_id: int = 0,
) -> Ranking:
    """The official ``rank_answer``, one question at a time (the reference for tests and benchmarks).

    Question states tiled k times, every candidate at the list's full width, the vocabulary
    projected at every position, the sequence loss a masked cross-entropy, as the official.
    """
    k = min(k, answer_ids.shape[0])
    best, cands, all_scores = [], [], []
    for i in range(question_states.shape[0]):
        states, mask = question_states[i : i + 1], question_mask[i : i + 1]
        first_logp = _first_token_logp(decoder, answer_ids[0, 0], states, mask)  # (1, V)
        candidates, first = first_token_candidates(first_logp, answer_ids[:, 1], k)  # (1, k)
        ids, att = answer_ids[candidates[0]], answer_mask[candidates[0]]  # (k, A)
        targets = ids.masked_fill(ids == pad_id, -100)
        hidden = decoder(ids, att, states.repeat(k, 1, 1), mask.repeat(k, 1))  # (k, A, C): tiled states
        logits = decoder.logits(hidden)[:, :-1].float()  # (k, A-1, V)
        loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets[:, 1:].reshape(-1), reduction="none")
        scores = first[0] - loss.view(k, -1).sum(1)  # (k,)
        best.append(candidates[0, scores.argmax()])
        cands.append(candidates[0])
        all_scores.append(scores)
    return Ranking(torch.stack(best), torch.stack(cands), torch.stack(all_scores))
