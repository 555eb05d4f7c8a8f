"""`memory` and `cached`: peak memory of the multi-layer head and of cached (GradCache) steps.

memory: on one tokenized batch, peak tensor memory (common.peak_bytes: torch.profiler allocation
    events, weights excluded) of
      last_token            the EOS state of the last layer (model1);
      multi_layer_taps      the multi-layer head over ALL layers, as dsembed computes it: forward hooks
                            pool each layer's output as it is produced (dsembed.modeling.layers);
      multi_layer_ohs       the same head fed from `output_hidden_states=True` (all L+1 [B, T, D]
                            states kept until the forward returns), what a straightforward
                            implementation does;
    in training (LoRA, forward + backward of a fixed projection of the embeddings, gradients included)
    and inference (no_grad forward). The head's own parameters and activations are part of the
    multi-layer figures; `head_only` measures the head alone on [B, K, D] inputs for reference.
cached: time and peak memory per optimizer step (forward, loss, backward, AdamW) against the
    contrastive batch size, plain (`gradcache.plain_backward`) and cached (`gradcache.cached_backward`,
    train.cache_chunk_size), the trainer's own functions through `common.LocalEngine`.
"""
from __future__ import annotations

import copy
from typing import Any

import torch
import torch.nn.functional as F
import yaml

from dsembed.bench.common import (TINY_RECIPE, LocalEngine, bench_recipe, build_dsembed, contrastive_examples,
                                  interleaved, mib, peak_bytes, sentences)

_TINY_HEAD = {"num_latents": 16, "num_heads": 4, "head_dim": 16}


def multi_layer_pooling(model: str) -> dict[str, Any]:
    """The multi-layer head over all layers: tiny-cpu.yaml's sizes on the tiny model, dataclass defaults otherwise."""
    pooling: dict[str, Any] = {"type": "multi_layer_attention", "layers": "all", "layer_weights": True}
    if model == "tiny":
        sizes = dict(_TINY_HEAD)
        if TINY_RECIPE.is_file():
            section = yaml.safe_load(TINY_RECIPE.read_text(encoding="utf-8"))["pooling"]
            sizes = {k: v for k, v in section.items() if k in ("num_latents", "num_heads", "head_dim", "ffn_mult")}
        pooling.update(sizes)
    return pooling


