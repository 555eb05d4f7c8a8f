"""One mining job: the texts to embed, its resumable shards, the selection and the output files.

Work is stored per shard in `<output stem>.shards/` as soon as a shard finishes, so a killed job
redoes at most one shard:
- `documents-NNNNN.npz`: the embeddings of a shard of the distinct document texts (the candidate
  corpus and the positives), keyed by the model's fingerprint and the shard's texts, so a change of
  K, margin or data elsewhere still reuses them;
- `examples-NNNNN.json`: the negatives chosen for a shard of examples, keyed by the job key (the
  model's fingerprint, the settings, the SHA-256 of all examples and of the corpus) and the shard.
A shard is written to a temporary name and renamed (whole or absent). The output JSONL, then its record
`<output stem>.mining.json` (settings, the model's fingerprint, counts) are written last, atomically
(the record is the proof of a whole output); the shard folder is then removed unless `keep_shards`.
Each output row keeps its group as `source` (the input's `source`, else its data file), so
`data.batching: by_source` on the mined file draws from the same groups as on the input.

Shapes: N documents, M queries of a shard, D embedding size.
"""
from __future__ import annotations

import dataclasses
import datetime
import hashlib
import io
import json
import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch

from dsembed.atomic import write_text_atomic
from dsembed.config import Recipe
from dsembed.data.batches import query_text
from dsembed.data.rows import Example, read_examples
from dsembed.errors import DataError
from dsembed.mining.select import select_negatives
from dsembed.testhooks import TestHooks

FORMAT = "dsembed-mined/1"
SAME_SOURCE = "same-source"


@dataclass(frozen=True)
class MineSettings:
    """What the chosen negatives depend on besides the model and the data (the CLI's options)."""

    negatives: int
    margin: float
    skip_top: int
    corpus: str | None  # a JSONL file of candidate texts; None: each source's own texts
    shard_size: int = field(default=4096, compare=False)  # texts per stored shard (not in the key)
    batch_size: int = field(default=32, compare=False)


def texts_sha256(texts: list[str]) -> str:
    digest = hashlib.sha256()
    for text in texts:
        digest.update(text.encode("utf-8") + b"\0")
    return digest.hexdigest()


def read_data(entries: list[str], recipe: Recipe, skip_malformed: bool = False) -> list[Example]:
    """The examples of `entries` (data.train entries; files relative to the working directory).

    Raises:
        DataError: a missing file or a malformed row (file:line), as training reports them.
    """
    resolved = []
    for entry in entries:
        if not entry.startswith(("hf:", "demo:", "synthetic:")):
            if not Path(entry).is_file():
                raise DataError(f"{entry}: data file not found (give JSONL files or hf:/demo:/synthetic: entries)")
            entry = str(Path(entry).resolve())
        resolved.append(entry)
    reading = dataclasses.replace(recipe, source=None, data=dataclasses.replace(
        recipe.data, train=resolved, max_rows=None, skip_malformed=skip_malformed))
    return list(read_examples(reading))


def read_corpus(path: Path) -> list[str]:
    """Candidate texts of `--corpus`: one JSON object {"text": ...} (or a JSON string) per line.

    Raises:
        DataError: a missing file, a bad line (file:line and the fix) or no text at all.
    """
    if not path.is_file():
        raise DataError(f"--corpus {path}: file not found")
    texts = []
    with path.open("rb") as handle:
        for number, raw in enumerate(handle, start=1):
            try:
                line = raw.decode("utf-8").lstrip("\ufeff")
                if not line.strip():
                    continue
                row = json.loads(line)
            except (UnicodeDecodeError, json.JSONDecodeError) as err:
                raise DataError(f"{path}:{number}: not a JSON line ({type(err).__name__}) "
                                "(write one {\"text\": \"...\"} object per line, UTF-8)") from None
            text = row.get("text") if isinstance(row, dict) else row
            if not isinstance(text, str) or not text.strip():
                raise DataError(f"{path}:{number}: no non-empty 'text' string (write one {{\"text\": \"...\"}} object per line)")
            texts.append(text)
    if not texts:
        raise DataError(f"--corpus {path}: no texts")
    return texts


@dataclass
class MiningPlan:
    """The examples, the texts to embed and each example's candidate corpus."""

    examples: list[Example]
    queries: list[str]  # per example: the query as the model sees it (with its instruction)
    documents: list[str]  # distinct document texts: candidates and positives
    index: dict[str, int]  # document text -> position in `documents`
    corpus: dict[str, list[int]]  # corpus name -> positions of its candidates in `documents`
    corpus_of: list[str]  # per example: its corpus name
    key: dict[str, Any]  # everything the chosen negatives depend on


