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


# ----------------------------------------------------------------------------- tiny local MTEB tasks

TOPICS = {
    "space": "rocket orbit planet galaxy astronaut telescope comet lunar",
    "food": "bread cheese pasta tomato recipe oven garlic butter",
    "music": "guitar melody concert drum violin chorus rhythm piano",
    "sport": "football goal referee stadium tennis sprint medal coach",
}


def sentence_about(rng, topic: str, n: int = 5) -> str:
    """`n` words drawn from one of TOPICS."""
    return " ".join(rng.choice(TOPICS[topic].split(), size=n))


def write_jsonl(path, rows: list[dict]) -> None:
    import json

    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")


@pytest.fixture(scope="module")
def task_root(tmp_path_factory):
    """A tasks dir with one tiny local task of each type (see `write_tiny_tasks`)."""
    return write_tiny_tasks(tmp_path_factory.mktemp("tasks"))


def write_tiny_tasks(root):
    """One tiny local task of each type under `root`: TinySTS, TinyRetrieval, TinyClassification,
    TinyClustering (topic words, so a bag-of-trigrams scores well). Returns `root`."""
    import numpy as np

    rng = np.random.default_rng(0)
    topics = list(TOPICS)
    sts = []
    for i in range(24):  # same topic -> high gold score, other topic -> low
        a, b = topics[i % 4], topics[(i // 2) % 4]
        sts.append({"sentence1": sentence_about(rng, a), "sentence2": sentence_about(rng, b),
                    "score": 4.5 if a == b else 0.5 + (i % 3) * 0.3})
    write_jsonl(root / "sts" / "TinySTS" / "test.jsonl", sts)
    docs = [{"_id": f"d{i}", "title": topics[i % 4], "text": sentence_about(rng, topics[i % 4], 8)}
            for i in range(16)]
    write_jsonl(root / "retrieval" / "TinyRetrieval" / "corpus.jsonl", docs)
    write_jsonl(root / "retrieval" / "TinyRetrieval" / "queries.jsonl",
                [{"_id": f"q{i}", "text": docs[i]["text"].split()[0] + " " + docs[i]["text"].split()[1]}
                 for i in range(8)])
    qrels = root / "retrieval" / "TinyRetrieval" / "qrels" / "test.tsv"
    qrels.parent.mkdir(parents=True)
    qrels.write_text("query-id\tcorpus-id\tscore\n" + "".join(f"q{i}\td{i}\t1\n" for i in range(8)))
    for split, n in (("train", 10), ("test", 6)):
        write_jsonl(root / "classification" / "TinyClassification" / f"{split}.jsonl",
                    [{"text": sentence_about(rng, t), "label": t} for t in topics for _ in range(n)])
    sets = []
    for _ in range(2):
        chosen = topics[:3]
        sets.append({"sentences": [sentence_about(rng, t) for t in chosen for _ in range(6)],
                     "labels": [t for t in chosen for _ in range(6)]})
    sets.append({"sentences": [sentence_about(rng, "food") for _ in range(4)], "labels": ["food"] * 4})
    write_jsonl(root / "clustering" / "TinyClustering" / "test.jsonl", sets)
    return root


@pytest.fixture
def flash_reference(monkeypatch):
    """transformers' flash_attention_2 path on the plain-PyTorch reference flash-attn (tests/flashref);
    yields the reference `flash_attn` module (its CALLS counts calls per function)."""
    from tests import flashref

    module = flashref.install(monkeypatch)
    yield module
    flashref.uninstall()
