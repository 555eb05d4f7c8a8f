"""dsembed-bench: speed and memory of dsembed against what users would pick instead.

    dsembed-bench train   --model tiny smollm2 --batch-size 16 [--deepspeed] [--dtype float32,bfloat16] --output train.json
    dsembed-bench encode  --model tiny smollm2 --num-texts 256 --batch-size 32 [--dtype float32,bfloat16] --output encode.json
    dsembed-bench memory  --model tiny smollm2 --batch-size 8 --output memory.json
    dsembed-bench cached  --model tiny --batch-sizes 32,64,128,256,512,1024 --chunk-size 32 --output cached.json
    dsembed-bench gpu     --shapes mistral-7b qwen2-0.5b --output gpu.json   (CUDA only; skipped otherwise)
    dsembed-bench gpu-proof --output proof.json [--dry-run]   (the GPU-only paths in one command, < 8 min)
    dsembed-bench eval    [--base RECIPE | --model-dir DIR] --tasks-dir ../shared/data/tasks --limit 64 --ranks 2
    dsembed-bench eval-plan --preset paper-all --shape mistral-7b [--tokens-per-s X] --output plan.json

Every subcommand prints a markdown table and, with --output, writes JSON:
    {"benchmark", "machine": {cpu, cores, torch, threads, load_average, date, ...}, "quiet_wait",
     "load_before", "load_after", "runs": [per-model result with "config", "results", ...], "rows"}
Comparisons run interleaved in one process with fixed torch threads (--threads); --wait-load X
first waits (polling every 20 s, at most --max-wait s) until the 1-minute load average is below X.
Methods: dsembed/bench/*.py module docstrings.
"""
from __future__ import annotations

import argparse
import os
import sys
from typing import Any

from dsembed.errors import run_cli


def _ints(text: str) -> list[int]:
    return [int(x) for x in text.split(",") if x.strip()]


