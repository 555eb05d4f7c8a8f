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
dtypes (`--dtype float32,bfloat16`): every contender once per dtype, all interleaved in one run, so
    each dtype is compared with the first (e.g. float32) and with sentence-transformers in the same
    dtype under the same load. Training in bfloat16: dsembed as its trainer does (weights in bf16,
    float32 master weights and AdamW state, DeepSpeed's bf16 mode); sentence-transformers as
    SentenceTransformerTrainer(bf16=True) does (float32 weights, forward under torch.autocast).
    Encoding in bfloat16: both hold bf16 weights (the same float32 weights, rounded). The encode
    benchmark reports the smallest cosine between each text's embeddings in the two dtypes.

Throughput: samples/s counts training triplets (train) or texts (encode), the unit both sides share;
tokens/s counts each side's own real (non-padding) tokens: dsembed appends an EOS to every text, so
its token counts are slightly higher for the same texts.
"""
from __future__ import annotations

import contextlib
import itertools
from typing import Any

import torch

from dsembed.bench.common import (bench_recipe, build_dsembed, build_sentence_transformer, contrastive_examples,
                                  interleaved, sentences, table)


def _names(dtypes: list[str]) -> dict[tuple[str, str], str]:
    """Contender names: "dsembed" / "sentence-transformers" for one dtype, "<impl> <dtype>" for several."""
    return {(impl, d): impl if len(dtypes) == 1 else f"{impl} {d}" for d in dtypes for impl in IMPLS}


def _dtype_ratios(results: dict[str, dict[str, Any]], dtypes: list[str], rate: str) -> dict[str, Any]:
    """Per dtype dsembed / ST, and per implementation each dtype against the first (e.g. float32)."""
    names = _names(dtypes)
    out: dict[str, Any] = {"vs_st": {}, "vs_first_dtype": {}}
    for d in dtypes:
        ds, st = results[names["dsembed", d]], results[names["sentence-transformers", d]]
        out["vs_st"][d] = {"median": ds[rate] / st[rate], "best_of": st["min_s"] / ds["min_s"]}
    for d in dtypes[1:]:
        out["vs_first_dtype"][d] = {impl: {"median": results[names[impl, d]][rate] / results[names[impl, dtypes[0]]][rate],
                                           "best_of": results[names[impl, dtypes[0]]]["min_s"] / results[names[impl, d]]["min_s"]}
                                    for impl in IMPLS}
    return out


def bench_train(model: str, batch_size: int, max_length: int | None, repeats: int, num_batches: int = 4,
                warmup: int = 1, deepspeed: bool = False, dtypes: list[str] | None = None,
                log: Any = print) -> dict[str, Any]:
    """Training-step throughput of dsembed and sentence-transformers in each dtype, all interleaved.

    Args:
        model: "tiny" or "smollm2".
        batch_size: triplets per step (contrastive batch).
        max_length: token limit (None: the model's benchmark default).
        repeats: timed steps per contender.
        num_batches: distinct batches cycled through.
        warmup: untimed steps per contender first.
        deepspeed: add, per dtype, "dsembed+deepspeed": the same step through
            dsembed.training.engine.Engine (DeepSpeed ZeRO stage 2, one rank, torch AdamW, clipping
            1.0; bf16 in DeepSpeed's bf16 mode, float32 master weights), as the trainer runs it.
        dtypes: e.g. ["float32", "bfloat16"] (default float32 only). dsembed trains as the trainer
            does: weights in the dtype, float32 master weights and AdamW state (`LocalEngine`);
            sentence-transformers as SentenceTransformerTrainer(bf16=True) does: float32 weights
            under torch.autocast(bfloat16).

    Returns:
        {"config", "results": {name: {...}}, "ratio_samples_per_s" (dsembed/ST, first dtype),
         "dtype_ratios" (per dtype vs ST, per implementation vs the first dtype), "rows"}; each
        result holds its step times and the loss of every step ("losses").
    """
    from sentence_transformers.sentence_transformer.losses import MultipleNegativesRankingLoss

    from dsembed.bench.common import LocalEngine
    from dsembed.data.batches import collate, query_text
    from dsembed.modeling.precision import resolve_dtype
    from dsembed.training.gradcache import plain_backward

    dtypes = [resolve_dtype(d).dtype for d in (dtypes or ["float32"])]
    names = _names(dtypes)
    examples = contrastive_examples(batch_size * num_batches)
    batches = [examples[i * batch_size:(i + 1) * batch_size] for i in range(num_batches)]
    contenders: dict[str, Any] = {}
    tokens: dict[str, list[int]] = {}
    losses: dict[str, list[float]] = {}
    trainable: dict[str, int] = {}
    ds_engines = []
    recipe = None
    for dtype in dtypes:
        recipe = bench_recipe(model, {"type": "last_token"}, lora=True, max_length=max_length, dtype=dtype)
        temperature = recipe.loss.temperature
        ds_model = build_dsembed(recipe)
        ds_model.train()
        engine = LocalEngine(ds_model, lr=recipe.optim.lr, weight_decay=recipe.optim.weight_decay)
        st_model = build_sentence_transformer(recipe, lora=True, dtype="float32")
        st_model.train()
        st_loss = MultipleNegativesRankingLoss(st_model, scale=1.0 / temperature)
        st_params = [p for p in st_model.parameters() if p.requires_grad]
        st_opt = torch.optim.AdamW(st_params, lr=recipe.optim.lr, weight_decay=recipe.optim.weight_decay)
        autocast = (lambda: torch.autocast("cpu", dtype=torch.bfloat16)) if dtype == "bfloat16" else contextlib.nullcontext

        def ds_step(name=names["dsembed", dtype], model_=ds_model, engine_=engine, it=itertools.cycle(batches), r=recipe) -> None:
            batch = collate(next(it), model_.tokenizer, r)
            stats = plain_backward(engine_, batch, r.loss.temperature, gather=False, boundary=True)
            engine_.step()
            tokens[name].append(stats.tokens)
            losses[name].append(stats.loss)

        def st_step(name=names["sentence-transformers", dtype], model_=st_model, loss_fn=st_loss, params=st_params,
                    opt=st_opt, it=itertools.cycle(batches), r=recipe, amp=autocast) -> None:
            exs = next(it)
            columns = [[query_text(e, r) for e in exs], [e.positive for e in exs], [e.negatives[0] for e in exs]]
            features = [model_.preprocess(col) for col in columns]
            with amp():
                loss = loss_fn(features, None)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            opt.step()
            opt.zero_grad(set_to_none=True)
            tokens[name].append(sum(int(f["attention_mask"].sum()) for f in features))
            losses[name].append(float(loss.detach()))

        for impl, fn, params in (("dsembed", ds_step, ds_model.parameters()), ("sentence-transformers", st_step, st_params)):
            contenders[names[impl, dtype]] = fn
            tokens[names[impl, dtype]], losses[names[impl, dtype]] = [], []
            trainable[names[impl, dtype]] = sum(p.numel() for p in params if p.requires_grad)
        if deepspeed:
            import dataclasses

            from dsembed.training.engine import Engine

            ds_recipe = dataclasses.replace(recipe, deepspeed=dataclasses.replace(recipe.deepspeed, zero_stage=2),
                                            train=dataclasses.replace(recipe.train, micro_batch_size=batch_size))
            dd_engine = Engine.create(ds_recipe, lambda r=ds_recipe: build_dsembed(r))
            dd_engine.train()
            ds_engines.append(dd_engine)
            name = "dsembed+deepspeed" if len(dtypes) == 1 else f"dsembed+deepspeed {dtype}"
            tokens[name], losses[name] = [], []
            trainable[name] = trainable[names["dsembed", dtype]]

            def dd_step(name=name, engine_=dd_engine, it=itertools.cycle(batches), r=recipe) -> None:
                batch = collate(next(it), engine_.module.tokenizer, r)
                stats = plain_backward(engine_, batch, r.loss.temperature, gather=False, boundary=True)
                engine_.step()
                tokens[name].append(stats.tokens)
                losses[name].append(stats.loss)

            contenders[name] = dd_step
    log(f"train: {model}, batch {batch_size} triplets, max_length {recipe.model.max_length}, dtypes {', '.join(dtypes)}, "
        f"{repeats} steps each")
    try:
        timing = interleaved(contenders, repeats, warmup)
    finally:
        if ds_engines:
            from dsembed.training.engine import shutdown_distributed

            shutdown_distributed()
    results, rows = {}, []
    for name, t in timing.items():
        tok = sum(tokens[name]) / len(tokens[name])  # mean real tokens per step
        results[name] = {**t, "tokens_per_step": tok, "samples_per_s": batch_size / t["median_s"],
                         "tokens_per_s": tok / t["median_s"], "trainable_parameters": trainable[name],
                         "losses": [round(x, 5) for x in losses[name]]}
        dtype = next((d for d in dtypes if name.endswith(d)), dtypes[0])
        rows.append({"model": model, "implementation": name, "dtype": dtype, "batch": batch_size, "step_s": t["median_s"],
                     "min_s": t["min_s"], "samples/s": results[name]["samples_per_s"], "tokens/s": results[name]["tokens_per_s"]})
    ratios = _dtype_ratios(results, dtypes, "samples_per_s")
    for row in rows:
        st_rate = results[names["sentence-transformers", row["dtype"]]]["samples_per_s"]
        first = results.get(row["implementation"].replace(row["dtype"], dtypes[0]))
        row["dsembed/ST"] = None if row["implementation"].startswith("sentence") else row["samples/s"] / st_rate
        row[f"vs {dtypes[0]}"] = None if len(dtypes) == 1 or first is None else row["samples/s"] / first["samples_per_s"]
    first = dtypes[0]
    out_ratio: dict[str, Any] = {"ratio_samples_per_s": ratios["vs_st"][first]["median"],
                                 # best-of ratio: contention on a shared machine only adds time, so min/min is the cleaner estimate
                                 "ratio_min_time": ratios["vs_st"][first]["best_of"], "dtype_ratios": ratios}
    if deepspeed and len(dtypes) == 1:
        out_ratio["ratio_deepspeed_samples_per_s"] = (results["dsembed+deepspeed"]["samples_per_s"]
                                                      / results["sentence-transformers"]["samples_per_s"])
    return {**out_ratio, "config": {"model": model, "batch_size": batch_size, "max_length": recipe.model.max_length,
                                    "repeats": repeats, "warmup": warmup, "lora": {"r": 16, "alpha": 32},
                                    "pooling": "last_token", "dtypes": dtypes,
                                    "dsembed_path": "collate + gradcache.plain_backward + clip + torch AdamW (LocalEngine, no "
                                                    "DeepSpeed; low-precision weights with float32 masters)",
                                    "st_path": "preprocess + MultipleNegativesRankingLoss + clip + torch AdamW "
                                               "(bfloat16: float32 weights under torch.autocast, as SentenceTransformerTrainer(bf16=True))"},
            "results": results, "rows": rows}


def bench_encode(model: str, num_texts: int, batch_size: int, max_length: int | None, repeats: int,
                 lora: bool = False, warmup: int = 1, dtypes: list[str] | None = None,
                 log: Any = print) -> dict[str, Any]:
    """Encoding throughput (texts/s) of EmbeddingModel.encode and SentenceTransformer.encode in each dtype, interleaved.

    Both sides hold their weights in the dtype (sentence-transformers: model_kwargs dtype), the same
    weights rounded from the float32 checkpoint.

    Returns:
        {"config", "results": {name: {...}}, "ratio_texts_per_s" (dsembed/ST, first dtype),
         "dtype_ratios", "min_cosine_to_first_dtype" (dsembed and ST, each dtype against the first),
         "min_cosine_dsembed_vs_st", "rows"}.
    """
    from dsembed.modeling.precision import resolve_dtype

    dtypes = [resolve_dtype(d).dtype for d in (dtypes or ["float32"])]
    names = _names(dtypes)
    texts = sentences(num_texts, 5, 200, seed=7)
    out: dict[str, Any] = {}
    contenders: dict[str, Any] = {}
    models: dict[str, Any] = {}
    for dtype in dtypes:
        recipe = bench_recipe(model, {"type": "last_token"}, lora=lora, max_length=max_length, dtype=dtype)
        ds_model = build_dsembed(recipe).eval()
        st_model = build_sentence_transformer(recipe, lora=lora).eval()
        models[dtype] = ds_model
        ds_name, st_name = names["dsembed", dtype], names["sentence-transformers", dtype]
        contenders[ds_name] = lambda m=ds_model, n=ds_name: out.__setitem__(n, m.encode(texts, batch_size=batch_size))
        contenders[st_name] = lambda m=st_model, n=st_name: out.__setitem__(n, m.encode(
            texts, batch_size=batch_size, normalize_embeddings=True, convert_to_numpy=True))
    ds_model = models[dtypes[0]]
    log(f"encode: {model}, {num_texts} texts, batch {batch_size}, max_length {ds_model.recipe.model.max_length}, "
        f"dtypes {', '.join(dtypes)}, {repeats} rounds each")
    timing = interleaved(contenders, repeats, warmup)
    tokens = int(sum(int(ds_model.tokenize(texts[i:i + 64])["attention_mask"].sum()) for i in range(0, len(texts), 64)))
    results, rows = {}, []
    for name, t in timing.items():
        results[name] = {**t, "texts_per_s": num_texts / t["median_s"], "tokens_per_s": tokens / t["median_s"]}
        dtype = next((d for d in dtypes if name.endswith(d)), dtypes[0])
        rows.append({"model": model, "implementation": name, "dtype": dtype, "texts": num_texts, "batch": batch_size,
                     "seconds": t["median_s"], "min_s": t["min_s"], "texts/s": results[name]["texts_per_s"]})
    ratios = _dtype_ratios(results, dtypes, "texts_per_s")
    for row in rows:
        st = results[names["sentence-transformers", row["dtype"]]]["texts_per_s"]
        first = results.get(row["implementation"].replace(row["dtype"], dtypes[0]))
        row["dsembed/ST"] = None if row["implementation"].startswith("sentence") else row["texts/s"] / st
        row[f"vs {dtypes[0]}"] = None if len(dtypes) == 1 or first is None else row["texts/s"] / first["texts_per_s"]
    cos = lambda a, b: float((a * b).sum(axis=1).min())  # noqa: E731 - both sides are L2-normalised
    to_first = {d: {impl: cos(out[names[impl, d]], out[names[impl, dtypes[0]]]) for impl in IMPLS} for d in dtypes[1:]}
    first = dtypes[0]
    # dsembed appends EOS and pools it, ST pools the last text token: embeddings agree only roughly.
    agreement = cos(out[names["dsembed", first]], out[names["sentence-transformers", first]])
    return {"config": {"model": model, "num_texts": num_texts, "batch_size": batch_size,
                       "max_length": ds_model.recipe.model.max_length, "repeats": repeats, "lora": lora,
                       "text_words": [5, 200], "dsembed_tokens": tokens, "dtypes": dtypes},
            "results": results, "ratio_texts_per_s": ratios["vs_st"][first]["median"],
            "ratio_min_time": ratios["vs_st"][first]["best_of"], "dtype_ratios": ratios,
            "min_cosine_to_first_dtype": to_first, "min_cosine_dsembed_vs_st": agreement, "rows": rows}


IMPLS = ("dsembed", "sentence-transformers")
TRAIN_COLUMNS = ["model", "implementation", "dtype", "batch", "step_s", "min_s", "samples/s", "tokens/s", "dsembed/ST",
                 "vs float32"]
ENCODE_COLUMNS = ["model", "implementation", "dtype", "texts", "batch", "seconds", "min_s", "texts/s", "dsembed/ST",
                  "vs float32"]


def print_rows(rows: list[dict[str, Any]], columns: list[str]) -> None:
    print(table(rows, columns))
