"""What a model without information scores on a task at the limit it is run with.

A cut task can leave nothing to measure: 192 texts of CLINC150 (110 of 150 intents present) give
random 64-dimensional vectors a V-measure of 0.77. Every task's results therefore carry the score of
a no-information model, computed on the loaded and limited task without encoding anything:
- sts: 0 (scores independent of the gold score have an expected Spearman of 0).
- retrieval: the expected NDCG@10 of a uniformly random ranking of each query's candidates (the
  corpus after the limit, or the query's `top_ranked` list), mean over queries, computed exactly:
  every candidate is equally likely at every rank, so E[DCG@10] = (sum of the query's gains) / N *
  sum_{r=1..min(10, N)} 1 / log2(r + 1), over the ideal DCG@10 (pytrec_eval's linear gains, the
  ones mteb scores with).
- classification: the majority-class share of the test subset (the accuracy of always answering
  the most frequent label); beside it, `random_embeddings`: mteb's own classifier setup (its
  undersampling to `samples_per_label` per label, its `n_experiments`, a clone of its logistic
  regression with its seed) fit and scored on random Gaussian vectors.
- clustering (mteb's legacy clustering): mteb's MiniBatchKMeans (k = labels present in the set,
  its batch size and seed) on random Gaussian vectors of RANDOM_DIM dimensions, V-measure averaged
  over sets as mteb does (a one-label set scores 1.0) and over CLUSTERING_DRAWS seeded draws.
Subsets (languages) are averaged like mteb's main score. Every draw is seeded (CHANCE_SEED).

`chance_plan(tasks)` adds the tasks that carry no information by construction (before anything is
trained), with the reasons; see `construction_problems` for the rules.
"""
from __future__ import annotations

import inspect
import math
import warnings
from collections import Counter
from typing import Any

import numpy as np
from mteb.abstasks import AbsTask, AbsTaskClassification, AbsTaskClusteringLegacy

from dsembed.evaluation.presets import CATEGORY_OF_TYPE
from dsembed.evaluation.tasks import task_containers

CHANCE_SEED = 0
RANDOM_DIM = 64  # the dimension the development data's random-embedding levels were measured at
CLUSTERING_DRAWS = 5
# Construction rules (chance_plan): beyond these a task cannot tell models apart at its limit.
MAX_RANDOM_V_MEASURE = 0.1
MAX_MAJORITY_SHARE = 0.9
MIN_TRAIN_PER_LABEL = 2.0  # mteb trains on up to 8 texts per label
MIN_ITEMS = 5  # test pairs / queries / texts: fewer leave no bootstrap interval worth reading


def _kmeans_settings() -> dict[str, int]:
    """mteb's legacy clustering k-means settings, read from its evaluator so they follow mteb."""
    from mteb._evaluators import ClusteringEvaluator
    from mteb._evaluators.evaluator import Evaluator

    batch = inspect.signature(ClusteringEvaluator.__init__).parameters["clustering_batch_size"].default
    seed = inspect.signature(Evaluator.__init__).parameters["seed"].default
    return {"batch_size": int(batch), "random_state": int(seed)}


def expected_random_ndcg_at_10(gains: list[float], n_candidates: int) -> float:
    """Exact expected NDCG@10 of a uniformly random ranking of `n_candidates` documents.

    Args:
        gains: the relevance of the query's judged documents (all among the candidates; gains <= 0
            count as 0, as in trec_eval).
        n_candidates: documents ranked for the query.

    Returns:
        E[DCG@10] / IDCG@10; 0.0 when no gain is positive or there is no candidate.
    """
    positive = sorted((g for g in gains if g > 0), reverse=True)
    if not positive or n_candidates < 1:
        return 0.0
    discount = 1.0 / np.log2(np.arange(2, 12))  # ranks 1..10
    ideal = float(np.sum(np.asarray(positive[:10]) * discount[:len(positive[:10])]))
    expected = sum(positive) / n_candidates * float(np.sum(discount[:min(10, n_candidates)]))
    return expected / ideal


