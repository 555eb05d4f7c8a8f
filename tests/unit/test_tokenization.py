"""Byte tokenizer and tokenize_texts: EOS appended and kept under truncation, padding on either side."""
from __future__ import annotations

import pytest
import torch

from dsembed.modeling.tokenization import BYTE_VOCAB_SIZE, byte_tokenizer, tokenize_texts


@pytest.fixture(scope="module")
def tok():
    return byte_tokenizer()


def test_byte_tokenizer_vocab_and_ids(tok):
    assert len(tok) == BYTE_VOCAB_SIZE == 260
    assert (tok.pad_token_id, tok.eos_token_id, tok.bos_token_id, tok.unk_token_id) == (0, 1, 2, 3)
    text = "héllo, wörld ✓"
    ids = tok(text)["input_ids"]
    assert ids == [b + 4 for b in text.encode("utf-8")]  # one token per UTF-8 byte, no specials added
    assert tok.decode(ids) == text


def test_byte_tokenizer_save_load_roundtrip(tok, tmp_path):
    from transformers import AutoTokenizer

    tok.save_pretrained(tmp_path)
    again = AutoTokenizer.from_pretrained(tmp_path)
    assert again("abc é")["input_ids"] == tok("abc é")["input_ids"]
    assert again.eos_token_id == 1 and again.pad_token_id == 0


@pytest.mark.parametrize("side", ["left", "right"])
def test_tokenize_texts_eos_and_padding(tok, side):
    out = tokenize_texts(tok, ["ab", "abcd"], max_length=16, padding_side=side)
    ids, mask = out["input_ids"], out["attention_mask"]
    assert ids.dtype == torch.long and mask.dtype == torch.long and ids.shape == (2, 5)
    assert ids[1].tolist() == [101, 102, 103, 104, 1]
    assert mask.sum(1).tolist() == [3, 5]
    if side == "left":
        assert ids[0].tolist() == [0, 0, 101, 102, 1] and mask[0].tolist() == [0, 0, 1, 1, 1]
    else:
        assert ids[0].tolist() == [101, 102, 1, 0, 0] and mask[0].tolist() == [1, 1, 1, 0, 0]


def test_truncation_keeps_eos_last(tok):
    out = tokenize_texts(tok, ["abcdefghij"], max_length=4, padding_side="left")
    assert out["input_ids"][0].tolist() == [101, 102, 103, 1]


def test_no_eos_when_disabled_and_no_double_eos(tok):
    out = tokenize_texts(tok, ["ab"], max_length=8, padding_side="right", append_eos=False)
    assert out["input_ids"][0].tolist() == [101, 102]
    out = tokenize_texts(tok, ["ab<eos>"], max_length=8, padding_side="right")
    assert out["input_ids"][0].tolist() == [101, 102, 1]


def test_bad_padding_side(tok):
    with pytest.raises(ValueError):
        tokenize_texts(tok, ["a"], max_length=4, padding_side="middle")
