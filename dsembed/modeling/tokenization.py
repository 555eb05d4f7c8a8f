"""Tokenizers and the one way texts become model inputs (EOS appended, truncation, padding side).

The paper appends an EOS token to every text and pools the last token with left padding; the
same routine serves every pooling type so that training, `encode()` and evaluation agree.
"""
from __future__ import annotations

from typing import Any, Sequence

import torch
from transformers import PreTrainedTokenizerFast

SPECIAL_TOKENS = ("<pad>", "<eos>", "<bos>", "<unk>")  # ids 0..3; bytes follow at 4..259
BYTE_VOCAB_SIZE = len(SPECIAL_TOKENS) + 256


def byte_tokenizer() -> PreTrainedTokenizerFast:
    """An offline byte-level tokenizer: vocab 260 (0 `<pad>`, 1 `<eos>`, 2 `<bos>`, 3 `<unk>`, bytes 4..259).

    Built in memory with the `tokenizers` library (a BPE with no merges over the GPT-2 byte
    alphabet, so every UTF-8 byte is one token); it adds no special tokens by itself.

    Returns:
        A `PreTrainedTokenizerFast` that saves and loads like any Hugging Face tokenizer.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from tokenizers.pre_tokenizers import ByteLevel

    table = _bytes_to_unicode()
    byte_chars = [table[b] for b in range(256)]
    assert set(byte_chars) == set(ByteLevel.alphabet())  # same alphabet as the pre-tokenizer
    vocab = {tok: i for i, tok in enumerate(SPECIAL_TOKENS)}
    vocab.update({ch: len(SPECIAL_TOKENS) + i for i, ch in enumerate(byte_chars)})
    model = models.BPE(vocab=vocab, merges=[], unk_token="<unk>")
    tok = Tokenizer(model)
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens(list(SPECIAL_TOKENS))
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, pad_token="<pad>", eos_token="<eos>", bos_token="<bos>", unk_token="<unk>",
        model_max_length=1 << 30,
    )


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's byte -> printable character table (what the ByteLevel pre-tokenizer emits)."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("\u00a1"), ord("\u00ac") + 1)) + list(range(ord("\u00ae"), ord("\u00ff") + 1))
    table = {b: chr(b) for b in printable}
    extra = 0
    for b in range(256):
        if b not in table:
            table[b] = chr(256 + extra)
            extra += 1
    return table


def pad_id(tokenizer: Any) -> int:
    """The id used for padding: the tokenizer's pad token, else its EOS (masked out either way)."""
    if tokenizer.pad_token_id is not None:
        return int(tokenizer.pad_token_id)
    if tokenizer.eos_token_id is not None:
        return int(tokenizer.eos_token_id)
    return 0


def token_ids(
    tokenizer: Any,
    texts: Sequence[str],
    max_length: int,
    append_eos: bool = True,
) -> list[list[int]]:
    """Unpadded token ids per text: the tokenizer's own special tokens, then EOS, truncated.

    Truncation keeps the EOS as the last real token (the last-token head pools it).

    Args:
        tokenizer: a Hugging Face tokenizer with an `eos_token_id` when `append_eos`.
        texts: the strings.
        max_length: the most tokens per text, EOS included.
        append_eos: append `tokenizer.eos_token_id` (unless the tokenizer already ended with it).

    Returns:
        One list of ids per text, each 1..max_length long.

    Raises:
        ValueError: `append_eos` with a tokenizer that has no EOS token.
    """
    eos = tokenizer.eos_token_id
    if append_eos and eos is None:
        raise ValueError("append_eos needs a tokenizer with an eos_token (set model.append_eos: false)")
    encoded = tokenizer(list(texts), add_special_tokens=True, truncation=True, max_length=max_length)["input_ids"]
    rows: list[list[int]] = []
    for ids in encoded:
        ids = list(ids)
        if append_eos:
            if ids and ids[-1] == eos:
                ids = ids[:-1]
            ids = ids[: max_length - 1] + [eos]
        rows.append(ids[:max_length] or [pad_id(tokenizer)])
    return rows


def pad_token_ids(rows: Sequence[Sequence[int]], pad: int, padding_side: str = "left") -> dict[str, torch.Tensor]:
    """Pad unpadded id lists to the longest.

    Args:
        rows: token ids per text (from `token_ids`).
        pad: the padding id (`pad_id(tokenizer)`).
        padding_side: "left" or "right".

    Returns:
        {"input_ids": LongTensor[B, T], "attention_mask": LongTensor[B, T]} with T the longest row.

    Raises:
        ValueError: bad padding side.
    """
    if padding_side not in ("left", "right"):
        raise ValueError(f"padding_side must be 'left' or 'right', not {padding_side!r}")
    width = max(len(r) for r in rows)
    input_ids = torch.full((len(rows), width), pad, dtype=torch.long)  # [B, T]
    mask = torch.zeros((len(rows), width), dtype=torch.long)  # [B, T]
    for i, ids in enumerate(rows):
        n = len(ids)
        sl = slice(width - n, width) if padding_side == "left" else slice(0, n)
        input_ids[i, sl] = torch.tensor(ids, dtype=torch.long)
        mask[i, sl] = 1
    return {"input_ids": input_ids, "attention_mask": mask}


def tokenize_texts(
    tokenizer: Any,
    texts: Sequence[str],
    max_length: int,
    padding_side: str = "left",
    append_eos: bool = True,
) -> dict[str, torch.Tensor]:
    """Tokenize a batch (`token_ids`) and pad it (`pad_token_ids`).

    Args:
        tokenizer: a Hugging Face tokenizer with an `eos_token_id` when `append_eos`.
        texts: the strings.
        max_length: the most tokens per text, EOS included.
        padding_side: "left" or "right".
        append_eos: append `tokenizer.eos_token_id` (unless the tokenizer already ended with it).

    Returns:
        {"input_ids": LongTensor[B, T], "attention_mask": LongTensor[B, T]} with T the longest text.

    Raises:
        ValueError: bad padding side, or `append_eos` with a tokenizer that has no EOS token.
    """
    rows = token_ids(tokenizer, texts, max_length, append_eos)
    return pad_token_ids(rows, pad_id(tokenizer), padding_side)
