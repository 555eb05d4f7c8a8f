"""Helpers for the 2-rank CPU training tests: launch `dsembed.train` under torchrun, read results.

Every launch uses gloo on CPU, OMP_NUM_THREADS=1 and one shared TORCH_EXTENSIONS_DIR, so
DeepSpeed's shm op is JIT-built once (~30 s) and reused by every later launch.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
TINY = REPO / "recipes" / "tiny-cpu.yaml"
EXTENSIONS = Path(os.environ.get("TORCH_EXTENSIONS_DIR", Path(tempfile.gettempdir()) / "dsembed-torch-extensions"))


def env(**extra: str) -> dict[str, str]:
    out = dict(os.environ, OMP_NUM_THREADS="1", TORCH_EXTENSIONS_DIR=str(EXTENSIONS), PYTHONPATH=str(REPO),
               TOKENIZERS_PARALLELISM="false", HF_HUB_OFFLINE="1")
    out.update(extra)
    return out


def launch(overrides: list[str], nproc: int = 2, recipe: Path = TINY, timeout: int = 240,
           **extra_env: str) -> subprocess.CompletedProcess:
    """`torchrun --standalone --nproc_per_node N -m dsembed.train RECIPE overrides...` (progress bar off)."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
           "-m", "dsembed.train", str(recipe), "logging.progress_bar=false", *overrides]
    return subprocess.run(cmd, cwd=REPO, env=env(**extra_env), capture_output=True, text=True, timeout=timeout)


def check(run: subprocess.CompletedProcess) -> None:
    assert run.returncode == 0, f"exit {run.returncode}\n{run.stdout[-2000:]}\n{run.stderr[-4000:]}"


def metrics(output_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (output_dir / "metrics.jsonl").read_text().splitlines()]
