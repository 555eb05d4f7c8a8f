"""Demo data from pip-installed packages: training rows, the held-out split and the written tasks."""
from __future__ import annotations

import csv
import importlib.util
import json
from pathlib import Path

import pytest

from dsembed.data import demo as demo_data
from dsembed.data import demo_sources
from dsembed.errors import DataError

pytestmark = pytest.mark.skipif(
    importlib.util.find_spec("chatterbot_corpus") is None or importlib.util.find_spec("gensim") is None,
    reason="demo data needs: pip install chatterbot-corpus gensim",
)


def _jsonl(path: Path) -> list[dict]:
    with open(path, encoding="utf-8") as fh:
        return [json.loads(line) for line in fh]


@pytest.fixture(scope="module")
def rows() -> list[dict]:
    return demo_data.demo_training_rows("chatterbot")


@pytest.fixture(scope="module")
def tasks_root(tmp_path_factory) -> Path:
    return demo_data.write_demo_tasks(tmp_path_factory.mktemp("demo") / "tasks")


def test_rows_well_formed(rows):
    assert len(rows) > 500
    categories = set()
    for row in rows:
        assert set(row) == {"query", "positive", "negative", "source"}
        assert all(isinstance(row[k], str) and row[k].strip() for k in row)
        assert row["negative"] != row["positive"]
        categories.add(row["source"])
    assert len(categories) > 10


def test_negative_is_not_an_answer_of_the_same_prompt(rows):
    answers: dict[str, set[str]] = {}
    for row in rows:
        answers.setdefault(row["query"], set()).add(row["positive"])
    assert all(row["negative"] not in answers[row["query"]] for row in rows)
    by_category: dict[str, set[str]] = {}
    for row in rows:
        by_category.setdefault(row["source"], set()).add(row["positive"])
    # Hard negatives come from the row's own category whenever that category offers one.
    same = sum(row["negative"] in by_category[row["source"]] for row in rows)
    assert same / len(rows) > 0.9


def test_rows_deterministic(rows):
    assert demo_data.demo_training_rows("chatterbot") == rows


def test_lee_background_rows_are_unseen_articles(tasks_root):
    background = demo_data.demo_training_rows("lee_background")
    assert len(background) > 250
    for row in background:
        assert row["source"] == "lee_background" and "negative" not in row
        assert len(row["query"].split()) == demo_data.LEE_QUERY_WORDS
        assert 10 <= len(row["positive"].split()) <= demo_data.LEE_POSITIVE_WORDS
    assert len({r["query"] for r in background}) == len(background)
    # No judged STS document is trained on, whole or in part.
    pairs = _jsonl(tasks_root / "sts" / "LeeNews" / "test.jsonl")
    judged = {demo_sources.text_key(t) for p in pairs for t in (p["sentence1"], p["sentence2"])}
    assert not any(demo_sources.text_key(r["query"]) in j or demo_sources.text_key(r["positive"]) in j
                   for r in background for j in judged)
    assert demo_data.demo_training_rows("lee_background") == background


def test_unknown_name_lists_known_names():
    with pytest.raises(DataError) as err:
        demo_data.demo_training_rows("nope")
    message = str(err.value)
    assert "nope" in message and "chatterbot" in message and "\n" not in message


