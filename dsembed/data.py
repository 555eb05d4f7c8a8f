"""Training data: loading and checking rows, query instructions, the contrastive order, the collator.

A row is {query, positive, negative | negatives, source?}: one JSON object per line in a JSONL file,
one record of a Hugging Face dataset (`hf:<name>[:split]`), a pip-installed demo set
(`demo:<name>`) or generated rows (`synthetic:<N>`). Bad rows raise `DataError("file:line: problem
(fix)")`, or are counted and skipped with `data.skip_malformed`.

Every example carries exactly `data.num_negatives` hard negatives after loading: rows with more keep
the first ones, rows with fewer are filled with other rows' positives, chosen deterministically
from `data.seed`, so every rank builds the same examples.

Queries get an instruction (E5 style, as the paper): the one for the row's source in
`data.instructions` / `data.instruction_preset` (dsembed.instructions), else "default", else none;
documents never get one.
"""
from __future__ import annotations

import json
import logging
import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Iterator

import torch

from dsembed.config import Recipe
from dsembed.errors import DataError
from dsembed.instructions import format_query, has_instruction, instruction_for, query_instructions

log = logging.getLogger(__name__)

_SKIP_HINT = "or set data.skip_malformed: true to skip such rows"
_ENTRY_KINDS = "a JSONL path, hf:<name>[:split], demo:<name> or synthetic:<N>"


@dataclass
class Example:
    """One training example: a query, its positive document and its hard negatives."""

    query: str
    positive: str
    negatives: list[str] = field(default_factory=list)
    source: str | None = None


class LoadedExamples(list):
    """The examples (a plain list) plus how many malformed rows were skipped, for logging."""

    def __init__(self, items: Iterable[Example] = (), skipped: int = 0, problems: list[str] | None = None,
                 already_instructed: int = 0):
        super().__init__(items)
        self.skipped = skipped
        self.problems = problems or []  # the first few skipped rows' messages
        self.already_instructed = already_instructed  # queries that came with an instruction of their own


class _RowError(Exception):
    """A malformed row; str() is 'problem (fix)' without the location."""


# ----------------------------------------------------------------------------- row checking


def _text_field(row: dict, key: str, required: bool) -> str | None:
    if key not in row or row[key] is None:
        if required:
            raise _RowError(f"missing field {key!r} (every row needs non-empty query and positive strings, {_SKIP_HINT})")
        return None
    value = row[key]
    if not isinstance(value, str):
        raise _RowError(f"field {key!r} should be a string, got {type(value).__name__} (quote the text, {_SKIP_HINT})")
    if not value.strip():
        raise _RowError(f"field {key!r} is empty (fill it in or remove the row, {_SKIP_HINT})")
    return value


def parse_row(row: Any) -> Example:
    """Check one row and turn it into an `Example` (negatives not yet filled).

    Raises:
        _RowError: the problem and its fix, without the location (callers add file:line).
    """
    if not isinstance(row, dict):
        raise _RowError(f"a row should be a JSON object, got {type(row).__name__} (write one {{\"query\": ..., \"positive\": ...}} object per line, {_SKIP_HINT})")
    query = _text_field(row, "query", True)
    positive = _text_field(row, "positive", True)
    if row.get("negative") is not None and row.get("negatives") is not None:
        raise _RowError(f"both 'negative' and 'negatives' given (keep one, {_SKIP_HINT})")
    negatives: list[str] = []
    single = _text_field(row, "negative", False)
    if single is not None:
        negatives.append(single)
    many = row.get("negatives")
    if many is not None:
        if not isinstance(many, list):
            raise _RowError(f"field 'negatives' should be a list of strings, got {type(many).__name__} (use [\"...\", ...], {_SKIP_HINT})")
        for i, text in enumerate(many):
            if not isinstance(text, str) or not text.strip():
                raise _RowError(f"negatives[{i}] should be a non-empty string (fix or drop it, {_SKIP_HINT})")
        negatives.extend(many)
    source = row.get("source")
    if source is not None and not isinstance(source, str):
        raise _RowError(f"field 'source' should be a string, got {type(source).__name__} (quote it, {_SKIP_HINT})")
    return Example(query=query, positive=positive, negatives=negatives, source=source)


