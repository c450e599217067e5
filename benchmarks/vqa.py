"""VQA answer ranking: the batched ranking vs the official procedure run question by question.

Both rank the same answer list with the same decoder (``albef_base`` widths by default: 6 layers,
width 768, BERT's 30,522-token vocabulary; random weights, which do not change the work) for the
same questions, and must choose the same answers (checked). Timed on this machine:

* ``reference``: :func:`~albef_ray.eval.vqa_rank.rank_answers_reference`, the official
  ``rank_answer`` one question at a time (question states tiled k times, every candidate padded
  to the longest answer of the list, the vocabulary projected at every position);
* ``batched``: :func:`~albef_ray.eval.vqa_rank.rank_answers` over all questions at once.

The answer list is synthetic but shaped like VQA v2's 3,129 answers (``--answers``): word-piece
lengths 1 / 2 / 3 / 4-6 for 60 / 30 / 8 / 2 % of them (most VQA answers are one word: "yes", "2",
"red"; some two or three: "fire hydrant", "black and white"). ``--uniform`` makes every answer
one word piece long, where no padding is saved: the speed-up that is left comes from the shared
cross-attention key/value and the skipped position 0.

    .venv/bin/python benchmarks/vqa.py [--questions 16] [--k 128] [--threads 2] [--uniform] [--size albef_base]

Prints one JSON line.
"""

from __future__ import annotations

import argparse
import json
import platform
import time

import torch

from albef_ray.eval.vqa_rank import rank_answers, rank_answers_reference
from albef_ray.model.decoder import AnswerDecoder
from albef_ray.model.registry import get_arch

LENGTHS = ((1, 0.60), (2, 0.30), (3, 0.08), (4, 0.01), (5, 0.005), (6, 0.005))  # word pieces per answer


def answer_list(m: int, vocab: int, uniform: bool, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """(M, A) ``[CLS] pieces [SEP]`` rows, padded to the longest, as the tokenised answer list."""
    sizes, probs = zip(*LENGTHS)
    pieces = [1] * m if uniform else [sizes[i] for i in torch.multinomial(torch.tensor(probs), m, True, generator=generator)]
    width = max(pieces) + 2
    ids, mask = torch.zeros(m, width, dtype=torch.long), torch.zeros(m, width, dtype=torch.long)
    for i, n in enumerate(pieces):
        ids[i, 0], ids[i, n + 1] = 101, 102
        ids[i, 1 : n + 1] = torch.randint(min(1000, vocab // 2), vocab, (n,), generator=generator)
        mask[i, : n + 2] = 1
    return ids, mask


def timed(fn, repeats: int):
    best, out = float("inf"), None
    for _ in range(repeats):
        start = time.perf_counter()
        out = fn()
        best = min(best, time.perf_counter() - start)
    return best, out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", default="albef_base")
    parser.add_argument("--questions", type=int, default=16)
    parser.add_argument("--question-len", type=int, default=12)
    parser.add_argument("--answers", type=int, default=3129)
    parser.add_argument("--k", type=int, default=128)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--uniform", action="store_true", help="every answer one word piece long")
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    g = torch.Generator().manual_seed(0)
    torch.manual_seed(0)
    arch = get_arch(args.size)
    device = torch.device(args.device)
    decoder = AnswerDecoder(arch).eval().to(device)
    n, t = args.questions, args.question_len
    states = torch.randn(n, t, arch.text_width, generator=g).to(device)
    q_mask = torch.ones(n, t, dtype=torch.long)
    q_mask[::2, t * 2 // 3 :] = 0  # some padded questions
    ids, mask = (x.to(device) for x in answer_list(args.answers, arch.vocab_size, args.uniform, g))
    q_mask = q_mask.to(device)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)

    def run(fn):
        def call():
            out = fn(decoder, states, q_mask, ids, mask, args.k)
            sync()
            return out
        return call

    run(rank_answers)()  # warm-up (allocator, kernels)
    t_ref, ref = timed(run(rank_answers_reference), args.repeats)
    t_fast, fast = timed(run(rank_answers), args.repeats)
    same = torch.equal(ref.best, fast.best)
    print(json.dumps({
        "size": args.size, "device": args.device, "threads": args.threads, "cpu": platform.processor() or platform.machine(),
        "questions": n, "answers": args.answers, "answer_width": ids.shape[1], "k": args.k, "uniform": args.uniform,
        "reference_s_per_question": round(t_ref / n, 4), "batched_s_per_question": round(t_fast / n, 4),
        "speedup": round(t_ref / t_fast, 2), "same_answers": same,
        "max_score_diff": float((ref.scores - fast.scores).abs().max()),
    }))
    if not same:
        raise SystemExit("batched and reference rankings chose different answers")


if __name__ == "__main__":
    main()
