"""Cheap checks of a model folder's files before transformers, tokenizers or safetensors read them.

A damaged or truncated file (a copy cut short by a disk quota, an interrupted rsync, a half-synced
shared filesystem) otherwise ends in a traceback from deep inside a library that names neither the
file nor the fix. Here every JSON file (config, tokenizer, dsembed.json, adapter config, shard
index) is parsed and every `*.safetensors` header is opened: safetensors refuses a header whose
tensors do not cover the file exactly, so any truncation is found without reading the tensors
(which carry no checksum). What these checks cannot see (a tokenizer.model, a damaged tensor body)
still ends in one line naming the folder, through `reading`.
"""
from __future__ import annotations

import contextlib
import json
import pickle
import zipfile
from pathlib import Path
from typing import Iterator

import torch

from dsembed.errors import CheckpointError, UserError

EXPORTED_FIX = "copy the model folder again or re-export it with dsembed-consolidate"
LOCAL_FIX = "copy or download the model folder again"
GGUF_FIX = "download or copy the GGUF file again"
# libraries whose own exception types mean "this file cannot be parsed" (tokenizers raises plain Exception)
_PARSER_MODULES = {"safetensors", "tokenizers", "yaml", "gguf", "google", "sentencepiece", "struct"}


def hub_fix(repo_id: str) -> str:
    """The fix for a damaged file in the Hugging Face cache."""
    return f"remove the cached download (hf cache rm model/{repo_id}) and load the model again with network"


def _first_line(err: BaseException) -> str:
    text = str(err).strip().splitlines()
    line = text[0] if text else type(err).__name__
    return line if len(line) <= 200 else line[:197] + "..."


def check_json(path: Path, fix: str) -> None:
    """Raises CheckpointError when `path` is not complete UTF-8 JSON."""
    try:
        json.loads(Path(path).read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError) as err:  # JSONDecodeError is a ValueError
        raise CheckpointError(f"{path}: not valid JSON: damaged or truncated ({_first_line(err)}); {fix}") from None
    except OSError as err:
        raise CheckpointError(f"{path}: cannot be read ({_first_line(err)}); {fix}") from None


def check_safetensors(path: Path, fix: str) -> None:
    """Raises CheckpointError when the header of `path` is unreadable or does not cover the file."""
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as handle:
            handle.keys()
    except Exception as err:  # noqa: BLE001 - SafetensorError (Rust) or OSError: both mean an unusable file
        raise CheckpointError(f"{path}: damaged or truncated safetensors file ({_first_line(err)}); {fix}") from None


def check_model_files(folder: Path, fix: str) -> None:
    """Check every JSON and safetensors file at the top of `folder` (a no-op for a missing folder).

    Args:
        folder: a transformers / dsembed model folder, a tokenizer folder or an adapter folder.
        fix: what the user should do, appended to the message.

    Raises:
        CheckpointError: the first damaged file, by name, or a shard the index names that is missing.
    """
    folder = Path(folder)
    if not folder.is_dir():
        return
    for path in sorted(folder.glob("*.json")):
        check_json(path, fix)
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        weight_map = json.loads(index.read_text(encoding="utf-8"))
        weight_map = weight_map.get("weight_map") if isinstance(weight_map, dict) else None
        shards = set(weight_map.values()) if isinstance(weight_map, dict) else set()
        for name in sorted(shards):
            if not (folder / name).is_file():
                raise CheckpointError(f"{folder / name}: missing (named in {index.name}); {fix}")
    for path in sorted(folder.glob("*.safetensors")):
        check_safetensors(path, fix)


def check_exported_files(folder: Path) -> None:
    """`check_model_files` over a folder EmbeddingModel.save wrote (and its adapter/, older layouts).

    Raises:
        CheckpointError: the first damaged file, by name.
    """
    for sub in (folder, folder / "backbone", folder / "tokenizer", folder / "adapter"):
        check_model_files(sub, EXPORTED_FIX)


def _unreadable_file(err: Exception) -> bool:
    """Whether `err` is how a library reports a file it cannot parse or read (not a bug, not memory)."""
    if isinstance(err, (UserError, ImportError, MemoryError, torch.OutOfMemoryError)):
        return False
    if isinstance(err, (ValueError, EOFError, OSError, KeyError, zipfile.BadZipFile, pickle.UnpicklingError)):
        return True
    if type(err) is Exception or type(err).__module__.split(".")[0] in _PARSER_MODULES:
        return True
    return isinstance(err, RuntimeError) and "PytorchStreamReader" in str(err)  # a damaged *.bin / *.pt


@contextlib.contextmanager
def reading(what: str | Path, fix: str) -> Iterator[None]:
    """Turn a library's failure to read model files into one CheckpointError naming `what`.

    safetensors, tokenizers (Rust), json, yaml, pickle and transformers each raise their own types
    for a damaged file; other errors (a bug, running out of memory, a missing package) pass through.
    """
    try:
        yield
    except Exception as err:  # noqa: BLE001 - filtered by _unreadable_file
        if not _unreadable_file(err):
            raise
        raise CheckpointError(f"{what}: cannot be loaded ({type(err).__name__}: {_first_line(err)}); "
                              f"if a file there is damaged or truncated: {fix}") from None