class _Collector:
    """Accumulates examples from all entries; raises or counts bad rows; enforces max_rows."""

    def __init__(self, skip: bool, max_rows: int | None):
        self.skip, self.max_rows = skip, max_rows
        self.examples: list[Example] = []
        self.skipped, self.problems = 0, []  # problems: the first few skipped rows' messages

    @property
    def full(self) -> bool:
        return self.max_rows is not None and len(self.examples) >= self.max_rows

    def add_rows(self, label: str, rows: Iterable[tuple[int, Any]]) -> None:
        """`rows` yields (line or row number, parsed object or a _RowError)."""
        before = len(self.examples)
        for number, row in rows:
            if self.full:
                return
            try:
                if isinstance(row, _RowError):
                    raise row
                self.examples.append(parse_row(row))
            except _RowError as err:
                if not self.skip:
                    raise DataError(f"{label}:{number}: {err}") from None
                self.skipped += 1
                self.problems += [f"{label}:{number}: {err}"] if len(self.problems) < 5 else []
        if len(self.examples) == before and not self.full:
            raise DataError(f"{label}: no usable rows (each line should be a JSON object with query and positive)")


def _jsonl_rows(path: Path) -> Iterator[tuple[int, Any]]:
    with path.open("rb") as handle:
        for number, raw in enumerate(handle, start=1):
            try:
                text = raw.decode("utf-8")
            except UnicodeDecodeError as err:
                yield number, _RowError(
                    f"not UTF-8 text (byte 0x{raw[err.start]:02x} at column {err.start + 1}) "
                    f"(re-save the file as UTF-8, {_SKIP_HINT})")
                continue
            if number == 1:
                text = text.lstrip("\ufeff")  # a UTF-8 byte-order mark some editors write
            if not text.strip():
                continue  # blank lines (often the last one) are not rows
            try:
                yield number, json.loads(text)
            except json.JSONDecodeError as err:
                yield number, _RowError(f"invalid JSON ({err.msg} at column {err.colno}) (write one JSON object per line, {_SKIP_HINT})")


def _hf_rows(spec: str) -> tuple[str, Iterator[tuple[int, Any]]]:
    name, _, split = spec[len("hf:"):].partition(":")
    split = split or "train"
    if not name:
        raise DataError(f"{spec}: no dataset name (write hf:<name>[:split], e.g. hf:yixuantt/ir_data:train)")
    try:
        import datasets
    except ImportError:
        raise DataError(f"{spec}: the 'datasets' package is not installed (pip install datasets, or use a local JSONL file)") from None
    try:
        dataset = datasets.load_dataset(name, split=split)
    except ConnectionError:
        raise DataError(
            f"{spec}: cannot reach the Hugging Face hub to load dataset {name!r} (download it while "
            "online, or convert it to a local JSONL file with query/positive/negative fields and list "
            "that path in data.train)") from None
    except (OSError, ValueError) as err:
        detail = " ".join(str(err).split())[:200]
        raise DataError(f"{spec}: cannot load dataset {name!r} split {split!r}: {detail} (check the name and split, or use a local JSONL file)") from None
    columns = list(dataset.column_names)
    if "query" not in columns or "positive" not in columns:
        raise DataError(f"{spec}: columns {columns} lack 'query' and 'positive' (rename them with datasets' rename_column and save as JSONL)")
    return f"{spec}:{split}" if ":" not in spec[3:] else spec, enumerate(dataset, start=1)


def _demo_rows(spec: str) -> Iterator[tuple[int, Any]]:
    from dsembed.demo_data import demo_training_rows  # a pip-data helper; imported only when used

    return enumerate(demo_training_rows(spec[len("demo:"):]), start=1)


_ANIMALS = ["otter", "falcon", "badger", "lynx", "heron", "walrus", "gecko", "bison",
            "raven", "moose", "koala", "tapir", "panda", "viper", "llama", "crane"]
_COLOURS = ["crimson", "teal", "amber", "violet", "olive", "ivory", "coral", "indigo"]


