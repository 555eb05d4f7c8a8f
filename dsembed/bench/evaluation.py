"""`eval` and `eval-plan`: what distributed, resumable evaluation costs here and on a GPU node.

`eval` (measured): the same `dsembed-evaluate` command, as separate processes in sequence on one
machine, on local tasks (default ../shared/data/tasks, the 18 development tasks):
  A. 1 rank x T threads           (one process using every core)
  B. N ranks x T/N threads        (`--nproc N`: the same cores shared out by rank)
  C. B again, unchanged           (resume after finish: every task skipped)
and, with --cold, D. B with --overwrite (the second full run, to show the first was not warming caches).
It reports wall times, the ratios B/A and C/B, the texts embedded and reused from the shared-text
cache, and the largest difference of any main score and any per-item number between A and B.
On one CPU machine B/A is expected near 1 (same cores); the point of the ranks is one GPU each.

`eval-plan` (computed, not measured): for a task preset, texts and tokens per category from mteb's
descriptive statistics, and encoder hours per model on 1 and 8 GPUs at a stated throughput.
  texts: STS both sides' unique texts; retrieval unique documents + queries; classification the
    unique test texts + at most n_experiments x samples_per_label x labels training texts (mteb's
    undersampling); clustering every text of every set (`unique` counts repeated texts once, what
    the shared-text cache saves when its budget holds them).
  tokens: characters / `chars_per_token` per category, each text capped at max_length tokens on
    average (a per-text cap would need every length; the figure is an upper bound for long texts).
  throughput: given (--tokens-per-s, e.g. measured with `dsembed-bench gpu` on the GPU) or derived
    from the shape: forward FLOPs per token = 2 N + 4 L D T (N matmul parameters without the
    embedding and LM head, T the mean tokens per text), at --mfu of the GPU's dense bf16 peak.
  Not included: loading the data, rank 0's scoring (the retrieval similarity of MSMARCO is about
    5e14 FLOP: minutes on CPU BLAS), and the model load.
"""
from __future__ import annotations

import json
import math
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from dsembed.bench.common import REPO_ROOT

# max_*_diff: the largest |difference| from run A of any main score / any per-item number
EVAL_COLUMNS = ["run", "ranks", "threads_per_rank", "wall_s", "ratio", "texts_embedded", "reused_from_cache",
                "tasks_skipped", "max_main_diff", "max_item_diff"]
PLAN_COLUMNS = ["category", "tasks", "texts", "unique_texts", "tokens_est", "hours_1_gpu", "hours_8_gpus"]
SHARED_TASKS = REPO_ROOT.parent / "shared" / "data" / "tasks"
DEFAULT_TARGET = ["--base", str(REPO_ROOT / "recipes" / "paper" / "smollm2-135m" / "model5.yaml")]


def _evaluate(target: list[str], tasks_dir: Path, output: Path, ranks: int, threads: int, extra: list[str]) -> dict[str, Any]:
    command = [sys.executable, "-m", "dsembed.cli.evaluate", *target, "--tasks-dir", str(tasks_dir),
               "--output", str(output), "--no-progress", *extra]
    if ranks > 1:
        command += ["--nproc", str(ranks)]
    env = dict(os.environ, OMP_NUM_THREADS=str(threads), TOKENIZERS_PARALLELISM="false")
    start = time.perf_counter()
    done = subprocess.run(command, env=env, capture_output=True, text=True)
    wall = time.perf_counter() - start
    if done.returncode != 0:
        raise RuntimeError(f"{' '.join(command)} failed (exit {done.returncode}):\n{done.stderr[-3000:]}")
    return {"wall_s": wall, "results": json.loads(output.read_text(encoding="utf-8")), "command": command}


def _item_values(entry: dict[str, Any]) -> tuple[list[float], list[Any]]:
    """Every per-item number of a task entry, and its per-item ids and labels, in a fixed order."""
    values: list[float] = []
    ids: list[Any] = []
    for subset in sorted(entry.get("items") or {}):
        record = entry["items"][subset]
        for key in ("cosine", "ndcg_at_10", "correct"):
            values += [float(x) for x in record.get(key, [])]
        if entry["category"] == "sts":
            values += [float(x) for x in record.get("gold", [])]
        else:
            ids += list(record.get("gold", [])) + list(record.get("query_ids", []))
        for one in record.get("sets", []):
            first_seen: dict[int, int] = {}  # the same partition under other cluster numbers is the same result
            values += [float(first_seen.setdefault(c, len(first_seen))) for c in one["clusters"]]
            ids += list(one["labels"])
    return values, ids


