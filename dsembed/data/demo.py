"""Offline demo data from pip-installed packages: training rows and small local MTEB tasks.

Everything here comes from `pip install chatterbot-corpus gensim` (or `pip install -e .[demo]`),
so the demo needs no network and no copy of anybody's data set inside this repository:

- chatterbot-corpus (BSD-3-Clause): English prompt/response pairs filed under categories. Training
  rows are prompt -> response with a same-category hard negative; a fixed, hash-based share of the
  prompts is held out for evaluation (retrieval, topic classification, topic clustering) and every
  text of the held-out part is kept out of the training rows.
- gensim's test data (LGPL-2.1 as shipped with gensim): the Lee corpus, 50 short news documents
  with averaged human similarity judgements for all 1,225 document pairs -> an STS task; and the
  Lee background corpus, 300 other news articles of the same source (the corpus Lee similarity is
  conventionally trained on, e.g. gensim's LSI tutorial) -> unsupervised training rows: the start
  of an article as the query, its continuation as the positive (the inverse-cloze idea of
  retrieval pre-training), other articles as in-batch negatives.

Tasks are written in the layout the evaluation reads (`<root>/<type>/<Name>/...`, see
dsembed.evaluation): sts test.jsonl {sentence1, sentence2, score}; retrieval BEIR corpus.jsonl,
queries.jsonl, qrels/test.tsv; classification train.jsonl/test.jsonl {text, label}; clustering
test.jsonl {sentences, labels}. Each task folder also holds metadata.json (source, licence, sizes).
"""
from __future__ import annotations


import json
import os
import random
import shutil
import tempfile
from collections import defaultdict
from pathlib import Path

from dsembed.errors import DataError
from dsembed.data.demo_sources import (DEMO_SOURCES, ChatterbotSplit, chatterbot_split, gensim_test_file,
                                       lee_documents, text_key, unit_hash)

FORMAT_VERSION = 1  # bump when the produced rows or tasks change; old task folders are rebuilt
NEGATIVE_SEED = 1234  # seeds the per-row hard-negative choice
MIN_TEXTS_PER_LABEL = 6  # smaller categories cannot fill both classification splits
MARKER = ".dsembed-demo-tasks.json"

TASKS = (
    ("sts", "LeeNews"),
    ("retrieval", "ChatterbotQA"),
    ("classification", "ChatterbotTopics"),
    ("clustering", "ChatterbotCategories"),
)


def _chatterbot_rows() -> list[dict]:
    split = chatterbot_split()
    responses_of: dict[str, set[str]] = defaultdict(set)
    for p in split.train:
        responses_of[text_key(p.prompt)].add(p.response)
    # Candidate negatives per category, sorted so the seeded choice does not depend on set order.
    by_category: dict[str, list[str]] = defaultdict(list)
    for p in split.train:
        by_category[p.category].append(p.response)
    by_category = {c: sorted(set(r)) for c, r in by_category.items()}
    everything = sorted({p.response for p in split.train})

    rows = []
    for p in split.train:
        own = responses_of[text_key(p.prompt)]
        rng = random.Random(f"{NEGATIVE_SEED}|{p.prompt}|{p.response}")  # str seeds are stable
        negative = None
        # Same category first (the hard negative); a category whose responses all answer this
        # prompt (e.g. humor: one prompt with 30 jokes) falls back to the whole training pool.
        for pool in (by_category[p.category], everything):
            candidates = [r for r in pool if r not in own and text_key(r) != text_key(p.response)]
            if candidates:
                negative = candidates[rng.randrange(len(candidates))]
                break
        rows.append({"query": p.prompt, "positive": p.response, "negative": negative, "source": p.category})
    return rows


# ---------------------------------------------------------------------------------------------
# gensim's Lee corpora
# ---------------------------------------------------------------------------------------------
LEE_QUERY_WORDS = 40  # the start of an article, about one or two sentences
LEE_POSITIVE_WORDS = 60  # its continuation; together about the length of a judged Lee document


def _lee_background_rows() -> list[dict]:
    """Article start -> continuation pairs from the 300 background articles (no hard negative:
    with data.num_negatives > 0 the loader fills in another row's positive, i.e. another article)."""
    judged = {text_key(d) for d in lee_documents("lee.cor")}
    rows, seen_starts = [], set()
    for doc in lee_documents("lee_background.cor"):
        if text_key(doc) in judged:  # none are today; keeps the STS task unseen if the data changes
            continue
        words = doc.split()
        query = " ".join(words[:LEE_QUERY_WORDS])
        # The corpus repeats some stories (10 of 300 share their opening): one row each, so that
        # a repeat never sits in the same batch as a "negative" of itself.
        if len(words) < LEE_QUERY_WORDS + 10 or text_key(query) in seen_starts:
            continue
        seen_starts.add(text_key(query))
        rows.append({"query": query,
                     "positive": " ".join(words[LEE_QUERY_WORDS:LEE_QUERY_WORDS + LEE_POSITIVE_WORDS]),
                     "source": "lee_background"})
    return rows


