"""The parts of `dsembed-bench gpu-proof` (dsembed/bench/gpu_proof.py runs each in its own process).

Every part takes the settings mapping that gpu_proof builds (shapes, sizes, the work folder, the
device) and returns a record {"ok": bool, ...figures}; an exception is recorded by the caller.

flash   sdpa and flash_attention_2 models with the same random weights, bf16, for each shape x
        causal / bidirectional x left / right padding: embeddings (mean pooling: every real token
        counts) and final token states of a padded batch (transformers unpads it and calls
        flash_attn_varlen_func) and of an equal-length batch (flash_attn_func); ok when every
        minimum cosine >= `min_cosine` (or its distance from 1 within 4x `bf16_noise_cosine`'s:
        sdpa bf16 vs sdpa float32, what bf16 rounding alone does), both flash functions were
        called, and the first real token's state moves (> 1e-3 relative) when only the last token
        changes under bidirectional and not (< 1% of that) under causal. Without flash-attn the same code compares sdpa with sdpa and the record
        says "skipped".
train   model5 (multi-layer trainable pooling, bidirectional) through the trainer itself: bf16,
        DeepSpeed ZeRO-3 (one rank), LoRA, gradient checkpointing, cached steps, on local rows this
        part writes; the live engine embeds a probe list after the last step (the trainer's
        DSEMBED_DUMP_EMBEDDINGS hook).
export  dsembed.export.consolidate of that run, reloaded with EmbeddingModel.load on the device;
        ok when its embeddings of the probe have cosine >= `min_cosine` with the live engine's
        (bf16 engine vs the float32 export: equal up to bf16 rounding).
eval    `python -m dsembed.cli.evaluate` (one rank) on four small local tasks this part writes,
        on the export (or, when the export is missing, the untrained model of the train recipe).
mfu     dsembed.bench.gpu.run_one at a shape with few layers: tokens/s, model TFLOP/s and MFU
        (its FLOP convention: 6 N + 12 L D T per token, PaLM; peak from gpu.PEAK_BF16).
"""
from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

PROBE_INSTRUCTION = "Retrieve the matching record"
TOPICS = {"space": "rocket orbit planet galaxy astronaut telescope comet lunar",
          "food": "bread cheese pasta tomato recipe oven garlic butter",
          "music": "guitar melody concert drum violin chorus rhythm piano",
          "sport": "football goal referee stadium tennis sprint medal coach"}


def flash_status() -> tuple[str | None, str | None]:
    """(flash-attn version, None) when `from flash_attn import flash_attn_func` works, else (None, why).

    A flash-attn built against another torch / CUDA imports with an error: the parts then use sdpa
    (and say so) instead of failing everywhere."""
    if importlib.util.find_spec("flash_attn") is None:
        return None, "flash_attn not installed"
    try:
        import flash_attn
        from flash_attn import flash_attn_func  # noqa: F401 - loads the CUDA extension
    except Exception as err:  # noqa: BLE001 - any import failure means: not usable here
        return None, f"flash_attn not importable ({type(err).__name__}: {str(err)[:300]})"
    return str(getattr(flash_attn, "__version__", "unknown")), None


def flash_installed() -> str | None:
    """The usable flash-attn version, or None."""
    return flash_status()[0]


def _texts(n: int, min_words: int, max_words: int, seed: int) -> list[str]:
    from dsembed.bench.common import sentences

    return sentences(n, min_words, max_words, seed=seed)


# ----------------------------------------------------------------------------- flash


def _count_flash_calls() -> tuple[dict[str, int] | None, Any]:
    """Count transformers' calls of the flash functions it imported (private globals of
    transformers.modeling_flash_attention_utils; None where this transformers has none)."""
    import transformers.modeling_flash_attention_utils as fa

    if getattr(fa, "_flash_fn", None) is None or getattr(fa, "_flash_varlen_fn", None) is None:
        return None, lambda: None
    counts = {"flash_attn_func": 0, "flash_attn_varlen_func": 0}
    dense, varlen = fa._flash_fn, fa._flash_varlen_fn

    def counted(name: str, fn: Any) -> Any:
        def call(*args: Any, **kwargs: Any) -> Any:
            counts[name] += 1
            return fn(*args, **kwargs)
        return call

    fa._flash_fn, fa._flash_varlen_fn = counted("flash_attn_func", dense), counted("flash_attn_varlen_func", varlen)

    def restore() -> None:
        fa._flash_fn, fa._flash_varlen_fn = dense, varlen
    return counts, restore


