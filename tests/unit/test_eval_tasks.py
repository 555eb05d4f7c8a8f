"""Local MTEB tasks of all four types load and score through mteb itself; CLI errors are one line.

The model is a deterministic stand-in (hashed bag of character trigrams) with the EmbeddingModel
`encode` contract, so these tests do not depend on the modeling code.
"""
from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import zlib
from pathlib import Path

import numpy as np
import pytest

from dsembed.errors import DataError, UserError
from dsembed.evaluation import run
from dsembed.evaluation.presets import E5_TASK_INSTRUCTIONS, PRESETS
from dsembed.evaluation.tasks import limit_task, load_local_tasks

from tests.conftest import write_jsonl

REPO = Path(__file__).resolve().parents[2]
SHARED_TASKS = REPO.parent / "shared" / "data" / "tasks"


class HashEncoder:
    """Hashed character-trigram counts, L2-normalised; records (instruction, n_texts) per call."""

    def __init__(self, dim: int = 512) -> None:
        self.dim = dim
        self.calls: list[tuple[str | None, int]] = []

    def encode(self, texts, instruction=None, batch_size=32, show_progress=False) -> np.ndarray:
        self.calls.append((instruction, len(texts)))
        out = np.zeros((len(texts), self.dim), dtype=np.float32)
        for row, text in enumerate(texts):
            padded = f" {text.lower()} "
            for i in range(len(padded) - 2):
                out[row, zlib.crc32(padded[i:i + 3].encode()) % self.dim] += 1.0
        return out / np.maximum(np.linalg.norm(out, axis=1, keepdims=True), 1e-9)


def test_all_four_local_types_score_through_mteb(task_root):
    tasks = load_local_tasks(task_root)
    assert [t.metadata.type for t in tasks] == ["STS", "Retrieval", "Classification", "Clustering"]
    run.prepare_tasks(tasks)
    model = HashEncoder()
    results = run.evaluate_tasks(model, tasks, model_name="hash", log=lambda _: None)
    by_name = results["tasks"]
    assert set(results["categories"]) == {"sts", "retrieval", "classification", "clustering"}
    for name, entry in by_name.items():
        # The per-item numbers reproduce mteb's own main score.
        assert entry["items_score"] == pytest.approx(entry["main_score"], abs=1e-4), name
    assert by_name["TinySTS"]["main_metric"] == "cosine_spearman"
    assert by_name["TinySTS"]["main_score"] > 0.3
    assert len(by_name["TinySTS"]["items"]["default"]["cosine"]) == 24
    assert by_name["TinyRetrieval"]["items"]["default"]["query_ids"] == sorted(f"q{i}" for i in range(8))
    assert by_name["TinyClassification"]["main_score"] > 0.8
    assert len(by_name["TinyClassification"]["items"]["default"]["correct"]) == 24
    sets = by_name["TinyClustering"]["items"]["default"]["sets"]
    assert [len(s["labels"]) for s in sets] == [18, 18, 4]  # the one-label set is kept, too
    assert by_name["TinyClustering"]["main_score"] > 0.5
    # Retrieval documents carry no instruction; everything else carries the task's.
    instructions = {instr for instr, _ in model.calls}
    assert None in instructions
    assert {i for i in instructions if i} == {by_name[n]["instruction"] for n in by_name}
    assert json.loads(json.dumps(results))["format"] == "dsembed-eval/1"


def test_instructions_e5_defaults_and_overrides(task_root, tmp_path):
    banking = tmp_path / "classification" / "Banking77"
    write_jsonl(banking / "train.jsonl", [{"text": "a", "label": "x"}])
    write_jsonl(banking / "test.jsonl", [{"text": "a", "label": "x"}])
    chosen = run.resolve_instructions(load_local_tasks(tmp_path))
    assert chosen["Banking77"] == E5_TASK_INSTRUCTIONS["Banking77Classification"]
    tasks = load_local_tasks(task_root)
    chosen = run.resolve_instructions(tasks, {"TinySTS": "Judge similarity", "TinyClustering": ""})
    assert chosen["TinySTS"] == "Judge similarity"
    assert "TinyClustering" not in chosen  # "" means no instruction
    with pytest.raises(UserError, match="NoSuchTask"):
        run.resolve_instructions(tasks, {"NoSuchTask": "x"})
    assert len(PRESETS["paper-all"]) == 8 + 14 + 6 + 11


