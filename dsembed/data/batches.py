"""The contrastive order of a run and the collator: which examples each rank embeds, and as which tokens.

`ContrastiveOrder` is a pure function of (step, accumulation index, rank), so a resumed run sees
exactly the batches an uninterrupted one would; `collate` applies the query instruction
(`query_text`) and tokenizes queries and documents with the recipe's length, padding side and EOS.
"""
from __future__ import annotations

from typing import Any

import torch

from dsembed.config import Recipe
from dsembed.data.rows import Example
from dsembed.errors import DataError
from dsembed.instructions import format_query, has_instruction, instruction_for, query_instructions


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

    Epoch e is the permutation `torch.randperm(N, generator=seed + e)`. It is cut into global
    contrastive batches of `micro_batch * world` consecutive indices (an incomplete last batch is
    dropped, so a batch never repeats a query); rank r takes slice [r*micro_batch, (r+1)*micro_batch)
    of each. The k-th contrastive batch of training is k = step * accumulation_steps + accum_index.
    Resuming at any (step, accum_index) therefore gives exactly the same examples.

    Args:
        num_examples: N, the number of examples.
        seed: the base seed (recipe.train.seed).
        accumulation_steps: contrastive batches per optimizer step (train.gradient_accumulation_steps).
    """

    def __init__(self, num_examples: int, seed: int, accumulation_steps: int = 1):
        if num_examples < 1:
            raise DataError("data: no training examples (check data.train)")
        if accumulation_steps < 1:
            raise ValueError(f"accumulation_steps must be >= 1, got {accumulation_steps}")
        self.num_examples, self.seed, self.accumulation_steps = num_examples, seed, accumulation_steps
        self._cached: tuple[int, torch.Tensor] | None = None

    def batches_per_epoch(self, world: int, micro_batch: int) -> int:
        """Full global contrastive batches in one epoch.

        Raises:
            DataError: fewer examples than one global contrastive batch.
        """
        size = micro_batch * world
        if size > self.num_examples:
            raise DataError(
                f"data: {self.num_examples} examples but one contrastive batch needs micro_batch_size x world "
                f"= {micro_batch} x {world} = {size} (add data or lower train.micro_batch_size)")
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
        start = within * micro_batch * world + rank * micro_batch
        return self.permutation(epoch)[start:start + micro_batch].tolist()


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
        {"query": {...}, "documents": {...}} of LongTensors.

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
    }
