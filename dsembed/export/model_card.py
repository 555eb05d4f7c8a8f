"""The README.md of an exported model: what it is, how to load it without dsembed, and its scores.

`model_card` writes the card at export time. `add_results` (called by `dsembed-evaluate MODEL_DIR`)
merges an evaluation's main scores into `eval_results.json` in the folder and rewrites the card with
the Hugging Face hub's `model-index` metadata (front matter) and a results table.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import yaml

from dsembed.atomic import write_text_atomic
from dsembed.config import Recipe

EVAL_RESULTS_FILE = "eval_results.json"
_RESULTS_START, _RESULTS_END = "<!-- dsembed:results -->", "<!-- /dsembed:results -->"
# mteb main metric -> the hub's metric type names (as MTEB leaderboard cards write them)
_HUB_METRICS = {"cosine_spearman": "cos_sim_spearman", "ndcg_at_10": "ndcg_at_10", "accuracy": "accuracy",
                "v_measure": "v_measure"}


def usage(name: str, form: str, prompts: dict[str, str], recipe: Recipe) -> str:
    """The card's "how to load" section for the export's sentence-transformers form."""
    query_prompt = json.dumps(prompts.get("query", ""))
    remote = ", trust_remote_code=True" if form in ("portable", "dsembed") else ""
    needs = {"plain": "sentence-transformers only (its own Transformer, Pooling and Normalize modules)",
             "portable": "sentence-transformers only; the head is `dsembed_model.py` in this folder (generated from dsembed)",
             "dsembed": "dsembed and peft (`pip install dsembed`): the LoRA adapter is kept separate"}[form]
    m = recipe.model
    text = f"""## Usage

Needs: {needs}.

```python
from sentence_transformers import SentenceTransformer
model = SentenceTransformer("{name}"{remote})
queries = model.encode(["how do I reset my password"], prompt_name="query")  # adds the query prompt
docs = model.encode(["Open settings and choose 'reset password'."])            # documents: no prompt
scores = model.similarity(queries, docs)
```

Query prompt (`prompt_name="query"`): {query_prompt}; documents get none. For mteb tasks the
prompts are named by task and task type in config_sentence_transformers.json.
"""
    if form == "plain":
        pool = ("the last token (the EOS the tokenizer appends)" if recipe.pooling.type == "last_token"
                else "the mean over non-padding tokens")
        text += f"""