def _flash_case(ref: Any, test: Any, batches: dict[str, dict], side: str) -> dict[str, Any]:
    import torch
    import torch.nn.functional as F

    out: dict[str, Any] = {}
    for kind, batch in batches.items():
        ids, mask = batch["input_ids"], batch["attention_mask"]
        with torch.no_grad():
            emb = [m(ids, mask).float() for m in (ref, test)]  # [B, D]
            states = [m.run_backbone(ids, mask)[0].float()[mask.bool()] for m in (ref, test)]  # [N, D] real tokens
            out[f"{kind}_embedding_min_cosine"] = F.cosine_similarity(*emb).min().item()
            out[f"{kind}_state_min_cosine"] = F.cosine_similarity(*states).min().item()
            # the first real token's final state when only the last real token changes
            lengths = mask.sum(1)
            first = (mask.shape[1] - lengths) if side == "left" else torch.zeros_like(lengths)
            rows = torch.arange(ids.shape[0], device=ids.device)
            changed = ids.clone()
            changed[rows, first + lengths - 1] = (ids[rows, first + lengths - 1] + 7) % 250 + 3
            a = test.run_backbone(ids, mask)[0].float()[rows, first]  # [B, D]
            b = test.run_backbone(changed, mask)[0].float()[rows, first]
            out[f"{kind}_first_token_shift"] = ((a - b).norm(dim=1) / a.norm(dim=1)).min().item()
    return out


def part_flash(s: dict[str, Any]) -> dict[str, Any]:
    import torch
    import torch.nn.functional as F

    from dsembed.config import recipe_from_dict
    from dsembed.modeling import build_model, set_attention_mode
    from dsembed.modeling.tokenization import tokenize_texts

    cfg = s["flash"]
    version, why_not = flash_status()
    impl = "flash_attention_2" if version else "sdpa"
    device = s["device"]
    unequal = _texts(cfg["texts"], 3, cfg["max_words"], seed=1)
    equal = [t[:cfg["equal_chars"]].ljust(cfg["equal_chars"], ".") for t in _texts(cfg["texts"], 40, 60, seed=2)]
    rows, ok = [], True
    for name, shape in cfg["shapes"].items():
        def build(attn: str) -> Any:
            data = {"model": {"random_init": shape, "tokenizer": "bytes", "dtype": "bfloat16", "attn_implementation": attn,
                              "max_length": cfg["max_length"]}, "pooling": {"type": "mean"}, "lora": {"enabled": False}}
            torch.manual_seed(0)
            return build_model(recipe_from_dict(data, f"<gpu-proof:flash:{name}>")).to(device).eval()

        ref = build("sdpa")
        test = build(impl)
        test.load_state_dict(ref.state_dict())
        counts, restore = _count_flash_calls() if version else (None, lambda: None)
        bf16_padded: dict[str, Any] = {}
        try:
            for mode in ("causal", "bidirectional"):
                for m in (ref, test):
                    set_attention_mode(m.backbone, mode)
                for side in ("left", "right"):
                    batches = {kind: {k: v.to(device) for k, v in tokenize_texts(ref.tokenizer, texts, cfg["max_length"],
                                                                                 side, True).items()}
                               for kind, texts in (("padded", unequal), ("equal", equal))}
                    rows.append({"shape": name, "mode": mode, "padding": side, **_flash_case(ref, test, batches, side)})
                    with torch.no_grad():
                        bf16_padded[f"{mode}-{side}"] = (batches["padded"], ref(**batches["padded"]).float())
        finally:
            restore()
        ref.float()  # bf16 rounding alone: the same sdpa model in float32
        for row in rows:
            if row["shape"] == name and "mode" in row:
                set_attention_mode(ref.backbone, row["mode"])
                batch, bf16 = bf16_padded[f"{row['mode']}-{row['padding']}"]
                with torch.no_grad():
                    row["bf16_noise_cosine"] = F.cosine_similarity(ref(**batch).float(), bf16).min().item()
        del ref, test
        if counts is not None:
            rows.append({"shape": name, "calls": dict(counts)})
            ok &= counts["flash_attn_func"] > 0 and counts["flash_attn_varlen_func"] > 0
    for row in rows:
        if "mode" not in row:
            continue
        worst = min(row[k] for k in row if k.endswith("_min_cosine"))
        # within the threshold, or within 4x what bf16 rounding alone moves the embeddings
        close = worst >= cfg["min_cosine"] or 1 - worst <= 4 * (1 - row["bf16_noise_cosine"])
        causal_ok = True
        for kind in ("padded", "equal"):
            shift = row[f"{kind}_first_token_shift"]
            bidir = next(r[f"{kind}_first_token_shift"] for r in rows
                         if r.get("shape") == row["shape"] and r.get("mode") == "bidirectional" and r["padding"] == row["padding"])
            causal_ok &= shift > 1e-3 if row["mode"] == "bidirectional" else shift < 0.01 * bidir
        row["ok"] = bool(close and causal_ok)
        ok &= row["ok"]
    record: dict[str, Any] = {"ok": bool(ok), "flash_attn": version, "compared": f"sdpa vs {impl}", "dtype": "bfloat16",
                              "device": torch.cuda.get_device_name(0) if device == "cuda" else device,
                              "min_cosine_required": cfg["min_cosine"], "rows": rows}
    if not version:
        record["skipped"] = f"{why_not}: sdpa compared with sdpa (the code path only, no flash-attention)"
    return record


