"""Chance levels: what a no-information model scores on a (limited) task, and the plan's warnings.

Where mteb's own path can be run on random vectors, the chance level is checked against it: the
clustering level equals mteb's score for the same vectors exactly; the classifier on random
embeddings agrees with mteb's evaluation of a random encoder within sampling noise.
"""
from __future__ import annotations

import zlib

import numpy as np
import pytest

from dsembed.evaluation import run
from dsembed.evaluation.chance import (RANDOM_DIM, cached_chance_level, chance_level, chance_plan, construction_problems,
                                       expected_random_ndcg_at_10, format_chance_plan,
                                       random_v_measure)
from dsembed.evaluation.tasks import limit_task, load_local_tasks

from tests.conftest import write_jsonl


class RandomEncoder:
    """A seeded Gaussian vector per text (crc32 of the text): a model that knows nothing."""

    def __init__(self, dim: int = RANDOM_DIM) -> None:
        self.dim = dim

    def encode(self, texts, instruction=None, batch_size=32, show_progress=False) -> np.ndarray:
        return np.stack([np.random.default_rng(zlib.crc32(t.encode())).standard_normal(self.dim)
                         for t in texts]).astype(np.float32)


class TableEncoder:
    """Returns row i of `table` for the text f"text {i}" (to hand mteb exactly chosen vectors)."""

    def __init__(self, table: np.ndarray) -> None:
        self.table = table

    def encode(self, texts, instruction=None, batch_size=32, show_progress=False) -> np.ndarray:
        return self.table[[int(t.split()[1]) for t in texts]]


def test_expected_random_ndcg_matches_pytrec_eval_over_random_rankings():
    import pytrec_eval

    qrels = {"q": {"d0": 3, "d1": 1, "d2": 2, "d5": 1}}  # graded, as CysticFibrosis
    evaluator = pytrec_eval.RelevanceEvaluator(qrels, {"ndcg_cut.10"})
    rng = np.random.default_rng(0)
    draws = [evaluator.evaluate({"q": {f"d{i}": float(s) for i, s in enumerate(rng.random(30))}})["q"]["ndcg_cut_10"]
             for _ in range(3000)]
    exact = expected_random_ndcg_at_10([3, 1, 2, 1], 30)
    assert abs(np.mean(draws) - exact) < 4 * np.std(draws) / np.sqrt(len(draws))
    # every candidate relevant: any ranking is ideal; no relevant document: 0
    assert expected_random_ndcg_at_10([1] * 12, 12) == pytest.approx(1.0)
    assert expected_random_ndcg_at_10([0, 0], 10) == 0.0


def test_chance_levels_of_the_tiny_tasks(task_root):
    tasks = load_local_tasks(task_root)
    run.prepare_tasks(tasks)
    sts, retrieval, classification, clustering = (chance_level(t) for t in tasks)
    assert sts["score"] == 0.0 and sts["n_items"] == 24
    # 16 candidates, one relevant document of gain 1 per query
    discount = sum(1 / np.log2(r + 1) for r in range(1, 11))
    assert retrieval["score"] == pytest.approx(discount / 16)
    assert retrieval["n_items"] == 8 and retrieval["candidates"] == 16
    assert classification["score"] == 0.25  # 6 test texts for each of 4 labels
    assert 0.0 <= classification["random_embeddings"] <= 0.6
    assert classification["n_labels"] == 4 and classification["train_per_label"] == 8
    assert len(clustering["draws"]) == 5 and clustering["score"] == pytest.approx(np.mean(clustering["draws"]))
    assert chance_level(tasks[3]) == clustering  # seeded: the same numbers again
    # computed once per loaded task (the layer probe scores each task once per layer) ...
    assert cached_chance_level(tasks[1]) is cached_chance_level(tasks[1])
    # ... and afresh once the task is cut
    limit_task(tasks[1], 2)
    assert cached_chance_level(tasks[1])["n_items"] == 2


def test_clustering_chance_is_mteb_own_score_for_the_same_random_vectors(tmp_path):
    labels = [f"topic{i % 5}" for i in range(60)]
    write_jsonl(tmp_path / "clustering" / "Five" / "test.jsonl",
                [{"sentences": [f"text {i}" for i in range(60)], "labels": labels}])
    task, = load_local_tasks(tmp_path)
    run.prepare_tasks([task])
    chance = chance_level(task)
    # draw 0 of set 0 uses seed 0: hand mteb those very vectors
    vectors = np.random.default_rng(0).standard_normal((60, RANDOM_DIM), dtype=np.float32)
    scored = run.evaluate_tasks(TableEncoder(vectors), [task], instructions={}, log=lambda _: None)
    assert scored["tasks"]["Five"]["main_score"] == pytest.approx(chance["draws"][0], abs=1e-9)
    assert random_v_measure(labels, 0) == pytest.approx(chance["draws"][0])
    assert scored["tasks"]["Five"]["chance"]["score"] == pytest.approx(chance["score"])


