"""InfoNCE on a hand-checkable case, against torch's cross entropy, and its statistics."""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from dsembed.training.loss import LossOutput, info_nce


def test_hand_checkable_case():
    query = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    docs = torch.tensor([[1.0, 0.0], [0.0, 1.0], [0.6, 0.8], [0.8, 0.6]])  # [pos0, pos1, neg0, neg1]
    out = info_nce(query, docs, temperature=0.5)
    # query 0 scores [1, 0, 0.6, 0.8] / 0.5; query 1 scores [0, 1, 0.8, 0.6] / 0.5: same multiset.
    by_hand = -math.log(math.exp(2) / (math.exp(2) + math.exp(0) + math.exp(1.2) + math.exp(1.6)))
    assert isinstance(out, LossOutput)
    assert out.loss.item() == pytest.approx(by_hand, abs=1e-6)
    assert out.accuracy == 1.0
    assert out.positive_cosine == pytest.approx(1.0)
    assert out.negative_cosine == pytest.approx((0 + 0.6 + 0.8) * 2 / 6)


def test_matches_torch_cross_entropy_with_hard_negatives():
    torch.manual_seed(0)
    b, n, d, tau = 5, 3, 16, 0.05
    query = F.normalize(torch.randn(b, d, dtype=torch.float64), dim=-1).requires_grad_()
    docs = F.normalize(torch.randn(b * (1 + n), d, dtype=torch.float64), dim=-1).requires_grad_()
    out = info_nce(query, docs, temperature=tau)
    expected = F.cross_entropy(query @ docs.T / tau, torch.arange(b))
    assert out.loss.dtype == torch.float64
    assert out.loss.item() == pytest.approx(expected.item(), abs=1e-10)
    grads = torch.autograd.grad(out.loss, (query, docs))
    ref = torch.autograd.grad(expected, (query, docs))
    for got, want in zip(grads, ref):
        assert torch.allclose(got, want, atol=1e-10)
    scores = (query @ docs.T).detach()
    assert out.accuracy == pytest.approx((scores.argmax(1) == torch.arange(b)).double().mean().item())
    assert out.positive_cosine == pytest.approx(scores.diagonal().mean().item())
    off = scores.sum().item() - scores.diagonal().sum().item()
    assert out.negative_cosine == pytest.approx(off / (b * (b * (1 + n) - 1)))


def test_stats_are_detached_floats_and_accuracy_sees_mistakes():
    query = torch.tensor([[1.0, 0.0], [1.0, 0.0]], requires_grad=True)
    docs = torch.tensor([[1.0, 0.0], [0.0, 1.0]], requires_grad=True)  # query 1 prefers doc 0
    out = info_nce(query, docs, temperature=0.1)
    assert out.loss.requires_grad
    assert all(isinstance(v, float) for v in (out.accuracy, out.positive_cosine, out.negative_cosine))
    assert out.accuracy == 0.5
    assert out.positive_cosine == pytest.approx(0.5)


def test_bfloat16_inputs_score_in_float32():
    torch.manual_seed(1)
    query = F.normalize(torch.randn(4, 8), dim=-1)
    docs = F.normalize(torch.randn(8, 8), dim=-1)
    out = info_nce(query.bfloat16(), docs.bfloat16(), temperature=0.05)
    assert out.loss.dtype == torch.float32
    ref = info_nce(query.bfloat16().float(), docs.bfloat16().float(), temperature=0.05)
    assert out.loss.item() == pytest.approx(ref.loss.item(), rel=1e-6)


def test_gather_is_identity_without_process_group():
    torch.manual_seed(2)
    query, docs = torch.randn(3, 4), torch.randn(6, 4)
    assert info_nce(query, docs, 0.1, gather=True).loss.item() == pytest.approx(info_nce(query, docs, 0.1, gather=False).loss.item())


@pytest.mark.parametrize("shapes,match", [(((2, 4), (3, 4)), "not a multiple"), (((2, 4), (4, 5)), "expected query_emb"),
                                          (((0, 4), (0, 4)), "not a multiple")])
def test_bad_shapes_raise(shapes, match):
    with pytest.raises(ValueError, match=match):
        info_nce(torch.randn(*shapes[0]), torch.randn(*shapes[1]), 0.1)
    with pytest.raises(ValueError, match="temperature"):
        info_nce(torch.randn(2, 4), torch.randn(4, 4), 0.0)
