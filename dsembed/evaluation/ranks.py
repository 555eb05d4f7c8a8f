"""Data-parallel evaluation: rank 0 runs mteb; every rank embeds a share of each encode call's texts.

Who runs what, in one evaluation of N ranks (torchrun, the deepspeed launcher, or `dsembed-evaluate
--nproc N`, which starts the N local ranks itself through torch's elastic launcher):
- rank 0 loads the tasks, runs mteb and scores, exactly as a one-process evaluation does. Its encoder
  is a `ShardedEncoder`: the batches a single process would run for an encode call (the model's
  `batch_plan`) are dealt whole to the ranks (scatter), each rank embeds its share, which the
  model batches exactly as planned, and rank 0 puts the rows back in input order (gather). Scoring needs every embedding in one place, and mteb's scorers are cheap next to the
  encoder, so the other ranks wait while rank 0 scores.
- ranks 1..N-1 load the same model on their own device and `serve` encode requests until rank 0
  sends the stop request (also on error: rank 0 always stops them before it exits).
The process group uses torch's default backends (gloo for CPU tensors, nccl for CUDA ones): nothing
here names a backend, and the object collectives used carry numpy arrays either way.
"""
from __future__ import annotations

import datetime
import logging
import os
import sys
import uuid
from typing import Any, Callable, Sequence

import numpy as np
import torch
import torch.distributed as dist

from dsembed import distributed
from dsembed.evaluation.encoder import TextEncoder

# Rank 0 scores while the others wait in a collective: scoring a multi-million-document retrieval
# task takes long, and the default timeouts (10 min for nccl) would kill the waiting ranks.
WAIT_TIMEOUT = datetime.timedelta(hours=12)
# Texts per rank per exchange: bounds the gathered arrays (32k x 4096 x 4 B = 512 MiB per rank for
# Mistral-7B) whatever size of call mteb makes.
TEXTS_PER_EXCHANGE = 32768


def start_ranks() -> int:
    """Join the process group when a launcher started several ranks; returns the world size.

    Raises nothing when not launched (world size 1, no process group).
    """
    if distributed.world_size() > 1 and not dist.is_initialized():
        if torch.cuda.is_available():
            torch.cuda.set_device(distributed.local_rank())  # the object collectives run on this device under nccl
        dist.init_process_group(timeout=WAIT_TIMEOUT)
    return distributed.world_size()


def rank_device(requested: str | None) -> str:
    """This rank's device: `requested` (a bare "cuda" becomes this rank's GPU), else its GPU or the CPU."""
    if requested not in (None, "cuda"):
        return requested
    if requested == "cuda" or torch.cuda.is_available():
        return f"cuda:{distributed.local_rank()}"
    return "cpu"


def broadcast_from_main(value: Any) -> Any:
    """Rank 0's `value` on every rank (the value itself when not distributed)."""
    if not dist.is_initialized():
        return value
    box = [value]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def stop_ranks() -> None:
    """Leave the process group (every rank, at the end, also after rank 0's error).

    The barrier first: rank 0's last scatter returns once its sends are queued, and a process group
    torn down while a peer still reads from it aborts that peer ("terminate called without an
    active exception", seen once in a 2-rank study evaluation).
    """
    if dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