def _retrieval(part: dict[str, Any]) -> dict[str, Any]:
    relevant = {q: d for q, d in part["relevant_docs"].items() if d}
    queries = [q for q in part["queries"]["id"] if q in relevant]
    top_ranked = part.get("top_ranked") or {}
    n_corpus = len(part["corpus"]) if part.get("corpus") is not None else 0
    scores, sizes = [], []
    for q in queries:
        n = len(top_ranked[q]) if q in top_ranked else n_corpus
        sizes.append(n)
        scores.append(expected_random_ndcg_at_10([float(g) for g in relevant[q].values()], n))
    return {"score": float(np.mean(scores)) if scores else 0.0, "n_items": len(queries),
            "candidates": float(np.mean(sizes)) if sizes else 0.0}


class _LabelColumn:
    """What mteb's `_undersample_data` reads of a training split (its labels, `select`), as a list."""

    def __init__(self, column: str, labels: list[Any]) -> None:
        self.column, self.labels = column, labels

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, column: str) -> list[Any]:
        return self.labels

    def select(self, indices: list[int]) -> None:
        return None  # the sampled split itself is not needed, only its indices


def _classification(task: AbsTaskClassification, box: Any, split: str, rng: np.random.Generator) -> dict[str, Any]:
    from sklearn.base import clone

    train, test = box[task.train_split], box[split]
    # [:]: one list instead of a lazy column (datasets >= 4) read row by row
    y_train = np.asarray(train[task.label_column_name][:])
    y_test = np.asarray(test[task.label_column_name][:])
    labels_only = _LabelColumn(task.label_column_name, y_train.tolist())
    counts = Counter(y_test.tolist())
    majority = max(counts.values()) / len(y_test) if len(y_test) else 0.0
    x_test = rng.standard_normal((len(y_test), RANDOM_DIM))
    x_train = rng.standard_normal((len(y_train), RANDOM_DIM))
    accuracies, idxs, used = [], None, 0
    model = clone(task.evaluator_model)
    if "random_state" in model.get_params():
        model.set_params(random_state=task.seed)  # as AbsTaskClassification.evaluate does
    for i in range(task.n_experiments):
        _, idxs, chosen = task._undersample_data(labels_only, i, idxs)  # mteb's own sampler, its seed
        used = used or len(chosen)
        if len(set(y_train[chosen].tolist())) < 2:
            accuracies.append(float(np.mean(y_test == y_train[chosen][0])) if chosen else 0.0)
            continue
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", module=r"sklearn\.")  # convergence on noise
            accuracies.append(float(np.mean(model.fit(x_train[chosen], y_train[chosen]).predict(x_test) == y_test)))
    return {"score": float(majority), "random_embeddings": float(np.mean(accuracies)), "n_items": len(y_test),
            "n_labels": len(counts), "train_per_label": used / max(len(counts), 1)}


def random_v_measure(labels: list[Any], seed: int, dim: int = RANDOM_DIM) -> float:
    """V-measure of mteb's k-means (k = labels present) on one draw of random Gaussian vectors."""
    from sklearn.cluster import MiniBatchKMeans
    from sklearn.metrics import v_measure_score

    k = len(set(labels))
    if k < 2:
        return 1.0  # mteb scores a one-label set 1.0 without clustering
    x = np.random.default_rng(seed).standard_normal((len(labels), dim), dtype=np.float32)
    settings = _kmeans_settings()
    assignment = MiniBatchKMeans(n_clusters=k, batch_size=settings["batch_size"], n_init="auto",
                                 compute_labels=True, random_state=settings["random_state"]).fit(x).labels_
    return float(v_measure_score(labels, assignment))


def random_v_measure_of_sets(sets: list[list[Any]], seed: int = CHANCE_SEED,
                             draws: int = CLUSTERING_DRAWS) -> list[float]:
    """Per draw, the mean over cluster sets of `random_v_measure` (mteb's main score on random vectors)."""
    return [float(np.mean([random_v_measure(labels, seed + 1000 * s + d) for s, labels in enumerate(sets)]))
            for d in range(draws)]