def test_missing_package_says_how_to_install(monkeypatch):
    monkeypatch.setattr(demo_sources.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(DataError, match="pip install chatterbot-corpus gensim"):
        demo_data.demo_training_rows("chatterbot")
    with pytest.raises(DataError, match="pip install"):
        demo_data.write_demo_tasks(Path("/nonexistent/never-written"))


def test_held_out_texts_never_in_training(rows, tasks_root):
    key = demo_sources.text_key
    train_texts = {key(r[k]) for r in rows for k in ("query", "positive", "negative")}
    retrieval = tasks_root / "retrieval" / "ChatterbotQA"
    queries = {q["_id"]: q["text"] for q in _jsonl(retrieval / "queries.jsonl")}
    corpus = {d["_id"]: d["text"] for d in _jsonl(retrieval / "corpus.jsonl")}
    with open(retrieval / "qrels" / "test.tsv", encoding="utf-8") as fh:
        qrels = list(csv.reader(fh, delimiter="\t"))[1:]
    relevant_docs = {corpus[doc] for _, doc, _ in qrels}
    assert not train_texts & {key(t) for t in queries.values()}
    assert not train_texts & {key(t) for t in relevant_docs}
    topics = tasks_root / "classification" / "ChatterbotTopics"
    for split in ("train.jsonl", "test.jsonl"):
        assert not train_texts & {key(r["text"]) for r in _jsonl(topics / split)}
    clusters = _jsonl(tasks_root / "clustering" / "ChatterbotCategories" / "test.jsonl")
    assert not train_texts & {key(t) for line in clusters for t in line["sentences"]}


def test_sts_task(tasks_root):
    pairs = _jsonl(tasks_root / "sts" / "LeeNews" / "test.jsonl")
    assert len(pairs) == 50 * 49 // 2
    assert all(isinstance(p["score"], float) and 0.0 <= p["score"] <= 1.0 for p in pairs)
    assert all(p["sentence1"] and p["sentence2"] and p["sentence1"] != p["sentence2"] for p in pairs)
    assert len({p["sentence1"] for p in pairs} | {p["sentence2"] for p in pairs}) == 50
    assert len({p["score"] for p in pairs}) > 20  # real judgements, not a constant


def test_retrieval_task_layout(tasks_root):
    folder = tasks_root / "retrieval" / "ChatterbotQA"
    corpus = _jsonl(folder / "corpus.jsonl")
    queries = _jsonl(folder / "queries.jsonl")
    assert all(set(d) == {"_id", "title", "text"} and d["text"] for d in corpus)
    assert all(set(q) == {"_id", "text"} and q["text"] for q in queries)
    assert len({d["_id"] for d in corpus}) == len(corpus) > len(queries) > 200
    lines = (folder / "qrels" / "test.tsv").read_text(encoding="utf-8").splitlines()
    assert lines[0] == "query-id\tcorpus-id\tscore"
    doc_ids, query_ids = {d["_id"] for d in corpus}, {q["_id"] for q in queries}
    judged = set()
    for line in lines[1:]:
        qid, did, score = line.split("\t")
        assert qid in query_ids and did in doc_ids and int(score) == 1
        judged.add(qid)
    assert judged == query_ids  # every query has at least one relevant document


def test_classification_and_clustering_tasks(tasks_root):
    folder = tasks_root / "classification" / "ChatterbotTopics"
    train, test = _jsonl(folder / "train.jsonl"), _jsonl(folder / "test.jsonl")
    assert len(train) + len(test) >= 300
    assert all(set(r) == {"text", "label"} and r["text"] and r["label"] for r in train + test)
    assert {r["label"] for r in test} <= {r["label"] for r in train}
    assert not {r["text"] for r in train} & {r["text"] for r in test}
    lines = _jsonl(tasks_root / "clustering" / "ChatterbotCategories" / "test.jsonl")
    for line in lines:
        assert len(line["sentences"]) == len(line["labels"]) >= 300
        assert len(set(line["labels"])) > 5


def test_write_is_idempotent_and_deterministic(tasks_root, tmp_path):
    marker = tasks_root / demo_data.MARKER
    stamp = marker.stat().st_mtime_ns
    sts = tasks_root / "sts" / "LeeNews" / "test.jsonl"
    sts.write_text("edited\n")  # a complete folder is not rewritten
    assert demo_data.write_demo_tasks(tasks_root) == tasks_root
    assert sts.read_text() == "edited\n" and marker.stat().st_mtime_ns == stamp

    other = demo_data.write_demo_tasks(tmp_path / "again")
    for task_type, name in demo_data.TASKS:
        for path in sorted((other / task_type / name).rglob("*")):
            twin = tasks_root / path.relative_to(other)
            if path.is_file() and twin != sts:
                assert path.read_bytes() == twin.read_bytes(), path
    assert not list(other.rglob("*.tmp-*"))  # no temporary folders left behind


def test_interrupted_write_is_rebuilt(tmp_path):
    root = tmp_path / "tasks"
    demo_data.write_demo_tasks(root)
    (root / demo_data.MARKER).unlink()  # as if the run died before the marker
    stale = root / "sts" / "LeeNews" / "test.jsonl"
    stale.write_text("partial\n")
    demo_data.write_demo_tasks(root)
    assert len(_jsonl(stale)) == 1225 and (root / demo_data.MARKER).is_file()


def test_attribution_covers_sources():
    text = demo_sources.demo_attribution()
    for name, (package, licence, _) in demo_sources.DEMO_SOURCES.items():
        assert name in text and package in text and licence in text