def differences(a: dict[str, Any], b: dict[str, Any]) -> tuple[float, float]:
    """(largest |main score difference|, largest |per-item difference|) between two results files.

    Clustering assignments are compared as partitions (clusters renumbered in order of first
    appearance): k-means may number the same clusters differently; any moved item counts.
    """
    main = item = 0.0
    for name, entry in a["tasks"].items():
        other = b["tasks"][name]
        main = max(main, abs(entry["main_score"] - other["main_score"]))
        (x, x_ids), (y, y_ids) = _item_values(entry), _item_values(other)
        if len(x) != len(y) or x_ids != y_ids:
            return main, math.inf
        item = max([item] + [abs(p - q) for p, q in zip(x, y)])
    return main, item


def bench_eval(target: list[str] | None, tasks_dir: Path | None, limit: int | None, ranks: int, threads: int,
               workdir: Path | None, cold: bool = False, task_limits: list[str] | None = None) -> dict[str, Any]:
    """Runs A, B, C (and D with `cold`) as described in the module docstring."""
    tasks_dir = Path(tasks_dir or SHARED_TASKS)
    if not tasks_dir.is_dir():
        return {"skipped": f"no task folder {tasks_dir}", "rows": []}
    target = target or DEFAULT_TARGET
    work = Path(workdir) if workdir else REPO_ROOT / "runs" / "bench-eval"
    if work.exists():
        shutil.rmtree(work)
    work.mkdir(parents=True)
    extra = (["--limit", str(limit)] if limit else []) + [f"--task-limit={t}" for t in task_limits or []]
    runs = {"A": _evaluate(target, tasks_dir, work / "A.json", 1, threads, extra)}
    runs["B"] = _evaluate(target, tasks_dir, work / "B.json", ranks, max(1, threads // ranks), extra)
    runs["C"] = _evaluate(target, tasks_dir, work / "B.json", ranks, max(1, threads // ranks), extra)
    if cold:
        runs["D"] = _evaluate(target, tasks_dir, work / "B.json", ranks, max(1, threads // ranks), extra + ["--overwrite"])
    rows = []
    base = runs["A"]["results"]
    for label, run in runs.items():
        results, encoding = run["results"], run["results"]["encoding"]
        main, item = differences(base, results)
        reference = runs["A"] if label == "B" else runs["B"] if label in ("C", "D") else None
        rows.append({"run": {"A": "A: 1 rank", "B": f"B: {ranks} ranks", "C": "C: B rerun (finished)",
                             "D": "D: B --overwrite"}[label],
                     "ranks": results["settings"]["ranks"], "threads_per_rank": threads if label == "A" else max(1, threads // ranks),
                     "wall_s": round(run["wall_s"], 1),
                     "ratio": "" if reference is None else f"{run['wall_s'] / reference['wall_s']:.3f} vs {'A' if label == 'B' else 'B'}",
                     "texts_embedded": encoding["embedded"], "reused_from_cache": encoding["reused"],
                     "tasks_skipped": len(encoding["finished_earlier"]),
                     "max_main_diff": f"{main:.2e}", "max_item_diff": f"{item:.2e}"})
    summary = {label: {"wall_s": run["wall_s"], "command": run["command"], "encoding": run["results"]["encoding"],
                       "categories": {c: v["mean"] for c, v in run["results"]["categories"].items()}}
               for label, run in runs.items()}
    return {"config": {"target": target, "tasks_dir": str(tasks_dir), "limit": limit, "task_limits": task_limits,
                       "ranks": ranks, "threads": threads},
            "runs_detail": summary, "ratio_ranks_vs_one": runs["B"]["wall_s"] / runs["A"]["wall_s"],
            "ratio_rerun_vs_first": runs["C"]["wall_s"] / runs["B"]["wall_s"], "rows": rows}


# ----------------------------------------------------------------------------------- projection

def _text_stats(stats: dict[str, Any]) -> list[dict[str, Any]]:
    return [v for k, v in stats.items() if "text" in k and k.endswith("_statistics") and isinstance(v, dict)]


def task_load(task: Any, chars_per_token: float, max_length: int) -> dict[str, float]:
    """Texts, unique texts and estimated tokens one mteb task makes the encoder embed (see module doc)."""
    stats = task.metadata.descriptive_stats or {}
    texts = unique = chars = 0.0
    parts = []
    for split in task.metadata.eval_splits:
        for part in _text_stats(stats.get(split, {})):
            parts.append((part, part["unique_texts"] if task.metadata.type != "Clustering" else stats[split]["num_samples"]))
    train_split = getattr(task, "train_split", None)
    if task.metadata.type == "Classification" and train_split in stats:
        train = stats[train_split]
        labels = (train.get("label_statistics") or {}).get("unique_labels") or 2
        used = min(train["num_samples"], task.n_experiments * task.samples_per_label * labels)
        for part in _text_stats(train):
            parts.append((part, used))
    tokens = 0.0
    for part, count in parts:
        mean_tokens = min(part["average_text_length"] / chars_per_token, max_length)
        texts += count
        unique += min(count, part["unique_texts"])
        chars += count * part["average_text_length"]
        tokens += count * mean_tokens
    return {"texts": texts, "unique_texts": unique, "tokens": tokens, "characters": chars}


def forward_flops_per_token(shape: dict[str, Any], mean_tokens: float) -> float:
    """2 N + 4 L D T: matmul parameters of the decoder layers (no embedding, no LM head) and attention."""
    d, layers, ffn = shape["hidden_size"], shape["num_hidden_layers"], shape["intermediate_size"]
    head_dim = shape.get("head_dim", d // shape["num_attention_heads"])
    kv = shape["num_key_value_heads"] * head_dim
    per_layer = 2 * d * d + 2 * d * kv + 3 * d * ffn  # q, o, k, v projections; gated MLP
    return 2 * layers * per_layer + 4 * layers * d * mean_tokens


def eval_plan(preset: str, shape_name: str, tokens_per_s: float | None, mfu: float, peak_tflops: float,
              chars_per_token: float, max_length: int, gpus: tuple[int, ...] = (1, 8)) -> dict[str, Any]:
    """The projection table for `preset` (see module doc)."""
    from dsembed.bench.gpu import SHAPES
    from dsembed.evaluation.presets import PRESETS
    from dsembed.evaluation.run import category_of, named_tasks

    tasks = named_tasks([preset])
    per_category: dict[str, dict[str, float]] = {}
    per_task = {}
    for task in tasks:
        load = task_load(task, chars_per_token, max_length)
        per_task[task.metadata.name] = load
        total = per_category.setdefault(category_of(task), {"tasks": 0, "texts": 0.0, "unique_texts": 0.0, "tokens": 0.0})
        total["tasks"] += 1
        for key in ("texts", "unique_texts", "tokens"):
            total[key] += load[key]
    all_tokens = sum(c["tokens"] for c in per_category.values())
    all_texts = sum(c["texts"] for c in per_category.values())
    source = "given (--tokens-per-s)"
    if tokens_per_s is None:
        flops = forward_flops_per_token(SHAPES[shape_name], all_tokens / max(all_texts, 1))
        tokens_per_s = mfu * peak_tflops * 1e12 / flops
        source = (f"derived: {mfu:.0%} MFU x {peak_tflops:.1f} TFLOP/s bf16 dense peak / "
                  f"{flops / 1e9:.2f} GFLOP per token forward ({shape_name}); an assumption, not a measurement")
    rows = []
    for category, total in list(per_category.items()) + [("all", {
            "tasks": len(tasks), **{k: sum(c[k] for c in per_category.values()) for k in ("texts", "unique_texts", "tokens")}})]:
        hours = {n: total["tokens"] / tokens_per_s / n / 3600 for n in gpus}
        rows.append({"category": category, "tasks": total["tasks"], "texts": f"{total['texts']:,.0f}",
                     "unique_texts": f"{total['unique_texts']:,.0f}", "tokens_est": f"{total['tokens'] / 1e6:,.1f} M",
                     "hours_1_gpu": f"{hours[gpus[0]]:.2f}", "hours_8_gpus": f"{hours[gpus[-1]]:.2f}"})
    return {"config": {"preset": preset, "shape": shape_name, "chars_per_token": chars_per_token,
                       "max_length": max_length, "gpus": list(gpus), "tasks": len(PRESETS.get(preset, [preset]))},
            "tokens_per_s_per_gpu": tokens_per_s, "throughput_source": source,
            "per_task": per_task, "rows": rows}