def test_random_embedding_classifier_agrees_with_mteb_on_a_random_encoder(tmp_path):
    rng = np.random.default_rng(1)
    for split, n in (("train", 240), ("test", 300)):
        write_jsonl(tmp_path / "classification" / "Six" / f"{split}.jsonl",
                    [{"text": f"{split} text {i} {rng.integers(1e9)}", "label": int(i % 6)} for i in range(n)])
    task, = load_local_tasks(tmp_path)
    run.prepare_tasks([task])
    entry = run.evaluate_tasks(RandomEncoder(), [task], instructions={}, log=lambda _: None)["tasks"]["Six"]
    assert entry["chance"]["score"] == pytest.approx(50 / 300)  # balanced: majority share 1/6
    # two independent random encoders: both near 1/6, within sampling noise of each other
    assert abs(entry["chance"]["random_embeddings"] - entry["main_score"]) < 0.08
    assert abs(entry["chance"]["random_embeddings"] - 1 / 6) < 0.08


def test_classification_chance_is_the_majority_share_of_the_limited_test_subset(tmp_path):
    rows = [{"text": f"t{i}", "label": "ham" if i % 10 else "spam"} for i in range(200)]
    write_jsonl(tmp_path / "classification" / "Spammy" / "train.jsonl", rows)
    write_jsonl(tmp_path / "classification" / "Spammy" / "test.jsonl", rows)
    task, = load_local_tasks(tmp_path)
    run.prepare_tasks([task], limit=50)
    labels = task.dataset["test"]["label"][:]
    chance = chance_level(task)
    assert chance["score"] == pytest.approx(max(labels.count(0), labels.count(1)) / 50)
    assert chance["score"] >= 0.8 and chance["n_items"] == 50


@pytest.mark.parametrize("category, chance, expected", [
    ("clustering", {"score": 0.32, "n_items": 192, "n_labels": 20}, "random embeddings reach V-measure 0.32"),
    ("clustering", {"score": 0.04, "n_items": 192, "n_labels": 6}, None),
    ("clustering", {"score": 1.0, "n_items": 40, "n_labels": 1}, "every cluster set holds one label"),
    ("classification", {"score": 0.93, "random_embeddings": 0.5, "n_items": 96, "n_labels": 2,
                        "train_per_label": 8.0}, "the majority class is 0.93"),
    ("classification", {"score": 0.06, "random_embeddings": 0.02, "n_items": 96, "n_labels": 60,
                        "train_per_label": 1.6}, "1.6 training texts per label"),
    ("classification", {"score": 0.3, "random_embeddings": 0.2, "n_items": 96, "n_labels": 6,
                        "train_per_label": 8.0}, None),
    ("retrieval", {"score": 0.2, "n_items": 4}, "only 4 queries"),
    ("sts", {"score": 0.0, "n_items": 40, "gold_values": 1}, "every pair has the same gold score"),
    ("sts", {"score": 0.0, "n_items": 40, "gold_values": 9}, None),
])
def test_construction_problems(category, chance, expected):
    problems = construction_problems(category, chance)
    if expected is None:
        assert problems == []
    else:
        assert any(expected in p for p in problems), problems
    assert construction_problems(category, None) == []


def test_chance_plan_names_the_tasks_that_carry_no_information(tmp_path):
    # 30 labels x 2 texts: random vectors cluster "well"; a classification test subset of one label
    write_jsonl(tmp_path / "clustering" / "ManyLabels" / "test.jsonl",
                [{"sentences": [f"s{i}" for i in range(60)], "labels": [f"l{i % 30}" for i in range(60)]}])
    write_jsonl(tmp_path / "clustering" / "FewLabels" / "test.jsonl",
                [{"sentences": [f"s{i}" for i in range(600)], "labels": [f"l{i % 3}" for i in range(600)]}])
    write_jsonl(tmp_path / "classification" / "OneLabel" / "train.jsonl",
                [{"text": f"a{i}", "label": i % 2} for i in range(40)])
    write_jsonl(tmp_path / "classification" / "OneLabel" / "test.jsonl", [{"text": f"b{i}", "label": 1} for i in range(20)])
    tasks = load_local_tasks(tmp_path)
    run.prepare_tasks(tasks)
    plan = chance_plan(tasks)
    assert list(plan) == ["OneLabel", "FewLabels", "ManyLabels"]
    # the same as a study's --plan does it, with a limit for one task: cut labels first
    cut = load_local_tasks(tmp_path)
    run.prepare_tasks(cut, task_limits={"ManyLabels": 40})
    at_limits = chance_plan(cut)
    assert at_limits["FewLabels"] == plan["FewLabels"]
    # 2 texts per label: labels first keeps 2 labels (no third could get 16 texts), 4 texts in all
    assert at_limits["ManyLabels"]["chance"]["n_items"] == 4
    assert at_limits["ManyLabels"]["chance"]["n_labels"] == 2
    assert "only 4 test texts (fewer than 5)" in at_limits["ManyLabels"]["problems"]
    assert plan["ManyLabels"]["chance"]["score"] >= 0.3
    assert any("V-measure" in p for p in plan["ManyLabels"]["problems"])
    assert plan["FewLabels"]["problems"] == [] and plan["FewLabels"]["chance"]["score"] < 0.05
    assert plan["OneLabel"]["problems"] == ["the test subset holds one label"]
    text = format_chance_plan(plan)
    assert text.splitlines()[-1] == "carry no information at these limits: OneLabel, ManyLabels"
    assert f"{100 * plan['ManyLabels']['chance']['score']:.2f}" in text
