"""The contrastive order of a run and the collator: which examples each rank embeds, and as which tokens.

`ContrastiveOrder` is a pure function of (step, accumulation index, rank), so a resumed run sees
exactly the batches an uninterrupted one would, in both orders (data.batching: mixed, or by_source:
each global contrastive batch from one source); `collate` applies the query instruction
(`query_text`), tokenizes queries and documents with the recipe's length, padding side and EOS, and
keys every document text (`text_keys`) for the loss's duplicate mask.
"""
from __future__ import annotations

import difflib
import hashlib
import logging
from typing import Any, Sequence

import torch

from dsembed.config import Recipe
from dsembed.data.rows import Example
from dsembed.errors import DataError
from dsembed.instructions import format_query, has_instruction, instruction_for, query_instructions

log = logging.getLogger(__name__)


def text_key(text: str) -> int:
    """A signed 64-bit key of the exact text (BLAKE2b): equal texts, equal keys, on every rank and run."""
    return int.from_bytes(hashlib.blake2b(text.encode("utf-8"), digest_size=8).digest(), "little", signed=True)


def text_keys(texts: Sequence[str]) -> torch.Tensor:
    """[len(texts)] int64 `text_key`s."""
    return torch.tensor([text_key(t) for t in texts], dtype=torch.int64)


def _seed(*parts: Any) -> int:
    """A generator seed from any values (stable across processes, unlike hash())."""
    digest = hashlib.sha256(repr(parts).encode("utf-8")).digest()
    return int.from_bytes(digest[:8], "little") >> 1


# ----------------------------------------------------------------------------- instructions


def query_text(example: Example, recipe: Recipe) -> str:
    """The query as the model sees it, with the instruction for its source applied.

    The instruction is `data.instructions` (over `data.instruction_preset`) for the row's source
    (dsembed.instructions.instruction_for), else "default", else none (the raw query). A query that
    already carries an instruction in the template's form is kept as it is, never instructed twice.
    """
    instruction = instruction_for(example.source, query_instructions(recipe.data))
    if instruction and has_instruction(recipe.data.query_template, example.query):
        return example.query
    return format_query(recipe.data.query_template, instruction, example.query)


# ----------------------------------------------------------------------------- order and batches