_ROW_BUILDERS = {"chatterbot": _chatterbot_rows, "lee_background": _lee_background_rows}


def demo_training_rows(name: str) -> list[dict]:
    """Training rows of a demo data set, built from pip-installed packages (deterministic).

    Args:
        name: demo set name; known: "chatterbot", "lee_background".

    Returns:
        Rows {"query", "positive", "negative", "source"} (source = the corpus category). Texts of
        the held-out part used by `write_demo_tasks` never occur in them.

    Raises:
        DataError: unknown name (lists the known ones) or the package is not installed.
    """
    builder = _ROW_BUILDERS.get(name)
    if builder is None:
        known = ", ".join(sorted(_ROW_BUILDERS))
        raise DataError(f"unknown demo data set 'demo:{name}'; known: {known}")
    return builder()


# ---------------------------------------------------------------------------------------------
# Task builders: each returns {relative path: list of JSON-able rows or raw text}, plus sizes.
# ---------------------------------------------------------------------------------------------
def _lee_sts() -> tuple[dict[str, list], dict]:
    docs = lee_documents("lee.cor")
    sims_path = gensim_test_file("similarities0-1.txt")
    # A 50x50 matrix, upper triangle filled (diagonal 1, zeros below): pairs i < j, as gensim's
    # own test_lee.py reads it (np.triu_indices(n, 1)). Scores: averaged judgements scaled to 0..1.
    matrix = [[float(v) for v in line.split()] for line in sims_path.read_text().splitlines() if line.strip()]
    if len(matrix) != len(docs) or any(len(row) != len(docs) for row in matrix):
        raise DataError(f"{sims_path}: expected a {len(docs)}x{len(docs)} matrix for lee.cor")
    rows = [
        {"sentence1": docs[i], "sentence2": docs[j], "score": matrix[i][j], "pair_id": f"{i}-{j}"}
        for i in range(len(docs)) for j in range(i + 1, len(docs))
    ]
    meta = {"source": "lee", "documents": len(docs), "pairs": len(rows), "min_score": 0.0, "max_score": 1.0,
            "main_score": "cosine_spearman"}
    return {"test.jsonl": rows}, meta


def _labelled_held_out_texts(split: ChatterbotSplit) -> list[tuple[str, str]]:
    """Held-out prompts and responses with their category; texts filed under two categories and
    categories too small for a train/test split are dropped. Sorted by a stable hash."""
    labels: dict[str, set[str]] = defaultdict(set)
    text_of: dict[str, str] = {}
    for p in split.held_out:
        for text in (p.prompt, p.response):
            labels[text_key(text)].add(p.category)
            text_of.setdefault(text_key(text), text)
    items = [(text_of[k], next(iter(c))) for k, c in labels.items() if len(c) == 1]
    counts: dict[str, int] = defaultdict(int)
    for _, label in items:
        counts[label] += 1
    items = [(t, lab) for t, lab in items if counts[lab] >= MIN_TEXTS_PER_LABEL]
    return sorted(items, key=lambda item: (unit_hash("order|" + item[0]), item[0]))