def plan_mining(examples: list[Example], recipe: Recipe, settings: MineSettings, fingerprint: str,
                corpus_texts: list[str] | None = None) -> MiningPlan:
    """Queries (instructed by `recipe`'s data section), distinct documents and candidate corpora.

    Without `corpus_texts` an example's candidates are the positives and negatives of the examples
    of its source (`Example.group`: the `source` field, else the data file); with them, those texts.
    """
    documents: dict[str, int] = {}
    corpus: dict[str, list[int]] = {}

    def add(text: str) -> int:
        return documents.setdefault(text, len(documents))

    if corpus_texts is not None:
        corpus["corpus"] = list(dict.fromkeys(add(t) for t in corpus_texts))
    for example in examples:
        add(example.positive)
        if corpus_texts is None:
            members = corpus.setdefault(example.group, [])
            members += [add(t) for t in [example.positive, *example.negatives]]
    corpus = {name: list(dict.fromkeys(members)) for name, members in corpus.items()}
    corpus_of = ["corpus" if corpus_texts is not None else e.group for e in examples]
    queries = [query_text(e, recipe) for e in examples]
    data_sha = texts_sha256([json.dumps([q, e.positive, e.negatives, e.group]) for q, e in zip(queries, examples)])
    chosen_by = {"negatives": settings.negatives, "margin": settings.margin, "skip_top": settings.skip_top,
                 "corpus": settings.corpus or SAME_SOURCE}
    key = {"format": FORMAT, "model": fingerprint, "settings": chosen_by, "data_sha256": data_sha,
           "corpus_sha256": texts_sha256(corpus_texts) if corpus_texts is not None else None}
    return MiningPlan(examples, queries, list(documents), documents, corpus, corpus_of, key)


class ShardStore:
    """`<output stem>.shards/`: finished shards, each valid only under the key it was made with."""

    def __init__(self, folder: Path, fresh: bool = False) -> None:
        self.folder, self.fresh = folder, fresh
        self.reused = self.computed = 0

    def _load(self, path: Path, key: dict[str, Any]) -> Any:
        if self.fresh or not path.is_file():
            return None
        try:
            if path.suffix == ".npz":
                with np.load(path, allow_pickle=False) as data:
                    found = json.loads(str(data["key"])) == key
                    return data["embeddings"] if found else None
            record = json.loads(path.read_text(encoding="utf-8"))
            return record["value"] if record.get("key") == key else None
        except (OSError, ValueError, KeyError):
            return None  # a damaged shard (cannot come from the atomic writes) is recomputed

    def get_or_make(self, name: str, key: dict[str, Any], make: Callable[[], Any]) -> Any:
        """The stored value of shard `name` under `key`, else `make()`, stored before it is returned."""
        path = self.folder / name
        found = self._load(path, key)
        if found is not None:
            self.reused += 1
            return found
        value = make()
        self.folder.mkdir(parents=True, exist_ok=True)
        partial = path.with_name(f".{path.name}.tmp-{os.getpid()}")
        if path.suffix == ".npz":
            buffer = io.BytesIO()
            np.savez(buffer, embeddings=value, key=np.array(json.dumps(key, sort_keys=True)))
            partial.write_bytes(buffer.getvalue())
        else:
            partial.write_text(json.dumps({"key": key, "value": value}), encoding="utf-8")
        os.replace(partial, path)
        self.computed += 1
        TestHooks.crash("mine-shard", self.reused + self.computed)
        return value


def _embed_documents(encode: Callable[[list[str]], np.ndarray], plan: MiningPlan, store: ShardStore,
                     size: int, log: Callable[[str], None]) -> torch.Tensor:
    parts = []
    shards = range(0, len(plan.documents), size)
    for number, start in enumerate(shards):
        texts = plan.documents[start:start + size]
        key = {"format": FORMAT, "model": plan.key["model"], "documents_sha256": texts_sha256(texts)}
        before = store.reused
        parts.append(store.get_or_make(f"documents-{number:05d}.npz", key, lambda t=texts: encode(t)))
        how = "stored earlier" if store.reused > before else "embedded"
        log(f"documents: shard {number + 1}/{len(shards)} ({len(texts)} texts, {how})")
    return torch.from_numpy(np.concatenate(parts))  # [N, D]


class _Corpora:
    """Each corpus's candidate positions, their embeddings on the scoring device and a position map,
    kept for the corpus used last (examples of one source mostly share shards)."""

    def __init__(self, plan: MiningPlan, docs: torch.Tensor, device: torch.device) -> None:
        self.plan, self.docs, self.device = plan, docs, device
        self._last: tuple[str, Any] | None = None

    def get(self, name: str) -> tuple[torch.Tensor, torch.Tensor, dict[int, int]]:
        """(candidate positions in documents [c], their embeddings [c, D] on the device, document -> row)."""
        if self._last is None or self._last[0] != name:
            self._last = None  # free the previous corpus first
            candidates = torch.tensor(self.plan.corpus[name], dtype=torch.long)  # [c]
            where = {doc: n for n, doc in enumerate(self.plan.corpus[name])}
            self._last = (name, (candidates, self.docs[candidates].to(self.device), where))
        return self._last[1]