def _clustering(task: AbsTaskClusteringLegacy, part: Any, seed: int) -> dict[str, Any]:
    sets = [list(map(str, labels)) for labels in part[task.label_column_name]]
    draws = random_v_measure_of_sets(sets, seed)
    return {"score": float(np.mean(draws)), "draws": draws, "n_items": sum(map(len, sets)),
            "n_labels": max((len(set(labels)) for labels in sets), default=0)}  # the most of any set


_METHOD = {
    "sts": "0: scores independent of the gold have an expected Spearman of 0",
    "retrieval": "exact expected NDCG@10 of a random ranking of each query's candidates, mean over queries",
    "classification": "majority-class share of the test subset; random_embeddings: mteb's logistic "
                      f"regression setup on random {RANDOM_DIM}-dim Gaussian vectors",
    "clustering": f"mean V-measure of mteb's k-means (k = labels present) on random {RANDOM_DIM}-dim "
                  f"Gaussian vectors over {CLUSTERING_DRAWS} draws",
}


def chance_level(task: AbsTask, seed: int = CHANCE_SEED) -> dict[str, Any] | None:
    """The score of a no-information model on a loaded (and limited) task.

    Args:
        task: an mteb task whose data is loaded (`run.prepare_tasks`), cut as it is evaluated.
        seed: seed of the random vectors.

    Returns:
        {"score", "method", "subsets": {subset: score}, "n_items", ...}: classification adds
        "random_embeddings", "n_labels", "train_per_label"; clustering "draws", "n_labels";
        retrieval "candidates" (mean per query); numbers are means over subsets. None for task
        kinds it does not cover (mteb's "fast" clustering).
    """
    category = CATEGORY_OF_TYPE.get(task.metadata.type)
    split = task.metadata.eval_splits[0]
    if category == "clustering" and not isinstance(task, AbsTaskClusteringLegacy):
        return None
    rng = np.random.default_rng(seed)
    per_subset: dict[str, dict[str, Any]] = {}
    for subset, box in task_containers(task).items():
        if category == "sts":
            pairs = box[split]
            gold = set(pairs["score"][:]) if "score" in pairs.column_names else None
            per_subset[subset] = {"score": 0.0, "n_items": len(pairs), "gold_values": None if gold is None else len(gold)}
        elif category == "retrieval":
            per_subset[subset] = _retrieval(box[split])
        elif category == "classification":
            per_subset[subset] = _classification(task, box, split, rng)
        elif category == "clustering":
            per_subset[subset] = _clustering(task, box[split], seed)
    if not per_subset:
        return None
    record: dict[str, Any] = {"score": float(np.mean([r["score"] for r in per_subset.values()])),
                              "method": _METHOD[category],
                              "subsets": {s: r["score"] for s, r in per_subset.items()}}
    for key in next(iter(per_subset.values())):
        if key == "draws":
            record[key] = np.mean([r[key] for r in per_subset.values()], axis=0).tolist()
        elif key not in ("score", "gold_values"):
            record[key] = float(np.mean([r[key] for r in per_subset.values()]))
    if category == "sts":
        record["gold_values"] = min((r["gold_values"] for r in per_subset.values()
                                     if r["gold_values"] is not None), default=None)
    for key in ("n_items", "n_labels"):
        if key in record:
            record[key] = int(record[key])
    return record


_CACHE_ATTR = "_dsembed_chance"  # on the task instance; run.prepare_tasks and tasks.limit_task drop it


def cached_chance_level(task: AbsTask) -> dict[str, Any] | None:
    """`chance_level(task)`, computed once per loaded task (the layer probe scores a task per layer)."""
    if _CACHE_ATTR not in task.__dict__:
        task.__dict__[_CACHE_ATTR] = chance_level(task)
    return task.__dict__[_CACHE_ATTR]


