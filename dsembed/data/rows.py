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


from dsembed.config import Recipe
from dsembed.errors import DataError
from dsembed.instructions import has_instruction, instruction_for, query_instructions

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
    origin: str | None = None  # the data.train entry it was read from

    @property
    def group(self) -> str:
        """The source a by_source batch draws from: the row's `source`, else its data.train entry."""
        return self.source if self.source is not None else (self.origin or "")


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

    def add_rows(self, label: str, rows: Iterable[tuple[int, Any]], origin: str | None = None) -> None:
        """`rows` yields (line or row number, parsed object or a _RowError); `origin`: the entry."""
        before = len(self.examples)
        for number, row in rows:
            if self.full:
                return
            try:
                if isinstance(row, _RowError):
                    raise row
                example = parse_row(row)
                example.origin = origin
                self.examples.append(example)
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
    from dsembed.data.demo import demo_training_rows  # a pip-data helper; imported only when used

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


def read_examples(recipe: Recipe) -> LoadedExamples:
    """Read every `data.train` entry and check the rows; negatives as the rows have them (not filled).

    Args:
        recipe: uses data.train, data.skip_malformed and data.max_rows (total over all entries);
            relative paths resolve against the recipe's folder.

    Returns:
        `Example`s (each with its `origin` entry) with `.skipped` and `.problems`.

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
        collector.add_rows(label, rows, origin=entry)
    if collector.skipped:
        log.warning("skipped %d malformed training rows; first: %s", collector.skipped, collector.problems[0])
    return LoadedExamples(collector.examples, collector.skipped, collector.problems)


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
    examples = read_examples(recipe)
    fill_negatives(examples, cfg.num_negatives, cfg.seed)
    instructions = query_instructions(cfg)
    examples.already_instructed = sum(1 for e in examples
                                      if instruction_for(e.source, instructions) and has_instruction(cfg.query_template, e.query))
    if examples.already_instructed:
        log.warning("data: %d of %d queries already carry an instruction in data.query_template's form; "
                    "no second one is added to them", examples.already_instructed, len(examples))
    return examples
