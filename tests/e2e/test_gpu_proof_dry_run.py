"""`dsembed-bench gpu-proof --dry-run`: every part's code path on the CPU with tiny shapes, end to end.

One command, as on a GPU: flash (sdpa vs sdpa without flash-attn, reported as skipped), train
(bf16, ZeRO-3 one rank, LoRA, checkpointing, cached steps, model5), export (consolidate, reload,
embeddings equal the live engine's), eval (dsembed-evaluate, one rank) and mfu (gpu.run_one).
"""
from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def test_dry_run_takes_every_part(tmp_path):
    out = tmp_path / "proof.json"
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    env.setdefault("TORCH_EXTENSIONS_DIR", "/tmp/dsembed-torch-extensions")
    proc = subprocess.run([sys.executable, "-m", "dsembed.cli.bench", "gpu-proof", "--dry-run", "--output", str(out),
                           "--workdir", str(tmp_path / "work")], cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=600)
    data = json.loads(out.read_text())
    parts = data["parts"]
    assert proc.returncode == 0, json.dumps(parts, indent=1)[-4000:] + proc.stdout[-2000:]
    assert data["finished"] and data["all_ok"] and data["dry_run"] and list(parts) == ["flash", "train", "export", "eval", "mfu"]
    assert all(p["ok"] and p["seconds"] > 0 for p in parts.values())

    flash = parts["flash"]
    if importlib.util.find_spec("flash_attn") is None:
        assert flash["skipped"].startswith("flash_attn not installed") and flash["compared"] == "sdpa vs sdpa"
    assert len([r for r in flash["rows"] if "mode" in r]) == 8

    train = parts["train"]
    assert train["steps"] == 2 and len(train["loss"]) == 2 and train["setup"]["zero_stage"] == 3
    assert train["setup"]["cache_chunk_size"] == 2 and train["setup"]["dtype"] == "bfloat16"

    export = parts["export"]
    assert min(export["min_cosine"].values()) >= 0.999 and export["backbone_dtype"] == "float32"
    assert export["reloaded_attn_implementation"] == "sdpa" and export["step"] == 2

    evaluation = parts["eval"]
    assert evaluation["evaluated"] == "export" and len(evaluation["main_scores"]) == 4

    mfu = parts["mfu"]
    assert mfu["tokens_per_s"] > 0 and mfu["model_tflops_per_s"] > 0 and "6*N + 12*L*D*T" in mfu["flop_convention"]
    assert mfu["gpu"] == "cpu" and mfu["mfu"] is None  # no peak for a CPU
