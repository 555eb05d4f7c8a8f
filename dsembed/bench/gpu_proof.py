"""`dsembed-bench gpu-proof`: the GPU-only code paths, proven in one command on one GPU (< 8 minutes).

    dsembed-bench gpu-proof --output proof.json             # on a CUDA machine
    dsembed-bench gpu-proof --dry-run --output proof.json   # every part's code path, tiny, on the CPU

No hub access: random-init configs, the byte tokenizer, and data the parts write themselves under
--workdir. Parts, in order (what each checks: dsembed/bench/proof_parts.py):
  flash   flash_attention_2 vs sdpa embeddings in bf16, causal and bidirectional, left and right
          padding, padded (varlen) and equal-length (dense) batches; Qwen2-0.5B and a 2-layer
          Mistral-7B shape
  train   model5 (multi-layer head with the paper's preset, bidirectional) on the Qwen2-0.5B shape:
          bf16, ZeRO-3, LoRA, gradient checkpointing, cached steps, through the trainer
  export  consolidate that run, reload it, its embeddings equal the live engine's (bf16 rounding)
  eval    dsembed-evaluate with one rank on four local tasks
  mfu     training speed at the Mistral-7B layer shape with 4 layers: tokens/s, MFU against the
          GPU's bf16 dense peak (dsembed.bench.gpu.PEAK_BF16, matched on the device name)
Each part runs in its own process (`python -m dsembed.bench.gpu_proof --part NAME ...`) under its
own time limit, so an out-of-memory, a crash or a hang costs that part only. After every part the
whole JSON is rewritten atomically: {"benchmark": "gpu-proof", "dry_run", "machine", "gpu",
"flash_attn", "budget_s", "elapsed_s", "finished", "all_ok", "parts": {NAME: {"ok", "seconds",
"error"?, "skipped"?, ...figures}}}. A part not started because the budget is spent says so.
Exit status: 0 when every part is ok, else 1.
"""
from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable

ORDER = ("flash", "train", "export", "eval", "mfu")
BUDGET_S = 460.0  # the whole proof, start-up of every process included: under 8 minutes
PART_LIMIT_S = {"flash": 100, "train": 150, "export": 120, "eval": 90, "mfu": 120}  # each capped by what is left
MIN_START_S = 20.0  # a part is not started with less time than this left


def settings(dry_run: bool, workdir: Path, device: str) -> dict[str, Any]:
    """What each part runs: GPU sizes, or tiny shapes for --dry-run."""
    from dsembed.bench.gpu import shape_config

    tiny = {"model_type": "qwen2", "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
            "num_attention_heads": 4, "num_key_value_heads": 2, "vocab_size": 320, "tie_word_embeddings": False}
    tiny_mistral = {**tiny, "model_type": "mistral", "num_attention_heads": 8, "num_key_value_heads": 2}
    common = {"workdir": str(workdir), "device": device, "dry_run": dry_run, "export_min_cosine": 0.999}
    if dry_run:
        return {**common,
                "flash": {"shapes": {"tiny-qwen2": tiny, "tiny-mistral": tiny_mistral}, "texts": 4, "max_words": 8,
                          "equal_chars": 24, "max_length": 64, "min_cosine": 0.99},
                "train": {"shape": tiny, "head": {"num_latents": 8, "num_heads": 2, "head_dim": 16}, "rows": 32,
                          "steps": 2, "batch": 4, "chunk": 2, "max_length": 32},
                "mfu": {"shape": "tiny", "layers": 2, "batch": 2, "seq_len": 32, "warmup": 1, "steps": 2}}
    return {**common,
            "flash": {"shapes": {"qwen2-0.5b": shape_config("qwen2-0.5b"), "mistral-7b-2-layers": shape_config("mistral-7b", 2)},
                      "texts": 16, "max_words": 60, "equal_chars": 200, "max_length": 256, "min_cosine": 0.999},
            "train": {"shape": shape_config("qwen2-0.5b"), "head": {"preset": "paper"}, "rows": 256, "steps": 4,
                      "batch": 16, "chunk": 4, "max_length": 128},
            "mfu": {"shape": "mistral-7b", "layers": 4, "batch": 4, "seq_len": 512, "warmup": 2, "steps": 5}}


def _device() -> tuple[str, str | None]:
    """("cuda", GPU name) or ("cpu", None). The name comes from nvidia-smi, so this process creates
    no CUDA context that would hold GPU memory while the parts run."""
    import shutil

    import torch

    if not torch.cuda.is_available():
        return "cpu", None
    name = None
    if shutil.which("nvidia-smi"):
        done = subprocess.run(["nvidia-smi", "--query-gpu=name", "--format=csv,noheader", "--id=0"],
                              capture_output=True, text=True)
        name = done.stdout.strip() or None
    return "cuda", name