def _dtypes(text: str) -> list[str]:
    names = [x.strip() for x in text.split(",") if x.strip()]
    bad = [n for n in names if n not in ("float32", "bfloat16", "float16", "auto")]
    if bad or not names:
        raise argparse.ArgumentTypeError(f"{text!r}: comma-separated dtypes among float32, bfloat16, float16, auto")
    return names


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="dsembed-bench", description=__doc__.split("\n")[0])
    sub = p.add_subparsers(dest="command", required=True)

    def add(name: str, help_text: str, models: bool = True) -> argparse.ArgumentParser:
        s = sub.add_parser(name, help=help_text)
        s.add_argument("--output", metavar="FILE.json", help="write the results as JSON")
        s.add_argument("--threads", type=int, default=None, help="torch threads (default: all cores)")
        s.add_argument("--wait-load", type=float, default=None, metavar="X",
                       help="wait until the 1-minute load average is below X first")
        s.add_argument("--max-wait", type=float, default=600.0, metavar="S")
        if models:
            s.add_argument("--model", nargs="+", default=["tiny"], choices=["tiny", "smollm2"])
            s.add_argument("--max-length", type=int, default=None, help="token limit (default: tiny 64, smollm2 128)")
        return s

    s = add("train", "training step throughput vs sentence-transformers (MNRL)")
    s.add_argument("--batch-size", type=int, default=16, help="triplets per step")
    s.add_argument("--repeats", type=int, default=5)
    s.add_argument("--warmup", type=int, default=1)
    s.add_argument("--deepspeed", action="store_true",
                   help="also time the step through dsembed.training.engine.Engine (DeepSpeed ZeRO-2, one rank)")
    s.add_argument("--dtype", type=_dtypes, default=["float32"], metavar="D1[,D2]",
                   help="e.g. float32,bfloat16: every dtype side by side in one run, each against "
                        "sentence-transformers in the same dtype (default: float32)")
    s = add("encode", "encode throughput vs SentenceTransformer.encode")
    s.add_argument("--num-texts", type=int, default=256)
    s.add_argument("--batch-size", type=int, default=32)
    s.add_argument("--repeats", type=int, default=5)
    s.add_argument("--warmup", type=int, default=1)
    s.add_argument("--lora", action="store_true", help="both models with (unmerged) LoRA adapters")
    s.add_argument("--dtype", type=_dtypes, default=["float32"], metavar="D1[,D2]",
                   help="e.g. float32,bfloat16: every dtype side by side in one run (default: float32)")
    s = add("memory", "peak memory: multi-layer head (taps / output_hidden_states) vs last token")
    s.add_argument("--batch-size", type=int, default=8)
    s.add_argument("--gradient-checkpointing", action="store_true")
    s = add("cached", "cached (GradCache) vs plain steps: time and peak memory vs contrastive batch")
    s.add_argument("--batch-sizes", type=_ints, default=[32, 64, 128, 256, 512, 1024])
    s.add_argument("--chunk-size", type=int, default=32)
    s.add_argument("--repeats", type=int, default=3)
    s = add("gpu", "bf16 + LoRA + ZeRO-3 + checkpointing on one CUDA GPU: tokens/s, memory, MFU", models=False)
    s.add_argument("--shapes", nargs="+", default=["mistral-7b", "qwen2-0.5b"], choices=["mistral-7b", "qwen2-0.5b", "tiny"])
    s.add_argument("--poolings", nargs="+", default=["last_token", "multi_layer"], choices=["last_token", "multi_layer"])
    s.add_argument("--seq-len", type=int, default=512)
    s.add_argument("--batch-size", type=int, default=None, help="queries per step (default: mistral-7b 4, qwen2-0.5b 16)")
    s.add_argument("--warmup", type=int, default=2)
    s.add_argument("--steps", type=int, default=5)
    s.add_argument("--peak-tflops", type=float, default=None, help="override the GPU's bf16 dense peak")
    s = sub.add_parser("gpu-proof", help="flash-attention, bf16 ZeRO-3 training, export, evaluation and MFU on one "
                       "GPU in under 8 minutes (dsembed/bench/gpu_proof.py)")
    s.add_argument("--output", required=True, metavar="FILE.json", help="rewritten after every part")
    s.add_argument("--dry-run", action="store_true", help="every part's code path with tiny shapes (CPU is fine)")
    s.add_argument("--workdir", default=None, help="where the parts write (default: a new temporary folder)")
    s.add_argument("--budget-s", type=float, default=None, help="time for the whole proof (default 460)")
    s.add_argument("--parts", nargs="+", default=None, choices=["flash", "train", "export", "eval", "mfu"],
                   help="run only these parts (export and eval use the train part's run in --workdir)")
    s = add("eval", "dsembed-evaluate: 1 rank vs N ranks on the same cores, and the rerun after finish", models=False)
    s.add_argument("--base", metavar="RECIPE.yaml", help="evaluate this recipe's untrained model (default: "
                   "recipes/paper/smollm2-135m/model5.yaml)")
    s.add_argument("--model-dir", metavar="DIR", help="evaluate an exported model instead")
    s.add_argument("--tasks-dir", default=None, help="local tasks (default: ../shared/data/tasks)")
    s.add_argument("--limit", type=int, default=64)
    s.add_argument("--task-limit", action="append", default=[], metavar="TASK=N")
    s.add_argument("--ranks", type=int, default=2)
    s.add_argument("--cold", action="store_true", help="also rerun B with --overwrite")
    s.add_argument("--workdir", default=None, help="where the runs write (default: runs/bench-eval; emptied first)")
    s = add("eval-plan", "texts, tokens and encoder hours of a task preset on 1 and 8 GPUs (computed)", models=False)
    s.add_argument("--preset", default="paper-all")
    s.add_argument("--shape", default="mistral-7b", choices=["mistral-7b", "qwen2-0.5b"])
    s.add_argument("--tokens-per-s", type=float, default=None, help="encode throughput per GPU (default: derived from --mfu)")
    s.add_argument("--mfu", type=float, default=0.4)
    s.add_argument("--peak-tflops", type=float, default=989.4, help="bf16 dense peak of the GPU (H100 SXM: 989.4)")
    s.add_argument("--chars-per-token", type=float, default=4.0)
    s.add_argument("--max-length", type=int, default=512)
    return p


