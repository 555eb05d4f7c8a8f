"""InfoNCE over (query, positive, hard negatives) embeddings, with documents gathered across ranks.

Losses are functions of embeddings only: the model never computes or rescales a loss. The model
L2-normalises its embeddings (recipe.model.normalize), so the dot products here are cosines; this
module deliberately does not normalise again (a model trained with normalize: false is scored by
raw dot products, which is what such a recipe asks for).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from dsembed.distributed import gather_with_grad, rank


@dataclass
class LossOutput:
    """The loss (with graph) and detached statistics of this rank's queries.

    accuracy: fraction of queries whose highest-scoring document is their own positive.
    positive_cosine: mean score of (query, own positive).
    negative_cosine: mean score of (query, every other document it was scored against: in-batch
        positives of other queries and all hard negatives, gathered across ranks when gathering).
    """

    loss: torch.Tensor
    accuracy: float
    positive_cosine: float
    negative_cosine: float


def info_nce(query_emb: torch.Tensor, doc_emb: torch.Tensor, temperature: float, gather: bool = True) -> LossOutput:
    """Cross-entropy of each query's own positive among all documents of the contrastive batch.

    Shapes:
        b = local queries, n = hard negatives per query, W = ranks (1 without gathering).
        query_emb: [b, D] (L2-normalised by the model).
        doc_emb: [b * (1 + n), D], ordered [positives b ; negatives b*n (query-major)] as `collate`.
        Gathered documents: [W * b * (1 + n), D], rank-major, so local query i of rank r has its
        positive at r * b * (1 + n) + i.

    With `gather`, every rank scores its local queries against all ranks' documents and the loss
    is the mean over local queries; once the engine averages parameter gradients over ranks, they
    equal the gradient of the single-process loss on the whole global batch.

    Args:
        query_emb: this rank's query embeddings.
        doc_emb: this rank's document embeddings.
        temperature: tau; logits are cosine / tau (the paper: 0.05, i.e. scale 20).
        gather: gather documents across ranks (recipe.loss.gather_across_ranks).

    Returns:
        LossOutput with the scalar loss (float32, or float64 for float64 inputs) and detached float statistics.

    Raises:
        ValueError: mismatched shapes or a non-positive temperature.
    """
    if temperature <= 0:
        raise ValueError(f"temperature must be positive, got {temperature}")
    if query_emb.dim() != 2 or doc_emb.dim() != 2 or query_emb.shape[1] != doc_emb.shape[1]:
        raise ValueError(f"expected query_emb [b, D] and doc_emb [b*(1+n), D], got {tuple(query_emb.shape)} and {tuple(doc_emb.shape)}")
    b = query_emb.shape[0]
    if b == 0 or doc_emb.shape[0] % b != 0:
        raise ValueError(f"doc_emb has {doc_emb.shape[0]} rows, not a multiple of the {b} queries")
    docs_per_rank = doc_emb.shape[0]
    offset = 0
    if gather:
        gathered = gather_with_grad(doc_emb)  # [W*b*(1+n), D]; the same tensor when not distributed
        if gathered.shape[0] != docs_per_rank:
            doc_emb, offset = gathered, rank() * docs_per_rank
    # At least float32 scores: bf16 logits / 0.05 lose too much precision for the softmax.
    dtype = torch.promote_types(query_emb.dtype, torch.float32)
    scores = query_emb.to(dtype) @ doc_emb.to(dtype).T  # [b, W*b*(1+n)] cosines
    target = torch.arange(b, device=scores.device) + offset  # [b]
    loss = F.cross_entropy(scores / temperature, target)
    with torch.no_grad():
        positive = scores.gather(1, target[:, None]).squeeze(1)  # [b]
        accuracy = (scores.argmax(dim=1) == target).float().mean()
        others = scores.shape[1] - 1
        negative = (scores.sum(dim=1) - positive).sum() / max(1, b * others)
    return LossOutput(loss=loss, accuracy=float(accuracy), positive_cosine=float(positive.mean()),
                      negative_cosine=float(negative))
