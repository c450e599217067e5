"""VQA evaluation: rank the answer list per question, write the result file, score VQA accuracy.

* Answers: each question of ``eval.split`` is answered from the fixed answer list
  (``vqa.answer_list``, else ``answer_list.json`` at the root of the evaluated dataset) by
  :func:`~albef_ray.eval.vqa_rank.rank_answers` (``vqa.k_test`` candidates scored in full).
* Result file: the official test-server format, ``[{"question_id": int, "answer": str}, ...]``
  (ids that are not integers stay strings), :func:`write_results`.
* Accuracy on a labelled split: per question ``min(#humans who gave the answer / 3, 1)``, with
  ``vqa.accuracy = leave_one_out`` (default) averaged over the 10 subsets of 9 annotators as the
  official VQA evaluation does (3 matching humans give 0.9, not 1.0). Human counts come from
  the stored answer weights: ``round(weight x vqa.annotators)``. Answers are compared after
  :func:`normalize_answer` (a subset of the official normalisation). Reported in percent.
"""

from __future__ import annotations

import json
import logging
import math
import re
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import torch

from ..config import AlbefConfig, ConfigError
from ..data.collate import tokenize
from ..precision import autocast_context
from .examples import iter_examples
from .vqa_rank import Ranking, rank_answers

log = logging.getLogger(__name__)

ANSWER_LIST = "answer_list.json"
_NUMBERS = {"none": "0", "zero": "0", "one": "1", "two": "2", "three": "3", "four": "4", "five": "5",
            "six": "6", "seven": "7", "eight": "8", "nine": "9", "ten": "10"}
_ARTICLES = {"a", "an", "the"}
_PUNCT = re.compile(r"[;/\[\]\"{}()=+\\_\-><@`,?!*#%^&$|~:]")
_PERIOD = re.compile(r"(?<!\d)\.(?!\d)")


def normalize_answer(text: str) -> str:
    """Lower case, punctuation and articles dropped, number words as digits (``"Two."`` -> ``"2"``).

    A subset of the official VQA evaluation's ``processPunctuation`` / ``processDigitArticle``
    (no contraction table; "1,000" -> "1000" by dropping the comma).
    """
    text = _PERIOD.sub("", _PUNCT.sub(lambda m: "" if m.group() == "," else " ", text.lower().strip()))
    words = [_NUMBERS.get(w, w) for w in text.split() if w not in _ARTICLES]
    return " ".join(words)


def vqa_accuracy(
    prediction: str, answers: Sequence[tuple[str, float]], annotators: int = 10, leave_one_out: bool = True
) -> float:
    """VQA accuracy of one prediction against the human answers.

    Args:
        prediction: the model's answer.
        answers: distinct human answers with their weights (share of the annotators).
        annotators: humans per question; an answer's count is ``round(weight x annotators)``.
        leave_one_out: average ``min(matches / 3, 1)`` over the n subsets of n - 1 annotators
            (official VQA eval; 1, 2, 3 matches of 10 give 0.3, 0.6, 0.9); else ``min(matches / 3, 1)``.

    Returns:
        The accuracy in [0, 1]; NaN when there are no human answers.
    """
    pred = normalize_answer(prediction)
    counts = [(normalize_answer(a), round(w * annotators)) for a, w in answers]
    total = sum(c for _, c in counts)
    if total <= 0:
        return math.nan
    matches = sum(c for a, c in counts if a == pred)
    if not leave_one_out:
        return min(matches / 3.0, 1.0)
    # Leaving out one of the `matches` annotators who agree leaves matches - 1; any other, matches.
    return (matches * min((matches - 1) / 3.0, 1.0) + (total - matches) * min(matches / 3.0, 1.0)) / total


def answer_list_path(cfg: AlbefConfig, paths: Sequence[str]) -> Path:
    """``vqa.answer_list``, else ``answer_list.json`` in the first evaluated dataset that has one."""
    if cfg.vqa.answer_list:
        path = Path(cfg.vqa.answer_list).expanduser()
        if not path.is_file():
            raise ConfigError(f"vqa.answer_list: {path} does not exist")
        return path
    for root in paths:
        if (Path(root) / ANSWER_LIST).is_file():
            return Path(root) / ANSWER_LIST
    raise ConfigError(f"vqa.answer_list: not set and no {ANSWER_LIST} in {', '.join(map(str, paths))}")