def test_limit_task_keeps_relevant_documents(task_root):
    tasks = load_local_tasks(task_root)
    run.prepare_tasks(tasks, limit=3)
    sts, retrieval, classification, clustering = tasks
    assert len(sts.dataset["test"]) == 3
    split = retrieval.dataset["default"]["test"]
    assert len(split["queries"]) == 3
    needed = {d for docs in split["relevant_docs"].values() for d in docs}
    assert needed <= set(split["corpus"]["id"])
    assert len(classification.dataset["test"]) == 3
    assert sum(len(s) for s in clustering.dataset["test"]["sentences"]) == 3


def test_limit_sts_counts_texts_not_pairs(tmp_path):
    # 6 documents judged in all 15 pairs: limit 3 allows 6 texts, so every pair stays; limit 2
    # allows 4 texts, so only pairs among at most 4 of the documents stay.
    docs = [f"document number {i}" for i in range(6)]
    rows = [{"sentence1": docs[i], "sentence2": docs[j], "score": float(i + j)}
            for i in range(6) for j in range(i + 1, 6)]
    write_jsonl(tmp_path / "sts" / "AllPairs" / "test.jsonl", rows)
    whole = load_local_tasks(tmp_path)
    run.prepare_tasks(whole, limit=3)
    assert len(whole[0].dataset["test"]) == 15
    cut = load_local_tasks(tmp_path)
    run.prepare_tasks(cut, limit=2)
    kept = cut[0].dataset["test"]
    texts = set(kept["sentence1"]) | set(kept["sentence2"])
    assert len(texts) <= 4 and 1 <= len(kept) <= 6
    again = load_local_tasks(tmp_path)
    run.prepare_tasks(again, limit=2)
    assert again[0].dataset["test"]["sentence1"] == kept["sentence1"]  # seeded, repeatable


def test_bad_local_file_names_file_and_line(tmp_path):
    path = tmp_path / "sts" / "Bad" / "test.jsonl"
    path.parent.mkdir(parents=True)
    path.write_text('{"sentence1": "a", "sentence2": "b", "score": 1}\n{"sentence1": "a"}\n')
    with pytest.raises(DataError, match=r"test.jsonl:2: missing key"):
        run.prepare_tasks(load_local_tasks(tmp_path))


@pytest.mark.parametrize("row, problem", [("q0\tno-such-doc\t1", "corpus-id 'no-such-doc' is not in corpus.jsonl"),
                                          ("no-such-query\td0\t1", "query-id 'no-such-query' is not in queries.jsonl")])
def test_qrels_naming_an_unknown_id_is_an_error_with_line(tmp_path, row, problem):
    folder = tmp_path / "retrieval" / "Bad"
    write_jsonl(folder / "corpus.jsonl", [{"_id": "d0", "text": "a"}, {"_id": "d1", "text": "b"}])
    write_jsonl(folder / "queries.jsonl", [{"_id": "q0", "text": "a?"}])
    (folder / "qrels").mkdir()
    (folder / "qrels" / "test.tsv").write_text(f"query-id\tcorpus-id\tscore\nq0\td0\t1\n{row}\n")
    with pytest.raises(DataError, match=re.escape(f"qrels/test.tsv:3: {problem}")):
        run.prepare_tasks(load_local_tasks(tmp_path))


def _cli(args: list[str], **env: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "dsembed.cli.evaluate", *args], cwd=REPO,
                          capture_output=True, text=True, timeout=120, env={**os.environ, **env})


def test_cli_missing_tasks_dir_is_one_line_exit_2(tmp_path):
    done = _cli([str(tmp_path), "--tasks-dir", str(tmp_path / "nope"), "--output", str(tmp_path / "r.json")])
    assert done.returncode == 2
    assert "Traceback" not in done.stderr
    assert done.stderr.strip().count("\n") == 0
    assert "does not exist" in done.stderr and "nope" in done.stderr


