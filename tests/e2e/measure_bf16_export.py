"""Measure how far a bf16 run's export is from the live engine (the README's "Exact export of bf16 runs").

    python tests/e2e/measure_bf16_export.py RUN_DIR DUMP_DIR

RUN_DIR: a bf16 LoRA run trained with DSEMBED_DUMP_EMBEDDINGS=DUMP_DIR (DUMP_DIR/probe.json holds the
texts; the trainer wrote the live engine's embeddings to DUMP_DIR/embeddings.npz after its last step).
Compares, on the same texts, the live engine with
  - "bf16 merge": LoRA added to the bf16 weights and rounded (the export before float32 merging),
  - "fp32 merge": `dsembed-consolidate` now (merged and written in float32, loaded by EmbeddingModel.load),
and both with "live fp32": the live model's own weights (bf16 base + LoRA, unmerged) evaluated in float32.
Prints one JSON object.
"""
from __future__ import annotations

import copy
import json
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch


def _cos(a: np.ndarray, b: np.ndarray) -> dict[str, float]:
    c = (a * b).sum(1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1))
    return {"min_cosine": float(c.min()), "mean_1_minus_cosine": float((1 - c).mean()), "max_abs": float(np.abs(a - b).max())}


def main(run_dir: str, dump_dir: str) -> None:
    from transformers import AutoModel

    from dsembed.export.consolidate import export_checkpoint, load_from_checkpoint, resolve_checkpoint
    from dsembed.modeling import EmbeddingModel
    from dsembed.modeling.backbone import unwrap
    from dsembed.modeling.weights import plain_state_dict

    probe = json.loads((Path(dump_dir) / "probe.json").read_text(encoding="utf-8"))
    live = np.load(Path(dump_dir) / "embeddings.npz")["documents"]
    folder, tag = resolve_checkpoint(run_dir)
    model = load_from_checkpoint(folder, tag)  # bf16 params, LoRA unmerged: the live engine's weights
    base = unwrap(model.backbone)
    rounded = plain_state_dict(base, merge=True)  # bf16 merge
    unmerged = plain_state_dict(base, merge=False)
    exact = plain_state_dict(base, merge=True, dtype=torch.float32)
    lost, moved, rel = 0, 0, []
    for key, weight in exact.items():
        if not key.endswith("proj.weight"):
            continue
        delta = weight - unmerged[key].float()
        nonzero = delta != 0
        moved += int(nonzero.sum())
        lost += int((nonzero & (rounded[key] == unmerged[key])).sum())
        rel.append((delta.abs() / unmerged[key].float().abs().clamp_min(1e-12))[nonzero].flatten()[::97].numpy())
    rel_all = np.concatenate(rel)  # a strided sample of |delta| / |W|

    texts = probe["texts"]
    same = model.encode(texts)  # the rebuilt bf16 model: should reproduce the dump
    live32 = copy.deepcopy(model).float().encode(texts)
    old_backbone = AutoModel.from_config(base.config, dtype=torch.bfloat16, attn_implementation="sdpa")
    old_backbone.load_state_dict(rounded)
    old = EmbeddingModel(old_backbone, model.pooler, model.tokenizer, model.recipe).eval().encode(texts)
    with tempfile.TemporaryDirectory() as tmp:
        export_checkpoint(run_dir, Path(tmp) / "export")
        new = EmbeddingModel.load(Path(tmp) / "export").encode(texts)
        dtype = json.loads((Path(tmp) / "export" / "dsembed.json").read_text())["backbone_dtype"]
    print(json.dumps({
        "texts": len(texts), "export_dtype": dtype,
        "lora_delta": {"elements_moved": moved, "lost_in_bf16_merge": lost, "fraction_lost": lost / max(moved, 1),
                       "relative_delta_median": float(np.median(rel_all)), "relative_delta_p99": float(np.quantile(rel_all, 0.99))},
        "rebuilt_bf16_vs_live": _cos(same, live),
        "bf16_merge_vs_live": _cos(old, live), "fp32_merge_vs_live": _cos(new, live),
        "bf16_merge_vs_live_fp32": _cos(old, live32), "fp32_merge_vs_live_fp32": _cos(new, live32),
        "live_vs_live_fp32": _cos(live, live32),
    }, indent=2))


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
