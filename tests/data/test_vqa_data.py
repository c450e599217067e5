"""VQA data: the official JSON source, the embedded VQA generator, and a short end-to-end run."""

from __future__ import annotations

import json
import math
import re

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch

from albef_ray.config import build_config
from albef_ray.data.build.sources import source_from_dict
from albef_ray.data.build.vqa import answer_weights
from albef_ray.data.build.writer import write_dataset
from albef_ray.data.manifest import shard_paths
from albef_ray.data.tokenizer import load_tokenizer, train_wordpiece
from albef_ray.synth.scenes import (
    Scene,
    Thing,
    lexicon,
    sample_scene,
)
from albef_ray.synth.tasks import SynthTaskSettings
from albef_ray.synth.vqa import (
    ANSWERS,
    KINDS,
    SYNONYMS,
    annotate,
    build_vqa,
    plan_vqa,
    sample_question,
)

from .samples import image_bytes

# ----------------------------------------------------------------------------- official JSON


def test_answer_weights_follow_the_official_dataset():
    ten = ["yes"] * 7 + ["no"] * 2 + ["maybe"]
    assert answer_weights({"answer": ten, "dataset": "vqa"}) == (["yes", "no", "maybe"], [0.7, 0.2, 0.1])
    assert answer_weights({"answer": "two", "dataset": "vg"}) == (["two"], [0.5])
    assert answer_weights({"answer": "two"}) == (["two"], [0.5])  # no dataset: a string is VG's form
    assert answer_weights({"question": "unlabelled"}) == ([], [])


def test_vqa_json_source_groups_by_image_and_skips_bad_inputs(tmp_path):
    images = tmp_path / "images"
    images.mkdir()
    for i in (1, 3):
        (images / f"img{i}.jpg").write_bytes(image_bytes(i))
    (images / "img2.jpg").write_bytes(b"not an image")
    ann = [
        {"question_id": 10, "question": "What color is it?", "answer": ["red"] * 8 + ["dark red"] * 2,
         "image": "img1.jpg", "dataset": "vqa"},
        {"question_id": 11, "question": "   ", "answer": ["yes"] * 10, "image": "img1.jpg", "dataset": "vqa"},
        {"question_id": 20, "question": "Is it a cat?", "answer": ["no"] * 10, "image": "img2.jpg", "dataset": "vqa"},
        {"question_id": 30, "question": "How many?", "answer": "2", "image": "img3.jpg", "dataset": "vg"},
        {"question_id": 12, "question": "Is it round?", "answer": ["yes"] * 5 + ["no"] * 5, "image": "img1.jpg",
         "dataset": "vqa"},
    ]
    (tmp_path / "vqa_train.json").write_text(json.dumps(ann))
    (tmp_path / "vqa_test.json").write_text(json.dumps([{"question_id": 40, "question": "Why?", "image": "img3.jpg",
                                                          "dataset": "vqa"}]))
    sources = [
        source_from_dict({"name": "vqa_train", "format": "vqa_json", "path": str(tmp_path / "vqa_train.json"),
                          "image_root": str(images), "split": "train"}),
        source_from_dict({"name": "vqa_test", "format": "vqa_json", "path": str(tmp_path / "vqa_test.json"),
                          "image_root": str(images), "split": "test"}),
    ]
    assert sources[0].count() == 3  # candidates: one per image
    manifest = write_dataset(tmp_path / "ds", sources, shuffle_seed=None, progress=False)
    assert manifest["skipped"]["by_reason"] == {"unreadable_image": 1, "empty_caption": 1}
    rows = {r["question_id"]: r for p in shard_paths(tmp_path / "ds", "train") for r in pq.read_table(p).to_pylist()}
    assert sorted(rows) == ["10", "12", "30"]
    assert rows["10"]["answers"] == ["red", "dark red"] and rows["10"]["answer_weights"] == pytest.approx([0.8, 0.2])
    assert rows["12"]["answer_weights"] == pytest.approx([0.5, 0.5])
    assert rows["30"]["answers"] == ["2"] and rows["30"]["answer_weights"] == [0.5]
    assert rows["10"]["image"] == rows["12"]["image"] == image_bytes(1) and rows["10"]["image_id"] == "img1.jpg"
    (test_row,) = [r for p in shard_paths(tmp_path / "ds", "test") for r in pq.read_table(p).to_pylist()]
    assert (test_row["question_id"], test_row["answers"], test_row["caption"]) == ("40", [], "Why?")


# ----------------------------------------------------------------------------- embedded VQA

_PLACES = {"on the left": "first", "at the top": "first", "on the right": "last", "at the bottom": "last",
           "in the middle": "middle"}
