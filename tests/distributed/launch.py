"""Helpers for the 2-rank CPU training tests: launch `dsembed.train` under torchrun, read results.

Every launch uses gloo on CPU, OMP_NUM_THREADS=1 and one shared TORCH_EXTENSIONS_DIR, so
DeepSpeed's shm op is JIT-built once (~30 s) and reused by every later launch.
"""
from __future__ import annotations

import json
import os
import socket
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


def launch_nodes(overrides: list[str], nnodes: int = 2, recipe: Path = TINY, timeout: int = 300,
                 cwds: list[Path] | None = None, **extra_env: str) -> list[subprocess.CompletedProcess]:
    """`nnodes` torchrun processes, one per "node", as a multi-node launch on one machine would be.

    Each is `torchrun --nnodes N --nproc_per_node 1 --node_rank R --master_addr 127.0.0.1
    --master_port P -m dsembed.train ...`: global ranks span the nodes while every LOCAL_RANK is 0.
    `cwds` gives each node its own working directory (a relative output_dir then differs per node,
    as an unshared disk would).
    """
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    procs = []
    for node in range(nnodes):
        cmd = [sys.executable, "-m", "torch.distributed.run", f"--nnodes={nnodes}", "--nproc_per_node=1",
               f"--node_rank={node}", "--master_addr=127.0.0.1", f"--master_port={port}",
               "-m", "dsembed.train", str(recipe), "logging.progress_bar=false", *overrides]
        procs.append(subprocess.Popen(cmd, cwd=(cwds or [REPO] * nnodes)[node], env=env(**extra_env),
                                      stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
    done = []
    for proc in procs:
        stdout, stderr = proc.communicate(timeout=timeout)
        done.append(subprocess.CompletedProcess(proc.args, proc.returncode, stdout, stderr))
    return done


def write_sts_task(root: Path, name: str = "TinySTS", pairs: int = 16) -> Path:
    """A small local STS task, root/sts/<name>/test.jsonl (sentence pairs with 0..5 scores)."""
    words = ["red", "blue", "green", "cat", "dog", "house", "river", "stone", "light", "music", "paper", "cloud"]
    rows = []
    for i in range(pairs):
        a = " ".join(words[(i + k) % len(words)] for k in range(4))
        b = " ".join(words[(i + k * (1 + i % 3)) % len(words)] for k in range(4))
        rows.append({"sentence1": a, "sentence2": b, "score": float(5 - i % 6)})
    folder = root / "sts" / name
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "test.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return root


def spawn_ranks(worker, world: int) -> dict:
    """Run `worker(rank, port, results)` in `world` spawned processes (gloo on a free local port) and
    return what each rank put into `results` (a shared dict)."""
    import torch.multiprocessing as mp

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    manager = mp.get_context("spawn").Manager()
    try:
        results = manager.dict()
        mp.spawn(worker, args=(port, results), nprocs=world, join=True)
        return dict(results)
    finally:
        manager.shutdown()
