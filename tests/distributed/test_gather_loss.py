"""Cross-rank InfoNCE: 2 CPU ranks (gloo) give the same loss and gradients as 1 rank on the whole batch.

Each rank embeds its share of queries and documents with the same linear layer, scores its queries
against the gathered documents, back-propagates, and averages parameter gradients over ranks as
DeepSpeed does. That must equal one process computing InfoNCE over the global batch.
"""
from __future__ import annotations


import pytest
import torch
import torch.nn.functional as F

from dsembed import distributed
from tests.distributed.launch import spawn_ranks
from dsembed.training.loss import info_nce

WORLD, B_LOCAL, NEG, DIM_IN, DIM, TAU = 2, 3, 2, 12, 8, 0.05



def _inputs():
    generator = torch.Generator().manual_seed(0)
    n = WORLD * B_LOCAL
    return (torch.randn(n, DIM_IN, generator=generator),  # queries
            torch.randn(n, DIM_IN, generator=generator),  # positives
            torch.randn(n * NEG, DIM_IN, generator=generator))  # negatives, query-major


def _layer() -> torch.nn.Linear:
    torch.manual_seed(1)
    return torch.nn.Linear(DIM_IN, DIM)


def _embed(layer, x):
    return F.normalize(layer(x), dim=-1)  # [N, DIM], like the model's normalised output


def _worker(rank: int, port: int, results: dict) -> None:
    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=WORLD)
    try:
        xq, xp, xn = _inputs()
        layer = _layer()
        local = slice(rank * B_LOCAL, (rank + 1) * B_LOCAL)
        local_neg = slice(rank * B_LOCAL * NEG, (rank + 1) * B_LOCAL * NEG)
        query = _embed(layer, xq[local])
        docs = _embed(layer, torch.cat([xp[local], xn[local_neg]]))  # [b*(1+n), DIM] as collate orders them
        query.retain_grad()
        docs.retain_grad()
        out = info_nce(query, docs, TAU, gather=True)
        out.loss.backward()
        for param in layer.parameters():  # DeepSpeed's gradient averaging over data-parallel ranks
            dist.all_reduce(param.grad)
            param.grad /= WORLD
        gathered = distributed.gather_with_grad(torch.full((2, 1), float(rank)))
        mean_loss = distributed.mean_across_ranks(out.loss)
        distributed.barrier()
        results[rank] = {
            "rank": distributed.rank(), "world": distributed.world_size(), "main": distributed.is_main(),
            "loss": out.loss.item(), "mean_loss": mean_loss.item(), "accuracy": out.accuracy,
            "positive_cosine": out.positive_cosine,
            "grads": [p.grad.clone() for p in layer.parameters()],
            "query_grad": query.grad.clone(), "doc_grad": docs.grad.clone(), "gathered": gathered.flatten().tolist(),
        }
    finally:
        dist.destroy_process_group()


@pytest.fixture(scope="module")
def two_rank_results():
    return spawn_ranks(_worker, WORLD)


@pytest.fixture(scope="module")
def one_rank_reference():
    xq, xp, xn = _inputs()
    layer = _layer()
    query, docs = _embed(layer, xq), _embed(layer, torch.cat([xp, xn]))
    query.retain_grad()
    docs.retain_grad()
    out = info_nce(query, docs, TAU, gather=True)  # not initialised: no gathering, the whole batch
    out.loss.backward()
    return out, [p.grad.clone() for p in layer.parameters()], query.grad, docs.grad


def test_helpers_in_each_rank(two_rank_results):
    assert sorted(two_rank_results) == [0, 1]
    for rank, res in two_rank_results.items():
        assert (res["rank"], res["world"], res["main"]) == (rank, WORLD, rank == 0)
        assert res["gathered"] == [0.0, 0.0, 1.0, 1.0]  # rank-major


def test_loss_and_parameter_gradients_match_one_rank(two_rank_results, one_rank_reference):
    ref, ref_grads, _, _ = one_rank_reference
    losses = [two_rank_results[r]["loss"] for r in range(WORLD)]
    assert sum(losses) / WORLD == pytest.approx(ref.loss.item(), abs=1e-5)
    assert two_rank_results[1]["mean_loss"] == pytest.approx(ref.loss.item(), abs=1e-5)
    assert sum(two_rank_results[r]["accuracy"] for r in range(WORLD)) / WORLD == pytest.approx(ref.accuracy)
    for r in range(WORLD):
        for got, want in zip(two_rank_results[r]["grads"], ref_grads):
            assert torch.allclose(got, want, atol=1e-5, rtol=1e-5), (got - want).abs().max()
    assert any(g.abs().sum() > 0 for g in ref_grads)


def test_embedding_gradients_reach_every_rank(two_rank_results, one_rank_reference):
    _, _, ref_query_grad, ref_doc_grad = one_rank_reference
    n = WORLD * B_LOCAL
    for r in range(WORLD):
        res = two_rank_results[r]
        local = slice(r * B_LOCAL, (r + 1) * B_LOCAL)
        local_neg = slice(n + r * B_LOCAL * NEG, n + (r + 1) * B_LOCAL * NEG)
        want_docs = torch.cat([ref_doc_grad[local], ref_doc_grad[local_neg]])
        # each rank's loss is a mean over its b queries, the reference a mean over W*b: factor W
        assert torch.allclose(res["query_grad"] / WORLD, ref_query_grad[local], atol=1e-5)
        assert torch.allclose(res["doc_grad"] / WORLD, want_docs, atol=1e-5)


def test_env_fallback_without_process_group(monkeypatch):
    monkeypatch.setenv("RANK", "3")
    monkeypatch.setenv("WORLD_SIZE", "4")
    monkeypatch.setenv("LOCAL_RANK", "1")
    assert (distributed.rank(), distributed.world_size(), distributed.local_rank(), distributed.is_main()) == (3, 4, 1, False)
    x = torch.randn(2, 3)
    assert distributed.gather_with_grad(x) is x  # not initialised: identity even if the env says 4 ranks
    distributed.barrier()  # a no-op, must not hang
    monkeypatch.delenv("RANK")
    monkeypatch.delenv("WORLD_SIZE")
    assert (distributed.rank(), distributed.world_size(), distributed.is_main()) == (0, 1, True)
