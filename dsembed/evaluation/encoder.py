"""An mteb encoder over any object with `encode(texts, instruction=None, batch_size=...)`.

mteb hands the encoder a DataLoader plus the task's metadata and a prompt type (query, document or
None). E5 convention, as in the paper: the task instruction goes on queries (retrieval), on both
sides of an STS pair and on classification / clustering texts (prompt type None); documents
(prompt type "document") get none. The wrapped model applies its own query template.

Texts are embedded once per model and run: within a call (an STS pair list repeats its sentences)
and across calls and tasks (the two sides of an STS task share sentences; FEVER and ClimateFEVER
share one 5.4M-passage corpus). The key is (instruction, text), since the instruction changes the
embedding; the cache keeps rows up to a memory budget and then stops adding.
"""
from __future__ import annotations

import inspect
from typing import Any, Protocol

import numpy as np
from mteb.models import ModelMeta
from mteb.models.abs_encoder import AbsEncoder
from mteb.types import PromptType

from dsembed.testhooks import TestHooks


class TextEncoder(Protocol):
    """What the adapter needs: dsembed's EmbeddingModel, or any stand-in with the same encode."""

    def encode(self, texts: list[str], instruction: str | None = None,
               batch_size: int = 32) -> np.ndarray: ...


def _model_meta(name: str, dim: int | None, n_parameters: int | None, revision: str) -> ModelMeta:
    # mteb requires the meta (else "No model implementation"); its name and revision place the
    # results in mteb's layout (results/<name>/<revision>/<task>.json), the rest is descriptive.
    return ModelMeta(
        loader=None, name=name if "/" in name else f"dsembed/{name}", revision=revision,
        release_date=None, languages=None, n_parameters=n_parameters, memory_usage_mb=None,
        max_tokens=None, embed_dim=dim, license=None, open_weights=True,
        public_training_code=None, public_training_data=None, framework=["PyTorch"],
        similarity_fn_name="cosine", use_instructions=True, training_datasets=None,
    )


class TruncatedModel:
    """A model whose embeddings are cut to their first `dim` coordinates and re-normalised.

    Scores a Matryoshka size (recipe loss.matryoshka_dims) as training scored it; everything else
    (batch_plan, parameters, pooler, recipe) is the wrapped model's.

    Args:
        model: an EmbeddingModel or any TextEncoder.
        dim: the size kept, at most the model's.
    """

    def __init__(self, model: TextEncoder, dim: int) -> None:
        self.model, self.truncate_dim = model, dim

    @property
    def dim(self) -> int:
        return self.truncate_dim

    def __getattr__(self, name: str) -> Any:
        if name in ("model", "truncate_dim"):  # not set yet (copy, unpickling): no recursion
            raise AttributeError(name)
        return getattr(self.model, name)

    def encode(self, texts: list[str], instruction: str | None = None, batch_size: int = 32,
               show_progress: bool = False) -> np.ndarray:
        """float32 [N, dim], each row of unit length (as training's re-normalised sizes)."""
        options: dict[str, Any] = {"instruction": instruction, "batch_size": batch_size}
        if show_progress and "show_progress" in inspect.signature(self.model.encode).parameters:
            options["show_progress"] = True
        rows = np.asarray(self.model.encode(texts, **options), dtype=np.float32)[:, :self.truncate_dim]  # [N, dim]
        norms = np.linalg.norm(rows, axis=1, keepdims=True)  # [N, 1]
        return rows / np.maximum(norms, 1e-12)


class EncodingMemo:
    """A model whose `encode` remembers its rows: the same (instruction, text) is embedded once for
    the life of the object, up to `budget_bytes` (then it embeds again, still correct).

    What lets `dsembed-evaluate --truncate-dim 64 128 256` embed each text once: the sizes'
    TruncatedModels share one memo of the full-size rows. Everything else is the wrapped model's.

    Args:
        model: an EmbeddingModel or any TextEncoder.
        budget_bytes: the most row bytes kept.
    """

    def __init__(self, model: TextEncoder, budget_bytes: int) -> None:
        self.model, self.memo = model, EmbeddingCache(budget_bytes)

    def __getattr__(self, name: str) -> Any:
        if name in ("model", "memo"):  # not set yet (copy, unpickling): no recursion
            raise AttributeError(name)
        return getattr(self.model, name)

    def encode(self, texts: list[str], instruction: str | None = None, batch_size: int = 32,
               show_progress: bool = False) -> np.ndarray:
        """float32 [N, D] in input order, the remembered rows not embedded again."""
        unique = list(dict.fromkeys(texts))
        missing, rows = self.memo.lookup(instruction, unique)
        if missing:
            options: dict[str, Any] = {"instruction": instruction, "batch_size": batch_size}
            if show_progress and "show_progress" in inspect.signature(self.model.encode).parameters:
                options["show_progress"] = True
            embedded = np.asarray(self.model.encode(missing, **options), dtype=np.float32)  # [M, D]
            self.memo.add(instruction, missing, embedded)
            rows.update(zip(missing, embedded))
        if not texts:
            return np.zeros((0, getattr(self.model, "dim", 0) or 0), dtype=np.float32)
        return np.stack([rows[text] for text in texts])  # [N, D]


