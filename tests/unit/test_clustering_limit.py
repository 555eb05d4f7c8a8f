"""--limit on clustering tasks: labels first, so that random embeddings stay near V-measure 0."""
from __future__ import annotations

from collections import Counter
from pathlib import Path

import numpy as np
import pytest

from dsembed.evaluation import run
from dsembed.evaluation.chance import chance_level, random_v_measure_of_sets
from dsembed.evaluation.clustering_limit import MIN_TEXTS_PER_LABEL, labels_first, limit_cluster_sets, set_by_set
from dsembed.evaluation.clustering_measure import measure_random_v_measure
from dsembed.evaluation.tasks import load_local_tasks

from tests.conftest import write_jsonl

SHARED_TASKS = Path(__file__).resolve().parents[3] / "shared" / "data" / "tasks"


def _many_labels(tmp_path, n_labels=40, per_label=30):
    labels = [f"intent{i % n_labels}" for i in range(n_labels * per_label)]
    write_jsonl(tmp_path / "clustering" / "Intents" / "test.jsonl",
                [{"sentences": [f"utterance {i}" for i in range(len(labels))], "labels": labels}])
    return labels


def test_limit_keeps_few_labels_with_many_texts_each_and_random_vectors_near_zero(tmp_path):
    labels = _many_labels(tmp_path)
    task, = load_local_tasks(tmp_path)
    run.prepare_tasks([task], limit=96)
    kept = Counter(task.dataset["test"]["labels"][0])
    assert sum(kept.values()) == 96
    assert 2 <= len(kept) <= 6 and min(kept.values()) >= MIN_TEXTS_PER_LABEL
    assert chance_level(task)["score"] < 0.1
    # the set-by-set cut it replaced: 96 texts over ~37 labels, random vectors score high
    before = set_by_set([labels], 96, np.random.default_rng(run.LIMIT_SEED))
    assert np.mean(random_v_measure_of_sets(before)) > 0.3


def test_limit_is_seeded_and_the_same_for_every_row(tmp_path):
    _many_labels(tmp_path)
    cuts = []
    for seed in (run.LIMIT_SEED, run.LIMIT_SEED, 7):
        task, = load_local_tasks(tmp_path)
        run.prepare_tasks([task], limit=96, seed=seed)
        cuts.append(task.dataset["test"]["sentences"][0])
    assert cuts[0] == cuts[1]
    assert cuts[0] != cuts[2]


def test_labels_with_few_texts_are_not_kept_beside_large_ones():
    counts = {"tiny1": 3, "tiny2": 2, "big1": 60, "big2": 50, "big3": 40, "tiny3": 4}
    labels = [name for name, n in counts.items() for _ in range(n)]
    keep = labels_first(labels, 60, np.random.default_rng(0))
    kept = Counter(labels[i] for i in keep)
    assert set(kept) <= {"big1", "big2", "big3"} and sum(kept.values()) == 60
    assert max(kept.values()) - min(kept.values()) <= 1  # shared evenly
    assert keep == sorted(keep) and len(set(keep)) == len(keep)


def test_sets_that_fit_stay_whole_and_a_small_remainder_starts_no_set():
    sets = [[f"l{i % 2}" for i in range(20)] for _ in range(3)]
    sentences, labels = limit_cluster_sets(sets, sets, 60, np.random.default_rng(0))
    assert [len(s) for s in labels] == [20, 20]  # 20 left: fewer than 2 x 16, no third set
    assert sentences == labels[:2]
    sentences, labels = limit_cluster_sets(sets, sets, 100, np.random.default_rng(0))
    assert [len(s) for s in labels] == [20, 20, 20]


@pytest.mark.skipif(not SHARED_TASKS.is_dir(), reason="../shared/data/tasks is absent")
def test_random_v_measure_stays_below_0_1_on_every_shared_clustering_task():
    rows = measure_random_v_measure(SHARED_TASKS, [96, 192, 1000], draws=3)
    assert len(rows) == 8
    for row in rows:
        for limit in (96, 192, 1000):
            assert row[limit]["after"] < 0.1, (row["task"], limit, row[limit])
    clinc = next(r for r in rows if r["task"] == "CLINC150")
    assert clinc[192]["before"] > 0.5  # what the issue measured with the old cut (0.77)