def _chatterbot_tasks() -> dict[tuple[str, str], tuple[dict[str, list], dict]]:
    split = chatterbot_split()
    licence = {"source": "chatterbot"}

    # Retrieval: held-out prompts as queries; every unique response of the corpus (training ones
    # included, as distractors) as documents; relevant = the prompt's own responses.
    all_responses = sorted({p.response for p in split.pairs})
    doc_id = {text: f"d{i}" for i, text in enumerate(all_responses)}
    relevant: dict[str, set[str]] = defaultdict(set)
    prompt_text: dict[str, str] = {}
    for p in split.held_out:
        prompt_text.setdefault(text_key(p.prompt), p.prompt)
        relevant[text_key(p.prompt)].add(doc_id[p.response])
    query_keys = sorted(relevant)
    queries = [{"_id": f"q{i}", "text": prompt_text[k]} for i, k in enumerate(query_keys)]
    qrels = ["query-id\tcorpus-id\tscore"] + [
        f"q{i}\t{d}\t1" for i, k in enumerate(query_keys) for d in sorted(relevant[k], key=lambda s: int(s[1:]))
    ]
    retrieval = (
        {"corpus.jsonl": [{"_id": doc_id[t], "title": "", "text": t} for t in all_responses],
         "queries.jsonl": queries, "qrels/test.tsv": qrels},
        {**licence, "documents": len(all_responses), "queries": len(queries), "qrels": len(qrels) - 1,
         "main_score": "ndcg_at_10"},
    )

    # Classification and clustering: the category of held-out utterances (prompts and responses).
    items = _labelled_held_out_texts(split)
    by_label: dict[str, list[str]] = defaultdict(list)
    for text, label in items:
        by_label[label].append(text)
    train, test = [], []
    for label in sorted(by_label):  # stratified: alternate within each label, half each side
        for n, text in enumerate(by_label[label]):
            (train if n % 2 == 0 else test).append({"text": text, "label": label})
    classification = (
        {"train.jsonl": train, "test.jsonl": test},
        {**licence, "train": len(train), "test": len(test), "labels": len(by_label), "main_score": "accuracy"},
    )
    clustering = (
        {"test.jsonl": [{"sentences": [t for t, _ in items], "labels": [lab for _, lab in items]}]},
        {**licence, "sentences": len(items), "labels": len(by_label), "main_score": "v_measure"},
    )
    return {
        ("retrieval", "ChatterbotQA"): retrieval,
        ("classification", "ChatterbotTopics"): classification,
        ("clustering", "ChatterbotCategories"): clustering,
    }


def _build_all() -> dict[tuple[str, str], tuple[dict[str, list], dict]]:
    tasks = {("sts", "LeeNews"): _lee_sts()}
    tasks.update(_chatterbot_tasks())
    return tasks


# ---------------------------------------------------------------------------------------------
# Writing
# ---------------------------------------------------------------------------------------------
def _write_files(folder: Path, files: dict[str, list], meta: dict) -> None:
    for rel, rows in files.items():
        path = folder / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(path, "w", encoding="utf-8", newline="\n") as fh:
            for row in rows:
                fh.write((row if isinstance(row, str) else json.dumps(row, ensure_ascii=False)) + "\n")
    (folder / "metadata.json").write_text(json.dumps(meta, indent=2) + "\n", encoding="utf-8")


def _marker_ok(root: Path) -> bool:
    try:
        marker = json.loads((root / MARKER).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    return marker.get("format_version") == FORMAT_VERSION and all((root / t / n).is_dir() for t, n in TASKS)


def write_demo_tasks(root: Path) -> Path:
    """Write the demo's local MTEB tasks under `root/<type>/<Name>` (atomic, idempotent).

    Each task is written to a temporary folder inside `root` and renamed into place; a marker file
    written last records completion, so a finished `root` is returned untouched and an interrupted
    one is rebuilt. Output is deterministic, so concurrent writers (several ranks) are harmless.

    Args:
        root: tasks folder (created when missing); other tasks already in it are left alone.

    Returns:
        `root`, ready for the evaluation's local task loader.

    Raises:
        DataError: chatterbot-corpus or gensim (or their data files) missing.
    """
    root = Path(root)
    if _marker_ok(root):
        return root
    tasks = _build_all()  # before touching the disk: a missing package leaves nothing behind
    root.mkdir(parents=True, exist_ok=True)
    for (task_type, name), (files, meta) in tasks.items():
        final = root / task_type / name
        final.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{name}.tmp-", dir=final.parent))
        try:
            _write_files(tmp, files, {"task": f"{task_type}/{name}", "format_version": FORMAT_VERSION,
                                      "package": DEMO_SOURCES[meta["source"]][0],
                                      "licence": DEMO_SOURCES[meta["source"]][1], **meta})
            if final.exists():  # stale (older format or interrupted run): replace it
                shutil.rmtree(final, ignore_errors=True)
            try:
                os.replace(tmp, final)
            except OSError:
                if not final.is_dir():  # another writer did not win the race either
                    raise
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    sizes = {
        f"{t}/{n}": {k: v for k, v in meta.items() if isinstance(v, int)} for (t, n), (_, meta) in tasks.items()
    }
    tmp_marker = root / f"{MARKER}.tmp-{os.getpid()}"
    tmp_marker.write_text(json.dumps({"format_version": FORMAT_VERSION, "tasks": sizes}, indent=2) + "\n",
                          encoding="utf-8")
    os.replace(tmp_marker, root / MARKER)
    return root
