"""Fault-injection and inspection hooks for the reliability tests, behind one seam.

The trainer calls `TestHooks` at a few named points; with none of the environment variables below
set, every call returns at once (the loop reads as the loop, and users pay nothing).

    DSEMBED_CRASH_AT="<point>@<step>[:<rank>]"   SIGKILL this process at a point of optimizer step
        <step> (every rank, or only global rank <rank>), to hit windows an outside kill cannot aim at:
          step          after the optimizer step, before metrics and the checkpoint
          save-shards   inside save(): this rank's shards and RNG file written, not yet renamed
          save-renamed  inside save(): tmp-step-N renamed to step-N, `latest` not yet updated
          save-latest   inside save(): `latest` updated, old checkpoints not yet pruned
          eval-encode   dsembed-evaluate: the first encode call of the <step>-th task evaluated
          mine-shard    dsembed-mine: right after its <step>-th shard (1-based) was stored
    DSEMBED_INJECT_NAN="loss@<step>[:<rank>]" | "grad@<step>[:<rank>]"   make that step's loss NaN
        before its backward, or keep the loss finite and make its gradients NaN.
    DSEMBED_DUMP_GRADS=<folder>   the reduced full gradients of every step, written before step().
    DSEMBED_DUMP_EMBEDDINGS=<folder>   a folder holding probe.json {"texts", "queries", "instruction"};
        after the last step the live engine embeds them and rank 0 writes embeddings.npz there.
"""
from __future__ import annotations

import json
import os
import signal
from pathlib import Path
from typing import Any

import numpy as np
import torch

from dsembed import distributed as dist

CRASH_AT_ENV = "DSEMBED_CRASH_AT"
INJECT_NAN_ENV = "DSEMBED_INJECT_NAN"
DUMP_GRADS_ENV = "DSEMBED_DUMP_GRADS"
DUMP_EMBEDDINGS_ENV = "DSEMBED_DUMP_EMBEDDINGS"


def _matches(env: str, kind: str, step: int) -> bool:
    """Whether hook `env` ("<kind>@<step>[:<rank>]") fires for `kind` at `step` on this rank."""
    value = os.environ.get(env)
    if not value:
        return False
    name, _, where = value.partition("@")
    at, _, only_rank = where.partition(":")
    return name == kind and int(at) == step and (not only_rank or int(only_rank) == dist.rank())


class _NaNGrad(torch.autograd.Function):
    """Identity forward, NaN backward (INJECT_NAN_ENV grad@N)."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor) -> torch.Tensor:
        return x.clone()

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> torch.Tensor:
        return grad * float("nan")


class TestHooks:
    """The trainer's only contact with the test hooks; every method is a no-op unless its variable is set."""

    __test__ = False  # not a pytest test class

    @staticmethod
    def crash(point: str, step: int) -> None:
        """SIGKILL this process when DSEMBED_CRASH_AT names `point` at `step` (for this rank)."""
        if _matches(CRASH_AT_ENV, point, step):
            os.kill(os.getpid(), signal.SIGKILL)

    @staticmethod
    def corrupt_loss(loss: torch.Tensor, step: int) -> torch.Tensor:
        """`loss`, or a NaN loss / a loss with NaN gradients when DSEMBED_INJECT_NAN asks for it."""
        if _matches(INJECT_NAN_ENV, "loss", step):
            return loss * float("nan")
        if _matches(INJECT_NAN_ENV, "grad", step):
            return _NaNGrad.apply(loss)
        return loss

    @staticmethod
    def dump_grads(engine: Any, step: int) -> None:
        """Write the reduced full gradients of `step` (collective under ZeRO-3: every rank calls it)."""
        folder = os.environ.get(DUMP_GRADS_ENV)
        if not folder:
            return
        grads = engine.full_grads()
        if dist.is_main():
            Path(folder).mkdir(parents=True, exist_ok=True)
            torch.save(grads, Path(folder) / f"grads_step{step}.pt")

    @staticmethod
    def dump_embeddings(model: Any) -> None:
        """Embed probe.json's texts with the live model (collective under ZeRO-3: every rank embeds)."""
        folder = os.environ.get(DUMP_EMBEDDINGS_ENV)
        if not folder:
            return
        probe = json.loads((Path(folder) / "probe.json").read_text(encoding="utf-8"))
        documents = model.encode(probe["texts"])  # [N, D]
        queries = model.encode(probe["queries"], instruction=probe.get("instruction"))  # [M, D]
        if dist.is_main():
            np.savez(Path(folder) / "embeddings.npz", documents=documents, queries=queries)
        dist.barrier()
