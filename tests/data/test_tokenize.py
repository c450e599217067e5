"""Caption tokenisation: the official ALBEF form ``[CLS] text`` by default, ``data.append_sep`` for BERT's."""

import numpy as np
import pytest
import torch

from albef_ray.config import build_config
from albef_ray.data.collate import CaptionCollator, load_tokenizer, tokenize
from albef_ray.objectives.mlm import IGNORE, SpecialTokens, mask_tokens
from albef_ray.synth.tensors import SyntheticSpec, synthetic_batches
from tests.data.shard_fixtures import make_tokenizer

LONG = "a small blue square left of the large green circle"  # 10 words, one token each


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    return load_tokenizer(make_tokenizer(tmp_path_factory.mktemp("tokenizer")))


def test_default_is_cls_then_words_without_sep(tok):
    ids, mask = tokenize(tok, ["a red circle", LONG], 8)
    words = tok.convert_tokens_to_ids(LONG.split())
    assert ids.shape == (2, 8)
    assert ids[0].tolist() == [tok.cls_token_id, *tok.convert_tokens_to_ids(["a", "red", "circle"])] + [tok.pad_token_id] * 4
    assert mask[0].tolist() == [1] * 4 + [0] * 4
    assert ids[1].tolist() == [tok.cls_token_id, *words[:7]]  # max_text_len - 1 words kept
    assert not (ids == tok.sep_token_id).any()


def test_append_sep_gives_berts_form_with_one_word_less(tok):
    ids, mask = tokenize(tok, [LONG], 8, append_sep=True)
    assert ids[0].tolist() == [tok.cls_token_id, *tok.convert_tokens_to_ids(LONG.split()[:6]), tok.sep_token_id]
    assert mask.all()


def test_collator_follows_the_switch(tok, tmp_path):
    rows = {"image": np.zeros((2, 3, 4, 4), dtype=np.uint8), "caption": np.array(["a red circle", LONG], dtype=object)}
    directory = make_tokenizer(tmp_path / "tok")
    plain = CaptionCollator(directory, 25)(rows)
    with_sep = CaptionCollator(directory, 25, append_sep=True)(rows)
    assert (plain["input_ids"][:, 0] == tok.cls_token_id).all()
    assert not (plain["input_ids"] == tok.sep_token_id).any()
    assert plain["attention_mask"].sum(1).tolist() == [4, 11]
    assert (with_sep["input_ids"] == tok.sep_token_id).sum().item() == 2


def test_config_default_and_synthetic_captions():
    cfg = build_config({"model": {"size": "albef_tiny", "vit_init": None, "bert_init": None}})
    assert cfg.data.append_sep is False
    batch = synthetic_batches(cfg, 1)[0]
    spec = SyntheticSpec.from_config(cfg)
    special = SpecialTokens()
    assert (batch["input_ids"][:, 0] == special.cls).all() and not (batch["input_ids"] == special.sep).any()
    assert batch["attention_mask"].sum(1).eq(spec.regions + 1).all()
    cfg = build_config({"model": {"size": "albef_tiny", "vit_init": None, "bert_init": None}, "data": {"append_sep": True}})
    batch = synthetic_batches(cfg, 1)[0]
    assert (batch["input_ids"][:, spec.regions + 1] == special.sep).all()


def test_masking_reaches_the_last_word_when_no_sep_follows():
    special = SpecialTokens()
    ids = torch.tensor([[special.cls, 200, 201, 202, special.pad], [special.cls, 300, 301, 302, 303]])
    masked, labels = mask_tokens(ids, 1000, special, probability=1.0, mask_fraction=1.0, random_fraction=0.0)
    words = (ids != special.cls) & (ids != special.pad)
    assert torch.equal(labels[words], ids[words]) and (labels[~words] == IGNORE).all()
    assert (masked[words] == special.mask).all() and masked[1, -1] == special.mask  # the caption's last token
