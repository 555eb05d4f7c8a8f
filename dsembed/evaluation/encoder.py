"""An mteb encoder over any object with `encode(texts, instruction=None, batch_size=...)`.

mteb hands the encoder a DataLoader plus the task's metadata and a prompt type (query, document or
None). E5 convention, as in the paper: the task instruction goes on queries (retrieval), on both
sides of an STS pair and on classification / clustering texts (prompt type None); documents
(prompt type "document") get none. The wrapped model applies its own query template.
"""
from __future__ import annotations

import inspect
from typing import Any, Protocol

import numpy as np
from mteb.models import ModelMeta
from mteb.models.abs_encoder import AbsEncoder
from mteb.types import PromptType


class TextEncoder(Protocol):
    """What the adapter needs: dsembed's EmbeddingModel, or any stand-in with the same encode."""

    def encode(self, texts: list[str], instruction: str | None = None,
               batch_size: int = 32) -> np.ndarray: ...


def _model_meta(name: str, dim: int | None, n_parameters: int | None) -> ModelMeta:
    # mteb requires the meta (else "No model implementation"); the fields are descriptive only.
    return ModelMeta(
        loader=None, name=name if "/" in name else f"dsembed/{name}", revision="local",
        release_date=None, languages=None, n_parameters=n_parameters, memory_usage_mb=None,
        max_tokens=None, embed_dim=dim, license=None, open_weights=True,
        public_training_code=None, public_training_data=None, framework=["PyTorch"],
        similarity_fn_name="cosine", use_instructions=True, training_datasets=None,
    )


class MtebEncoder(AbsEncoder):
    """Adapter from dsembed's `encode` to mteb's EncoderProtocol.

    Args:
        model: object with `encode(texts, instruction=None, batch_size=.., [show_progress=..])`
            returning float32 [N, D] (L2-normalised for EmbeddingModel).
        instructions: task name -> instruction; a task not in the map is encoded without one.
        name: the model name mteb records.
        batch_size: passed to `model.encode`.
        show_progress: passed to `model.encode` when it accepts it.
    """

    def __init__(self, model: TextEncoder, instructions: dict[str, str], name: str = "dsembed/model",
                 batch_size: int = 32, show_progress: bool = False) -> None:
        self.model = model
        self.instructions = dict(instructions)
        self.batch_size = batch_size
        self.show_progress = show_progress
        self._takes_progress = "show_progress" in inspect.signature(model.encode).parameters
        n_params = None
        if hasattr(model, "parameters"):
            n_params = sum(p.numel() for p in model.parameters())
        self.mteb_model_meta = _model_meta(name, None, n_params)
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
        options: dict[str, Any] = {"instruction": instruction, "batch_size": self.batch_size}
        if self._takes_progress:
            options["show_progress"] = self.show_progress
        self.calls.append({"task": task_metadata.name, "prompt_type": str(prompt_type),
                           "instruction": instruction, "n": len(texts)})
        # STS pairs reuse their sentences (LeeNews: 1,225 pairs of 50 documents): embed each
        # distinct text once. Padding never changes an embedding, so the result is the same.
        unique = list(dict.fromkeys(texts))
        where = {text: i for i, text in enumerate(unique)}
        embeddings = np.asarray(self.model.encode(unique, **options), dtype=np.float32)  # [U, D]
        return embeddings[[where[text] for text in texts]]  # [N, D]
