"""`train` and `encode`: dsembed against sentence-transformers on the same backbone, batch and lengths.

train: one optimizer step on a contrastive batch of b (query, positive, hard negative) triplets.
    dsembed: `dsembed.data.batches.collate` (tokenize) -> `dsembed.training.gradcache.plain_backward` (the trainer's
        step: query forward, documents forward, `info_nce`, backward) -> clip 1.0 -> torch AdamW,
        through `LocalEngine` (one process, no DeepSpeed: ZeRO-0 on one rank adds only bookkeeping);
        with `deepspeed=True` also through `dsembed.training.engine.Engine` (ZeRO stage 0, one rank).
    sentence-transformers: the loop SentenceTransformerTrainer runs per step, written out:
        `model.preprocess` per column -> `MultipleNegativesRankingLoss` (scale 1/temperature = 20;
        it merges the positive and negative columns into one forward, as dsembed does) -> backward
        -> clip 1.0 -> torch AdamW. Model: Transformer + Pooling(pooling_mode='lasttoken').
    Both: the same backbone weights, fp32, sdpa, causal attention, last-token pooling, L2-normalised
    cosine scores, peft LoRA r=16 alpha=32 on every linear layer, the same texts (queries carry the
    recipe's instruction for both).
encode: `EmbeddingModel.encode` against `SentenceTransformer.encode` (normalize_embeddings=True) on the
    same texts of 5-200 words, batch size and max length, no LoRA (a merged, exported model).

Throughput: samples/s counts training triplets (train) or texts (encode), the unit both sides share;
tokens/s counts each side's own real (non-padding) tokens: dsembed appends an EOS to every text, so
its token counts are slightly higher for the same texts.
"""
from __future__ import annotations

import itertools
from typing import Any

import torch

from dsembed.bench.common import (bench_recipe, build_dsembed, build_sentence_transformer, contrastive_examples,
                                  interleaved, sentences, table)


def bench_train(model: str, batch_size: int, max_length: int | None, repeats: int, num_batches: int = 4,
                warmup: int = 1, deepspeed: bool = False, log: Any = print) -> dict[str, Any]:
    """Training-step throughput of dsembed and sentence-transformers, interleaved.

    Args:
        model: "tiny" or "smollm2".
        batch_size: triplets per step (contrastive batch).
        max_length: token limit (None: the model's benchmark default).
        repeats: timed steps per contender.
        num_batches: distinct batches cycled through.
        warmup: untimed steps per contender first.
        deepspeed: add a third contender, "dsembed+deepspeed": the same step through
            dsembed.training.engine.Engine (DeepSpeed ZeRO stage 0, one rank, fp32, torch AdamW, clipping 1.0).

    Returns:
        {"config", "results": {name: {...}}, "ratio_samples_per_s", "rows"}.
    """
    from sentence_transformers.sentence_transformer.losses import MultipleNegativesRankingLoss

    from dsembed.bench.common import LocalEngine
    from dsembed.data.batches import collate, query_text
    from dsembed.training.gradcache import plain_backward

    recipe = bench_recipe(model, {"type": "last_token"}, lora=True, max_length=max_length)
    temperature = recipe.loss.temperature
    examples = contrastive_examples(batch_size * num_batches)
    batches = [examples[i * batch_size:(i + 1) * batch_size] for i in range(num_batches)]

    ds_model = build_dsembed(recipe)
    ds_model.train()
    engine = LocalEngine(ds_model, lr=recipe.optim.lr, weight_decay=recipe.optim.weight_decay)
    st_model = build_sentence_transformer(recipe, lora=True)
    st_model.train()
    st_loss = MultipleNegativesRankingLoss(st_model, scale=1.0 / temperature)
    st_params = [p for p in st_model.parameters() if p.requires_grad]
    st_opt = torch.optim.AdamW(st_params, lr=recipe.optim.lr, weight_decay=recipe.optim.weight_decay)

    tokens = {"dsembed": [], "sentence-transformers": []}
    ds_iter, st_iter = itertools.cycle(batches), itertools.cycle(batches)

    def ds_step() -> None:
        batch = collate(next(ds_iter), ds_model.tokenizer, recipe)
        stats = plain_backward(engine, batch, temperature, gather=False, boundary=True)
        engine.step()
        tokens["dsembed"].append(stats.tokens)

    def st_step() -> None:
        exs = next(st_iter)
        columns = [[query_text(e, recipe) for e in exs], [e.positive for e in exs], [e.negatives[0] for e in exs]]
        features = [st_model.preprocess(col) for col in columns]
        loss = st_loss(features, None)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(st_params, 1.0)
        st_opt.step()
        st_opt.zero_grad(set_to_none=True)
        tokens["sentence-transformers"].append(sum(int(f["attention_mask"].sum()) for f in features))

    contenders = {"dsembed": ds_step, "sentence-transformers": st_step}
    ds_engine = None
    if deepspeed:
        import dataclasses

        from dsembed.training.engine import Engine

        ds_recipe = dataclasses.replace(recipe, deepspeed=dataclasses.replace(recipe.deepspeed, zero_stage=0),
                                        train=dataclasses.replace(recipe.train, micro_batch_size=batch_size))
        ds_engine = Engine.create(ds_recipe, lambda: build_dsembed(ds_recipe))
        ds_engine.train()
        tokens["dsembed+deepspeed"] = []
        dd_iter = itertools.cycle(batches)

        def dd_step() -> None:
            batch = collate(next(dd_iter), ds_model.tokenizer, recipe)
            stats = plain_backward(ds_engine, batch, temperature, gather=False, boundary=True)
            ds_engine.step()
            tokens["dsembed+deepspeed"].append(stats.tokens)

        contenders["dsembed+deepspeed"] = dd_step
    log(f"train: {model}, batch {batch_size} triplets, max_length {recipe.model.max_length}, {repeats} steps each")
    try:
        timing = interleaved(contenders, repeats, warmup)
    finally:
        if ds_engine is not None:
            from dsembed.training.engine import shutdown_distributed

            shutdown_distributed()
    results, rows = {}, []
    for name, t in timing.items():
        tok = sum(tokens[name]) / len(tokens[name])  # mean real tokens per step
        results[name] = {**t, "tokens_per_step": tok, "samples_per_s": batch_size / t["median_s"],
                         "tokens_per_s": tok / t["median_s"],
                         "trainable_parameters": sum(p.numel() for p in (st_model if name == "sentence-transformers" else ds_model).parameters() if p.requires_grad)}
        rows.append({"model": model, "implementation": name, "batch": batch_size, "step_s": t["median_s"], "min_s": t["min_s"],
                     "samples/s": results[name]["samples_per_s"], "tokens/s": results[name]["tokens_per_s"]})
    ratio = results["dsembed"]["samples_per_s"] / results["sentence-transformers"]["samples_per_s"]
    st_rate = results["sentence-transformers"]["samples_per_s"]
    for row in rows:
        row["dsembed/ST"] = None if row["implementation"] == "sentence-transformers" else row["samples/s"] / st_rate
    out_ratio = {"ratio_deepspeed_samples_per_s": results["dsembed+deepspeed"]["samples_per_s"] / st_rate} if deepspeed else {}
    # best-of ratio: contention on a shared machine only ever adds time, so min/min is the cleaner estimate
    out_ratio["ratio_min_time"] = results["sentence-transformers"]["min_s"] / results["dsembed"]["min_s"]
    return {**out_ratio, "config": {"model": model, "batch_size": batch_size, "max_length": recipe.model.max_length,
                       "repeats": repeats, "warmup": warmup, "lora": {"r": 16, "alpha": 32}, "pooling": "last_token",
                       "dsembed_path": "collate + gradcache.plain_backward + clip + torch AdamW (LocalEngine, no DeepSpeed)",
                       "st_path": "preprocess + MultipleNegativesRankingLoss + clip + torch AdamW"},
            "results": results, "ratio_samples_per_s": ratio, "rows": rows}