def test_cli_unreachable_hub_is_one_line_exit_2(tmp_path):
    done = _cli([str(tmp_path), "--tasks", "STSBenchmark", "--output", str(tmp_path / "r.json")],
                HF_HUB_OFFLINE="1")
    assert done.returncode == 2
    assert "Traceback" not in done.stderr
    lines = [line for line in done.stderr.splitlines() if line.startswith("error:")]
    assert len(lines) == 1 and "hub is unreachable" in lines[0] and "--tasks-dir" in lines[0]


@pytest.mark.skipif(not SHARED_TASKS.is_dir(), reason="../shared/data/tasks is absent")
def test_smoke_on_shared_tasks_with_limit():
    tasks = load_local_tasks(SHARED_TASKS)
    run.prepare_tasks(tasks, limit=40)
    results = run.evaluate_tasks(HashEncoder(dim=256), tasks, model_name="hash", log=lambda _: None)
    assert {e["category"] for e in results["tasks"].values()} == {"sts", "retrieval", "classification",
                                                                  "clustering"}
    for name, entry in results["tasks"].items():
        assert 0.0 <= entry["main_score"] <= 1.0 or entry["category"] == "sts", name
        assert entry["items_score"] == pytest.approx(entry["main_score"], abs=1e-4), name


def test_layer_weight_info_reads_row_norms_of_the_head():
    import torch

    class Pooler(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.layer_weights = torch.nn.Parameter(torch.tensor([[3.0, 4.0], [0.0, 1.0]]))  # [K=2, D=2]
            self.tapped_layers = [7, 8]

    class Model:
        pooler = Pooler()

    assert run.layer_weight_info(Model()) == {"layers": [7, 8], "norms": [5.0, 1.0]}
    assert run.layer_weight_info(HashEncoder()) is None


def test_integer_labels_stay_integers_for_binary_tasks(tmp_path):
    """SST2 / MR / CR ship 0/1 labels: as strings, mteb's average precision (pos_label=1) fails."""
    rng = np.random.default_rng(0)
    for split, n in (("train", 24), ("test", 16)):
        write_jsonl(tmp_path / "classification" / "Binary" / f"{split}.jsonl",
                    [{"text": f"good great fine {i}" if i % 2 else f"bad awful poor {i}", "label": i % 2}
                     for i in rng.permutation(n).tolist()])
    binary, = load_local_tasks(tmp_path, ["Binary"])
    binary.load_data()
    assert set(binary.dataset["test"]["label"]) == {0, 1} and binary.label_names is None
    result = run.evaluate_tasks(HashEncoder(64), [binary], log=lambda _: None)["tasks"]["Binary"]
    assert result["main_score"] > 0.9 and result["items_score"] == pytest.approx(result["main_score"], abs=1e-4)
    assert "label_names" not in result


def test_string_labels_become_integers_and_reports_keep_the_names(tmp_path):
    """SMSSpam ships "ham"/"spam": mapped to 0/1 in sorted order inside the loader, names kept."""
    rng = np.random.default_rng(0)
    for split, n in (("train", 24), ("test", 16)):
        write_jsonl(tmp_path / "classification" / "Spam" / f"{split}.jsonl",
                    [{"text": f"win cash prize now {i}" if i % 2 else f"see you at lunch {i}",
                      "label": "spam" if i % 2 else "ham"} for i in rng.permutation(n).tolist()])
    write_jsonl(tmp_path / "classification" / "Mixed" / "train.jsonl", [{"text": "a", "label": 1}, {"text": "b", "label": "x"}])
    write_jsonl(tmp_path / "classification" / "Mixed" / "test.jsonl", [{"text": "a", "label": 1}])
    mixed, spam = load_local_tasks(tmp_path, ["Spam", "Mixed"])
    spam.load_data()
    mixed.load_data()
    assert spam.label_names == ["ham", "spam"]
    assert set(spam.dataset["test"]["label"]) == {0, 1}  # spam = 1, the positive class of average precision
    assert mixed.label_names == ["1", "x"] and mixed.dataset["train"]["label"] == [0, 1]
    result = run.evaluate_tasks(HashEncoder(64), [spam], log=lambda _: None)["tasks"]["Spam"]
    assert result["main_score"] > 0.9 and result["items_score"] == pytest.approx(result["main_score"], abs=1e-4)
    assert result["label_names"] == ["ham", "spam"]
    assert set(result["items"]["default"]["gold"]) == {"0", "1"}


def test_two_test_labels_other_than_0_and_1_are_renumbered_so_average_precision_applies(tmp_path):
    """mteb's average precision takes pos_label=1 whenever a test split has two labels: {0, 2}
    failed, and so did a three-label task whose test holds only "neg" and "pos" (numbers 0 and 2)."""
    rng = np.random.default_rng(0)
    words = {0: "bad awful poor", 1: "plain usual so-so", 2: "good great fine"}
    for split, n, labels in (("train", 24, (0, 1, 2)), ("test", 16, (0, 2))):
        for name, label in (("Gapped", lambda v: v), ("Sentiment", lambda v: ["neg", "neu", "pos"][v])):
            write_jsonl(tmp_path / "classification" / name / f"{split}.jsonl",
                        [{"text": f"{words[labels[i % len(labels)]]} {i}", "label": label(labels[i % len(labels)])}
                         for i in rng.permutation(n).tolist()])
    gapped, sentiment = load_local_tasks(tmp_path, ["Gapped", "Sentiment"])
    run.prepare_tasks([gapped, sentiment])
    assert gapped.label_names == ["0", "2", "1"] and sentiment.label_names == ["neg", "pos", "neu"]
    for task in (gapped, sentiment):
        assert set(task.dataset["test"]["label"]) == {0, 1} and set(task.dataset["train"]["label"]) == {0, 1, 2}
        for split in ("train", "test"):  # number 1 is the original label 2 / "pos" in every split
            part = task.dataset[split]
            assert all(t.startswith(words[2]) == (label == 1) for t, label in zip(part["text"], part["label"]))
    results = run.evaluate_tasks(HashEncoder(64), [gapped, sentiment], log=lambda _: None)["tasks"]
    for name in ("Gapped", "Sentiment"):
        assert results[name]["main_score"] > 0.9 and results[name]["label_names"][1] in ("2", "pos")
    spam_like, = load_local_tasks(_binary_task(tmp_path / "plain"), ["Binary"])
    run.prepare_tasks([spam_like])
    assert spam_like.label_names is None  # 0/1 tasks keep their own numbers


def _binary_task(root: Path) -> Path:
    for split, n in (("train", 8), ("test", 4)):
        write_jsonl(root / "classification" / "Binary" / f"{split}.jsonl",
                    [{"text": f"text {i}", "label": i % 2} for i in range(n)])
    return root


class _FailsOn(HashEncoder):
    """Raises inside mteb's encode call when it meets a text containing `marker`."""

    def __init__(self, marker: str) -> None:
        super().__init__(64)
        self.marker = marker

    def encode(self, texts, instruction=None, batch_size=32, show_progress=False):
        if any(self.marker in t for t in texts):
            raise RuntimeError("simulated failure\nsecond line of detail")
        return super().encode(texts, instruction, batch_size, show_progress)


def test_a_task_that_fails_is_one_line_naming_it_after_earlier_tasks_were_stored(task_root):
    tasks = load_local_tasks(task_root)
    run.prepare_tasks(tasks)
    stored = []
    marker = tasks[1].dataset["default"]["test"]["queries"]["text"][0]  # a retrieval query
    with pytest.raises(UserError) as caught:
        run.evaluate_tasks(_FailsOn(marker), tasks, log=lambda _: None,
                           on_task=lambda task, entry, result: stored.append(task.metadata.name))
    message = str(caught.value)
    assert stored == ["TinySTS"]
    assert "TinyRetrieval" in message and "RuntimeError: simulated failure" in message
    assert "\n" not in message and "second line" not in message


def test_a_failure_in_the_scoring_after_mteb_is_one_line_too(task_root, monkeypatch):
    """Item scores and chance levels run after mteb.evaluate: their failure names the task as well."""
    tasks = load_local_tasks(task_root)
    run.prepare_tasks(tasks)
    chance = run.cached_chance_level

    def fails_on_retrieval(task):
        if task.metadata.name == "TinyRetrieval":
            raise ValueError("simulated chance failure\nsecond line")
        return chance(task)

    monkeypatch.setattr(run, "cached_chance_level", fails_on_retrieval)
    stored = []
    with pytest.raises(UserError) as caught:
        run.evaluate_tasks(HashEncoder(64), tasks, log=lambda _: None,
                           on_task=lambda task, entry, result: stored.append(task.metadata.name))
    assert stored == ["TinySTS"]
    assert "task TinyRetrieval (retrieval) failed" in str(caught.value) and "ValueError: simulated chance failure" in str(caught.value)
    assert "second line" not in str(caught.value)


def test_texts_shared_between_tasks_are_embedded_once(task_root, tmp_path):
    """A corpus used by two retrieval tasks is embedded once per run; the scores do not change."""
    import shutil

    root = tmp_path / "tasks"
    shutil.copytree(task_root / "retrieval" / "TinyRetrieval", root / "retrieval" / "TinyRetrieval")
    shutil.copytree(task_root / "retrieval" / "TinyRetrieval", root / "retrieval" / "TinyRetrievalAgain")
    shutil.copytree(task_root / "sts" / "TinySTS", root / "sts" / "TinySTS")
    scores = {}
    for budget in (0, 1 << 20):
        tasks = load_local_tasks(root)
        run.prepare_tasks(tasks)
        model = HashEncoder()
        results = run.evaluate_tasks(model, tasks, model_name="hash", log=lambda _: None, cache_bytes=budget,
                                     instructions={})  # no instructions: both tasks' queries read the same too
        scores[budget] = {n: e["main_score"] for n, e in results["tasks"].items()}
        embedded = sum(n for _, n in model.calls)
        if budget:
            # the second task's 16 documents and 8 queries come from the cache
            assert results["tasks"]["TinyRetrievalAgain"]["encoding"]["embedded"] == 0
            assert results["encoding"]["reused"] >= 24
            assert embedded == results["encoding"]["embedded"] == without_cache - 24
        else:
            assert results["encoding"]["reused"] == 0
            without_cache = embedded
    assert scores[0] == scores[1 << 20]


def test_results_carry_the_chance_level_in_json_table_and_mteb_files(task_root, tmp_path):
    import mteb

    from dsembed.evaluation import resume
    from dsembed.evaluation.encoder import MtebEncoder
    from dsembed.evaluation.report import format_results_table

    tasks = load_local_tasks(task_root)
    run.prepare_tasks(tasks)
    mteb_results = {}
    results = run.evaluate_tasks(HashEncoder(), tasks, model_name="hash", log=lambda _: None,
                                 on_task=lambda task, entry, result: mteb_results.update({task.metadata.name: result}))
    chance = {name: entry["chance"] for name, entry in results["tasks"].items()}
    assert chance["TinySTS"]["score"] == 0.0 and chance["TinyClassification"]["score"] == 0.25
    assert 0.0 < chance["TinyRetrieval"]["score"] < results["tasks"]["TinyRetrieval"]["main_score"]
    assert all(record["method"] for record in chance.values())
    table = format_results_table(results)
    assert "chance" in table.splitlines()[0]
    row = next(line.split() for line in table.splitlines() if "TinyClassification" in line)
    assert row[-1] == "25.00"  # score, then chance x100
    # mteb's TaskResult keeps it as an extra field of each subset's scores, through its own loader
    encoder = MtebEncoder(HashEncoder(), {}, name="hash", revision="abc")
    for name, result in mteb_results.items():
        back = mteb.TaskResult.from_disk(resume.save_mteb_result(tmp_path, result, encoder, 32))
        extra = back.scores["test"][0]["dsembed_chance"]
        assert extra["score"] == pytest.approx(chance[name]["score"], abs=1e-6), name
        assert extra["method"] == chance[name]["method"]
        assert back.get_score() == pytest.approx(results["tasks"][name]["main_score"], abs=1e-6)


def test_tasks_not_loaded_beforehand_are_loaded_once_and_get_their_chance_level(task_root):
    tasks = load_local_tasks(task_root)  # no prepare_tasks: mteb would load (and drop) the data itself
    results = run.evaluate_tasks(HashEncoder(), tasks, log=lambda _: None)["tasks"]
    assert set(results) == {"TinySTS", "TinyRetrieval", "TinyClassification", "TinyClustering"}
    assert all(entry["chance"] is not None for entry in results.values())
    assert results["TinySTS"]["chance"]["score"] == 0.0