class ShardedEncoder:
    """Rank 0's `encode`: the texts of each call shared out over all ranks, the rows gathered back.

    Args:
        model: rank 0's own model (EmbeddingModel or any TextEncoder).
    """

    def __init__(self, model: TextEncoder) -> None:
        self.model = model
        self.world = distributed.world_size() if dist.is_initialized() else 1
        self.texts_per_rank = [0] * self.world  # texts each rank embedded (the results' `encoding` record)

    @property
    def dim(self) -> int | None:
        """The wrapped model's embedding size (None for a stand-in without one)."""
        return getattr(self.model, "dim", None)

    def parameters(self):
        """The wrapped model's parameters (mteb's model meta counts them)."""
        return self.model.parameters() if hasattr(self.model, "parameters") else iter(())

    def encode(self, texts: Sequence[str], instruction: str | None = None, batch_size: int = 32,
               show_progress: bool = False) -> np.ndarray:
        """Embed `texts` on every rank; float32 [N, D] in input order on rank 0."""
        if self.world == 1:
            self.texts_per_rank[0] += len(texts)
            return _encode(self.model, list(texts), instruction, batch_size, show_progress)
        # The single process's batches (the model's own plan: by token count, longest first), dealt
        # whole, so every batch has the shape it has in a one-rank run and the embeddings are the
        # same (bit for bit with the same kernels). Each batch goes to the rank with the least work
        # so far (longest first: the LPT rule), and a rank's batches stay in plan order, which its
        # own `encode` batches exactly as planned.
        plan = _batch_plan(self.model, texts, instruction, batch_size)
        out: np.ndarray | None = None
        step = max(1, TEXTS_PER_EXCHANGE // max(1, batch_size)) * self.world  # batches per exchange
        for start in range(0, len(plan), step):
            shares = _deal(plan[start:start + step], texts, self.world)
            requests = [{"texts": [texts[i] for i in share], "instruction": instruction, "batch_size": batch_size}
                        for share in shares]
            mine: list[Any] = [None]
            dist.scatter_object_list(mine, requests, src=0)
            own = _encode(self.model, mine[0]["texts"], instruction, batch_size, show_progress)  # [n0, D]
            gathered: list[Any] = [None] * self.world
            dist.gather_object(own, gathered, dst=0)
            if out is None:
                out = np.empty((len(texts), own.shape[1]), dtype=np.float32)  # [N, D]
            for rank, share in enumerate(shares):
                out[share] = gathered[rank]  # [n_rank, D] rows back to their input positions
                self.texts_per_rank[rank] += len(share)
        return out if out is not None else np.zeros((0, _dim(self.model)), dtype=np.float32)

    def close(self) -> None:
        """Release the serving ranks (rank 0, once, also after an error)."""
        if self.world > 1:
            release_servers()


def release_servers() -> None:
    """Rank 0: send the stop request that ends every other rank's `serve` loop."""
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.scatter_object_list([None], [None] * dist.get_world_size(), src=0)


def serve(model: TextEncoder) -> int:
    """Ranks 1..N-1: embed the shares rank 0 sends until it sends the stop request.

    Returns:
        The number of texts this rank embedded.
    """
    done = 0
    while True:
        box: list[Any] = [None]
        dist.scatter_object_list(box, None, src=0)
        request = box[0]
        if request is None:
            return done
        rows = _encode(model, request["texts"], request["instruction"], request["batch_size"], False)
        dist.gather_object(rows, None, dst=0)
        done += len(request["texts"])


def _deal(batches: list[list[int]], texts: Sequence[str], world: int) -> list[list[int]]:
    """Text positions per rank: whole batches, each to the least-loaded rank, in plan order.

    A batch's work is estimated as its size times its longest text in characters (the padded width).
    """
    load = [0] * world
    shares: list[list[int]] = [[] for _ in range(world)]
    for batch in batches:
        rank = min(range(world), key=load.__getitem__)
        load[rank] += len(batch) * max(len(texts[i]) for i in batch)
        shares[rank].extend(batch)
    return shares


def _batch_plan(model: TextEncoder, texts: Sequence[str], instruction: str | None,
                batch_size: int) -> list[list[int]]:
    """The model's own batches (EmbeddingModel.batch_plan), or by character count for a stand-in."""
    if hasattr(model, "batch_plan"):
        return model.batch_plan(texts, instruction, batch_size)
    order = sorted(range(len(texts)), key=lambda i: -len(texts[i]))
    return [order[start:start + batch_size] for start in range(0, len(order), batch_size)]


def _encode(model: TextEncoder, texts: list[str], instruction: str | None, batch_size: int,
            show_progress: bool) -> np.ndarray:
    if not texts:
        return np.zeros((0, _dim(model)), dtype=np.float32)
    options: dict[str, Any] = {"instruction": instruction, "batch_size": batch_size}
    if show_progress:
        options["show_progress"] = True
    return np.asarray(model.encode(texts, **options), dtype=np.float32)


def _dim(model: TextEncoder) -> int:
    dim = getattr(model, "dim", None)
    if dim is None:  # a stand-in encoder: ask it once
        dim = np.asarray(model.encode(["x"])).shape[1]
    return int(dim)


def _without_nproc(argv: list[str]) -> list[str]:
    return [arg for i, arg in enumerate(argv)
            if arg != "--nproc" and not arg.startswith("--nproc=") and not (i and argv[i - 1] == "--nproc")]


def launch_local(nproc: int, module: str, argv: list[str],
                 log: Callable[[str], None] = lambda line: print(line, file=sys.stderr, flush=True)) -> int:
    """Run `python -m module *argv` as `nproc` local ranks (torch's elastic launcher, as torchrun does);
    argv's own --nproc option is left out (the ranks must not start ranks themselves).

    Each rank gets cores // nproc threads unless OMP_NUM_THREADS is set. A rank that exits with an
    error makes the launcher stop the others; the first failing rank's exit code is returned (rank 0
    has already printed the one-line error).
    """
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.launcher.api import LaunchConfig, elastic_launch

    os.environ.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // nproc)))
    # The agent logs every worker start and stop at WARNING; dsembed prints its own lines.
    logging.getLogger("torch.distributed.elastic").setLevel(logging.CRITICAL)
    config = LaunchConfig(min_nodes=1, max_nodes=1, nproc_per_node=nproc, run_id=uuid.uuid4().hex,
                          rdzv_backend="c10d", rdzv_endpoint="localhost:0", max_restarts=0,
                          monitor_interval=0.1)
    log(f"starting {nproc} local ranks ({os.environ['OMP_NUM_THREADS']} threads each)")
    try:
        elastic_launch(config, sys.executable)("-m", module, *_without_nproc(argv))
    except ChildFailedError as err:
        codes = [failure.exitcode for _, failure in sorted(err.failures.items())]
        first = next((c for c in codes if c > 0), None)
        # no rank exited by itself: a signal ended one (-9 -> 137, as a shell reports it)
        return first if first is not None else 128 + abs(codes[0] if codes else 1)
    return 0