def bench_encode(model: str, num_texts: int, batch_size: int, max_length: int | None, repeats: int,
                 lora: bool = False, warmup: int = 1, log: Any = print) -> dict[str, Any]:
    """Encoding throughput (texts/s) of EmbeddingModel.encode and SentenceTransformer.encode, interleaved.

    Returns:
        {"config", "results": {name: {...}}, "ratio_texts_per_s", "max_abs_cosine_gap", "rows"}.
    """
    recipe = bench_recipe(model, {"type": "last_token"}, lora=lora, max_length=max_length)
    texts = sentences(num_texts, 5, 200, seed=7)
    ds_model = build_dsembed(recipe).eval()
    st_model = build_sentence_transformer(recipe, lora=lora).eval()
    out: dict[str, Any] = {}
    contenders = {
        "dsembed": lambda: out.__setitem__("dsembed", ds_model.encode(texts, batch_size=batch_size)),
        "sentence-transformers": lambda: out.__setitem__("sentence-transformers", st_model.encode(
            texts, batch_size=batch_size, normalize_embeddings=True, convert_to_numpy=True)),
    }
    log(f"encode: {model}, {num_texts} texts, batch {batch_size}, max_length {recipe.model.max_length}, {repeats} rounds each")
    timing = interleaved(contenders, repeats, warmup)
    tokens = int(sum(int(ds_model.tokenize(texts[i:i + 64])["attention_mask"].sum()) for i in range(0, len(texts), 64)))
    results, rows = {}, []
    for name, t in timing.items():
        results[name] = {**t, "texts_per_s": num_texts / t["median_s"], "tokens_per_s": tokens / t["median_s"]}
        rows.append({"model": model, "implementation": name, "texts": num_texts, "batch": batch_size,
                     "seconds": t["median_s"], "texts/s": results[name]["texts_per_s"]})
    ratio = results["dsembed"]["texts_per_s"] / results["sentence-transformers"]["texts_per_s"]
    for row in rows:
        row["dsembed/ST"] = ratio if row["implementation"] == "dsembed" else None
        row["min_s"] = results[row["implementation"]]["min_s"]
    ratio_min = results["sentence-transformers"]["min_s"] / results["dsembed"]["min_s"]
    # dsembed appends EOS and pools it, ST pools the last text token: embeddings agree only roughly.
    agreement = float((out["dsembed"] * out["sentence-transformers"]).sum(axis=1).min())
    return {"config": {"model": model, "num_texts": num_texts, "batch_size": batch_size,
                       "max_length": recipe.model.max_length, "repeats": repeats, "lora": lora,
                       "text_words": [5, 200], "dsembed_tokens": tokens},
            "results": results, "ratio_texts_per_s": ratio, "ratio_min_time": ratio_min,
            "min_cosine_dsembed_vs_st": agreement, "rows": rows}


TRAIN_COLUMNS = ["model", "implementation", "batch", "step_s", "min_s", "samples/s", "tokens/s", "dsembed/ST"]
ENCODE_COLUMNS = ["model", "implementation", "texts", "batch", "seconds", "min_s", "texts/s", "dsembed/ST"]


def print_rows(rows: list[dict[str, Any]], columns: list[str]) -> None:
    print(table(rows, columns))