def synthetic_rows(n: int) -> list[dict[str, str]]:
    """`n` deterministic rows that a tiny random model with a byte tokenizer learns quickly.

    The query and its positive share a distinctive animal name, number and colour; the hard negative
    has a different animal and number but the positive's wording and colour, so matching needs the
    shared tokens. (A 4-layer random Llama, mean pooling, lr 3e-4, batch 8 reaches in-batch accuracy
    ~1 in 20-50 steps with a default instruction; queries sharing fewer bytes did not learn.)
    """
    rows = []
    for i in range(n):
        animal, colour = _ANIMALS[i % len(_ANIMALS)], _COLOURS[(i * 3) % len(_COLOURS)]
        other, j = _ANIMALS[(i + 5) % len(_ANIMALS)], (i * 7 + 3) % max(n, 10)
        rows.append({"query": f"is {animal} {i} {colour}?",
                     "positive": f"{animal} {i} is {colour}",
                     "negative": f"{other} {j} is {colour}",
                     "source": "synthetic"})
    return rows


def _synthetic(spec: str) -> Iterator[tuple[int, Any]]:
    count = spec[len("synthetic:"):]
    if not count.isdigit() or int(count) < 1:
        raise DataError(f"{spec}: synthetic:<N> needs a positive row count (e.g. synthetic:512)")
    return enumerate(synthetic_rows(int(count)), start=1)


def fill_negatives(examples: list[Example], num_negatives: int, seed: int) -> None:
    """Give every example exactly `num_negatives` negatives, in place.

    Extra negatives are dropped (the first ones are kept); missing ones are other rows' positives
    drawn with `random.Random(seed)`, so the result is the same on every rank and every run.

    Raises:
        DataError: too few distinct positives to draw negatives from.
    """
    rng = random.Random(seed)
    for index, example in enumerate(examples):
        del example.negatives[num_negatives:]
        attempts = 0
        while len(example.negatives) < num_negatives:
            other = examples[rng.randrange(len(examples))].positive
            attempts += 1
            if other != example.positive and other not in example.negatives:
                example.negatives.append(other)
            elif attempts > 100 + 10 * num_negatives:
                raise DataError(
                    f"data: cannot find {num_negatives} negatives different from row {index + 1}'s positive "
                    "(add rows with distinct positives or lower data.num_negatives)")


def check_data_files(recipe: Recipe) -> None:
    """Fail fast on a `data.train` that is empty or names a local file that does not exist.

    Cheap (no file is read), so `--dry-run` and a study check it before anything runs.

    Raises:
        DataError: naming the recipe and the missing file.
    """
    where = recipe.source or "<recipe>"
    if not recipe.data.train:
        raise DataError(f"{where}: data.train is empty (list {_ENTRY_KINDS})")
    for entry in recipe.data.train:
        if entry.startswith(("hf:", "demo:", "synthetic:")):
            continue
        path = recipe.resolve_path(entry)
        if not path.is_file():
            raise DataError(f"{where}: data.train: {path}: data file not found (data.train entries are {_ENTRY_KINDS})")


def load_examples(recipe: Recipe) -> LoadedExamples:
    """Read every `data.train` entry, check the rows and fill negatives.

    Args:
        recipe: uses data.train, data.skip_malformed, data.max_rows (total over all entries),
            data.num_negatives and data.seed; relative paths resolve against the recipe's folder.

    Returns:
        A list of `Example`s with `.skipped` (the count of malformed rows skipped) and `.problems`.

    Raises:
        DataError: an unreadable entry, a malformed row (unless skip_malformed), or no rows at all.
    """
    cfg = recipe.data
    check_data_files(recipe)
    collector = _Collector(cfg.skip_malformed, cfg.max_rows)
    for entry in cfg.train:
        if collector.full:
            break
        if entry.startswith("hf:"):
            label, rows = _hf_rows(entry)
        elif entry.startswith("demo:"):
            label, rows = entry, _demo_rows(entry)
        elif entry.startswith("synthetic:"):
            label, rows = entry, _synthetic(entry)
        else:
            path = recipe.resolve_path(entry)
            label, rows = str(path), _jsonl_rows(path)
        collector.add_rows(label, rows)
    if collector.skipped:
        log.warning("skipped %d malformed training rows; first: %s", collector.skipped, collector.problems[0])
    fill_negatives(collector.examples, cfg.num_negatives, cfg.seed)
    instructions = query_instructions(cfg)
    already = sum(1 for e in collector.examples
                  if instruction_for(e.source, instructions) and has_instruction(cfg.query_template, e.query))
    if already:
        log.warning("data: %d of %d queries already carry an instruction in data.query_template's form; "
                    "no second one is added to them", already, len(collector.examples))
    return LoadedExamples(collector.examples, collector.skipped, collector.problems, already)


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
    from dsembed.tokenization import tokenize_texts

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