# ----------------------------------------------------------------------------- train, export


def _train_recipe(s: dict[str, Any]) -> dict[str, Any]:
    cfg, work = s["train"], Path(s["workdir"])
    return {"model": {"random_init": cfg["shape"], "tokenizer": "bytes", "dtype": "bfloat16",
                      "attn_implementation": "flash_attention_2" if flash_installed() else "sdpa",
                      "gradient_checkpointing": True, "max_length": cfg["max_length"], "padding_side": "left"},
            "attention": {"mode": "bidirectional"},
            "pooling": {"type": "multi_layer_attention", "layers": "all", "layer_weights": True, **cfg["head"]},
            "lora": {"enabled": True, "r": 16, "alpha": 32, "dropout": 0.1},
            "data": {"train": [str(work / "train.jsonl")], "num_negatives": 1,
                     "instructions": {"default": PROBE_INSTRUCTION}},
            "optim": {"lr": 1e-4, "warmup_steps": 0, "weight_decay": 0.0},
            "train": {"output_dir": str(work / "run"), "max_steps": cfg["steps"], "micro_batch_size": cfg["batch"],
                      "cache_chunk_size": cfg["chunk"], "save_steps": cfg["steps"], "overwrite": True},
            "deepspeed": {"zero_stage": 3}, "logging": {"progress_bar": False, "tensorboard": False}}


