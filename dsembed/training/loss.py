"""InfoNCE over (query, positive, hard negatives) embeddings, with documents gathered across ranks.

Losses are functions of embeddings only: the model never computes or rescales a loss. The model
L2-normalises its embeddings (recipe.model.normalize), so the dot products here are cosines; this
module deliberately does not normalise again (a model trained with normalize: false is scored by
raw dot products, which is what such a recipe asks for), except for Matryoshka sizes, which are
re-normalised after truncation.

False negatives (recipe.loss): a candidate is left out of a query's softmax (its logit set to -inf,
so it gets no gradient) when its text equals the query's own positive text (`doc_keys`: a 64-bit
hash per document text, gathered across ranks beside the embeddings, so every rank and a cached
step build the same mask), or with `false_negative_margin` m when the model scores it above
pos - (1 - m) * |pos| (pos: the query's score with its own positive; sentence-transformers'
relative margin 1 - m). The positive itself is never masked. Masks are computed without gradient,
from the full-size scores, and apply to every Matryoshka size.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from dsembed.config import LossConfig
from dsembed.distributed import gather_tensor, gather_with_grad, rank


@dataclass
class LossOutput:
    """The loss (with graph) and detached statistics of this rank's queries.

    accuracy: fraction of queries whose highest-scoring document is their own positive.
    positive_cosine: mean score of (query, own positive).
    negative_cosine: mean score of (query, every other document it was scored against: in-batch
        positives of other queries and all hard negatives, gathered across ranks when gathering),
        masked candidates left out.
    masked: mean number of candidates masked per query (duplicates of its positive, false negatives).
    """

    loss: torch.Tensor
    accuracy: float
    positive_cosine: float
    negative_cosine: float
    masked: float = 0.0


@dataclass(frozen=True)
class LossOptions:
    """recipe.loss beyond temperature and gathering, as `info_nce` arguments (`LossOptions.of`)."""

    mask_duplicates: bool
    false_negative_margin: float | None
    dims: tuple[int, ...]
    dim_weights: tuple[float, ...]

    @classmethod
    def of(cls, cfg: LossConfig) -> "LossOptions":
        return cls(cfg.mask_duplicates, cfg.false_negative_margin, tuple(cfg.matryoshka_dims),
                   tuple(cfg.matryoshka_weights))


def contrastive_loss(query_emb: torch.Tensor, doc_emb: torch.Tensor, temperature: float, gather: bool,
                     doc_keys: torch.Tensor | None = None, options: LossOptions | None = None) -> LossOutput:
    """`info_nce` with the recipe's options; the one call the plain and the cached step share.

    Args:
        doc_keys: [b*(1+n)] int64 text keys of the documents (dsembed.data.batches.text_keys), or None.
        options: None: plain InfoNCE (no masking, one size).
    """
    if options is None:
        return info_nce(query_emb, doc_emb, temperature, gather)
    return info_nce(query_emb, doc_emb, temperature, gather,
                    doc_keys=doc_keys if options.mask_duplicates else None,
                    false_negative_margin=options.false_negative_margin,
                    dims=options.dims or None, dim_weights=options.dim_weights or None)


def relative_threshold(positive: torch.Tensor, margin: float) -> torch.Tensor:
    """pos - (1 - margin) * |pos|: margin x pos for a positive score, below pos for a negative one.

    The same rule as sentence-transformers' `relative_margin` (= 1 - margin); NV-Retriever's
    "TopK-PercPos" at margin 0.95. Used by the loss and by hard-negative mining.
    """
    return positive - (1.0 - margin) * positive.abs()


def candidate_mask(scores: torch.Tensor, target: torch.Tensor, doc_keys: torch.Tensor | None = None,
                   false_negative_margin: float | None = None) -> torch.Tensor:
    """Which candidates each query leaves out of its softmax (never its own positive).

    Shapes:
        scores: [b, M] (detached), target: [b] column of each query's positive, doc_keys: [M].
        returns: [b, M] bool.
    """
    mask = torch.zeros_like(scores, dtype=torch.bool)  # [b, M]
    if doc_keys is not None:
        mask |= doc_keys[None, :] == doc_keys[target][:, None]  # same text as the query's positive
    if false_negative_margin is not None:
        positive = scores.gather(1, target[:, None])  # [b, 1]
        mask |= scores > relative_threshold(positive, false_negative_margin)
    mask[torch.arange(len(target), device=scores.device), target] = False
    return mask


def _truncated(emb: torch.Tensor, dim: int) -> torch.Tensor:
    return F.normalize(emb[:, :dim], dim=-1)  # [N, dim]


def info_nce(query_emb: torch.Tensor, doc_emb: torch.Tensor, temperature: float, gather: bool = True, *,
             doc_keys: torch.Tensor | None = None, false_negative_margin: float | None = None,
             dims: tuple[int, ...] | list[int] | None = None,
             dim_weights: tuple[float, ...] | list[float] | None = None) -> LossOutput:
    """Cross-entropy of each query's own positive among all documents of the contrastive batch.

    Shapes:
        b = local queries, n = hard negatives per query, W = ranks (1 without gathering).
        query_emb: [b, D] (L2-normalised by the model).
        doc_emb: [b * (1 + n), D], ordered [positives b ; negatives b*n (query-major)] as `collate`.
        doc_keys: [b * (1 + n)] int64, one key per document text, in doc_emb's order.
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
        doc_keys: mask candidates whose key equals the query's positive's key (None: no such mask).
        false_negative_margin: mask candidates scored above `relative_threshold` (None: off).
        dims: Matryoshka sizes: the loss is the weighted sum of the InfoNCE over the first d
            coordinates of every embedding, re-normalised, for each d (None: the full embedding).
        dim_weights: one weight per size (None: 1 each).

    Returns:
        LossOutput with the scalar loss (float32, or float64 for float64 inputs) and detached float
        statistics (of the full-size scores).

    Raises:
        ValueError: mismatched shapes, a non-positive temperature or a size above D.
    """
    if temperature <= 0:
        raise ValueError(f"temperature must be positive, got {temperature}")
    if query_emb.dim() != 2 or doc_emb.dim() != 2 or query_emb.shape[1] != doc_emb.shape[1]:
        raise ValueError(f"expected query_emb [b, D] and doc_emb [b*(1+n), D], got {tuple(query_emb.shape)} and {tuple(doc_emb.shape)}")
    b = query_emb.shape[0]
    if b == 0 or doc_emb.shape[0] % b != 0:
        raise ValueError(f"doc_emb has {doc_emb.shape[0]} rows, not a multiple of the {b} queries")
    if doc_keys is not None and tuple(doc_keys.shape) != (doc_emb.shape[0],):
        raise ValueError(f"doc_keys has shape {tuple(doc_keys.shape)}, expected ({doc_emb.shape[0]},)")
    if dims and max(dims) > query_emb.shape[1]:
        raise ValueError(f"Matryoshka size {max(dims)} exceeds the embedding size {query_emb.shape[1]}")
    if dims and dim_weights is not None and len(dim_weights) != len(dims):
        raise ValueError(f"{len(dim_weights)} Matryoshka weights for {len(dims)} sizes")
    docs_per_rank = doc_emb.shape[0]
    offset = 0
    if gather:
        gathered = gather_with_grad(doc_emb)  # [W*b*(1+n), D]; the same tensor when not distributed
        if gathered.shape[0] != docs_per_rank:
            doc_emb, offset = gathered, rank() * docs_per_rank
            if doc_keys is not None:
                doc_keys = gather_tensor(doc_keys.to(gathered.device))  # [W*b*(1+n)], as the rows
    # At least float32 scores: bf16 logits / 0.05 lose too much precision for the softmax.
    dtype = torch.promote_types(query_emb.dtype, torch.float32)
    query, docs = query_emb.to(dtype), doc_emb.to(dtype)
    scores = query @ docs.T  # [b, W*b*(1+n)] cosines
    target = torch.arange(b, device=scores.device) + offset  # [b]
    with torch.no_grad():
        keys = doc_keys.to(scores.device) if doc_keys is not None else None
        mask = candidate_mask(scores.detach(), target, keys, false_negative_margin)  # [b, W*b*(1+n)]
    if dims:
        weights = dim_weights if dim_weights is not None else [1.0] * len(dims)
        loss = sum(w * F.cross_entropy((_truncated(query, d) @ _truncated(docs, d).T).masked_fill(mask, float("-inf"))
                                       / temperature, target)
                   for d, w in zip(dims, weights))
    else:
        loss = F.cross_entropy(scores.masked_fill(mask, float("-inf")) / temperature, target)
    with torch.no_grad():
        positive = scores.gather(1, target[:, None]).squeeze(1)  # [b]
        accuracy = (scores.masked_fill(mask, float("-inf")).argmax(dim=1) == target).float().mean()
        others = ~mask
        others[torch.arange(b, device=scores.device), target] = False  # [b, M] scored negatives
        negative = (scores * others).sum() / max(1, int(others.sum()))
    return LossOutput(loss=loss, accuracy=float(accuracy), positive_cosine=float(positive.mean()),
                      negative_cosine=float(negative), masked=float(mask.sum()) / b)
