"""The sentence-transformers module of a `--keep-adapter` export (copied into it as `dsembed_st.py`).

Merged exports load without dsembed (sentence-transformers' own modules, or the generated
`dsembed_model.py`: see dsembed/export/st_files.py and dsembed/export/portable.py). An export that keeps LoRA as a
separate peft adapter is loaded through this module instead, which imports dsembed (and so peft):

    SentenceTransformer(MODEL_DIR, trust_remote_code=True).encode(queries, prompt_name="query")

embeds exactly as `EmbeddingModel.load(MODEL_DIR).encode(queries, instruction=...)`:
- tokenization is `EmbeddingModel.tokenize` (EOS appended, truncation keeping the EOS, the recipe's
  padding side and max length), called from `preprocess`; a prompt is prepended as sentence-transformers
  does (and `prompt_suffixes[prompt]` appended, for query templates with text after `{query}`);
- the forward is `EmbeddingModel.forward`, which already L2-normalises when the recipe says so; the
  folder has no Pooling or Normalize module, so nothing pools or normalises twice.
"""
from __future__ import annotations

import json
import os
from typing import Any

import torch

try:  # sentence-transformers >= 6
    from sentence_transformers.base.modules import InputModule
except ImportError:  # sentence-transformers 5.x
    from sentence_transformers.models import InputModule

from dsembed.modeling.model import EmbeddingModel

CONFIG_FILE = "dsembed_st.json"


class DsembedEmbedding(InputModule):
    """A whole dsembed `EmbeddingModel` as one sentence-transformers input module.

    Args:
        model: the loaded model (backbone + pooling head + tokenizer + recipe).
        prompt_suffixes: prompt text -> text appended after the input when that prompt is used.
    """

    config_file_name = CONFIG_FILE
    config_keys = ["prompt_suffixes"]
    save_in_root = True

    def __init__(self, model: EmbeddingModel, prompt_suffixes: dict[str, str] | None = None) -> None:
        super().__init__()
        self.model = model
        self.tokenizer = model.tokenizer
        self.prompt_suffixes = dict(prompt_suffixes or {})

    @property
    def max_seq_length(self) -> int:
        return int(self.model.recipe.model.max_length)

    def get_embedding_dimension(self) -> int:
        return self.model.dim

    get_sentence_embedding_dimension = get_embedding_dimension  # sentence-transformers 5.x name

    def preprocess(self, inputs: Any, prompt: str | None = None, **kwargs: Any) -> dict[str, torch.Tensor]:
        """Prompt + text (+ suffix), tokenized exactly as dsembed training and `encode` do."""
        texts = [text if isinstance(text, str) else " ".join(text) for text in inputs]
        if prompt:
            suffix = self.prompt_suffixes.get(prompt, "")
            texts = [prompt + text + suffix for text in texts]
        return self.model.tokenize(texts)

    def tokenize(self, texts: list[str], **kwargs: Any) -> dict[str, torch.Tensor]:  # sentence-transformers 5.x
        return self.preprocess(texts, **kwargs)

    def forward(self, features: dict[str, Any], **kwargs: Any) -> dict[str, Any]:
        """Adds `sentence_embedding` [B, D] (L2-normalised when the recipe normalises)."""
        features["sentence_embedding"] = self.model(features["input_ids"], features["attention_mask"])  # [B, D]
        return features

    def save(self, output_path: str, *args: Any, **kwargs: Any) -> None:
        """Write the dsembed folder (LoRA merged) and this module's config."""
        self.model.save(output_path, merge_lora=True)
        with open(os.path.join(output_path, CONFIG_FILE), "w", encoding="utf-8") as f:
            json.dump(self.get_config_dict(), f, indent=2)

    @classmethod
    def load(cls, model_name_or_path: str, subfolder: str = "", token: Any = None, cache_folder: str | None = None,
             revision: str | None = None, local_files_only: bool = False, **kwargs: Any) -> "DsembedEmbedding":
        """Load the dsembed folder (a local path or a Hub repository) on CPU; the caller moves it."""
        folder = cls.load_dir_path(model_name_or_path, subfolder=subfolder, token=token, cache_folder=cache_folder,
                                   revision=revision, local_files_only=local_files_only)
        config_path = os.path.join(folder, CONFIG_FILE)
        config: dict[str, Any] = {}
        if os.path.isfile(config_path):
            with open(config_path, encoding="utf-8") as f:
                config = json.load(f)
        return cls(EmbeddingModel.load(folder), **{k: v for k, v in config.items() if k in cls.config_keys})