def part_train(s: dict[str, Any]) -> dict[str, Any]:
    import yaml

    from dsembed.bench.common import contrastive_examples
    from dsembed.config import recipe_from_dict
    from dsembed.recipe_rules import validate
    from dsembed.testhooks import DUMP_EMBEDDINGS_ENV
    from dsembed.training.engine import shutdown_distributed
    from dsembed.training.trainer import train

    work, cfg = Path(s["workdir"]), s["train"]
    rows = [{"query": e.query, "positive": e.positive, "negative": e.negatives[0]}
            for e in contrastive_examples(cfg["rows"], seed=0)]
    (work / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    data = _train_recipe(s)
    (work / "recipe.yaml").write_text(yaml.safe_dump(data, sort_keys=False), encoding="utf-8")
    dump = work / "dump"
    dump.mkdir(exist_ok=True)
    probe = {"texts": _texts(6, 3, 40, seed=3), "queries": _texts(3, 3, 10, seed=4), "instruction": PROBE_INSTRUCTION}
    (dump / "probe.json").write_text(json.dumps(probe), encoding="utf-8")
    recipe = recipe_from_dict(data, str(work / "recipe.yaml"))
    validate(recipe, world_size=1)
    os.environ[DUMP_EMBEDDINGS_ENV] = str(dump)
    try:
        step = train(recipe)
    finally:
        shutdown_distributed()
    metrics = [json.loads(line) for line in (work / "run" / "metrics.jsonl").read_text().splitlines()]
    losses = [m["train/loss"] for m in metrics]
    finite = all(x == x and abs(x) != float("inf") for x in losses)
    return {"ok": step == cfg["steps"] and finite and (dump / "embeddings.npz").is_file(), "steps": step,
            "attn_implementation": data["model"]["attn_implementation"], "loss": losses,
            "step_time_s": [m["perf/step_time_s"] for m in metrics], "tokens_per_s": [m["perf/tokens_per_s"] for m in metrics],
            "peak_memory_mib": max(m["perf/peak_memory_mib"] for m in metrics),
            "setup": {"zero_stage": 3, "dtype": "bfloat16", "lora_r": 16, "gradient_checkpointing": True,
                      "micro_batch_size": cfg["batch"], "cache_chunk_size": cfg["chunk"], "max_length": cfg["max_length"],
                      "layers": cfg["shape"]["num_hidden_layers"], "hidden_size": cfg["shape"]["hidden_size"]}}


def part_export(s: dict[str, Any]) -> dict[str, Any]:
    import numpy as np

    from dsembed import EmbeddingModel
    from dsembed.export.consolidate import export_checkpoint
    from dsembed.modeling.backbone import unwrap

    work = Path(s["workdir"])
    live_file = work / "dump" / "embeddings.npz"
    if not live_file.is_file():
        return {"ok": False, "error": f"{live_file} is missing: the train part did not finish"}
    start = time.perf_counter()
    summary = export_checkpoint(work / "run", work / "model", overwrite=True)
    export_s = time.perf_counter() - start
    model = EmbeddingModel.load(work / "model", device=s["device"])
    probe = json.loads((work / "dump" / "probe.json").read_text(encoding="utf-8"))
    live = np.load(live_file)
    docs = model.encode(probe["texts"])
    queries = model.encode(probe["queries"], instruction=probe["instruction"])

    def cos(a: Any, b: Any) -> float:
        return float(((a * b).sum(1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1))).min())

    cosines = {"documents": cos(docs, live["documents"]), "queries": cos(queries, live["queries"])}
    return {"ok": min(cosines.values()) >= s["export_min_cosine"], "min_cosine": cosines,
            "min_cosine_required": s["export_min_cosine"], "export_s": export_s, "step": summary.step,
            "backbone_dtype": summary.backbone_dtype, "head_parameters": summary.head_parameters,
            "backbone_parameters": summary.backbone_parameters,
            "reloaded_attn_implementation": unwrap(model.backbone).config._attn_implementation}


# ----------------------------------------------------------------------------- eval, mfu