def forward_output_hidden_states(model: Any, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """EmbeddingModel.forward for a multi-layer head, fed from output_hidden_states=True instead of taps.

    hidden_states[i] is the output of decoder layer i (1-based) for i < L; hidden_states[-1] is the
    final-normed state (layer L), as the taps define them.
    """
    from dsembed.modeling.layers import masked_mean

    position_ids = (attention_mask.long().cumsum(dim=-1) - 1).clamp_min(0)  # [B, T]
    out = model.backbone(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                         use_cache=False, output_hidden_states=True)
    states = out.hidden_states  # L+1 x [B, T, D]
    depth = len(states) - 1
    means = [masked_mean(states[i] if i < depth else states[-1], attention_mask) for i in model.pooler.tapped_layers]
    emb = model.pooler(out.last_hidden_state, attention_mask, torch.stack(means, dim=1))  # [B, D]
    return F.normalize(emb, dim=-1) if model.recipe.model.normalize else emb


def bench_memory(model: str, batch_size: int, max_length: int | None, gradient_checkpointing: bool = False,
                 log: Any = print) -> dict[str, Any]:
    """Peak memory of last_token / multi_layer_taps / multi_layer_ohs in training and inference.

    Returns:
        {"config", "results": {mode: {case: peak MiB}}, "ratios": {...}, "rows"}.
    """
    last = bench_recipe(model, {"type": "last_token"}, lora=True, max_length=max_length,
                        gradient_checkpointing=gradient_checkpointing)
    multi = bench_recipe(model, multi_layer_pooling(model), lora=True, max_length=max_length,
                         gradient_checkpointing=gradient_checkpointing)
    models = {"last_token": build_dsembed(last), "multi_layer": build_dsembed(multi)}
    batch = models["last_token"].tokenize(sentences(batch_size, 20, 200, seed=3))
    ids, mask = batch["input_ids"], batch["attention_mask"]
    dim = models["last_token"].dim
    probe = torch.randn(batch_size, dim, generator=torch.Generator().manual_seed(0))  # [B, D] fixed projection
    cases = {
        "last_token": lambda: models["last_token"](ids, mask),
        "multi_layer_taps": lambda: models["multi_layer"](ids, mask),
        "multi_layer_ohs": lambda: forward_output_hidden_states(models["multi_layer"], ids, mask),
    }
    depth = len(models["multi_layer"].pooler.tapped_layers)
    log(f"memory: {model}, batch {batch_size} x {ids.shape[1]} tokens, {depth} tapped layers, "
        f"gradient checkpointing {gradient_checkpointing}")

    def train_step(fn):
        def run():
            (fn() * probe).sum().backward()
        return run

    results: dict[str, dict[str, float]] = {"train": {}, "inference": {}}
    for name, fn in cases.items():
        owner = models["last_token"] if name == "last_token" else models["multi_layer"]
        owner.train()
        owner.zero_grad(set_to_none=True)
        train_step(fn)()  # warm-up (lazy initialisation outside the probe)
        owner.zero_grad(set_to_none=True)
        results["train"][name] = mib(peak_bytes(train_step(fn)))
        owner.zero_grad(set_to_none=True)
        owner.eval()
        with torch.no_grad():
            results["inference"][name] = mib(peak_bytes(fn))
    # the head alone on its [B, K, D] input: its share of the multi-layer figures
    pooler = models["multi_layer"].pooler.train()
    means = torch.randn(batch_size, depth, dim, requires_grad=True)  # [B, K, D]
    results["train"]["head_only"] = mib(peak_bytes(lambda: (pooler(None, mask, means) * probe).sum().backward()))
    with torch.no_grad():
        results["inference"]["head_only"] = mib(peak_bytes(lambda: pooler(None, mask, means)))
    ratios, rows = {}, []
    for mode, r in results.items():
        ratios[mode] = {"taps_vs_last_token": r["multi_layer_taps"] / r["last_token"],
                        "ohs_vs_last_token": r["multi_layer_ohs"] / r["last_token"],
                        "taps_vs_ohs": r["multi_layer_taps"] / r["multi_layer_ohs"],
                        "taps_minus_head_vs_last_token": (r["multi_layer_taps"] - r["head_only"]) / r["last_token"]}
        for case in ("last_token", "multi_layer_taps", "multi_layer_ohs", "head_only"):
            rows.append({"model": model, "mode": mode, "case": case, "peak_MiB": r[case],
                         "vs last_token": r[case] / r["last_token"]})
    head_params = sum(p.numel() for p in pooler.parameters())
    return {"config": {"model": model, "batch_size": batch_size, "tokens": int(ids.shape[1]),
                       "max_length": last.model.max_length, "layers": depth, "gradient_checkpointing": gradient_checkpointing,
                       "head": {k: v for k, v in multi_layer_pooling(model).items() if k != "type"},
                       "head_parameters": head_params, "lora": True,
                       "method": "torch.profiler profile_memory: peak of live tensor bytes allocated inside the probe"},
            "results": results, "ratios": ratios, "rows": rows}


def bench_cached(model: str, batch_sizes: list[int], chunk_size: int, max_length: int | None, repeats: int,
                 log: Any = print) -> dict[str, Any]:
    """Time and peak memory per step, plain vs cached, for each contrastive batch size.

    The model is the tiny-cpu recipe's (multi-layer head, bidirectional, LoRA) on `model`'s backbone.

    Returns:
        {"config", "results": [{batch, plain_s, cached_s, plain_MiB, cached_MiB, ...}], "rows",
         "ratio_at_256"} (ratio_at_256: cached / plain peak memory at batch 256, when measured).
    """
    from dsembed.data.batches import collate
    from dsembed.training.gradcache import cached_backward, plain_backward

    recipe = bench_recipe(model, multi_layer_pooling(model), lora=True, max_length=max_length, attention="bidirectional")
    emb_model = build_dsembed(recipe).train()
    engine = LocalEngine(emb_model, lr=recipe.optim.lr, weight_decay=recipe.optim.weight_decay)
    temperature = recipe.loss.temperature
    examples = contrastive_examples(max(batch_sizes), query_words=(5, 20), doc_words=(10, 60))
    log(f"cached: {model}, batch sizes {batch_sizes}, chunk {chunk_size}, max_length {recipe.model.max_length}")
    rows = []
    for size in batch_sizes:
        batch = collate(examples[:size], emb_model.tokenizer, recipe)

        def plain() -> None:
            plain_backward(engine, batch, temperature, gather=False, boundary=True)
            engine.step()

        def cached() -> None:
            cached_backward(engine, batch, temperature, gather=False, chunk_size=chunk_size, boundary=True)
            engine.step()

        timing = interleaved({"plain": plain, "cached": cached}, repeats, warmup=1)
        peaks = {name: mib(peak_bytes(fn)) for name, fn in (("plain", plain), ("cached", cached))}
        tokens = int(batch["query"]["attention_mask"].sum() + batch["documents"]["attention_mask"].sum())
        row = {"model": model, "batch": size, "chunk": chunk_size, "tokens": tokens,
               "plain_s": timing["plain"]["median_s"], "cached_s": timing["cached"]["median_s"],
               "time cached/plain": timing["cached"]["median_s"] / timing["plain"]["median_s"],
               "plain_MiB": peaks["plain"], "cached_MiB": peaks["cached"],
               "memory cached/plain": peaks["cached"] / peaks["plain"]}
        log(f"  batch {size}: plain {row['plain_s']:.3f} s {row['plain_MiB']} MiB, cached {row['cached_s']:.3f} s {row['cached_MiB']} MiB")
        rows.append(row)
    at_256 = next((r["memory cached/plain"] for r in rows if r["batch"] == 256), None)
    return {"config": {"model": model, "batch_sizes": batch_sizes, "chunk_size": chunk_size,
                       "max_length": recipe.model.max_length, "repeats": repeats,
                       "recipe": "tiny-cpu head (multi-layer, all layers), bidirectional, LoRA r16",
                       "memory_method": "torch.profiler profile_memory, one step incl. AdamW, optimizer state excluded (exists before)"},
            "results": copy.deepcopy(rows), "rows": rows, "ratio_at_256": at_256}


MEMORY_COLUMNS = ["model", "mode", "case", "peak_MiB", "vs last_token"]
CACHED_COLUMNS = ["model", "batch", "chunk", "tokens", "plain_s", "cached_s", "time cached/plain",
                  "plain_MiB", "cached_MiB", "memory cached/plain"]