class ContrastiveOrder:
    """Which examples each rank embeds, as a pure function of the position in training.

    Mixed (no `groups`): epoch e is the permutation `torch.randperm(N, generator=seed + e)`. It is
    cut into global contrastive batches of G = `micro_batch * world` consecutive indices (an
    incomplete last batch is dropped, so a batch never repeats a query).

    By source (`groups`: one source name per example): source s with N_s examples yields
    B_s = N_s // G batches per pass over it; pass p of s is a seeded permutation of its examples cut
    into G-sized batches, and its passes follow one another without end. Training is cut into blocks
    of L = sum of B_s batches (one pass over every source). Block e holds q_s batches of each source
    s in a seeded random order: q_s = B_s (proportional to size; a source with fewer than G
    examples is left out, with a warning), or with `weights` L apportioned by weight (largest
    remainders), so a heavy source cycles through its passes faster and a weight-0 source is left
    out. The k-th global batch is position k mod L of block k // L; it is the c-th batch of its
    source, c = e * q_s + its earlier occurrences in block e.

    Either way rank r takes slice [r*micro_batch, (r+1)*micro_batch) of each global batch, and the
    k-th contrastive batch of training is k = step * accumulation_steps + accum_index. Resuming at
    any (step, accum_index) therefore gives exactly the same examples.

    Args:
        num_examples: N, the number of examples.
        seed: the base seed (recipe.train.seed).
        accumulation_steps: contrastive batches per optimizer step (train.gradient_accumulation_steps).
        groups: by_source batching: each example's source (`Example.group`); None: mixed.
        weights: by_source: source -> relative weight (data.source_weights); None: by size.
    """

    def __init__(self, num_examples: int, seed: int, accumulation_steps: int = 1,
                 groups: Sequence[str] | None = None, weights: dict[str, float] | None = None):
        if num_examples < 1:
            raise DataError("data: no training examples (check data.train)")
        if accumulation_steps < 1:
            raise ValueError(f"accumulation_steps must be >= 1, got {accumulation_steps}")
        if groups is not None and len(groups) != num_examples:
            raise ValueError(f"{len(groups)} groups for {num_examples} examples")
        self.num_examples, self.seed, self.accumulation_steps = num_examples, seed, accumulation_steps
        self._cached: tuple[int, torch.Tensor] | None = None
        self._sources = _SourcePlan(list(groups), weights or None, seed) if groups is not None else None

    def batches_per_epoch(self, world: int, micro_batch: int) -> int:
        """Full global contrastive batches in one epoch (by_source: one block, L).

        Raises:
            DataError: fewer examples than one global contrastive batch (by_source: in every source,
                or in a source given a positive weight), or weights naming unknown sources.
        """
        size = micro_batch * world
        if size > self.num_examples:
            raise DataError(
                f"data: {self.num_examples} examples but one contrastive batch needs micro_batch_size x world "
                f"= {micro_batch} x {world} = {size} (add data or lower train.micro_batch_size)")
        if self._sources is not None:
            return self._sources.block_length(size)
        return self.num_examples // size

    def permutation(self, epoch: int) -> torch.Tensor:
        """The epoch's order of all example indices ([N] int64)."""
        if self._cached is None or self._cached[0] != epoch:
            generator = torch.Generator().manual_seed(self.seed + epoch)
            self._cached = (epoch, torch.randperm(self.num_examples, generator=generator))
        return self._cached[1]

    def _locate(self, step: int, accum_index: int, world: int, micro_batch: int) -> tuple[int, int]:
        if not 0 <= accum_index < self.accumulation_steps:
            raise ValueError(f"accum_index {accum_index} outside 0..{self.accumulation_steps - 1} "
                             "(pass accumulation_steps to ContrastiveOrder)")
        if step < 0:
            raise ValueError(f"step must be >= 0, got {step}")
        batch = step * self.accumulation_steps + accum_index
        per_epoch = self.batches_per_epoch(world, micro_batch)
        return divmod(batch, per_epoch)  # (epoch, batch within the epoch)

    def epoch(self, step: int, accum_index: int, world: int, micro_batch: int) -> int:
        """The (0-based) epoch that batch (step, accum_index) belongs to."""
        return self._locate(step, accum_index, world, micro_batch)[0]

    def indices(self, step: int, accum_index: int, rank: int, world: int, micro_batch: int) -> list[int]:
        """The example indices rank `rank` embeds for contrastive batch (step, accum_index).

        Args:
            step: 0-based optimizer step (the number of steps completed before this batch).
            accum_index: 0-based contrastive batch within the step.
            rank, world: this rank and the number of ranks.
            micro_batch: queries per rank (train.micro_batch_size).

        Returns:
            `micro_batch` indices into the example list.
        """
        if not 0 <= rank < world:
            raise ValueError(f"rank {rank} outside 0..{world - 1}")
        epoch, within = self._locate(step, accum_index, world, micro_batch)
        if self._sources is not None:
            batch = self._sources.batch(epoch, within, micro_batch * world)  # [G] global batch
            return batch[rank * micro_batch:(rank + 1) * micro_batch]
        start = within * micro_batch * world + rank * micro_batch
        return self.permutation(epoch)[start:start + micro_batch].tolist()

    def source_of(self, step: int, accum_index: int, world: int, micro_batch: int) -> str | None:
        """by_source: the source of contrastive batch (step, accum_index); None when mixed."""
        if self._sources is None:
            return None
        epoch, within = self._locate(step, accum_index, world, micro_batch)
        return self._sources.block(epoch, micro_batch * world)[0][within]


