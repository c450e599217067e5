"""Tokenizers: a small WordPiece vocabulary for the synthetic captions, and loading by name or path.

:func:`train_wordpiece` trains a BERT-style WordPiece tokenizer (lower-casing, BERT
pre-tokenisation, ``[CLS] text [SEP]`` as BERT's template) with the ``tokenizers`` library and
saves it as a standard Hugging Face tokenizer directory, which
``transformers.AutoTokenizer.from_pretrained`` loads. Captions for the model are built by
:func:`albef_ray.data.collate.tokenize` (``[CLS] text``, the official ALBEF form), not by the
template. Its special tokens come first: ``[PAD]`` = 0, ``[UNK]`` = 1, ``[CLS]`` = 2, ``[SEP]`` = 3,
``[MASK]`` = 4; these differ from bert-base-uncased's ids, so build the MLM's special ids
with ``SpecialTokens.from_tokenizer(tokenizer)`` rather than its defaults.
"""

from __future__ import annotations

import os
import string
from collections.abc import Iterable
from pathlib import Path
from typing import TYPE_CHECKING

from .manifest import tokenizer_dir
from .schema import MANIFEST

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

SPECIAL_TOKENS = ("[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]")  # ids 0..4 in this order
DEFAULT_VOCAB_SIZE = 512  # albef_tiny's embedding table has 1000 rows
# Every printable ASCII character is in the vocabulary (lower-case letters and digits also as
# "##" continuations), so an unseen ASCII word splits into pieces instead of becoming [UNK].
ALPHABET = list(string.ascii_lowercase + string.digits + string.punctuation)


def train_wordpiece(
    texts: Iterable[str],
    out_dir: str | os.PathLike,
    vocab_size: int = DEFAULT_VOCAB_SIZE,
    min_frequency: int = 1,
    model_max_length: int = 512,
) -> PreTrainedTokenizerBase:
    """Trains a lower-casing BERT-style WordPiece tokenizer and saves it to ``out_dir``.

    Args:
        texts: training text (captions).
        out_dir: directory to write ``tokenizer.json``, ``tokenizer_config.json``, ``vocab.txt``.
        vocab_size: upper bound on the vocabulary (a small corpus gives fewer tokens).
        min_frequency: least count for a merge to enter the vocabulary.
        model_max_length: the longest input the saved tokenizer accepts without truncation warnings.

    Returns:
        The saved tokenizer, loaded back through ``AutoTokenizer`` as a caller would.
    """
    from tokenizers import (
        Tokenizer,
        decoders,
        models,
        normalizers,
        pre_tokenizers,
        processors,
        trainers,
    )
    from transformers import AutoTokenizer, BertTokenizerFast

    backend = Tokenizer(models.WordPiece(unk_token="[UNK]"))
    backend.normalizer = normalizers.BertNormalizer(clean_text=True, lowercase=True, strip_accents=None)
    backend.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    backend.decoder = decoders.WordPiece(prefix="##")
    trainer = trainers.WordPieceTrainer(
        vocab_size=vocab_size,
        min_frequency=min_frequency,
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=ALPHABET,
        continuing_subword_prefix="##",
        show_progress=False,
    )
    backend.train_from_iterator(texts, trainer=trainer)
    # The trainer adds the alphabet only as word starts; without "##x" pieces, "42" or "quickly"
    # would still become [UNK]. Add the missing ones at the end of the vocabulary.
    vocab = backend.get_vocab()
    for piece in ("##" + c for c in string.ascii_lowercase + string.digits):
        vocab.setdefault(piece, len(vocab))
    backend.model = models.WordPiece(vocab=vocab, unk_token="[UNK]", continuing_subword_prefix="##")
    cls, sep = backend.token_to_id("[CLS]"), backend.token_to_id("[SEP]")
    backend.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]",
        pair="[CLS] $A [SEP] $B:1 [SEP]:1",
        special_tokens=[("[CLS]", cls), ("[SEP]", sep)],
    )
    wrapped = BertTokenizerFast(
        tokenizer_object=backend,
        do_lower_case=True,
        model_max_length=model_max_length,
        **dict(zip(("pad_token", "unk_token", "cls_token", "sep_token", "mask_token"), SPECIAL_TOKENS)),
    )
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    wrapped.save_pretrained(str(out))
    # vocab.txt as well, so that tools expecting a classic BERT directory find one.
    vocab = backend.get_vocab()
    (out / "vocab.txt").write_text("".join(t + "\n" for t in sorted(vocab, key=vocab.get)), encoding="utf-8")
    return AutoTokenizer.from_pretrained(str(out))


def load_tokenizer(name_or_path: str | os.PathLike) -> PreTrainedTokenizerBase:
    """A fast (Rust-backed) Hugging Face tokenizer by hub name, tokenizer directory or dataset root.

    Args:
        name_or_path: e.g. ``"bert-base-uncased"`` (resolved by transformers: its cache or the
            hub), a tokenizer directory, or a dataset root whose manifest names its tokenizer.

    Raises:
        TypeError: when only a slow (pure Python) tokenizer exists for ``name_or_path``.
    """
    from transformers import AutoTokenizer

    path = Path(name_or_path)
    if (path / MANIFEST).is_file() and not (path / "tokenizer_config.json").exists():
        found = tokenizer_dir(path)
        if found is None:
            raise FileNotFoundError(f"{path}: the dataset has no tokenizer of its own")
        name_or_path = found
    tokenizer = AutoTokenizer.from_pretrained(str(name_or_path), use_fast=True)
    if not tokenizer.is_fast:
        raise TypeError(f"{name_or_path}: no fast tokenizer available")
    return tokenizer
