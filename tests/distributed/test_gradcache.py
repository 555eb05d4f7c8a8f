"""Cached (GradCache) steps give the gradients of the plain step.

In-process, with a stand-in engine: dropout replays identically in the re-run, the accumulation
boundary is set on the last backward only. Then 2 CPU ranks under ZeRO-3 and ZeRO-2 (where
sentence-transformers #3173 and Tevatron #206 broke): the reduced gradients DeepSpeed holds before
the optimizer step (dumped through the DSEMBED_DUMP_GRADS test hook) match within 1e-5, with 2
accumulated contrastive batches of 4 chunks each.
"""
from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from dsembed.training.gradcache import cached_backward, plain_backward

from launch import check, launch

VOCAB, DIM = 50, 16


class _Embedder(torch.nn.Module):
    def __init__(self, dropout: float) -> None:
        super().__init__()
        self.emb = torch.nn.Embedding(VOCAB, DIM)
        self.proj = torch.nn.Linear(DIM, DIM)
        self.drop = torch.nn.Dropout(dropout)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        hidden = self.drop(self.proj(self.emb(input_ids)))  # [B, T, D]
        mask = attention_mask[..., None].float()  # [B, T, 1]
        return F.normalize((hidden * mask).sum(1) / mask.sum(1), dim=-1)  # [B, D]


class _Engine:
    """The three calls gradcache makes on dsembed.training.engine.Engine, on a plain module."""

    device = torch.device("cpu")

    def __init__(self, module: torch.nn.Module, accumulation: int) -> None:
        self.module, self.accumulation, self.boundaries = module, accumulation, []

    def __call__(self, **batch: torch.Tensor) -> torch.Tensor:
        return self.module(**batch)

    def set_boundary(self, is_boundary: bool) -> None:
        self.boundaries.append(is_boundary)

    def backward(self, loss: torch.Tensor, scale_wrt_gas: bool = True) -> None:
        (loss / self.accumulation if scale_wrt_gas else loss).backward()


def _tokens(rows: int, generator: torch.Generator) -> dict[str, torch.Tensor]:
    lengths = torch.randint(3, 12, (rows,), generator=generator)
    ids = torch.randint(1, VOCAB, (rows, int(lengths.max())), generator=generator)
    mask = (torch.arange(ids.shape[1])[None] >= ids.shape[1] - lengths[:, None]).long()  # left padding
    return {"input_ids": ids * mask, "attention_mask": mask}


def _grads(chunk: int | None, dropout: float, accumulation: int = 2):
    torch.manual_seed(0)
    engine = _Engine(_Embedder(dropout), accumulation)
    generator = torch.Generator().manual_seed(1)
    torch.manual_seed(2)  # the dropout stream
    for a in range(accumulation):
        batch = {"query": _tokens(8, generator), "documents": _tokens(16, generator)}  # b=8, 1 negative
        last = a == accumulation - 1
        if chunk is None:
            plain_backward(engine, batch, 0.05, gather=False, boundary=last)
        else:
            cached_backward(engine, batch, 0.05, gather=False, chunk_size=chunk, boundary=last)
    grads = {n: p.grad.clone() for n, p in engine.module.named_parameters()}
    return grads, engine.boundaries


def _max_diff(a: dict, b: dict) -> float:
    assert a.keys() == b.keys()
    return max((a[k] - b[k]).abs().max().item() for k in a)


def test_cached_chunks_match_plain_and_mark_one_boundary() -> None:
    plain, plain_bounds = _grads(None, dropout=0.0)
    cached, cached_bounds = _grads(2, dropout=0.0)
    assert _max_diff(plain, cached) < 1e-5
    assert plain_bounds == [False, True]
    assert cached_bounds == [False] * 8 + [False] * 7 + [True]  # 4+4 chunks per batch, last one only


def test_cached_step_replays_dropout() -> None:
    # One chunk per side consumes the dropout stream in the plain step's order (queries, then
    # documents), so the gradients agree only if each re-run restores its chunk's RNG state.
    plain, _ = _grads(None, dropout=0.3)
    cached, _ = _grads(8, dropout=0.3)
    assert _max_diff(plain, cached) < 1e-5
    other, _ = _grads(None, dropout=0.5)
    assert _max_diff(plain, other) > 1e-3  # dropout does change the gradients


@pytest.mark.parametrize("stage", [3, 2])
def test_two_rank_cached_gradients_equal_plain(tmp_path: Path, stage: int) -> None:
    grads = {}
    for chunk in ("null", "2"):
        out, dump = tmp_path / f"run-{chunk}", tmp_path / f"grads-{chunk}"
        check(launch([f"train.output_dir={out}", f"deepspeed.zero_stage={stage}", "train.max_steps=1",
                      "train.gradient_accumulation_steps=2", f"train.cache_chunk_size={chunk}"],
                     DSEMBED_DUMP_GRADS=str(dump)))
        grads[chunk] = torch.load(dump / "grads_step1.pt")
    plain, cached = grads["null"], grads["2"]
    assert sum("lora_" in name for name in plain) == 4 * 7 * 2  # LoRA A/B on 7 modules x 4 layers
    assert any(name.startswith("pooler.") for name in plain)  # the head, trained in full
    assert max(g.abs().max().item() for g in plain.values()) > 1e-2  # a real, non-zero gradient
    assert _max_diff(plain, cached) < 1e-5
