"""Helpers for the reliability tests: run `dsembed.train` as a user would, kill it, inspect the run dir.

Reuses tests/distributed/launch.py's environment (OMP_NUM_THREADS=1, shared TORCH_EXTENSIONS_DIR,
offline hub). One rank runs `python -m dsembed.train` directly; two ranks run under torchrun.
"""
from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

import psutil
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "distributed"))
from launch import REPO, TINY, env  # noqa: E402

BASE = ["logging.progress_bar=false"]


def train_cmd(args: list[str], nproc: int = 1, recipe: Path | str = TINY) -> list[str]:
    if nproc == 1:
        return [sys.executable, "-m", "dsembed.train", str(recipe), *BASE, *args]
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
            "-m", "dsembed.train", str(recipe), *BASE, *args]


def cli(args: list[str], nproc: int = 1, recipe: Path | str = TINY, timeout: int = 180,
        **extra_env: str) -> subprocess.CompletedProcess:
    """Run the training CLI to completion (or failure) and capture its output."""
    return subprocess.run(train_cmd(args, nproc, recipe), cwd=REPO, env=env(**extra_env),
                          capture_output=True, text=True, timeout=timeout)


def start(args: list[str], nproc: int = 1, log: Path | None = None, **extra_env: str) -> subprocess.Popen:
    """Start the training CLI in the background (stdout+stderr to `log`)."""
    out = open(log, "w") if log is not None else subprocess.DEVNULL
    return subprocess.Popen(train_cmd(args, nproc), cwd=REPO, env=env(**extra_env), stdout=out,
                            stderr=subprocess.STDOUT)


def kill_tree(proc: subprocess.Popen) -> None:
    """SIGKILL the process and all its descendants at once (torchrun puts ranks in new sessions)."""
    try:
        parent = psutil.Process(proc.pid)
        procs = parent.children(recursive=True) + [parent]
    except psutil.NoSuchProcess:
        return
    for p in procs:
        try:
            p.kill()
        except psutil.NoSuchProcess:
            pass
    psutil.wait_procs(procs, timeout=30)
    proc.wait(timeout=30)


def wait_for_step(output_dir: Path, step: int, proc: subprocess.Popen, timeout: float = 180) -> None:
    """Block until metrics.jsonl has a row for `step` (or the process ends)."""
    metrics = output_dir / "metrics.jsonl"
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and proc.poll() is None:
        if metrics.is_file() and any(f'"step": {step},' in line for line in metrics.read_text().splitlines()):
            return
        time.sleep(0.02)


def error_lines(run: subprocess.CompletedProcess) -> list[str]:
    return [line for line in run.stderr.splitlines() if line.startswith("error:")]


def assert_latest_complete(output_dir: Path, world: int) -> str | None:
    """`latest` (if any) names a complete checkpoint: every rank's RNG file, matching step, loadable.

    Returns:
        The tag named by `latest`, or None when there is none.
    """
    from dsembed.training.engine import fp32_state_dict

    folder = output_dir / "checkpoints"
    pointer = folder / "latest"
    if not pointer.is_file():
        return None
    tag = pointer.read_text().strip()
    assert tag.startswith("step-"), f"latest names {tag!r}"
    ckpt = folder / tag
    assert ckpt.is_dir(), f"latest names a missing checkpoint {tag}"
    assert sorted(p.name for p in ckpt.glob("rng_rank*.pt")) == [f"rng_rank{r}.pt" for r in range(world)]
    states = sorted(ckpt.glob("*model_states.pt"))
    assert states, f"{tag}: no model states"
    client = torch.load(states[0], weights_only=False)
    assert client["step"] == int(tag.split("-")[1]) and client["world_size"] == world
    weights = fp32_state_dict(folder, tag)
    assert weights and all(torch.isfinite(v).all() for v in weights.values())
    return tag