def load_answer_list(path: str | Path) -> list[str]:
    """The candidate answers: a JSON list of strings (official ``answer_list.json``)."""
    answers = json.loads(Path(path).read_text(encoding="utf-8"))
    if not isinstance(answers, list) or not answers or not all(isinstance(a, str) for a in answers):
        raise ConfigError(f"vqa.answer_list: {path} is not a non-empty JSON list of strings")
    return answers


def _question_id(text: str) -> int | str:
    return int(text) if text.lstrip("-").isdigit() else text


def write_results(results: list[dict], path: str | Path) -> Path:
    """The result file of the VQA test server: ``[{"question_id": ..., "answer": ...}]``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(results) + "\n", encoding="utf-8")
    return path


def _unwrap(task: torch.nn.Module) -> torch.nn.Module:
    while hasattr(task, "module"):  # DDP
        task = task.module
    return task


@torch.no_grad()
def answer_questions(
    task: torch.nn.Module,
    image: torch.Tensor,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    answer_ids: torch.Tensor,
    answer_mask: torch.Tensor,
    k: int,
    precision: str = "fp32",
) -> Ranking:
    """Rank the answer list for a batch of questions (the task in eval mode, online weights).

    Args:
        task: a :class:`~albef_ray.objectives.vqa.VQATask` (or a DDP wrapper of one).
        image: (B, 3, H, W); input_ids, attention_mask: (B, T) questions.
        answer_ids, answer_mask: (M, A) the tokenised answer list.
        k: candidates scored in full (``vqa.k_test``).
        precision: ``train.precision`` (bf16 autocast where supported).

    Returns:
        :class:`~albef_ray.eval.vqa_rank.Ranking`; ``best`` indexes the answer list.
    """
    task = _unwrap(task)
    with autocast_context(precision, image.device):
        states = task.question_states(task.model, image, input_ids, attention_mask)  # (B, T, C)
        return rank_answers(task.decoder, states, attention_mask, answer_ids, answer_mask, k)


@torch.no_grad()
def evaluate(
    task: torch.nn.Module,
    paths: Sequence[str],
    cfg: AlbefConfig,
    tokenizer,
    device: torch.device | str | None = None,
    split: str | None = None,
    max_rows: int | None = None,
    log_fn: Callable[[str], None] | None = None,
) -> tuple[dict[str, float], list[dict]]:
    """Answer every question of ``split`` (default ``eval.split``) of ``paths``.

    Args:
        task: a :class:`~albef_ray.objectives.vqa.VQATask` (or a DDP wrapper of one).
        paths: dataset roots; the answer list is looked up in them unless ``vqa.answer_list``.
        cfg: reads ``vqa``, ``eval.batch_size``, ``data`` (text limits), ``train.precision``.
        tokenizer: the tokenizer of ``data.tokenizer``.
        device: default: the task's.
        max_rows: answer only the first N questions.
        log_fn: receives one summary line.

    Returns:
        ``(metrics, results)``: ``vqa_acc`` (percent; NaN without labelled questions),
        ``num_questions``, ``num_labelled``, ``num_answers``, ``eval_seconds``; and the result
        entries ``{"question_id", "answer"}`` in row order.
    """
    start = time.perf_counter()
    task = _unwrap(task)
    device = torch.device(device) if device is not None else next(task.parameters()).device
    split = split or cfg.eval.split
    answers = load_answer_list(answer_list_path(cfg, paths))
    answer_ids, answer_mask = (t.to(device) for t in tokenize(tokenizer, answers, cfg.vqa.max_answer_len, append_sep=True))
    was_training = task.training
    task.eval()
    results, scores = [], []
    leave_one_out = cfg.vqa.accuracy == "leave_one_out"
    try:
        for batch in iter_examples(list(paths), split, cfg, tokenizer, cfg.eval.batch_size, max_rows):
            t = {k: v.to(device) for k, v in batch.tensors.items()}
            ranking = answer_questions(task, t["image"], t["input_ids"], t["attention_mask"], answer_ids, answer_mask,
                                       cfg.vqa.k_test, cfg.train.precision)
            for i, (qid, best) in enumerate(zip(batch.question_id, ranking.best.tolist())):
                results.append({"question_id": _question_id(qid), "answer": answers[best]})
                human = batch.answers[i] if batch.answers else []
                if human:
                    scores.append(vqa_accuracy(answers[best], human, cfg.vqa.annotators, leave_one_out))
    finally:
        task.train(was_training)
    scores = [s for s in scores if not math.isnan(s)]
    metrics = {
        "vqa_acc": 100.0 * sum(scores) / len(scores) if scores else math.nan,
        "num_questions": float(len(results)),
        "num_labelled": float(len(scores)),
        "num_answers": float(len(answers)),
        "eval_seconds": time.perf_counter() - start,
    }
    if log_fn is not None:
        log_fn(f"VQA on {split}: {len(results)} questions ({len(scores)} labelled), vqa_acc {metrics['vqa_acc']:.2f}, "
               f"{len(answers)} answers, k_test {cfg.vqa.k_test}, {metrics['eval_seconds']:.1f} s")
    return metrics, results


def load_vqa_task(cfg: AlbefConfig, checkpoint: str | Path | None = None) -> torch.nn.Module:
    """A :class:`~albef_ray.objectives.vqa.VQATask` (no momentum copy) with the checkpoint's weights.

    A pretraining checkpoint gives a decoder copied from its fusion encoder (an untrained VQA
    model); a VQA checkpoint (albef-ray or the official ``vqa.pth``) loads as trained.
    """
    from ..model.loading import build_model_from_config, load_albef_checkpoint
    from ..objectives.vqa import VQATask
    from .checkpoint import resolve_checkpoint

    checkpoint = checkpoint or cfg.model.checkpoint
    model_cfg = cfg.model.model_copy(update={"vit_init": None, "bert_init": None} if checkpoint else {})
    cfg = cfg.model_copy(update={"model": model_cfg, "vqa": cfg.vqa.model_copy(update={"distill": False})})
    task = VQATask(build_model_from_config(cfg), cfg)
    if checkpoint is None:
        log.warning("no checkpoint given: evaluating the model as initialised by model.vit_init / model.bert_init")
        return task
    weights = resolve_checkpoint(checkpoint)
    report = load_albef_checkpoint(task, str(weights))
    momentum = [k for k in report.unused if k.startswith(("momentum.", "momentum_decoder."))]
    if momentum:  # training-only copies: evaluation runs the online model
        report.unused = [k for k in report.unused if k not in momentum]
        report.notes.append(f"{len(momentum)} momentum tensors not needed for evaluation")
    if not report.loaded:
        raise ValueError(f"{weights}: no weight of the checkpoint fits model.size={cfg.model.size}")
    (log.warning if report.missing else log.info)("%s", report)
    return task


def evaluate_checkpoint(
    cfg: AlbefConfig, checkpoint: str | Path | None = None, device: torch.device | str | None = None
) -> tuple[dict[str, float], list[dict]]:
    """VQA of a checkpoint on ``eval.split`` of ``eval.shards`` (else ``data.shards``)."""
    from ..data.collate import load_tokenizer
    from ..precision import resolve_device
    from .checkpoint import eval_paths

    paths = eval_paths(cfg)
    answer_list_path(cfg, paths)  # a config error before the model loads
    device = torch.device(device) if device is not None else resolve_device(cfg)
    task = load_vqa_task(cfg, checkpoint).to(device)
    return evaluate(task, paths, cfg, load_tokenizer(cfg.data.tokenizer), device, log_fn=log.info)


def vqa_metrics(cfg: AlbefConfig, checkpoint: str) -> dict[str, float]:
    """A sweep stage's report: VQA accuracy of ``checkpoint`` on ``eval.split`` (TaskSpec.evaluation)."""
    return evaluate_checkpoint(cfg, checkpoint)[0]