def chance_levels(chance: dict[str, Any] | None) -> list[float]:
    """Every no-information level of a chance record (classification: majority and random embeddings)."""
    if not chance:
        return []
    return [chance["score"]] + ([chance["random_embeddings"]] if "random_embeddings" in chance else [])


def construction_problems(category: str, chance: dict[str, Any] | None) -> list[str]:
    """Why a task at its limit carries no information before any model is scored ([] when none).

    Rules: fewer than MIN_ITEMS test items (pairs, queries, texts); STS with one gold value;
    classification with one test label, a majority share of at least MAX_MAJORITY_SHARE, or fewer
    than MIN_TRAIN_PER_LABEL training texts per label; clustering with one label or a
    random-embedding V-measure of at least MAX_RANDOM_V_MEASURE.

    Args:
        category: the task's study category.
        chance: its `chance_level` record (None: nothing to judge).

    Returns:
        One reason per rule the task breaks.
    """
    if chance is None:
        return []
    out = []
    n = chance.get("n_items")
    if n is not None and n < MIN_ITEMS:
        what = {"sts": "pairs", "retrieval": "queries"}.get(category, "test texts")
        out.append(f"only {n} {what} (fewer than {MIN_ITEMS})")
    if category == "sts" and chance.get("gold_values") == 1:
        out.append("every pair has the same gold score")
    if category == "classification":
        if chance.get("n_labels", 2) < 2:
            out.append("the test subset holds one label")
        elif chance["score"] >= MAX_MAJORITY_SHARE:
            out.append(f"the majority class is {chance['score']:.2f} of the test subset "
                       f"(>= {MAX_MAJORITY_SHARE})")
        if chance.get("train_per_label", math.inf) < MIN_TRAIN_PER_LABEL:
            out.append(f"{chance['train_per_label']:.1f} training texts per label "
                       f"(fewer than {MIN_TRAIN_PER_LABEL:g}; mteb trains on up to 8)")
    if category == "clustering":
        if chance.get("n_labels", 2) < 2:
            out.append("every cluster set holds one label")
        elif chance["score"] >= MAX_RANDOM_V_MEASURE:
            out.append(f"random embeddings reach V-measure {chance['score']:.2f} "
                       f"(>= {MAX_RANDOM_V_MEASURE})")
    return out


def chance_plan(tasks: list[AbsTask], seed: int = CHANCE_SEED) -> dict[str, dict[str, Any]]:
    """Each loaded, limited task's chance level and its construction problems, for a study's plan.

    Args:
        tasks: mteb tasks after `run.prepare_tasks(tasks, limit, task_limits=...)`.
        seed: seed of the random vectors.

    Returns:
        {task name: {"category", "chance": record | None, "problems": [reason, ...]}}, in task
        order; a task with problems carries no information at this limit.
    """
    plan = {}
    for task in tasks:
        category = CATEGORY_OF_TYPE.get(task.metadata.type, "")
        chance = chance_level(task, seed)
        plan[task.metadata.name] = {"category": category, "chance": chance,
                                    "problems": construction_problems(category, chance)}
    return plan


def format_chance_plan(plan: dict[str, dict[str, Any]]) -> str:
    """The plan as lines to print: one per task (chance x100; rnd-clf: for classification, mteb's
    classifier on random embeddings x100; the problems), then the tasks that carry no information."""
    lines = [f"{'task':<32} {'category':<15} {'chance':>7} {'rnd-clf':>7}  carries no information because"]
    for name, entry in plan.items():
        chance = entry["chance"] or {}
        level = f"{100 * chance['score']:.2f}" if chance else "-"
        classifier = f"{100 * chance['random_embeddings']:.2f}" if "random_embeddings" in chance else ""
        lines.append(f"{name:<32} {entry['category']:<15} {level:>7} {classifier:>7}  "
                     f"{'; '.join(entry['problems']) or '-'}")
    empty = [name for name, entry in plan.items() if entry["problems"]]
    lines.append(f"carry no information at these limits: {', '.join(empty)}" if empty
                 else "every task can carry information at these limits")
    return "\n".join(lines)