class _SourcePlan:
    """The by_source schedule of `ContrastiveOrder` (its docstring describes it), per batch size G."""

    def __init__(self, groups: list[str], weights: dict[str, float] | None, seed: int) -> None:
        self.seed, self.weights = seed, weights
        self.members: dict[str, list[int]] = {}
        for index, name in enumerate(groups):
            self.members.setdefault(name, []).append(index)
        self.names = sorted(self.members)
        self._quotas: dict[int, dict[str, int]] = {}
        self._blocks: dict[tuple[int, int], tuple[list[str], list[int]]] = {}
        self._passes: dict[tuple[str, int], list[int]] = {}

    def quotas(self, size: int) -> dict[str, int]:
        """Source -> batches per block at global batch size `size` (only sources that take part)."""
        if size in self._quotas:
            return self._quotas[size]
        full = {s: len(self.members[s]) // size for s in self.names}
        if self.weights is None:
            small = [s for s in self.names if full[s] == 0]
            if small:
                log.warning("data.batching by_source: %d source(s) have fewer examples than one global contrastive "
                            "batch (%d) and are left out: %s", len(small), size, ", ".join(small[:5]))
            quotas = {s: n for s, n in full.items() if n > 0}
            if not quotas:
                raise DataError(f"data.batching by_source: no source has {size} examples for one global contrastive "
                                "batch (micro_batch_size x world); lower train.micro_batch_size or use data.batching: mixed")
        else:
            quotas = self._weighted(full, size)
        self._quotas[size] = quotas
        return quotas

    def _weighted(self, full: dict[str, int], size: int) -> dict[str, int]:
        unknown = [s for s in self.weights if s not in self.members]
        if unknown:
            hint = difflib.get_close_matches(unknown[0], self.names, n=1)
            raise DataError(f"data.source_weights names source(s) {unknown} that no row has"
                            f"{f' (did you mean {hint[0]!r}?)' if hint else ''}; sources: {', '.join(self.names[:10])}")
        missing = [s for s in self.names if s not in self.weights]
        if missing:
            raise DataError(f"data.source_weights has no weight for source(s) {missing[:5]} (give every source a "
                            "weight; 0 leaves one out)")
        small = [s for s in self.names if self.weights[s] > 0 and full[s] == 0]
        if small:
            raise DataError(f"data.source_weights: source(s) {small[:5]} have fewer examples than one global "
                            f"contrastive batch ({size}); give them weight 0 or lower train.micro_batch_size")
        active = [s for s in self.names if self.weights[s] > 0]
        length = sum(full[s] for s in active)
        total = sum(self.weights[s] for s in active)
        exact = {s: length * self.weights[s] / total for s in active}
        quotas = {s: int(exact[s]) for s in active}
        by_remainder = sorted(active, key=lambda s: (-(exact[s] - quotas[s]), s))
        for s in by_remainder[:length - sum(quotas.values())]:
            quotas[s] += 1
        return {s: q for s, q in quotas.items() if q > 0}

    def block_length(self, size: int) -> int:
        return sum(self.quotas(size).values())

    def block(self, epoch: int, size: int) -> tuple[list[str], list[int]]:
        """Block `epoch`'s source per position and, per position, the source's batches before it in the block."""
        key = (epoch, size)
        if key not in self._blocks:
            quotas = self.quotas(size)
            names = [s for s in sorted(quotas) for _ in range(quotas[s])]
            order = torch.randperm(len(names), generator=torch.Generator().manual_seed(_seed(self.seed, "block", epoch)))
            sources, seen, counts = [names[i] for i in order.tolist()], {}, []
            for s in sources:
                counts.append(seen.get(s, 0))
                seen[s] = counts[-1] + 1
            if len(self._blocks) > 4:
                self._blocks.clear()
            self._blocks[key] = (sources, counts)
        return self._blocks[key]

    def batch(self, epoch: int, within: int, size: int) -> list[int]:
        """The example indices of global batch `within` of block `epoch` ([size])."""
        sources, counts = self.block(epoch, size)
        source = sources[within]
        nth = epoch * self.quotas(size)[source] + counts[within]  # this source's batch number overall
        per_pass = len(self.members[source]) // size
        pass_number, part = divmod(nth, per_pass)
        key = (source, pass_number)
        if key not in self._passes:
            members = self.members[source]
            generator = torch.Generator().manual_seed(_seed(self.seed, "source", source, pass_number))
            if len(self._passes) > 64:
                self._passes.clear()
            self._passes[key] = [members[i] for i in torch.randperm(len(members), generator=generator).tolist()]
        return self._passes[key][part * size:(part + 1) * size]


def collate(examples: list[Example], tokenizer: Any, recipe: Recipe) -> dict[str, dict[str, torch.Tensor]]:
    """Tokenize a micro-batch: queries with instructions, then all documents.

    Shapes:
        b = len(examples), n = data.num_negatives.
        query: input_ids / attention_mask [b, Tq].
        documents: input_ids / attention_mask [b * (1 + n), Td], rows ordered
            [positive_0 .. positive_{b-1}, neg_0_0 .. neg_0_{n-1}, neg_1_0, ...] (query-major).

    Args:
        examples: examples as returned by `load_examples` (exactly n negatives each).
        tokenizer: the model's tokenizer.
        recipe: data.* for instructions, model.max_length / padding_side / append_eos.

    Returns:
        {"query": {...}, "documents": {...}, "document_keys": [b * (1 + n)] `text_keys`} of LongTensors.

    Raises:
        ValueError: an example whose negatives count is not data.num_negatives.
    """
    from dsembed.modeling.tokenization import tokenize_texts

    n = recipe.data.num_negatives
    for example in examples:
        if len(example.negatives) != n:
            raise ValueError(f"example has {len(example.negatives)} negatives, expected {n} (use load_examples or fill_negatives)")
    queries = [query_text(e, recipe) for e in examples]
    documents = [e.positive for e in examples] + [neg for e in examples for neg in e.negatives]
    m = recipe.model
    return {
        "query": tokenize_texts(tokenizer, queries, m.max_length, m.padding_side, append_eos=m.append_eos),
        "documents": tokenize_texts(tokenizer, documents, m.max_length, m.padding_side, append_eos=m.append_eos),
        "document_keys": text_keys(documents),
    }