_BEFORE = {"left of": True, "above": True, "right of": False, "below": False}


def _resolve(scene: Scene, phrase: str) -> int:
    """Index of the one object a phrase names, read independently of the generator."""
    phrase = phrase.removeprefix("the ")
    if phrase.startswith("object "):
        place = _PLACES[phrase.removeprefix("object ")]
        return {"first": 0, "last": len(scene.things) - 1, "middle": 1}[place]
    words = phrase.removesuffix(" object").split()
    hits = [i for i, t in enumerate(scene.things) if all(w in (t.size, t.colour, t.shape) for w in words)]
    assert len(hits) == 1, f"{phrase!r} names {len(hits)} objects of {scene}"
    return hits[0]


def _answer(scene: Scene, text: str) -> str:
    """The answer a reader of the scene gives (parsing the question's template)."""
    things, n = scene.things, len(scene.things)
    rel = "|".join(_BEFORE)
    if m := re.fullmatch(rf"what (color|shape) is the object ({rel}) (.+)\?", text):
        anchor = _resolve(scene, m.group(3))
        side = [i for i in range(n) if (i < anchor) == _BEFORE[m.group(2)] and i != anchor]
        assert len(side) == 1, text
        return getattr(things[side[0]], "colour" if m.group(1) == "color" else "shape")
    if m := re.fullmatch(r"what (color|shape) is (on the left|on the right|at the top|at the bottom)\?", text):
        return getattr(things[0 if _PLACES[m.group(2)] == "first" else -1], "colour" if m.group(1) == "color" else "shape")
    if m := re.fullmatch(r"what (color|shape|size) is (.+)\?", text):
        field = {"color": "colour"}.get(m.group(1), m.group(1))
        assert field not in m.group(2).split() and getattr(things[_resolve(scene, m.group(2))], field) not in m.group(2)
        return getattr(things[_resolve(scene, m.group(2))], field)
    if text == "how many objects are there?":
        return str(n)
    if m := re.fullmatch(r"how many (\w+) objects are there\?", text):
        return str(sum(t.size == m.group(1) for t in things))
    if m := re.fullmatch(r"how many (\w+)s are there\?", text):
        return str(sum(t.shape == m.group(1) for t in things))
    if m := re.fullmatch(r"is there a (\w+) (\w+)\?", text):
        return "yes" if any((t.colour, t.shape) == m.groups() for t in things) else "no"
    if m := re.fullmatch(rf"is (.+) ({rel}) (.+)\?", text):
        a, b = _resolve(scene, m.group(1)), _resolve(scene, m.group(3))
        return "yes" if (a < b) == _BEFORE[m.group(2)] else "no"
    if m := re.fullmatch(r"is (.+) (\w+)\?", text):
        return "yes" if things[_resolve(scene, m.group(1))].colour == m.group(2) else "no"
    raise AssertionError(f"unknown question form: {text}")


def test_questions_by_hand():
    row = Scene("horizontal", (Thing("small", "red", "circle"), Thing("large", "blue", "circle"),
                               Thing("small", "green", "star")))
    rng = np.random.default_rng(0)
    seen = {}
    for _ in range(300):
        kind = KINDS[int(rng.integers(len(KINDS)))]
        q = sample_question(row, kind, rng)
        seen[q.text] = q.answer
    # Two circles: "the circle" names none alone; the star is the only object right of the large circle.
    assert "what color is the circle?" not in seen
    for text, answer in {"how many objects are there?": "3", "how many circles are there?": "2",
                         "what color is on the right?": "green", "what size is the star?": "small",
                         "what shape is the object right of the large circle?": "star"}.items():
        if text in seen:
            assert seen[text] == answer, text
    column = Scene("vertical", (Thing("large", "white", "square"), Thing("small", "cyan", "triangle")))
    for _ in range(100):
        q = sample_question(column, "spatial", rng)
        assert "left" not in q.text and "right" not in q.text  # a column speaks of above / below
        assert q.answer in {"white", "cyan", "square", "triangle"}


def test_generated_answers_agree_with_the_scene():
    rng = np.random.default_rng(1)
    yes = []
    for _ in range(400):
        scene = sample_scene(rng)
        for kind in KINDS:
            q = sample_question(scene, kind, rng)
            assert q.answer in ANSWERS and _answer(scene, q.text) == q.answer, (scene, q)
            if kind == "yesno":
                yes.append(q.answer == "yes")
    assert 0.45 < np.mean(yes) < 0.55  # the text alone cannot tell yes from no