In transformers alone (the tokenizer appends the EOS, pads on the {m.padding_side}, truncates to {m.max_length};
config.json's `is_causal` = {str(recipe.attention.mode == "causal").lower()} gives {recipe.attention.mode} attention):

```python
import torch, torch.nn.functional as F
from transformers import AutoModel, AutoTokenizer
tokenizer, model = AutoTokenizer.from_pretrained("{name}"), AutoModel.from_pretrained("{name}").eval()
batch = tokenizer([{query_prompt} + "how do I reset my password"], padding=True, truncation=True, return_tensors="pt")
with torch.no_grad():
    states = model(**batch).last_hidden_state                         # [B, T, D]
"""
        if recipe.pooling.type == "last_token":
            text += "emb = states[:, -1] if tokenizer.padding_side == \"left\" else states[torch.arange(len(states)), batch.attention_mask.sum(1) - 1]\n"
        else:
            text += "mask = batch.attention_mask.unsqueeze(-1).float()\nemb = (states * mask).sum(1) / mask.sum(1)\n"
        text += f"emb = {'F.normalize(emb, dim=-1)' if m.normalize else 'emb'}  # {pool}\n```\n"
    dims = list(recipe.loss.matryoshka_dims)
    if dims:
        text += f"""
Trained at the Matryoshka sizes {dims} (the first d coordinates, re-normalised): load a smaller
size with `SentenceTransformer("{name}"{remote}, truncate_dim={dims[0]})`; `dsembed-evaluate --truncate-dim {dims[0]}` scores it.
"""
    text += f"""
With dsembed: `from dsembed import EmbeddingModel; EmbeddingModel.load("{name}")`.
"""
    return text


def model_card(recipe: Recipe, summary: Any, prompts: dict[str, str]) -> str:
    """README.md of a fresh export: variant, base model, training data, steps, usage."""
    m, p = recipe.model, recipe.pooling
    base = m.name_or_path or f"random init ({(m.random_init or {}).get('model_type', '?')})"
    name = summary.out_dir.name
    lora = {"merged": f"LoRA r={recipe.lora.r} merged into the backbone",
            "adapter": f"LoRA r={recipe.lora.r} kept as a peft adapter (adapter/)", "none": "full backbone"}[summary.lora]
    dtype = f", {summary.backbone_dtype} weights" if summary.backbone_dtype else ""
    return f"""---
library_name: sentence-transformers
pipeline_tag: sentence-similarity
tags: [sentence-transformers, feature-extraction, dsembed]
---
# {name}

A text-embedding model fine-tuned from a decoder LLM with dsembed (arXiv 2409.02727 designs).

| | |
|---|---|
| attention | {recipe.attention.mode} |
| pooling | {p.type} |
| base model | {base} |
| training data | {", ".join(recipe.data.train) or "-"} |
| steps | {summary.step} (micro-batch {recipe.train.micro_batch_size} x accumulation {recipe.train.gradient_accumulation_steps} x {summary.world_size or "?"} ranks) |
| weights | {lora}{dtype}; backbone {summary.backbone_parameters:,} parameters, head {summary.head_parameters:,} |
| embedding | dim {summary.dim}, {"L2-normalised" if m.normalize else "not normalised"}, {"EOS appended" if m.append_eos else "no EOS"}, {m.padding_side} padding, max {m.max_length} tokens |

{usage(name, summary.form or "dsembed", prompts, recipe)}
The resolved training recipe is recipe.yaml.
"""


def add_results(folder: str | Path, results: dict[str, Any]) -> Path | None:
    """Merge a `dsembed-evaluate` results record into the folder's card (model-index + table).

    Args:
        folder: an exported model folder with a README.md written by `model_card`.
        results: the record dsembed-evaluate writes (format dsembed-eval/1).

    Returns:
        The README path, or None when the folder has no dsembed card (nothing is written then).
    """
    folder = Path(folder)
    readme = folder / "README.md"
    if not readme.is_file() or not (folder / "dsembed.json").is_file():
        return None
    text = readme.read_text(encoding="utf-8")
    if not text.startswith("---\n") or "\n---\n" not in text[4:]:
        return None
    store = folder / EVAL_RESULTS_FILE
    saved = json.loads(store.read_text(encoding="utf-8")) if store.is_file() else {"tasks": {}}
    for task, record in results["tasks"].items():
        saved["tasks"][task] = {k: record.get(k) for k in ("category", "type", "main_metric", "main_score", "split")}
        saved["tasks"][task]["mteb_version"] = results.get("mteb_version")
    write_text_atomic(store, json.dumps(saved, indent=2) + "\n")
    front, body = text[4:].split("\n---\n", 1)
    meta = yaml.safe_load(front) or {}
    meta["model-index"] = [{"name": folder.resolve().name, "results": [_hub_entry(task, r) for task, r in saved["tasks"].items()]}]
    if _RESULTS_START in body:
        body = body[:body.index(_RESULTS_START)] + body[body.index(_RESULTS_END) + len(_RESULTS_END):].lstrip("\n")
    body = body.rstrip("\n") + "\n\n" + _results_table(saved["tasks"]) + "\n"
    write_text_atomic(readme, "---\n" + yaml.safe_dump(meta, sort_keys=False, allow_unicode=True) + "---\n" + body)
    return readme


def _hub_entry(task: str, record: dict[str, Any]) -> dict[str, Any]:
    metric = record.get("main_metric") or "main_score"
    return {"task": {"type": record.get("type") or "feature-extraction"},
            "dataset": {"name": f"MTEB {task}", "type": task, "split": record.get("split") or "test"},
            "metrics": [{"type": _HUB_METRICS.get(metric, metric), "value": round(100 * float(record["main_score"]), 2)}]}


def _results_table(tasks: dict[str, dict[str, Any]]) -> str:
    rows = [f"| {name} | {r.get('category')} | {r.get('main_metric')} | {100 * float(r['main_score']):.2f} |"
            for name, r in sorted(tasks.items(), key=lambda kv: (str(kv[1].get("category")), kv[0]))]
    return "\n".join([_RESULTS_START, "## Evaluation (dsembed-evaluate, mteb)", "",
                      "| task | category | metric | score x100 |", "|---|---|---|---:|", *rows, _RESULTS_END])

