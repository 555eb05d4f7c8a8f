"""dsembed-mine: the positive-aware choice, the written training data, resume, ranks and bad input.

The model is recipes/tiny-cpu.yaml's untrained model (seeded: every run and rank builds the same one).
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from dsembed.cli import mine as mine_cli
from dsembed.config import load_recipe
from dsembed.data.batches import query_text
from dsembed.data.rows import load_examples
from dsembed.errors import run_cli
from dsembed.mining import select
from dsembed.mining.select import select_negatives
from dsembed.training.loss import relative_threshold

REPO = Path(__file__).resolve().parents[2]
TINY = REPO / "recipes" / "tiny-cpu.yaml"
TOPICS = ["cats", "dogs", "stocks", "rain", "music", "chess"]


def _unit(*rows):
    x = torch.tensor(rows, dtype=torch.float32)
    return x / x.norm(dim=1, keepdim=True)


def test_selection_is_positive_aware_skips_top_ranks_and_marks_missing():
    query = _unit([1.0, 0.0])
    corpus = _unit([1.0, 0.05], [1.0, 0.3], [1.0, 0.6], [1.0, 1.0], [0.0, 1.0], [1.0, 0.001])
    scores = (query @ corpus.T)[0]
    positive = scores[1:2]  # the positive is corpus[1] (cos 0.958); excluded by position
    excluded = torch.tensor([[1, 5]])  # its own position, and the query's own text (corpus[5])
    got = select_negatives(query, positive, corpus, excluded, k=3, margin=0.95)
    # above 0.95 x 0.958 = 0.910: corpus[0] (0.999) is dropped; corpus[2] 0.857, [3] 0.707, [4] 0.0 remain
    assert got.indices.tolist() == [[2, 3, 4]]
    assert got.dropped_by_margin == 1
    skipped = select_negatives(query, positive, corpus, excluded, k=3, margin=0.95, skip_top=1)
    assert skipped.indices.tolist() == [[3, 4, -1]] and torch.isinf(skipped.scores[0, 2])
    loose = select_negatives(query, positive, corpus, excluded, k=2, margin=1.0)
    assert loose.indices.tolist() == [[2, 3]] and loose.dropped_by_margin == 1  # margin 1: those above the positive


def test_selection_in_chunks_equals_one_pass(monkeypatch):
    g = torch.Generator().manual_seed(0)
    queries, corpus = torch.randn(7, 4, generator=g), torch.randn(11, 4, generator=g)
    positive = torch.rand(7, generator=g)
    excluded = torch.randint(-1, 11, (7, 2), generator=g)
    whole = select_negatives(queries, positive, corpus, excluded, 3, 0.9, 1)
    monkeypatch.setattr(select, "CHUNK_ELEMENTS", 11 * 2)  # 2 queries per chunk
    parts = select_negatives(queries, positive, corpus, excluded, 3, 0.9, 1)
    assert torch.equal(whole.indices, parts.indices) and whole.dropped_by_margin == parts.dropped_by_margin


def _data(path: Path, n: int = 36) -> Path:
    rows = [{"query": f"what about {TOPICS[i % 6]} {i}?", "positive": f"{TOPICS[i % 6]} fact number {i}",
             "negative": f"{TOPICS[(i + 1) % 6]} fact number {i + 100}" if i % 3 == 0 else None,
             "source": "first" if i < n * 2 // 3 else "second"} for i in range(n)]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def _mine(tmp_path: Path, *extra: str, output: str = "mined.jsonl") -> int:
    args = [str(TINY), str(tmp_path / "data.jsonl"), "--output", str(tmp_path / output), "--negatives", "3",
            "--margin", "0.999", "--shard-size", "16", *extra]
    return run_cli(mine_cli.main, args)


@pytest.fixture(scope="module")
def mined(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("mine")
    _data(tmp / "data.jsonl")
    assert _mine(tmp) == 0
    return tmp


def test_mined_negatives_follow_the_rule_and_train_reads_them(mined):
    rows = [json.loads(line) for line in (mined / "mined.jsonl").read_text().splitlines()]
    record = json.loads((mined / "mined.mining.json").read_text())
    assert record["key"]["settings"] == {"negatives": 3, "margin": 0.999, "skip_top": 0, "corpus": "same-source"}
    assert record["key"]["model"].startswith("recipe:") and record["counts"]["examples"] == len(rows) == 36
    assert not (mined / "mined.shards").exists()  # removed after success
    # recompute the rule with the same model: the written negatives are the best allowed candidates
    recipe = load_recipe(TINY)
    model = mine_cli._load_model({"folder": None, "recipe": recipe}, "cpu")
    inputs = [json.loads(line) for line in (mined / "data.jsonl").read_text().splitlines()]
    pool = {s: list(dict.fromkeys(t for r in inputs if r["source"] == s for t in (r["positive"], r["negative"]) if t))
            for s in ("first", "second")}
    examples = load_examples(load_recipe(TINY, [f"data.train=[{mined / 'data.jsonl'}]", "data.num_negatives=0"]))
    total = 0
    for row, example in zip(rows, examples):
        q = torch.from_numpy(model.encode([query_text(example, recipe)]))[0]
        candidates = [t for t in pool[row["source"]] if t not in (row["positive"], row["query"])]  # the same source
        emb = torch.from_numpy(model.encode(candidates + [row["positive"]]))
        scores = emb[:-1] @ q
        allowed = scores <= relative_threshold(emb[-1] @ q, 0.999)
        best = [candidates[i] for i in torch.argsort(scores, descending=True).tolist() if allowed[i]][:3]
        assert row["negatives"] == best
        total += len(best)
    assert total == record["counts"]["negatives_written"] > 36
    train = load_examples(load_recipe(TINY, [f"data.train=[{mined / 'mined.jsonl'}]", "data.num_negatives=3"]))
    assert all(len(e.negatives) == 3 for e in train)
    assert all(e.negatives == r["negatives"] for e, r in zip(train, rows) if len(r["negatives"]) == 3)


def test_a_rerun_is_up_to_date_and_other_settings_need_overwrite(mined, capsys):
    before = (mined / "mined.jsonl").read_bytes()
    assert _mine(mined) == 0
    assert "up to date" in capsys.readouterr().err
    assert _mine(mined, "--skip-top", "1") == 2
    assert "use --overwrite" in capsys.readouterr().err
    assert (mined / "mined.jsonl").read_bytes() == before


def test_a_killed_run_resumes_from_its_shards_and_ranks_give_the_same_output(mined, tmp_path):
    _data(tmp_path / "data.jsonl")
    env = dict(os.environ, DSEMBED_CRASH_AT="mine-shard@2", OMP_NUM_THREADS="1", PYTHONPATH=str(REPO))
    def args(output: str) -> list[str]:
        return [sys.executable, "-m", "dsembed.cli.mine", str(TINY), str(tmp_path / "data.jsonl"), "--output",
                str(tmp_path / output), "--negatives", "3", "--margin", "0.999", "--shard-size", "16"]

    killed = subprocess.run(args("mined.jsonl"), env=env, capture_output=True, text=True, timeout=300)
    assert killed.returncode in (-9, 137), killed.stderr[-2000:]
    assert sorted(p.name for p in (tmp_path / "mined.shards").iterdir()) == ["documents-00000.npz", "documents-00001.npz"]
    assert not (tmp_path / "mined.jsonl").exists()
    assert _mine(tmp_path) == 0
    record = json.loads((tmp_path / "mined.mining.json").read_text())
    assert (record["counts"]["shards_reused"], record["counts"]["shards_computed"]) == (2, 4)
    assert (tmp_path / "mined.jsonl").read_bytes() == (mined / "mined.jsonl").read_bytes()
    env.pop("DSEMBED_CRASH_AT")
    ranked = subprocess.run(args("ranked.jsonl") + ["--nproc", "2"], env=env, capture_output=True, text=True, timeout=300)
    assert ranked.returncode == 0, ranked.stderr[-2000:]
    assert json.loads((tmp_path / "ranked.mining.json").read_text())["ranks"] == 2
    assert (tmp_path / "ranked.jsonl").read_bytes() == (mined / "mined.jsonl").read_bytes()


def test_a_run_killed_between_output_and_record_is_never_up_to_date(mined, tmp_path, monkeypatch, capsys):
    """The record is the proof of a whole output: it goes before the new output and comes back last."""
    from dsembed.mining import job

    for name in ("data.jsonl", "mined.jsonl", "mined.mining.json"):
        (tmp_path / name).write_bytes((mined / name).read_bytes())
    write = job.write_text_atomic

    def killed_at_the_record(path, text):
        if Path(path).name.endswith(".mining.json"):
            raise KeyboardInterrupt  # the kill: after the new output, before its record
        write(path, text)

    monkeypatch.setattr(job, "write_text_atomic", killed_at_the_record)
    assert _mine(tmp_path, "--skip-top", "1", "--overwrite") == 130
    monkeypatch.setattr(job, "write_text_atomic", write)
    assert (tmp_path / "mined.jsonl").read_bytes() != (mined / "mined.jsonl").read_bytes()  # the new output
    assert not (tmp_path / "mined.mining.json").exists()
    capsys.readouterr()
    assert _mine(tmp_path) == 2  # the old settings' record is gone: not "up to date" with the new rows
    assert "use --overwrite" in capsys.readouterr().err


def test_rows_without_a_source_keep_their_data_file_for_by_source_batches(tmp_path):
    files = []
    for name, topics in (("a.jsonl", TOPICS[:3]), ("b.jsonl", TOPICS[3:])):
        rows = [{"query": f"what about {t} {i}?", "positive": f"{t} fact {i}", "negative": f"{t} myth {i}"}
                for i in range(4) for t in topics]
        (tmp_path / name).write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
        files.append(str(tmp_path / name))
    out = tmp_path / "mined.jsonl"
    assert run_cli(mine_cli.main, [str(TINY), *files, "--output", str(out), "--negatives", "1"]) == 0
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["source"] for r in rows] == [files[0]] * 12 + [files[1]] * 12
    examples = load_examples(load_recipe(TINY, [f"data.train=[{out}]", "data.batching=by_source"]))
    assert {e.group for e in examples} == set(files)


def test_a_given_corpus_supplies_the_candidates(tmp_path):
    _data(tmp_path / "data.jsonl", n=12)
    texts = [f"{t} essay {k}" for t in TOPICS for k in range(2)]
    (tmp_path / "corpus.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))
    assert _mine(tmp_path, "--corpus", str(tmp_path / "corpus.jsonl"), "--margin", "1.0") == 0
    rows = [json.loads(line) for line in (tmp_path / "mined.jsonl").read_text().splitlines()]
    assert {n for r in rows for n in r["negatives"]} <= set(texts)
    assert json.loads((tmp_path / "mined.mining.json").read_text())["key"]["corpus_sha256"]


@pytest.mark.parametrize("case,message", [
    ("bad row", "data.jsonl:2: invalid JSON"),
    ("no model", "no such model folder or recipe"),
    ("margin", "--margin 1.5"),
    ("negatives", "--negatives"),
    ("corpus line", "corpus.jsonl:1: no non-empty 'text'"),
    ("damaged model", "not a dsembed model folder"),
])
def test_bad_input_is_one_line_exit_2_and_nothing_written(tmp_path, capsys, case, message):
    data = _data(tmp_path / "data.jsonl", n=6)
    if case == "bad row":
        data.write_text(data.read_text().replace("\n", "\n{oops\n", 1))
    (tmp_path / "corpus.jsonl").write_text('{"text": ""}\n')
    (tmp_path / "model").mkdir()
    model = {"no model": str(tmp_path / "missing"), "damaged model": str(tmp_path / "model")}.get(case, str(TINY))
    extra = {"margin": ["--margin", "1.5"], "negatives": ["--negatives", "0"],
             "corpus line": ["--corpus", str(tmp_path / "corpus.jsonl")]}.get(case, [])
    before = sorted(p.name for p in tmp_path.iterdir())
    code = run_cli(mine_cli.main, [model, str(data), "--output", str(tmp_path / "out.jsonl"), *extra])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and message in err[0], err
    assert sorted(p.name for p in tmp_path.iterdir()) == before
