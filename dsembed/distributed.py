"""Rank / world helpers, an all-gather that keeps gradients, and the RNG state of a rank.

Every helper works in three situations: a single process with no launcher (rank 0 of 1), a process
started by a launcher (torchrun / deepspeed set RANK, WORLD_SIZE, LOCAL_RANK) before
`torch.distributed` is initialised, and an initialised process group. No backend or device is
hard-coded: collectives run on whatever device the caller's tensors live on, with whatever backend
the engine initialised (gloo on CPU, nccl on GPUs).
"""
from __future__ import annotations

import os
import random
import shutil
import socket
import uuid
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist


def _initialized() -> bool:
    return dist.is_available() and dist.is_initialized()


def _env_int(name: str, default: int) -> int:
    value = os.environ.get(name, "")
    try:
        return int(value)
    except ValueError:
        return default


def rank() -> int:
    """This process's global rank (0 when not distributed)."""
    return dist.get_rank() if _initialized() else _env_int("RANK", 0)


def world_size() -> int:
    """The number of processes (1 when not distributed)."""
    return dist.get_world_size() if _initialized() else max(1, _env_int("WORLD_SIZE", 1))


def exit_process(code: int) -> None:
    """Exit with `code`; a rank of a multi-process run skips the interpreter's finalization.

    Why: gloo's worker threads can still hold work objects when the interpreter tears down at exit,
    and their destructors then call std::terminate ("terminate called without an active exception",
    SIGABRT): the rank's exit code (3 after a non-finite loss, even 0) becomes -6 and the launcher
    reports a crash. Seen in 2-rank CPU runs (pytorch PR 179291 describes the cause). By this point
    everything a run writes is closed (checkpoints are atomic; monitor and metrics close in
    `finally`), so only the finalization is skipped; a single process exits normally.
    """
    import sys

    if world_size() > 1:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
    sys.exit(code)


def local_rank() -> int:
    """This process's rank on its machine (LOCAL_RANK, 0 when unset)."""
    return _env_int("LOCAL_RANK", 0)


def is_main() -> bool:
    """True on global rank 0: the process that logs, prints and writes shared files."""
    return rank() == 0


def barrier() -> None:
    """Wait for every rank; a no-op when torch.distributed is not initialised."""
    if _initialized() and dist.get_world_size() > 1:
        dist.barrier()


def ranks_not_sharing(folder: Path) -> list[str]:
    """The ranks that cannot see a file global rank 0 writes into `folder` (collective).

    Rank 0 creates `folder` if needed and writes a probe file named by a random token; every rank
    looks for it. On one machine the list is always empty; across nodes it names the ranks (and
    hosts) whose `folder` is not the same shared directory. A folder created only for the probe is
    removed again when some rank cannot see it, so a refused run leaves nothing behind.

    Returns:
        "rank R on HOST" for each rank that cannot see the probe; [] when not distributed.
    """
    if not _initialized() or dist.get_world_size() == 1:
        return []
    token = [uuid.uuid4().hex if rank() == 0 else None]  # not the seeded generators: training stays reproducible
    dist.broadcast_object_list(token, src=0)
    probe = Path(folder) / f".shared-check-{token[0]}"
    created = False
    if rank() == 0:
        created = not Path(folder).exists()
        Path(folder).mkdir(parents=True, exist_ok=True)
        probe.write_text(token[0], encoding="utf-8")
    dist.barrier()
    seen: list = [None] * dist.get_world_size()
    dist.all_gather_object(seen, (rank(), socket.gethostname(), probe.is_file()))
    blind = [f"rank {r} on {host}" for r, host, ok in seen if not ok]
    dist.barrier()  # every rank has looked before the probe goes
    if rank() == 0:
        probe.unlink(missing_ok=True)
        if blind and created:
            shutil.rmtree(folder, ignore_errors=True)
    return blind


def gather_objects(obj: Any) -> list[Any]:
    """`obj` (picklable) from every rank, in rank order; collective. [obj] when not distributed."""
    if not _initialized() or dist.get_world_size() == 1:
        return [obj]
    out: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def gather_with_grad(tensor: torch.Tensor) -> torch.Tensor:
    """Concatenate `tensor` from every rank along dim 0, keeping the autograd graph.

    Shapes:
        tensor: [b, ...] on this rank (the same b on every rank).
        returns: [W * b, ...], rank-major: rows [r*b, (r+1)*b) come from rank r.

    The backward pass sums, on each rank, the gradients every rank computed for that rank's rows
    (torch.distributed.nn's all_gather), so a loss computed on each rank from the gathered tensor
    back-propagates into every rank's own graph. When the engine then averages parameter gradients
    over ranks, the result equals the gradient of the mean of the per-rank losses.

    Args:
        tensor: this rank's rows; any device the process group's backend supports.

    Returns:
        The gathered tensor; `tensor` itself when not distributed or with one rank.
    """
    if not _initialized() or dist.get_world_size() == 1:
        return tensor
    from torch.distributed.nn.functional import all_gather

    with warnings.catch_warnings():
        # torch 2.13 marks it deprecated in favour of a private functional API; it is still the
        # public autograd-aware all_gather and behaves correctly on gloo and nccl.
        warnings.simplefilter("ignore", FutureWarning)
        parts = all_gather(tensor.contiguous())  # W x [b, ...]
    return torch.cat(parts, dim=0)  # [W*b, ...]


def gather_tensor(tensor: torch.Tensor) -> torch.Tensor:
    """Concatenate `tensor` from every rank along dim 0, without gradient (integer tensors too).

    Shapes:
        tensor: [b, ...] on this rank (the same b on every rank).
        returns: [W * b, ...], rank-major, like `gather_with_grad`.

    Args:
        tensor: this rank's rows, on the device the backend uses (the embeddings' device).

    Returns:
        The gathered tensor; `tensor` itself when not distributed or with one rank.
    """
    if not _initialized() or dist.get_world_size() == 1:
        return tensor
    tensor = tensor.detach().contiguous()
    parts = [torch.empty_like(tensor) for _ in range(dist.get_world_size())]
    dist.all_gather(parts, tensor)  # W x [b, ...]
    return torch.cat(parts, dim=0)  # [W*b, ...]


def mean_across_ranks(tensor: torch.Tensor) -> torch.Tensor:
    """The mean of `tensor` over ranks, without gradient (for logging the global loss / accuracy).

    Args:
        tensor: any shape, on the device the backend uses (e.g. the loss's device).

    Returns:
        A new tensor holding the mean; a detached copy when not distributed.
    """
    out = tensor.detach().clone()
    if _initialized() and dist.get_world_size() > 1:
        dist.all_reduce(out, op=dist.ReduceOp.SUM)
        out /= dist.get_world_size()
    return out


def rng_states() -> dict[str, Any]:
    """The python, numpy, torch (and CUDA) generator states of this process."""
    states = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        states["cuda"] = torch.cuda.get_rng_state_all()
    return states


def set_rng_states(states: dict[str, Any]) -> None:
    """Restore what `rng_states` returned (a resumed rank continues the same random streams)."""
    random.setstate(states["python"])
    np.random.set_state(states["numpy"])
    torch.set_rng_state(states["torch"])
    if "cuda" in states and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(states["cuda"])
