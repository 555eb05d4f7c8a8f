"""`gpu`: training throughput, peak memory and MFU on one CUDA GPU for paper-sized backbones.

Each configuration (shape x pooling) runs in its own subprocess (`python -m dsembed.bench.gpu --one
...`), so one out-of-memory or one DeepSpeed engine's leftovers cannot spoil the next. Inside it the
trainer's own path runs: `dsembed.training.engine.Engine.create` (DeepSpeed ZeRO-3, one rank, torch AdamW, bf16,
the backbone built partitioned under HfDeepSpeedConfig), `build_model` (random weights from the
shape's config, sdpa, non-reentrant gradient checkpointing, peft LoRA r=16 alpha=32 dropout 0.1 on
all linear layers), and per step `gradcache.plain_backward` + `engine.step()` on a contrastive batch
of b queries, b positives and b hard negatives, all `seq_len` tokens long (random ids, no padding).

FLOP convention (stated in the output): model FLOPs per token = 6 N + 12 L D T (PaLM, Chowdhery et
al. 2022, appendix B), N = parameters that do matmuls (backbone without the embedding table, plus the
pooling head), L layers, D hidden size, T sequence length. MFU = model FLOPs/s / peak bf16 dense
FLOP/s of the GPU. Not counted: the checkpointing recompute (that would be hardware FLOPs) and the
weight gradients LoRA does not compute; with LoRA + checkpointing the executed work is about
2N (forward) + 2N (recompute) + 2N (input gradients) = 6N per token as well, so MFU here is close to
the hardware utilisation.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

SHAPES: dict[str, dict[str, Any]] = {
    # Mistral-7B-v0.1's config.json (sliding window off: sequences here are <= 4096)
    "mistral-7b": {"model_type": "mistral", "hidden_size": 4096, "intermediate_size": 14336, "num_hidden_layers": 32,
                   "num_attention_heads": 32, "num_key_value_heads": 8, "vocab_size": 32000,
                   "max_position_embeddings": 32768, "rms_norm_eps": 1e-5, "rope_theta": 10000.0,
                   "tie_word_embeddings": False},
    # Qwen2-0.5B's config.json
    "qwen2-0.5b": {"model_type": "qwen2", "hidden_size": 896, "intermediate_size": 4864, "num_hidden_layers": 24,
                   "num_attention_heads": 14, "num_key_value_heads": 2, "vocab_size": 151936,
                   "max_position_embeddings": 32768, "rms_norm_eps": 1e-6, "rope_theta": 1000000.0,
                   "tie_word_embeddings": True},
    # a 2-layer stand-in for checking this module's code path on CPU (`run_one` works without CUDA)
    "tiny": {"model_type": "qwen2", "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
             "num_attention_heads": 4, "num_key_value_heads": 2, "vocab_size": 320, "tie_word_embeddings": False},
}
DEFAULT_BATCH = {"mistral-7b": 4, "qwen2-0.5b": 16, "tiny": 2}
# Dense bf16 tensor-core peaks (no sparsity), FLOP/s, matched against torch.cuda.get_device_name.
PEAK_BF16 = [("H200", 989.4e12), ("H100 PCIe", 756.0e12), ("H100", 989.4e12), ("A100", 312.0e12),
             ("L40S", 362.05e12), ("A10G", 70.0e12), ("L4", 121.0e12)]
POOLINGS = {"last_token": {"type": "last_token"},
            "multi_layer": {"type": "multi_layer_attention", "layers": "all", "layer_weights": True}}


def peak_flops(name: str) -> float | None:
    for key, flops in PEAK_BF16:
        if key in name:
            return flops
    return None


def shape_config(shape: str, layers: int | None = None) -> dict[str, Any]:
    """The transformers config mapping of `shape`, with `layers` decoder layers when given."""
    cfg = dict(SHAPES[shape])
    if layers is not None:
        cfg["num_hidden_layers"] = layers
    return cfg


def _recipe(shape: str, pooling: str, batch: int, seq_len: int, layers: int | None = None, attn: str = "sdpa") -> Any:
    from dsembed.config import recipe_from_dict

    data = {"model": {"random_init": shape_config(shape, layers), "tokenizer": "bytes", "dtype": "bfloat16",
                      "attn_implementation": attn, "gradient_checkpointing": True, "max_length": seq_len},
            "attention": {"mode": "causal"}, "pooling": POOLINGS[pooling],
            "lora": {"enabled": True, "r": 16, "alpha": 32, "dropout": 0.1},
            "optim": {"lr": 1e-5, "warmup_steps": 0}, "train": {"micro_batch_size": batch, "max_steps": 1000,
                                                                  "output_dir": tempfile.mkdtemp(prefix="dsembed-bench-gpu-")},
            "deepspeed": {"zero_stage": 3}}
    return recipe_from_dict(data, f"<bench:gpu:{shape}>")


def _encode_speed(engine: Any, cfg: dict[str, Any], matmul_params: int, input_ids: Any, attention_mask: Any,
                  warmup: int, steps: int, sync: Any) -> dict[str, float]:
    """Evaluation's forward (no_grad, eval mode, the engine's bf16 weights): median tokens/s and FLOP/s.

    Forward FLOPs per token = 2 N + 4 L D T (a third of the training convention's 6 N + 12 L D T).
    """
    import torch

    model = engine.module
    device = next(model.parameters()).device
    input_ids, attention_mask = input_ids.to(device), attention_mask.to(device)  # [B, T]
    model.eval()
    times = []
    with torch.no_grad():
        for i in range(warmup + steps):
            start = time.perf_counter()
            model(input_ids, attention_mask)  # [B, D]
            sync()
            if i >= warmup:
                times.append(time.perf_counter() - start)
    model.train()
    times.sort()
    tokens = input_ids.numel()
    flops_per_token = 2 * matmul_params + 4 * cfg["num_hidden_layers"] * cfg["hidden_size"] * input_ids.shape[1]
    seconds = times[len(times) // 2]
    return {"tokens_per_s": tokens / seconds, "flops_per_s": flops_per_token * tokens / seconds}


def run_one(shape: str, pooling: str, batch: int, seq_len: int, warmup: int, steps: int, layers: int | None = None,
            attn: str = "sdpa") -> dict[str, Any]:
    """One configuration in this process (CUDA, or the CPU for a check of the code path). Returns the
    measurements, training and encoding (a forward of 8 x batch texts, as evaluation runs it).

    `layers` keeps the shape's layer width with fewer layers; `attn` is the attention implementation."""
    import torch

    from dsembed.training.engine import Engine, shutdown_distributed
    from dsembed.training.gradcache import plain_backward
    from dsembed.modeling import build_model

    recipe = _recipe(shape, pooling, batch, seq_len, layers, attn)
    encode_batch = 8 * batch
    torch.manual_seed(0)
    engine = Engine.create(recipe, lambda: build_model(recipe))
    model = engine.module
    try:
        cfg = shape_config(shape, layers)
        numel = lambda p: int(getattr(p, "ds_numel", p.numel()))  # noqa: E731 - ZeRO-3 partitions report ds_numel
        backbone_params = sum(numel(p) for n, p in model.backbone.named_parameters() if "lora_" not in n)
        embed = cfg["vocab_size"] * cfg["hidden_size"]
        head_params = sum(numel(p) for p in model.pooler.parameters())
        lora_params = sum(numel(p) for n, p in model.backbone.named_parameters() if "lora_" in n)
        matmul_params = backbone_params - embed + head_params + lora_params
        gen = torch.Generator().manual_seed(0)
        ids = lambda rows: torch.randint(4, 260, (rows, seq_len), generator=gen)  # noqa: E731
        ones = lambda rows: torch.ones(rows, seq_len, dtype=torch.long)  # noqa: E731
        batches = [{"query": {"input_ids": ids(batch), "attention_mask": ones(batch)},
                    "documents": {"input_ids": ids(2 * batch), "attention_mask": ones(2 * batch)}} for _ in range(2)]
        engine.train()

        def step(i: int) -> None:
            plain_backward(engine, batches[i % 2], recipe.loss.temperature, gather=True, boundary=True)
            engine.step()

        cuda = torch.cuda.is_available()
        sync = torch.cuda.synchronize if cuda else (lambda: None)
        for i in range(warmup):
            step(i)
        sync()
        if cuda:
            torch.cuda.reset_peak_memory_stats()
        times = []
        for i in range(steps):
            start = time.perf_counter()
            step(i)
            sync()
            times.append(time.perf_counter() - start)
        times.sort()
        step_s = times[len(times) // 2]
        encode = _encode_speed(engine, cfg, matmul_params, ids(encode_batch), ones(encode_batch), warmup, steps, sync)
        tokens = 3 * batch * seq_len
        flops_per_token = 6 * matmul_params + 12 * cfg["num_hidden_layers"] * cfg["hidden_size"] * seq_len
        name = torch.cuda.get_device_name(0) if cuda else "cpu"
        peak = peak_flops(name)
        achieved = flops_per_token * tokens / step_s
        return {"shape": shape, "layers": cfg["num_hidden_layers"], "attn_implementation": attn, "pooling": pooling,
                "gpu": name, "batch": batch, "seq_len": seq_len,
                "tokens_per_step": tokens, "step_s": step_s, "steps_s": [round(t, 4) for t in times],
                "tokens_per_s": tokens / step_s, "samples_per_s": batch / step_s,
                "peak_memory_gib": torch.cuda.max_memory_allocated() / 2**30 if cuda else None,
                "peak_reserved_gib": torch.cuda.max_memory_reserved() / 2**30 if cuda else None,
                "params_backbone": backbone_params, "params_head": head_params, "params_lora": lora_params,
                "params_matmul": matmul_params, "model_tflops_per_s": achieved / 1e12,
                "peak_tflops": None if peak is None else peak / 1e12, "mfu": None if peak is None else achieved / peak,
                "encode_batch": encode_batch, "encode_tokens_per_s": encode["tokens_per_s"],
                "encode_tflops_per_s": encode["flops_per_s"] / 1e12,
                "encode_mfu": None if peak is None else encode["flops_per_s"] / peak}
    finally:
        shutdown_distributed()


def bench_gpu(shapes: list[str], poolings: list[str], seq_len: int, batch: int | None, warmup: int, steps: int,
              peak_tflops: float | None = None, log: Any = print) -> dict[str, Any]:
    """Every shape x pooling in its own subprocess. Returns {"skipped"} without CUDA."""
    import torch

    if not torch.cuda.is_available():
        return {"skipped": "no CUDA device (torch.cuda.is_available() is False)", "rows": []}
    rows = []
    for shape in shapes:
        for pooling in poolings:
            b = batch or DEFAULT_BATCH[shape]
            with tempfile.TemporaryDirectory() as tmp:
                out = Path(tmp) / "result.json"
                cmd = [sys.executable, "-m", "dsembed.bench.gpu", "--one", shape, pooling, str(b), str(seq_len),
                       str(warmup), str(steps), str(out)]
                log(f"gpu: {shape} {pooling} batch {b} x {seq_len} tokens x 3 texts")
                proc = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "DS_ACCELERATOR": "cuda"})
                if proc.returncode != 0 or not out.is_file():
                    tail = (proc.stdout + proc.stderr)[-3000:]
                    log(tail)
                    rows.append({"shape": shape, "pooling": pooling, "batch": b, "seq_len": seq_len,
                                 "error": tail.strip().splitlines()[-1] if tail.strip() else f"exit {proc.returncode}"})
                    continue
                row = json.loads(out.read_text())
            if peak_tflops:
                row["peak_tflops"] = peak_tflops
                row["mfu"] = row["model_tflops_per_s"] / peak_tflops
            rows.append(row)
    return {"config": {"seq_len": seq_len, "warmup": warmup, "steps": steps, "dtype": "bfloat16", "zero_stage": 3,
                       "gradient_checkpointing": True, "attn_implementation": "sdpa", "lora": {"r": 16, "alpha": 32},
                       "flop_convention": "model FLOPs/token = 6*N + 12*L*D*T (PaLM); N = matmul parameters "
                                          "(backbone minus embeddings + LoRA + head); recompute not counted"},
            "rows": rows}


GPU_COLUMNS = ["shape", "pooling", "gpu", "batch", "seq_len", "step_s", "tokens_per_s", "peak_memory_gib",
               "model_tflops_per_s", "mfu", "encode_tokens_per_s", "encode_mfu"]


def _main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(description="one gpu benchmark configuration (internal)")
    p.add_argument("--one", nargs=7, metavar=("SHAPE", "POOLING", "BATCH", "SEQ", "WARMUP", "STEPS", "OUT"), required=True)
    shape, pooling, batch, seq, warmup, steps, out = p.parse_args(argv).one
    result = run_one(shape, pooling, int(batch), int(seq), int(warmup), int(steps))
    Path(out).write_text(json.dumps(result), encoding="utf-8")
    return 0


if __name__ == "__main__":
    sys.exit(_main(sys.argv[1:]))