def test_annotations_weight_the_true_answer_most():
    rng = np.random.default_rng(2)
    for answer in ("small", "red", "3", "yes", "circle"):
        for _ in range(20):
            given, weights = annotate(answer, rng)
            assert given[0] == answer and weights[0] >= 0.6 and math.isclose(sum(weights), 1.0)
            assert set(given) <= set(ANSWERS) and (len(given) == 1 or answer in SYNONYMS or len(given) == 2)


def test_held_out_scenes_and_question_counts():
    settings = SynthTaskSettings(tokenizer_from="unused", train=200, val=30, test=52)
    plan = plan_vqa(settings)
    assert [sum(len(s.questions) for s in plan[k]) for k in ("train", "val", "test")] == [200, 30, 55]
    train = {s.scene for s in plan["train"]}
    held = [s.scene for k in ("val", "test") for s in plan[k]]
    assert not train & set(held) and len(held) == len(set(held))
    assert all(len({q.text for q in s.questions}) == len(s.questions) for k in plan for s in plan[k])


# ----------------------------------------------------------------------------- end to end


@pytest.fixture(scope="module")
def synth_vqa(tmp_path_factory):
    root = tmp_path_factory.mktemp("vqa")
    words = [lexicon(), ("what color shape size is the object how many objects are there yes no little big violet "
                         "light round circles squares triangles stars 0 1 2 3")]
    train_wordpiece(words, root / "caption" / "tokenizer", vocab_size=400)
    settings = SynthTaskSettings(tokenizer_from=str(root / "caption"), train=40, val=10, test=15, image_size=32)
    build_vqa(root / "vqa", settings, progress=False)
    return root / "vqa"


def test_a_few_steps_train_and_evaluation_writes_results(synth_vqa, tmp_path):
    from albef_ray.cli import main
    from albef_ray.eval.examples import iter_examples
    from albef_ray.eval.vqa import evaluate
    from albef_ray.tasks import build_task
    from albef_ray.train.loop import Schedule, train_step
    from albef_ray.train.optim import build_optimizer

    assert json.loads((synth_vqa / "answer_list.json").read_text()) == list(ANSWERS)
    cfg = build_config({
        "task": "vqa", "model": {"size": "albef_tiny", "vit_init": None, "bert_init": None},
        "train": {"batch_size": 8, "num_workers": 1, "use_gpu": False, "precision": "fp32"},
        "data": {"shards": [str(synth_vqa)], "tokenizer": str(synth_vqa / "tokenizer")},
        "optim": {"lr": 1e-3, "warmup_steps": 0}, "vqa": {"k_test": 5}, "eval": {"split": "test", "batch_size": 8},
    })
    tokenizer = load_tokenizer(cfg.data.tokenizer)
    task = build_task(cfg).train()
    optimizer = build_optimizer(task, cfg.optim)
    batches = [b.tensors for b in iter_examples(cfg.data.shards, "train", cfg, tokenizer, batch_size=8)]
    assert batches[0]["answer_ids"].dim() == 3 and batches[0]["answer_weights"].sum() > 0
    losses = [train_step(task, optimizer, b, step, cfg, Schedule(len(batches), len(batches)))["loss"]
              for step, b in enumerate(batches)]
    assert all(math.isfinite(x) for x in losses)

    metrics, results = evaluate(task, cfg.data.shards, cfg, tokenizer, torch.device("cpu"))
    assert metrics["num_questions"] == metrics["num_labelled"] == 15 and 0 <= metrics["vqa_acc"] <= 100
    assert len(results) == 15 and all(r["answer"] in ANSWERS for r in results)
    assert results[0]["question_id"].startswith("test-")

    torch.save({"model": task.state_dict()}, tmp_path / "vqa.pth")
    (tmp_path / "cfg.yaml").write_text(json.dumps({
        "task": "vqa", "model": {"size": "albef_tiny", "vit_init": None, "bert_init": None},
        "train": {"use_gpu": False, "precision": "fp32"},
        "data": {"shards": [str(synth_vqa)], "tokenizer": str(synth_vqa / "tokenizer")},
        "vqa": {"k_test": 5}, "eval": {"split": "test"}, "tracking": {"enabled": False},
    }))
    out = tmp_path / "result.json"
    assert main(["eval", "vqa", "--config", str(tmp_path / "cfg.yaml"), "--checkpoint", str(tmp_path / "vqa.pth"),
                 "--results", str(out), "--out", str(tmp_path / "metrics.json")]) == 0
    assert [r["answer"] for r in json.loads(out.read_text())] == [r["answer"] for r in results]
    assert json.loads((tmp_path / "metrics.json").read_text())["vqa_acc"] == pytest.approx(metrics["vqa_acc"])
