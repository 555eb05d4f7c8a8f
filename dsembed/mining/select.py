"""Positive-aware hard-negative selection, as a function of embeddings.

For each query, the candidates of its corpus are ranked by score (dot product of the model's
L2-normalised embeddings: cosine). Dropped before ranking: the candidate whose text is the query's
own positive or the query itself, and every candidate scoring above
`relative_threshold(score(query, positive), margin)` = pos - (1 - margin) * |pos| (NV-Retriever's
"TopK-PercPos" at margin 0.95; sentence-transformers' `relative_margin` = 1 - margin). Of the rest,
the first `skip_top` ranks are skipped (the "rank 30+" practice; sentence-transformers'
`range_min`, applied after the margin as there) and the next `k` kept.

Shapes: m queries, c candidates, D embedding size. Scores are computed on the inputs' device
(dsembed-mine uses the GPU when there is one).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from dsembed.training.loss import relative_threshold

# score-matrix elements per chunk of queries (float32: 256 MiB)
CHUNK_ELEMENTS = 1 << 26


@dataclass
class Selection:
    """Chosen candidates per query, best first.

    indices: [m, k] positions in the corpus, -1 where fewer than k candidates qualified.
    scores: [m, k] their scores (-inf at -1).
    dropped_by_margin: candidates the margin removed, over all m queries.
    """

    indices: torch.Tensor
    scores: torch.Tensor
    dropped_by_margin: int


def select_negatives(queries: torch.Tensor, positive_scores: torch.Tensor, corpus: torch.Tensor,
                     excluded: torch.Tensor, k: int, margin: float, skip_top: int = 0) -> Selection:
    """The `k` hard negatives of each query among `corpus`, positive-aware.

    Shapes:
        queries: [m, D]; positive_scores: [m] score(query, its positive); corpus: [c, D];
        excluded: [m, e] corpus positions never chosen for that query (its positive's and its own
        text's position), -1 for none.

    Args:
        k: negatives per query (at least 1).
        margin: in (0, 1]; candidates scoring above relative_threshold(positive, margin) are dropped.
        skip_top: ranks skipped after the filters.

    Returns:
        A `Selection`.
    """
    m, c = queries.shape[0], corpus.shape[0]
    take = min(k + skip_top, c)
    indices = torch.full((m, k), -1, dtype=torch.long, device=queries.device)
    scores = torch.full((m, k), float("-inf"), device=queries.device)
    dropped = 0
    rows = max(1, CHUNK_ELEMENTS // max(1, c))
    for start in range(0, m, rows):
        part = slice(start, min(m, start + rows))
        chunk = queries[part].float() @ corpus.float().T  # [r, c]
        gone = excluded[part]  # [r, e]
        keep = torch.ones_like(chunk, dtype=torch.bool)  # [r, c]
        valid = gone >= 0
        row_ids = torch.arange(chunk.shape[0], device=chunk.device)[:, None].expand_as(gone)  # [r, e]
        keep[row_ids[valid], gone[valid]] = False
        above = chunk > relative_threshold(positive_scores[part].float(), margin)[:, None]  # [r, c]
        dropped += int((above & keep).sum())
        keep &= ~above
        chunk = chunk.masked_fill(~keep, float("-inf"))
        if take == 0:
            continue
        top_scores, top = torch.topk(chunk, take, dim=1)  # [r, take], best first
        top_scores, top = top_scores[:, skip_top:skip_top + k], top[:, skip_top:skip_top + k]  # [r, <=k]
        top = top.masked_fill(torch.isinf(top_scores), -1)
        width = top.shape[1]
        indices[part, :width], scores[part, :width] = top, top_scores
    return Selection(indices=indices.cpu(), scores=scores.cpu(), dropped_by_margin=dropped)
