"""One contrastive batch's backward, plain or cached (GradCache, Gao et al. 2021).

A cached backward embeds the batch in chunks without a graph, computes the loss and the gradients
of the loss with respect to the embeddings once, then re-runs every chunk with a graph and
backpropagates `(embeddings * cached_grad).sum()`. The parameter gradients equal those of the
plain backward; peak activation memory is one chunk's.

Two things make this correct under DeepSpeed ZeRO-2/3 with several ranks, where other
implementations went wrong (sentence-transformers #3173, Tevatron #206):
- every chunk's forward goes through the DeepSpeed engine (ZeRO-3 advances the counter that makes
  the next backward accumulate instead of overwrite there), and
- only the very last backward before `step()` is marked as the accumulation boundary, so each
  backward is reduced into the accumulated partitioned gradient and the optimizer runs once.
Dropout replays identically: each chunk's RNG state is recorded before its first forward and
restored before the re-run. Both steps call the same `contrastive_loss` with the batch's document
text keys (`document_keys` from collate), so they mask the same candidates.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

import torch

from dsembed.training.loss import LossOptions, contrastive_loss

Batch = dict[str, torch.Tensor]
# Called with the loss right before its backward; returns the loss to backpropagate or raises (the
# trainer's non-finite check). Every rank calls it once per contrastive batch, so it may be collective.
LossGuard = Callable[[torch.Tensor], torch.Tensor]


@dataclass
class BatchStats:
    """Detached statistics of one contrastive batch on this rank."""

    loss: float
    accuracy: float
    positive_cosine: float
    negative_cosine: float
    tokens: int
    masked: float = 0.0  # candidates masked per query (duplicates of its positive, false negatives)


def _rng_state() -> tuple[torch.Tensor, list[torch.Tensor] | None]:
    cuda = torch.cuda.get_rng_state_all() if torch.cuda.is_available() and torch.cuda.is_initialized() else None
    return torch.get_rng_state(), cuda


def _set_rng_state(state: tuple[torch.Tensor, list[torch.Tensor] | None]) -> None:
    cpu, cuda = state
    torch.set_rng_state(cpu)
    if cuda is not None:
        torch.cuda.set_rng_state_all(cuda)


def _to(batch: Batch, device: torch.device) -> Batch:
    return {k: v.to(device) for k, v in batch.items()}


def _chunks(batch: Batch, size: int) -> list[Batch]:
    """Row chunks of a tokenized batch, each cut to the columns where it has tokens.

    Dropping all-padding columns is exact: padding never changes an embedding (DESIGN.md).
    """
    out = []
    rows = batch["attention_mask"].shape[0]
    for start in range(0, rows, size):
        mask = batch["attention_mask"][start:start + size]  # [c, T]
        used = mask.sum(0).nonzero()
        lo, hi = (int(used.min()), int(used.max()) + 1) if used.numel() else (0, mask.shape[1])
        out.append({k: v[start:start + size, lo:hi] for k, v in batch.items()})
    return out


def _stats(output: Any, query: Batch, documents: Batch) -> BatchStats:
    tokens = int(query["attention_mask"].sum()) + int(documents["attention_mask"].sum())
    return BatchStats(float(output.loss.detach()), output.accuracy, output.positive_cosine,
                      output.negative_cosine, tokens, output.masked)


def _keys(batch: dict[str, Any], device: torch.device) -> torch.Tensor | None:
    keys = batch.get("document_keys")
    return None if keys is None else keys.to(device)  # [b*(1+n)] int64


def plain_backward(engine: Any, batch: dict[str, Any], temperature: float, gather: bool,
                   boundary: bool, loss_guard: LossGuard | None = None,
                   options: LossOptions | None = None) -> BatchStats:
    """Forward the whole contrastive batch with a graph and backward the loss.

    Args:
        engine: dsembed.training.engine.Engine.
        batch: {"query": {input_ids, attention_mask}, "documents": {...}, "document_keys"?} from
            dsembed.data.batches.collate.
        temperature, gather: recipe.loss settings.
        boundary: whether this is the last backward before `engine.step()`.
        loss_guard: checks (or, in tests, poisons) the loss before its backward.
        options: recipe.loss masking and Matryoshka sizes (`LossOptions.of`); None: plain InfoNCE.

    Returns:
        The batch's detached statistics.
    """
    query, documents = _to(batch["query"], engine.device), _to(batch["documents"], engine.device)
    q = engine(**query)  # [b, D]
    d = engine(**documents)  # [b*(1+n), D]
    output = contrastive_loss(q, d, temperature, gather, _keys(batch, engine.device), options)
    loss = output.loss if loss_guard is None else loss_guard(output.loss)
    engine.set_boundary(boundary)
    engine.backward(loss)  # divided by the accumulation steps
    return _stats(output, query, documents)


def cached_backward(engine: Any, batch: dict[str, Any], temperature: float, gather: bool,
                    chunk_size: int, boundary: bool, loss_guard: LossGuard | None = None,
                    options: LossOptions | None = None) -> BatchStats:
    """GradCache: the same parameter gradients as `plain_backward`, one chunk's activations.

    Args:
        engine: dsembed.training.engine.Engine.
        batch: as for `plain_backward`; b queries, b*(1+n) documents.
        temperature, gather: recipe.loss settings.
        chunk_size: queries per chunk (train.cache_chunk_size); documents go (1+n) times as many.
        boundary: whether the last chunk's backward is the last one before `engine.step()`.
        loss_guard: checks (or, in tests, poisons) the loss before its backward.
        options: as for `plain_backward`.

    Returns:
        The batch's detached statistics.
    """
    query, documents = _to(batch["query"], engine.device), _to(batch["documents"], engine.device)
    docs_per_query = documents["input_ids"].shape[0] // query["input_ids"].shape[0]
    chunks = _chunks(query, chunk_size) + _chunks(documents, chunk_size * docs_per_query)
    num_query_chunks = len(_chunks(query, chunk_size))

    # (a) embeddings without a graph, remembering each chunk's RNG state for the replay.
    states, embeddings = [], []
    with torch.no_grad():
        for chunk in chunks:
            states.append(_rng_state())
            embeddings.append(engine(**chunk))  # [c, D]
    after = _rng_state()

    # (b) loss and its gradient with respect to the (detached) embeddings only.
    q = torch.cat(embeddings[:num_query_chunks]).detach().requires_grad_()  # [b, D]
    d = torch.cat(embeddings[num_query_chunks:]).detach().requires_grad_()  # [b*(1+n), D]
    output = contrastive_loss(q, d, temperature, gather, _keys(batch, engine.device), options)
    loss = output.loss if loss_guard is None else loss_guard(output.loss)
    # The gather's backward sums every rank's contribution to this rank's embeddings, as in the plain step.
    loss.backward()
    grads = list(q.grad.split([len(e) for e in embeddings[:num_query_chunks]])) + \
        list(d.grad.split([len(e) for e in embeddings[num_query_chunks:]]))

    # (c) re-run each chunk with a graph and push the cached gradient through the parameters.
    for i, (chunk, state, grad) in enumerate(zip(chunks, states, grads)):
        _set_rng_state(state)
        emb = engine(**chunk)  # [c, D]
        engine.set_boundary(boundary and i == len(chunks) - 1)
        engine.backward((emb * grad).sum())  # divided by the accumulation steps, like the loss
    _set_rng_state(after)
    return _stats(output, query, documents)