def _machine() -> dict[str, Any]:
    """Versions and the host, without importing deepspeed or sentence-transformers here."""
    import importlib.metadata
    import platform

    info: dict[str, Any] = {"python": platform.python_version(), "cores": os.cpu_count(),
                            "date": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
    for name in ("torch", "transformers", "peft", "deepspeed", "mteb", "flash-attn"):
        try:
            info[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            info[name] = None
    return info


def _tail(text: str, lines: int = 30) -> str:
    return "\n".join(text.strip().splitlines()[-lines:])


def _last_error_line(text: str) -> str:
    for line in reversed(text.strip().splitlines()):
        if line.strip() and not line.startswith((" ", "\t")):
            return line.strip()[:500]
    return ""


def _run_part(name: str, settings_file: Path, result_file: Path, limit: float, env: dict[str, str]) -> dict[str, Any]:
    """One part in its own process group; its record, or the error it died with."""
    command = [sys.executable, "-m", "dsembed.bench.gpu_proof", "--part", name, "--settings", str(settings_file),
               "--result", str(result_file)]
    result_file.unlink(missing_ok=True)  # never read an earlier run's record
    start = time.perf_counter()
    proc = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env,
                            start_new_session=True)
    try:
        output, _ = proc.communicate(timeout=limit)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)  # the part and anything it started
        output, _ = proc.communicate()
        return {"ok": False, "error": f"timed out after {limit:.0f} s", "seconds": time.perf_counter() - start,
                "output_tail": _tail(output or "")}
    seconds = time.perf_counter() - start
    record: dict[str, Any] = {}
    if result_file.is_file():
        record = json.loads(result_file.read_text(encoding="utf-8"))
    if not record:
        record = {"ok": False, "error": f"exit {proc.returncode}: {_last_error_line(output) or 'no result written'}"}
    if not record.get("ok"):
        record["output_tail"] = _tail(output)
    record["seconds"] = seconds
    return record


def run_proof(output: Path, dry_run: bool = False, workdir: Path | None = None, budget_s: float = BUDGET_S,
              parts: tuple[str, ...] = ORDER, log: Callable[[str], None] = print) -> dict[str, Any]:
    """Run the parts in order within `budget_s`, rewriting `output` after each. Returns the payload."""
    from dsembed.atomic import write_text_atomic
    from dsembed.bench.proof_parts import flash_status

    begin = time.perf_counter()
    device, gpu = _device()
    work = Path(workdir) if workdir else Path(tempfile.mkdtemp(prefix="dsembed-gpu-proof-"))
    work.mkdir(parents=True, exist_ok=True)
    settings_file = work / "settings.json"
    settings_file.write_text(json.dumps(settings(dry_run, work, device), indent=1), encoding="utf-8")
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    if device == "cuda":
        env["DS_ACCELERATOR"] = "cuda"
    payload: dict[str, Any] = {"benchmark": "gpu-proof", "dry_run": dry_run, "machine": _machine(), "gpu": gpu,
                               "device": device, "flash_attn": " ".join(filter(None, flash_status())), "workdir": str(work),
                               "budget_s": budget_s, "elapsed_s": 0.0, "finished": False, "all_ok": False,
                               "parts": {name: {"ok": False, "error": "pending"} for name in parts}}
    if device != "cuda" and not dry_run:
        payload["note"] = "no CUDA device: the GPU sizes run on the CPU (slow); use --dry-run for the code path"

    def save() -> None:
        payload["elapsed_s"] = round(time.perf_counter() - begin, 2)
        write_text_atomic(output, json.dumps(payload, indent=2) + "\n")

    save()
    for name in parts:
        left = budget_s - (time.perf_counter() - begin)
        if left < MIN_START_S:
            payload["parts"][name] = {"ok": False, "error": f"not started: {left:.0f} s of the {budget_s:.0f} s budget left"}
            save()
            continue
        limit = min(PART_LIMIT_S[name] * (3 if dry_run else 1), left)
        log(f"gpu-proof: {name} (limit {limit:.0f} s) ...")
        record = _run_part(name, settings_file, work / f"part-{name}.json", limit, env)
        payload["parts"][name] = record
        status = "ok" if record.get("ok") else f"FAILED: {record.get('error', 'see the record')}"
        if record.get("skipped"):
            status += f" (skipped: {record['skipped']})"
        log(f"gpu-proof: {name} {status} in {record['seconds']:.1f} s")
        save()
    payload["finished"] = True
    payload["all_ok"] = all(p.get("ok") for p in payload["parts"].values())
    save()
    return payload


def _part_main(argv: list[str]) -> int:
    import traceback

    p = argparse.ArgumentParser(description="one part of dsembed-bench gpu-proof (internal)")
    p.add_argument("--part", required=True, choices=ORDER)
    p.add_argument("--settings", required=True)
    p.add_argument("--result", required=True)
    args = p.parse_args(argv)
    from dsembed.atomic import write_text_atomic
    from dsembed.bench.proof_parts import PARTS

    cfg = json.loads(Path(args.settings).read_text(encoding="utf-8"))
    try:
        record = PARTS[args.part](cfg)
        code = 0
    except Exception as err:  # noqa: BLE001 - every failure becomes the part's record
        traceback.print_exc()
        record = {"ok": False, "error": f"{type(err).__name__}: {str(err)[:1000]}"}
        code = 1
    write_text_atomic(Path(args.result), json.dumps(record, indent=1, default=str) + "\n")
    return code


if __name__ == "__main__":
    sys.exit(_part_main(sys.argv[1:]))
