"""Shared test helpers: tiny random decoder configs and recipes (CPU, no download).

`tiny_recipe(...)` (a fixture returning a factory) builds a validated-schema Recipe around a
random-init backbone with the byte tokenizer; other test files may add fixtures here.
"""
from __future__ import annotations

from typing import Any

import pytest

TINY_ARCHS = ("llama", "qwen2", "mistral")


def tiny_backbone_config(model_type: str = "llama", layers: int = 2, hidden: int = 32, **extra: Any) -> dict[str, Any]:
    """A transformers config mapping (model.random_init) for a tiny decoder of `model_type`."""
    cfg: dict[str, Any] = {
        "model_type": model_type, "hidden_size": hidden, "intermediate_size": 2 * hidden,
        "num_hidden_layers": layers, "num_attention_heads": 4, "num_key_value_heads": 2,
        "vocab_size": 260, "max_position_embeddings": 128, "tie_word_embeddings": False,
    }
    if model_type == "qwen3":
        cfg["head_dim"] = hidden // 4
    cfg.update(extra)
    return cfg


def make_tiny_recipe(model_type: str = "llama", pooling: dict[str, Any] | None = None, attention: str = "causal",
                     lora: bool = False, layers: int = 2, hidden: int = 32, **model: Any):
    """A Recipe for a tiny random backbone; `model` entries override the model section."""
    from dsembed.config import recipe_from_dict

    data = {
        "model": {"random_init": tiny_backbone_config(model_type, layers, hidden), "tokenizer": "bytes",
                  "attn_implementation": "sdpa", "max_length": 64, **model},
        "attention": {"mode": attention},
        "pooling": pooling or {"type": "last_token"},
        "lora": {"enabled": lora, "r": 4, "alpha": 8, "dropout": 0.0},
    }
    return recipe_from_dict(data)


@pytest.fixture
def tiny_recipe():
    """Factory fixture: tiny_recipe(model_type="llama", pooling={...}, attention="causal", lora=False, layers=2, ...)."""
    return make_tiny_recipe
