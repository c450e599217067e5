"""The synthetic dataset's WordPiece tokenizer: a standard Hugging Face directory, small vocab."""

from __future__ import annotations

import re

import pytest

from albef_ray.synth.scenes import lexicon
from albef_ray.synth.benchmark import SynthConfig, build_synth, plan
from albef_ray.data.tokenizer import SPECIAL_TOKENS, load_tokenizer, train_wordpiece
from albef_ray.objectives.mlm import SpecialTokens


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    root = tmp_path_factory.mktemp("tok") / "ds"
    build_synth(root, SynthConfig(seed=0, train=60, val=6, test=6), progress=False)
    return root


def test_auto_tokenizer_loads_it_with_bert_special_tokens(dataset):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(dataset / "tokenizer"))
    assert tokenizer.is_fast and (dataset / "tokenizer" / "vocab.txt").exists()
    assert [tokenizer.convert_tokens_to_ids(t) for t in SPECIAL_TOKENS] == [0, 1, 2, 3, 4]
    special = SpecialTokens.from_tokenizer(tokenizer)
    assert (special.pad, special.unk, special.cls, special.sep, special.mask) == (0, 1, 2, 3, 4)
    assert len(tokenizer) < 1000  # fits albef_tiny's vocabulary
    ids = tokenizer("A Small RED circle")["input_ids"]
    assert ids[0] == special.cls and ids[-1] == special.sep


def test_captions_round_trip_as_whole_words(dataset):
    tokenizer = load_tokenizer(dataset / "tokenizer")
    captions = [
        c
        for images in plan(SynthConfig(seed=5, train=50, val=5, test=5)).splits.values()
        for i in images
        for c in i.captions
    ]
    for text in captions:
        ids = tokenizer(text)["input_ids"]
        tokens = tokenizer.convert_ids_to_tokens(ids)
        assert "[UNK]" not in tokens and not any(t.startswith("##") for t in tokens)
        decoded = tokenizer.decode(ids, skip_special_tokens=True)
        assert re.sub(r" ([,:])", r"\1", decoded) == text


def test_padding_to_the_longest(dataset):
    tokenizer = load_tokenizer(dataset)  # a dataset root finds its own tokenizer
    batch = tokenizer(
        ["a red circle", "a small blue square above a large red star"], padding="longest", return_tensors="pt"
    )
    assert batch["input_ids"].shape == (2, 11) and batch["input_ids"][0, -1].item() == tokenizer.pad_token_id
    assert batch["attention_mask"][0].tolist() == [1] * 5 + [0] * 6


def test_unseen_words_fall_back_to_characters_not_unk(tmp_path):
    tokenizer = train_wordpiece([lexicon()], tmp_path / "tok", vocab_size=300)
    tokens = tokenizer.tokenize("a zebra, 42!")
    assert "[UNK]" not in tokens and tokens[0] == "a"
    assert tokenizer.decode(tokenizer("a zebra")["input_ids"], skip_special_tokens=True) == "a zebra"


def test_a_dataset_without_a_tokenizer_is_named(tmp_path):
    (tmp_path / "manifest.json").write_text('{"schema_version": 1, "splits": {}}')
    with pytest.raises(FileNotFoundError, match="no tokenizer of its own"):
        load_tokenizer(tmp_path)