class VQAEvaluator:
    """Epoch-end VQA accuracy of the online model on ``eval.split`` (rank 0 during fine-tuning).

    Args:
        cfg: reads ``eval``, ``vqa``, ``data``.
        device: where the model is.
        tracker: an MLflow :class:`~albef_ray.tracking.MetricLogger`, or None.
    """

    score = "vqa_acc"

    def __init__(self, cfg: AlbefConfig, device: torch.device | str | None = None, tracker=None):
        self.cfg, self.device, self.tracker = cfg, device, tracker
        self._tokenizer = None

    def __call__(self, task: torch.nn.Module, step: int, run: bool = True) -> dict[str, float]:
        """``vqa_acc`` and counts (``vqa_acc`` = NaN when not ``run``), also logged to MLflow at ``step``."""
        if not run:
            return {self.score: math.nan}
        from ..data.collate import load_tokenizer
        from .checkpoint import eval_paths

        if self._tokenizer is None:
            self._tokenizer = load_tokenizer(self.cfg.data.tokenizer)
        metrics, _ = evaluate(task, eval_paths(self.cfg), self.cfg, self._tokenizer, self.device, log_fn=log.info)
        if self.tracker is not None:
            self.tracker.log(metrics, step)
        return {k: float(v) for k, v in metrics.items()}