def _run(args: argparse.Namespace) -> dict[str, Any]:
    from dsembed.bench import memory, throughput

    runs = []
    for model in getattr(args, "model", []):
        if args.command == "train":
            runs.append(throughput.bench_train(model, args.batch_size, args.max_length, args.repeats, warmup=args.warmup,
                                               deepspeed=args.deepspeed, dtypes=args.dtype))
        elif args.command == "encode":
            runs.append(throughput.bench_encode(model, args.num_texts, args.batch_size, args.max_length, args.repeats,
                                                lora=args.lora, warmup=args.warmup, dtypes=args.dtype))
        elif args.command == "memory":
            runs.append(memory.bench_memory(model, args.batch_size, args.max_length, args.gradient_checkpointing))
        elif args.command == "cached":
            runs.append(memory.bench_cached(model, args.batch_sizes, args.chunk_size, args.max_length, args.repeats))
    columns = {"train": throughput.TRAIN_COLUMNS, "encode": throughput.ENCODE_COLUMNS,
               "memory": memory.MEMORY_COLUMNS, "cached": memory.CACHED_COLUMNS}[args.command]
    if args.command in ("train", "encode"):  # each dtype against the first one given
        first = runs[0]["config"]["dtypes"][0] if runs else "float32"
        columns = [c for c in columns if c != "vs float32"] + ([f"vs {first}"] if len(args.dtype) > 1 else [])
    return {"runs": runs, "rows": [row for run in runs for row in run["rows"]], "columns": columns}


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")  # the tokenizer's threads would compete with torch's
    if args.command == "gpu-proof":
        from pathlib import Path

        from dsembed.bench.gpu_proof import BUDGET_S, ORDER, run_proof

        payload = run_proof(Path(args.output), args.dry_run, Path(args.workdir) if args.workdir else None,
                            args.budget_s or BUDGET_S, tuple(args.parts or ORDER))
        print(f"gpu-proof: {'all parts ok' if payload['all_ok'] else 'NOT all parts ok'} in {payload['elapsed_s']:.0f} s; "
              f"{args.output}")
        return 0 if payload["all_ok"] else 1
    from dsembed.bench.common import load_average, machine_info, set_threads, table, wait_for_quiet, write_json

    quiet = None
    if args.wait_load is not None:
        quiet = wait_for_quiet(args.wait_load, args.max_wait)
    threads = set_threads(args.threads)
    load_before = load_average()
    if args.command == "eval":
        from dsembed.bench.evaluation import EVAL_COLUMNS, bench_eval

        target = [args.model_dir] if args.model_dir else (["--base", args.base] if args.base else None)
        result = bench_eval(target, args.tasks_dir, args.limit, args.ranks, threads, args.workdir, args.cold,
                            args.task_limit)
        result = {"runs": [result] if result.get("rows") else [], "rows": result.get("rows", []),
                  "columns": EVAL_COLUMNS, **({"skipped": result["skipped"]} if "skipped" in result else {})}
    elif args.command == "eval-plan":
        from dsembed.bench.evaluation import PLAN_COLUMNS, eval_plan

        plan = eval_plan(args.preset, args.shape, args.tokens_per_s, args.mfu, args.peak_tflops,
                         args.chars_per_token, args.max_length)
        print(f"encode throughput per GPU: {plan['tokens_per_s_per_gpu']:,.0f} tokens/s ({plan['throughput_source']})")
        result = {"runs": [plan], "rows": plan["rows"], "columns": PLAN_COLUMNS}
    elif args.command == "gpu":
        from dsembed.bench.gpu import GPU_COLUMNS, bench_gpu

        result = bench_gpu(args.shapes, args.poolings, args.seq_len, args.batch_size, args.warmup, args.steps,
                           args.peak_tflops)
        if "skipped" in result:
            print(f"gpu: skipped ({result['skipped']})")
        result["columns"] = GPU_COLUMNS
    else:
        result = _run(args)
    machine = machine_info()
    print(f"machine: {machine['cpu']}, {machine['cores']} cores, torch {machine['torch']}, threads {threads}; "
          f"load before {load_before}, after {machine['load_average']}" + (f"; quiet wait {quiet}" if quiet else ""))
    if result["rows"]:
        print(table(result["rows"], result.pop("columns")))
    else:
        result.pop("columns", None)
    for run in result.get("runs", []):
        for key in ("ratio_ranks_vs_one", "ratio_rerun_vs_first", "ratio_samples_per_s", "ratio_deepspeed_samples_per_s", "ratio_texts_per_s", "ratio_min_time",
                    "ratio_at_256"):
            if run.get(key) is not None:
                print(f"{run['config'].get('model', args.command)}: {key} = {run[key]:.3f}")
        ratios = run.get("dtype_ratios", {})
        for dtype, r in ratios.get("vs_st", {}).items():
            if len(ratios["vs_st"]) > 1:
                print(f"{run['config']['model']} {dtype}: dsembed / sentence-transformers = {r['median']:.3f} "
                      f"(best-of {r['best_of']:.3f})")
        first = run.get("config", {}).get("dtypes", [""])[0]
        for dtype, per_impl in ratios.get("vs_first_dtype", {}).items():
            for impl, r in per_impl.items():
                print(f"{run['config']['model']} {impl}: {dtype} / {first} = {r['median']:.3f} (best-of {r['best_of']:.3f})")
        for dtype, per_impl in run.get("min_cosine_to_first_dtype", {}).items():
            print(f"{run['config']['model']}: min cosine {dtype} vs {first}: "
                  + ", ".join(f"{impl} {c:.5f}" for impl, c in per_impl.items()))
        if "ratios" in run:
            for mode, r in run["ratios"].items():
                print(f"{run['config']['model']} {mode}: multi-layer (taps) / last-token = {r['taps_vs_last_token']:.3f}, "
                      f"output_hidden_states / last-token = {r['ohs_vs_last_token']:.3f}")
    payload = {"benchmark": args.command, "argv": sys.argv[1:] if argv is None else list(argv), "machine": machine,
               "threads": threads, "quiet_wait": quiet, "load_before": load_before,
               "load_after": machine["load_average"], **result}
    write_json(args.output, payload)
    return 0


def cli() -> None:
    sys.exit(run_cli(main))


if __name__ == "__main__":
    cli()
