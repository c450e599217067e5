"""Downstream-task datasets: task columns survive build (shuffled or not), stream, collate and
the evaluation reader; a bad second image is skipped and counted like a bad first one."""

from __future__ import annotations

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch

from albef_ray.config import build_config
from albef_ray.data.build.candidates import Candidate, IterableSource
from albef_ray.data.build.writer import write_dataset
from albef_ray.data.collate import collate_batch, tokenize_answers
from albef_ray.data.manifest import shard_paths
from albef_ray.data.stream import EpochOrder, file_row_counts, iter_window, task_columns_of
from albef_ray.data.transforms import AugmentSpec
from albef_ray.eval.examples import iter_examples
from albef_ray.train.loop import batch_keys

from albef_ray.data.tokenizer import load_tokenizer

from .samples import image_bytes
from .shard_fixtures import make_tokenizer


@pytest.fixture(scope="module")
def tiny_tokenizer(tmp_path_factory):
    return load_tokenizer(make_tokenizer(tmp_path_factory.mktemp("tokenizer")))


def _pairs(bad_second: int | None = None):
    """NLVR2-like: 6 image pairs, one statement each, labels alternating; VQA-like fields too."""

    def candidates():
        for i in range(6):
            second = b"not an image" if i == bad_second else image_bytes(100 + i, size=(8, 8))
            text = {"text": f"statement {i}", "label": i % 2, "question_id": f"q{i}",
                    "answers": ["yes", "two"][: 1 + i % 2], "answer_weights": [1.0, 0.5][: 1 + i % 2]}
            yield Candidate("nlvr", f"pair{i}", f"left{i}", [text], image=image_bytes(i, size=(8, 8)),
                            image2=second, image_id2=f"right{i}")

    return IterableSource("nlvr", candidates, split="test", description="pairs")


@pytest.mark.parametrize("shuffle_seed", [None, 0])
def test_task_columns_are_written_and_a_bad_second_image_is_skipped(tmp_path, shuffle_seed):
    manifest = write_dataset(tmp_path / "ds", [_pairs(bad_second=3)], shuffle_seed=shuffle_seed, progress=False)
    rows = [r for p in shard_paths(tmp_path / "ds", "test") for r in pq.read_table(p).to_pylist()]
    assert sorted(r["caption"] for r in rows) == [f"statement {i}" for i in (0, 1, 2, 4, 5)]
    for r in rows:
        i = int(r["caption"].split()[-1])
        assert (r["label"], r["question_id"], r["image_id2"]) == (i % 2, f"q{i}", f"right{i}")
        assert r["answers"] == ["yes", "two"][: 1 + i % 2] and r["image2"] == image_bytes(100 + i, size=(8, 8))
    assert manifest["skipped"]["by_reason"] == {"unreadable_image": 1}


def test_stream_collate_and_evaluation_reader_carry_the_task_columns(tmp_path, tiny_tokenizer):
    write_dataset(tmp_path / "ds", [_pairs()], shuffle_seed=None, progress=False)
    files = shard_paths(tmp_path / "ds", "test")
    assert task_columns_of(files[0]) == ("label", "question_id", "answers", "answer_weights", "image2", "image_id2")
    order = EpochOrder(tuple(files), tuple(file_row_counts(files)), 0, block_rows=8, task_columns=task_columns_of(files[0]))
    spec = AugmentSpec(image_res=16, crop_scale=(1.0, 1.0), flip_prob=0.0, randaug_ops=0)
    (window,) = order.windows(0)
    rows = next(iter_window(order, 0, window, spec, max_words=30))
    assert rows["image2"].shape == rows["image"].shape == (6, 3, 16, 16)
    assert not np.array_equal(rows["image2"], rows["image"])
    labels = {c: lab for c, lab in zip(rows["caption"], rows["label"])}
    assert labels == {f"statement {i}": i % 2 for i in range(6)}

    batch = collate_batch(rows, tiny_tokenizer, max_text_len=12)
    assert batch["label"].dtype == torch.int64 and batch["image2"].dtype == torch.float32
    assert batch["answer_ids"].shape[:2] == (6, 2) and batch["answer_weights"].shape == (6, 2)
    for k, caption in enumerate(rows["caption"]):
        i = int(caption.split()[-1])
        assert batch["answer_weights"][k].tolist() == ([1.0, 0.5] if i % 2 else [1.0, 0.0])
        if not i % 2:  # one answer: the second is padding
            assert batch["answer_mask"][k, 1].sum() == 0 and batch["answer_ids"][k, 1].sum() == 0

    cfg = build_config({"model": {"size": "albef_tiny"}, "data": {"max_text_len": 12}})
    got = list(iter_examples([str(tmp_path / "ds")], "test", cfg, tiny_tokenizer, batch_size=4))
    assert [len(b.question_id) for b in got] == [4, 2]
    assert [q for b in got for q in b.question_id] == [f"q{i}" for i in range(6)]
    assert torch.cat([b.tensors["label"] for b in got]).tolist() == [i % 2 for i in range(6)]
    assert got[0].answers[1] == [("yes", 1.0), ("two", 0.5)]


def test_answers_are_cls_answer_sep_padded_with_zero_weight(tiny_tokenizer):
    out = tokenize_answers(tiny_tokenizer, [["yes"], ["two", "red"]], None)
    ids, mask, weights = out["answer_ids"], out["answer_mask"], out["answer_weights"]
    assert ids.shape[:2] == (2, 2) and weights.tolist() == [[1.0, 0.0], [0.5, 0.5]]
    assert ids[0, 0, 0] == tiny_tokenizer.cls_token_id and mask[0, 1].sum() == 0
    last = mask[1, 0].sum() - 1
    assert ids[1, 0, last] == tiny_tokenizer.sep_token_id


def test_a_task_names_its_batch_keys():
    class VE(torch.nn.Module):
        batch_keys = ("label",)

    assert batch_keys(VE()) == ("label",)
    assert batch_keys(torch.nn.Module()) == ("image_idx",)
