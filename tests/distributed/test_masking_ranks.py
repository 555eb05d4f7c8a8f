"""Masks and Matryoshka sizes are the same in one process, across 2 ranks and in cached steps.

One global batch of 6 queries with 1 hard negative each, whose texts repeat across ranks (a
positive shared by queries on different ranks, a hard negative that is another rank's positive).
Each of 2 gloo ranks embeds its share with the same small embedder and runs the plain step and the
cached (GradCache) step with duplicate masking, a false-negative margin and Matryoshka sizes; the
averaged parameter gradients, the loss and the number of masked candidates must equal one process
computing the plain step on the whole batch.
"""
from __future__ import annotations


import pytest
import torch
import torch.nn.functional as F

from dsembed import distributed
from tests.distributed.launch import spawn_ranks
from dsembed.data.batches import text_keys
from dsembed.training.gradcache import cached_backward, plain_backward
from dsembed.training.loss import LossOptions

WORLD, B, VOCAB, DIM, TAU = 2, 3, 40, 16, 0.05
OPTIONS = LossOptions(mask_duplicates=True, false_negative_margin=0.9, dims=(4, 8, 16), dim_weights=(1.0, 1.0, 2.0))
# positives of queries 0..5 (rank 0: 0-2, rank 1: 3-5), then one hard negative each (query-major)
POSITIVES = ["alpha", "beta", "gamma", "alpha", "delta", "eps"]  # q0 and q3 share a positive
NEGATIVES = ["delta", "zeta", "eta", "theta", "beta", "alpha"]  # n0 = q4's positive, n4 = q1's, n5 = q0's/q3's


class _Embedder(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.emb = torch.nn.Embedding(VOCAB, DIM)
        self.proj = torch.nn.Linear(DIM, DIM)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        hidden = self.proj(self.emb(input_ids))  # [B, T, D]
        mask = attention_mask[..., None].float()  # [B, T, 1]
        return F.normalize((hidden * mask).sum(1) / mask.sum(1), dim=-1)  # [B, D]


class _Engine:
    device = torch.device("cpu")

    def __init__(self) -> None:
        self.module = _Embedder()

    def __call__(self, **batch: torch.Tensor) -> torch.Tensor:
        return self.module(**batch)

    def set_boundary(self, is_boundary: bool) -> None:
        pass

    def backward(self, loss: torch.Tensor) -> None:
        loss.backward()


def _tokens(texts: list[str]) -> dict[str, torch.Tensor]:
    """Equal texts give equal token rows (their embeddings are equal, as real duplicates' are)."""
    ids = torch.tensor([[1 + (ord(c) * 7 + i) % (VOCAB - 1) for i, c in enumerate(t.ljust(5, "."))][:5] for t in texts])
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids)}


def _batch(rows: list[int]) -> dict:
    queries = [f"question {i}" for i in rows]
    docs = [POSITIVES[i] for i in rows] + [NEGATIVES[i] for i in rows]
    return {"query": _tokens(queries), "documents": _tokens(docs), "document_keys": text_keys(docs)}


def _run(rows: list[int], cached: bool, gather: bool):
    engine = _Engine()
    batch = _batch(rows)
    if cached:
        stats = cached_backward(engine, batch, TAU, gather, chunk_size=1, boundary=True, options=OPTIONS)
    else:
        stats = plain_backward(engine, batch, TAU, gather, boundary=True, options=OPTIONS)
    return stats, {n: p.grad.clone() for n, p in engine.module.named_parameters()}



def _worker(rank: int, port: int, results: dict) -> None:
    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=WORLD)
    try:
        out = {"keys": distributed.gather_tensor(torch.tensor([rank, 10 + rank], dtype=torch.int64)).tolist()}
        for cached in (False, True):
            stats, grads = _run(list(range(rank * B, (rank + 1) * B)), cached, gather=True)
            for g in grads.values():  # DeepSpeed's gradient averaging over data-parallel ranks
                dist.all_reduce(g)
                g /= WORLD
            out["cached" if cached else "plain"] = {"loss": stats.loss, "masked": stats.masked, "grads": grads}
        results[rank] = out
    finally:
        dist.destroy_process_group()


@pytest.fixture(scope="module")
def two_ranks():
    return spawn_ranks(_worker, WORLD)


def _max_diff(a: dict, b: dict) -> float:
    return max((a[k] - b[k]).abs().max().item() for k in a)


def test_cached_step_masks_as_the_plain_step_in_one_process():
    plain_stats, plain = _run(list(range(WORLD * B)), cached=False, gather=False)
    cached_stats, cached = _run(list(range(WORLD * B)), cached=True, gather=False)
    assert plain_stats.masked == cached_stats.masked > 0
    assert plain_stats.loss == pytest.approx(cached_stats.loss, abs=1e-6)
    assert _max_diff(plain, cached) < 1e-5


def test_two_ranks_mask_the_same_candidates_as_one_process(two_ranks):
    ref_stats, ref = _run(list(range(WORLD * B)), cached=False, gather=False)
    assert two_ranks[0]["keys"] == two_ranks[1]["keys"] == [0, 10, 1, 11]  # gather_tensor: rank-major int64
    for kind in ("plain", "cached"):
        masked = sum(two_ranks[r][kind]["masked"] for r in range(WORLD)) / WORLD
        loss = sum(two_ranks[r][kind]["loss"] for r in range(WORLD)) / WORLD
        assert masked == pytest.approx(ref_stats.masked)
        assert loss == pytest.approx(ref_stats.loss, abs=1e-5)
        for r in range(WORLD):
            assert _max_diff(two_ranks[r][kind]["grads"], ref) < 1e-5, (kind, r)
    # the texts shared across ranks are what is masked: at least the 4 cross-rank duplicates
    assert ref_stats.masked * WORLD * B >= 4
