"""False-negative masking and Matryoshka sizes in info_nce, against by-hand references (float64)."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from dsembed.data.batches import text_key, text_keys
from dsembed.training.loss import LossOptions, candidate_mask, contrastive_loss, info_nce, relative_threshold


def _embeddings(b: int, docs: int, dim: int = 8, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    query = F.normalize(torch.randn(b, dim, generator=g, dtype=torch.float64), dim=-1).requires_grad_()
    doc = F.normalize(torch.randn(docs, dim, generator=g, dtype=torch.float64), dim=-1).requires_grad_()
    return query, doc


def _reference(query, doc, tau, allowed):
    """Mean over queries of -s_ii/tau + logsumexp over the allowed candidates (allowed[i] lists columns)."""
    scores = query @ doc.T
    losses = [torch.logsumexp(scores[i, allowed[i]] / tau, dim=0) - scores[i, i] / tau for i in range(len(allowed))]
    return torch.stack(losses).mean()


def test_text_keys_are_exact_text_hashes():
    keys = text_keys(["a", "a", "a ", "b"])
    assert keys.dtype == torch.int64 and keys.shape == (4,)
    assert keys[0] == keys[1] and len(set(keys.tolist())) == 3
    assert text_key("a") == keys[0].item() == text_key("a")  # stable: no per-process salt (unlike hash())


def test_duplicates_of_the_own_positive_are_masked_and_get_no_gradient():
    # docs [p0, p1, n0, n1]: p0 == p1 (two queries share a positive), n0 == n1 == that text too
    texts = ["same answer", "same answer", "same answer", "same answer"]
    query, doc = _embeddings(2, 4)
    out = info_nce(query, doc, 0.1, doc_keys=text_keys(texts))
    # every candidate besides the own positive is a duplicate: the loss is exactly 0
    assert out.loss.item() == pytest.approx(0.0, abs=1e-12)
    assert out.masked == 3.0 and out.accuracy == 1.0
    out.loss.backward()
    assert torch.count_nonzero(doc.grad) == 0 and torch.count_nonzero(query.grad) == 0


def test_mask_matches_a_by_hand_softmax_over_the_allowed_candidates():
    # b=3, n=1: docs [p0, p1, p2, n0, n1, n2]; n1 is q0's positive text (someone else's positive), p2 == p0
    texts = ["paris", "rome", "paris", "oslo", "paris", "lima"]
    query, doc = _embeddings(3, 6, seed=1)
    out = info_nce(query, doc, 0.05, doc_keys=text_keys(texts))
    allowed = [[0, 1, 3, 5], [0, 1, 2, 3, 4, 5], [1, 2, 3, 5]]  # q0: drop p2, n1; q2: drop p0, n1
    ref = _reference(query, doc, 0.05, allowed)
    assert out.loss.item() == pytest.approx(ref.item(), abs=1e-12)
    assert out.masked == pytest.approx(4 / 3)
    got = torch.autograd.grad(out.loss, (query, doc))
    want = torch.autograd.grad(ref, (query, doc))
    for a, b in zip(got, want):
        assert torch.allclose(a, b, atol=1e-12)
    # without keys nothing is masked and the loss is plain InfoNCE
    plain = info_nce(query, doc, 0.05)
    assert plain.masked == 0.0 and plain.loss.item() > out.loss.item()


def test_the_positive_is_never_masked():
    scores = torch.tensor([[0.5, 0.9, 0.1], [0.2, 0.4, 0.3]])
    keys = torch.tensor([7, 7, 7])
    mask = candidate_mask(scores, torch.tensor([0, 1]), keys, false_negative_margin=0.01)
    assert not mask[0, 0] and not mask[1, 1]
    assert mask[0, 1] and mask[0, 2] and mask[1, 0] and mask[1, 2]


def test_false_negative_margin_masks_what_the_model_scores_near_the_positive():
    # query 0: positive 0.8; candidates 0.78 (> 0.95 * 0.8 = 0.76: masked) and 0.7 (kept)
    query = torch.tensor([[1.0, 0.0]], dtype=torch.float64, requires_grad=True)
    doc = torch.tensor([[0.8, 0.6], [0.78, (1 - 0.78 ** 2) ** 0.5], [0.7, (1 - 0.49) ** 0.5]], dtype=torch.float64,
                       requires_grad=True)
    out = info_nce(query, doc, 0.1, false_negative_margin=0.95)
    assert out.masked == 1.0
    assert out.loss.item() == pytest.approx(_reference(query, doc, 0.1, [[0, 2]]).item(), abs=1e-12)
    out.loss.backward()
    assert torch.count_nonzero(doc.grad[1]) == 0 and torch.count_nonzero(doc.grad[2]) > 0
    # a negative positive score: the threshold lies below it (sentence-transformers' relative margin)
    assert relative_threshold(torch.tensor(-0.5), 0.9).item() == pytest.approx(-0.55)
    assert relative_threshold(torch.tensor(0.5), 0.9).item() == pytest.approx(0.45)


def test_matryoshka_is_the_weighted_sum_of_renormalised_truncations():
    query, doc = _embeddings(3, 6, dim=8, seed=2)
    keys = text_keys(["a", "b", "a", "c", "d", "e"])  # p2 == p0: masked at every size
    dims, weights = (2, 4, 8), (0.5, 1.0, 2.0)
    out = info_nce(query, doc, 0.05, doc_keys=keys, dims=dims, dim_weights=weights)
    allowed = [[0, 1, 3, 4, 5], [0, 1, 2, 3, 4, 5], [1, 2, 3, 4, 5]]
    ref = sum(w * _reference(F.normalize(query[:, :d], dim=-1), F.normalize(doc[:, :d], dim=-1), 0.05, allowed)
              for d, w in zip(dims, weights))
    assert out.loss.item() == pytest.approx(ref.item(), abs=1e-10)
    got = torch.autograd.grad(out.loss, (query, doc))
    want = torch.autograd.grad(ref, (query, doc))
    for a, b in zip(got, want):
        assert torch.allclose(a, b, atol=1e-10)
    equal = info_nce(query, doc, 0.05, dims=(4, 8))
    assert equal.loss.item() == pytest.approx((info_nce(F.normalize(query[:, :4], dim=-1), F.normalize(doc[:, :4], dim=-1), 0.05).loss
                                               + info_nce(query, doc, 0.05).loss).item(), abs=1e-10)
    with pytest.raises(ValueError, match="exceeds"):
        info_nce(query, doc, 0.05, dims=(16,))


def test_contrastive_loss_applies_the_recipe_options(tiny_recipe):
    recipe = tiny_recipe()
    options = LossOptions.of(recipe.loss)
    assert options.mask_duplicates and options.false_negative_margin is None and options.dims == ()
    query, doc = _embeddings(2, 4, seed=3)
    keys = text_keys(["x", "x", "y", "z"])
    assert contrastive_loss(query, doc, 0.05, True, keys, options).masked == 1.0  # q0 masks p1, q1 masks p0
    off = LossOptions(False, None, (), ())
    assert contrastive_loss(query, doc, 0.05, True, keys, off).masked == 0.0
    assert contrastive_loss(query, doc, 0.05, True, keys, None).loss.item() == info_nce(query, doc, 0.05).loss.item()