class EmbeddingCache:
    """(instruction, text) -> float32 row, up to `budget_bytes` of rows; counts what it saved.

    Args:
        budget_bytes: the most embedding bytes kept (0: no cache).
    """

    def __init__(self, budget_bytes: int) -> None:
        self.budget_bytes = budget_bytes
        self.rows: dict[tuple[str | None, str], np.ndarray] = {}
        self.used_bytes = 0
        self.reused = 0  # texts served from the cache (across calls)
        self.embedded = 0  # texts the model embedded

    def lookup(self, instruction: str | None, texts: list[str]) -> tuple[list[str], dict[str, np.ndarray]]:
        """The texts not cached yet, and the cached rows of the others."""
        found = {t: self.rows[(instruction, t)] for t in texts if (instruction, t) in self.rows}
        self.reused += len(found)
        return [t for t in texts if t not in found], found

    def add(self, instruction: str | None, texts: list[str], rows: np.ndarray) -> None:
        """Keep `rows` [n, D] of `texts` while the budget lasts."""
        self.embedded += len(texts)
        for text, row in zip(texts, rows):
            if self.used_bytes + row.nbytes > self.budget_bytes:
                return
            self.rows[(instruction, text)] = row.copy()  # not a view: it would keep the whole call's array alive
            self.used_bytes += row.nbytes


class MtebEncoder(AbsEncoder):
    """Adapter from dsembed's `encode` to mteb's EncoderProtocol.

    Args:
        model: object with `encode(texts, instruction=None, batch_size=.., [show_progress=..])`
            returning float32 [N, D] (L2-normalised for EmbeddingModel).
        instructions: task name -> instruction; a task not in the map is encoded without one.
        name: the model name mteb records.
        batch_size: passed to `model.encode`.
        show_progress: passed to `model.encode` when it accepts it.
        cache_bytes: memory for embeddings reused across calls and tasks (0: reuse within a call only).
        revision: the model revision mteb records (dsembed-evaluate passes the weights' fingerprint).
    """

    def __init__(self, model: TextEncoder, instructions: dict[str, str], name: str = "dsembed/model",
                 batch_size: int = 32, show_progress: bool = False, cache_bytes: int = 0,
                 revision: str = "local") -> None:
        self.model = model
        self.memo = EncodingMemo(model, cache_bytes)  # each distinct text once, across calls up to the budget
        self.cache = self.memo.memo  # its counts: embedded, reused
        self.instructions = dict(instructions)
        self.batch_size = batch_size
        self.show_progress = show_progress
        n_params = None
        if hasattr(model, "parameters"):
            n_params = sum(p.numel() for p in model.parameters())
        self.mteb_model_meta = _model_meta(name, getattr(model, "dim", None), n_params, revision)
        self.calls: list[dict[str, Any]] = []  # one record per encode call: task, prompt, count

    def encode(self, inputs, *, task_metadata, hf_split: str, hf_subset: str,
               prompt_type: PromptType | None = None, **kwargs: Any) -> np.ndarray:
        """Embed every text the DataLoader yields; returns float32 [N, D] in input order."""
        texts: list[str] = []
        for batch in inputs:
            texts.extend(batch["text"])
        instruction = None
        if prompt_type != PromptType.document:
            instruction = self.instructions.get(task_metadata.name)
        self.calls.append({"task": task_metadata.name, "prompt_type": str(prompt_type),
                           "instruction": instruction, "n": len(texts)})
        # the reliability test's kill in the middle of the k-th task evaluated (no-op otherwise)
        TestHooks.crash("eval-encode", len({call["task"] for call in self.calls}))
        # STS pairs reuse their sentences (LeeNews: 1,225 pairs of 50 documents): the memo embeds each
        # distinct text once. Padding never changes an embedding, so the result is the same.
        before = self.cache.embedded
        rows = self.memo.encode(texts, instruction=instruction, batch_size=self.batch_size,
                                show_progress=self.show_progress)  # [N, D]
        self.calls[-1]["embedded"] = self.cache.embedded - before
        if not texts:
            return np.zeros((0, 0), dtype=np.float32)
        return rows