def write_tasks(root: Path, seed: int = 0) -> Path:
    """Four small local tasks (sts, retrieval, classification, clustering) of topic words under `root`."""
    import random

    rng = random.Random(seed)
    topics = list(TOPICS)

    def about(topic: str, n: int = 6) -> str:
        return " ".join(rng.choice(TOPICS[topic].split()) for _ in range(n))

    def jsonl(path: Path, rows: list[dict]) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")

    jsonl(root / "sts" / "ProofSTS" / "test.jsonl",
          [{"sentence1": about(topics[i % 4]), "sentence2": about(topics[(i // 2) % 4]),
            "score": 4.5 if i % 4 == (i // 2) % 4 else 0.5 + (i % 3) * 0.3} for i in range(32)])
    docs = [{"_id": f"d{i}", "title": "", "text": about(topics[i % 4], 10)} for i in range(24)]
    jsonl(root / "retrieval" / "ProofRetrieval" / "corpus.jsonl", docs)
    jsonl(root / "retrieval" / "ProofRetrieval" / "queries.jsonl",
          [{"_id": f"q{i}", "text": " ".join(docs[i]["text"].split()[:3])} for i in range(12)])
    (root / "retrieval" / "ProofRetrieval" / "qrels").mkdir(parents=True, exist_ok=True)
    (root / "retrieval" / "ProofRetrieval" / "qrels" / "test.tsv").write_text(
        "query-id\tcorpus-id\tscore\n" + "".join(f"q{i}\td{i}\t1\n" for i in range(12)), encoding="utf-8")
    for split, n in (("train", 12), ("test", 8)):
        jsonl(root / "classification" / "ProofClassification" / f"{split}.jsonl",
              [{"text": about(t), "label": t} for t in topics for _ in range(n)])
    jsonl(root / "clustering" / "ProofClustering" / "test.jsonl",
          [{"sentences": [about(t) for t in topics for _ in range(6)], "labels": [t for t in topics for _ in range(6)]}
           for _ in range(2)])
    return root


def part_eval(s: dict[str, Any]) -> dict[str, Any]:
    work = Path(s["workdir"])
    tasks = write_tasks(work / "tasks")
    exported = (work / "model" / "dsembed.json").is_file()
    target = [str(work / "model")] if exported else ["--base", str(work / "recipe.yaml")]
    if not exported and not (work / "recipe.yaml").is_file():
        return {"ok": False, "error": "neither the export nor the train recipe exists (the train part did not run)"}
    output = work / "eval" / "results.json"
    command = [sys.executable, "-m", "dsembed.cli.evaluate", *target, "--tasks-dir", str(tasks), "--output", str(output),
               "--no-progress", "--overwrite"]
    start = time.perf_counter()
    done = subprocess.run(command, capture_output=True, text=True, env={**os.environ, "TOKENIZERS_PARALLELISM": "false"})
    wall = time.perf_counter() - start
    if done.returncode != 0:
        return {"ok": False, "error": f"dsembed-evaluate exit {done.returncode}: {(done.stderr.strip().splitlines() or [''])[-1]}",
                "stderr_tail": done.stderr[-3000:], "wall_s": wall}
    results = json.loads(output.read_text(encoding="utf-8"))
    scores = {name: t["main_score"] for name, t in results["tasks"].items()}
    # a NaN score is a finding, not a broken pipeline: an untrained or tiny bf16 model can embed short
    # texts alike (all cosines 1.0 -> Spearman NaN); the record names such tasks
    non_finite = sorted(name for name, v in scores.items() if not (isinstance(v, (int, float)) and abs(v) < float("inf")))
    return {"ok": sorted(scores) == ["ProofClassification", "ProofClustering", "ProofRetrieval", "ProofSTS"],
            "evaluated": "export" if exported else "untrained model (--base)", "ranks": results["settings"].get("ranks"),
            "main_scores": scores, "non_finite": non_finite, "wall_s": wall,
            "texts_embedded": results.get("encoding", {}).get("embedded")}


def part_mfu(s: dict[str, Any]) -> dict[str, Any]:
    from dsembed.bench.gpu import run_one

    cfg = s["mfu"]
    row = run_one(cfg["shape"], "last_token", cfg["batch"], cfg["seq_len"], cfg["warmup"], cfg["steps"],
                  layers=cfg["layers"], attn="flash_attention_2" if flash_installed() else "sdpa")
    row["flop_convention"] = ("model FLOPs/token = 6*N + 12*L*D*T (PaLM, Chowdhery et al. 2022, app. B); N = matmul "
                              "parameters (backbone minus embeddings + LoRA + head); MFU = model FLOPs/s / bf16 dense peak")
    return {"ok": row["tokens_per_s"] > 0, **row}


PARTS = {"flash": part_flash, "train": part_train, "export": part_export, "eval": part_eval, "mfu": part_mfu}