def _mine_shard(encode: Callable[[list[str]], np.ndarray], plan: MiningPlan, corpora: _Corpora,
                rows: list[int], settings: MineSettings) -> dict[str, Any]:
    """Negatives (texts) of examples `rows` and the count the margin dropped."""
    distinct = list(dict.fromkeys(plan.queries[i] for i in rows))
    embedded = torch.from_numpy(encode(distinct))  # [M, D]
    at = {text: n for n, text in enumerate(distinct)}
    chosen: dict[int, list[str]] = {}
    dropped = 0
    by_corpus: dict[str, list[int]] = {}
    for i in rows:
        by_corpus.setdefault(plan.corpus_of[i], []).append(i)
    for name, members in by_corpus.items():
        candidates, corpus, where = corpora.get(name)
        queries = embedded[[at[plan.queries[i]] for i in members]]  # [m, D]
        positives = corpora.docs[[plan.index[plan.examples[i].positive] for i in members]]  # [m, D]
        excluded = torch.tensor([[where.get(plan.index[plan.examples[i].positive], -1),
                                  where.get(plan.index.get(plan.examples[i].query, -1), -1)] for i in members])  # [m, 2]
        selection = select_negatives(queries.to(corpora.device), (queries * positives).sum(1).to(corpora.device),
                                     corpus, excluded.to(corpora.device), settings.negatives, settings.margin,
                                     settings.skip_top)
        dropped += selection.dropped_by_margin
        for i, picks in zip(members, selection.indices.tolist()):
            chosen[i] = [plan.documents[int(candidates[p])] for p in picks if p >= 0]
    return {"negatives": [chosen[i] for i in rows], "dropped_by_margin": dropped}


def mine(encoder: Any, plan: MiningPlan, settings: MineSettings, store: ShardStore,
         log: Callable[[str], None]) -> tuple[list[list[str]], dict[str, int]]:
    """Embed (or reuse) every shard and choose each example's negatives.

    Args:
        encoder: `encode(texts, instruction=None, batch_size=...)` -> float32 [n, D] (a ShardedEncoder
            shares every call over the ranks).

    Returns:
        (negatives per example, counts).
    """
    def encode(texts: list[str]) -> np.ndarray:
        return np.asarray(encoder.encode(texts, instruction=None, batch_size=settings.batch_size), dtype=np.float32)

    docs = _embed_documents(encode, plan, store, settings.shard_size, log)
    corpora = _Corpora(plan, docs, torch.device("cuda" if torch.cuda.is_available() else "cpu"))
    negatives: list[list[str]] = []
    dropped = 0
    shards = range(0, len(plan.examples), settings.shard_size)
    for number, start in enumerate(shards):
        rows = list(range(start, min(len(plan.examples), start + settings.shard_size)))
        key = dict(plan.key, shard=number, rows=[rows[0], rows[-1]])
        before = store.reused
        result = store.get_or_make(f"examples-{number:05d}.json", key,
                                   lambda r=rows: _mine_shard(encode, plan, corpora, r, settings))
        negatives += result["negatives"]
        dropped += result["dropped_by_margin"]
        how = "stored earlier" if store.reused > before else "mined"
        log(f"examples: shard {number + 1}/{len(shards)} ({len(rows)} examples, {how})")
    counts = {"examples": len(plan.examples), "documents": len(plan.documents),
              "with_fewer_than_k": sum(len(n) < settings.negatives for n in negatives),
              "negatives_written": sum(len(n) for n in negatives), "dropped_by_margin": dropped,
              "shards_reused": store.reused, "shards_computed": store.computed}
    return negatives, counts


def record_path(output: Path) -> Path:
    """The record beside the output: mined.jsonl -> mined.mining.json."""
    return output.with_name(f"{output.stem}.mining.json")


def shards_path(output: Path) -> Path:
    return output.with_name(f"{output.stem}.shards")


def up_to_date(output: Path, key: dict[str, Any]) -> bool:
    """Whether `output` and its record exist and were made under `key`."""
    record = record_path(output)
    if not (output.is_file() and record.is_file()):
        return False
    try:
        return json.loads(record.read_text(encoding="utf-8")).get("key") == json.loads(json.dumps(key))
    except (json.JSONDecodeError, UnicodeDecodeError):
        return False


def write_output(output: Path, plan: MiningPlan, negatives: list[list[str]], counts: dict[str, int],
                 info: dict[str, Any], keep_shards: bool) -> None:
    """The training JSONL, then its record (each atomically), then the shard folder goes.

    An earlier record is removed first and the new one written last: it is what `up_to_date`
    trusts, so a run killed between the writes leaves an output without a record (refused until
    --overwrite), never a record that vouches for another run's output.
    """
    lines = []
    for example, chosen in zip(plan.examples, negatives):
        row: dict[str, Any] = {"query": example.query, "positive": example.positive, "negatives": chosen}
        if example.group:  # the row's source, else its data file: by_source batches keep the grouping
            row["source"] = example.group
        lines.append(json.dumps(row, ensure_ascii=False) + "\n")
    record = {"format": FORMAT, "key": plan.key, "counts": counts,
              "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"), **info}
    record_path(output).unlink(missing_ok=True)
    write_text_atomic(output, "".join(lines))
    write_text_atomic(record_path(output), json.dumps(record, indent=1) + "\n")
    if not keep_shards:
        shutil.rmtree(shards_path(output), ignore_errors=True)
