"""dsembed: turn decoder LLMs into text-embedding models; the pooling-and-attention study."""
from typing import Any

__all__ = ["EmbeddingModel", "build_model"]


def __getattr__(name: str) -> Any:
    # Lazy: `import dsembed` stays light (no torch / transformers) until the model is asked for.
    if name in ("EmbeddingModel", "build_model"):
        from dsembed.modeling import model

        return getattr(model, name)
    raise AttributeError(f"module 'dsembed' has no attribute {name!r}")
