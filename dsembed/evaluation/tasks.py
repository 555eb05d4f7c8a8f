"""Local MTEB tasks read from disk, and a size limit that works on any loaded task.

Layout (see ../shared/data/README.md): `<root>/<type>/<Name>/` with `type` one of
- `sts/`: `test.jsonl` lines {"sentence1", "sentence2", "score"};
- `retrieval/`: BEIR files `corpus.jsonl` {"_id", "title", "text"}, `queries.jsonl` {"_id", "text"},
  `qrels/test.tsv` (query-id, corpus-id, score; one header row);
- `classification/`: `train.jsonl` and `test.jsonl` lines {"text", "label"};
- `clustering/`: `test.jsonl`, one line per cluster set {"sentences": [...], "labels": [...]}.
An optional `task.json` may hold {"instruction", "description", "min_score", "max_score"}.

Each task becomes a subclass of mteb's own abstract task, so mteb does the encoding calls and the
scoring exactly as for its named tasks. Clustering uses `AbsTaskClusteringLegacy`: the paper's
clustering tasks are legacy tasks in mteb 2.26 (one k-means per cluster set, V-measure averaged over
sets), and its full-set assignments are what the bootstrap resamples; the "fast" AbsTaskClustering
clusters 10 resamples drawn from an internal random state instead.
"""
from __future__ import annotations

import csv
import json
from pathlib import Path
from typing import Any

import numpy as np
from datasets import Dataset, DatasetDict
from mteb.abstasks import (
    AbsTask,
    AbsTaskClassification,
    AbsTaskClusteringLegacy,
    AbsTaskRetrieval,
    AbsTaskSTS,
)
from mteb.abstasks.task_metadata import TaskMetadata

from dsembed.errors import DataError, UserError
from dsembed.evaluation.clustering_limit import limit_cluster_sets
from dsembed.evaluation.presets import CATEGORIES, MAIN_METRIC

_TYPE_NAME = {"sts": "STS", "retrieval": "Retrieval", "classification": "Classification",
              "clustering": "Clustering"}


def _read_jsonl(path: Path, required: tuple[str, ...]) -> list[dict[str, Any]]:
    """Rows of a JSONL file; DataError "file:line: problem" on bad JSON or a missing key."""
    if not path.is_file():
        raise DataError(f"{path}: file not found (the task layout is described in dsembed/evaluation/tasks.py)")
    rows = []
    with path.open(encoding="utf-8") as handle:
        for number, line in enumerate(handle, start=1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as err:
                raise DataError(f"{path}:{number}: not valid JSON ({err.msg}); fix or remove the line") from None
            missing = [key for key in required if key not in row]
            if missing:
                raise DataError(f"{path}:{number}: missing key(s) {missing}; each line needs {list(required)}")
            rows.append(row)
    if not rows:
        raise DataError(f"{path}: no rows")
    return rows


def _metadata(name: str, category: str, task_dir: Path, extra: dict[str, Any]) -> TaskMetadata:
    return TaskMetadata(
        name=name,
        description=extra.get("description", f"Local {category} task read from {task_dir}"),
        reference=None,
        dataset={"path": str(task_dir), "revision": "local"},
        type=_TYPE_NAME[category],
        category="t2t",
        modalities=["text"],
        eval_splits=["test"],
        eval_langs=["eng-Latn"],
        main_score=MAIN_METRIC[category],
        date=None,
        domains=None,
        task_subtypes=None,
        license=None,
        annotations_creators=None,
        dialect=None,
        sample_creation=None,
        bibtex_citation=None,
    )


class _LocalTask:
    """Mixin: where the files are and what the task's own task.json says."""

    task_dir: Path
    extra: dict[str, Any]

    @property
    def own_instruction(self) -> str | None:
        return self.extra.get("instruction")


class LocalSTSTask(_LocalTask, AbsTaskSTS):
    """STS pairs from `test.jsonl`; mteb scores Spearman of cosine against the gold score."""

    def load_data(self, num_proc: int | None = None, **kwargs: Any) -> None:
        rows = _read_jsonl(self.task_dir / "test.jsonl", ("sentence1", "sentence2", "score"))
        self.dataset = DatasetDict({"test": Dataset.from_dict({
            "sentence1": [str(r["sentence1"]) for r in rows],
            "sentence2": [str(r["sentence2"]) for r in rows],
            "score": [float(r["score"]) for r in rows],
        })})
        self.data_loaded = True


class LocalRetrievalTask(_LocalTask, AbsTaskRetrieval):
    """A BEIR-layout retrieval task; mteb scores NDCG@10 with pytrec_eval."""

    def load_data(self, num_proc: int | None = None, **kwargs: Any) -> None:
        corpus = _read_jsonl(self.task_dir / "corpus.jsonl", ("_id", "text"))
        queries = _read_jsonl(self.task_dir / "queries.jsonl", ("_id", "text"))
        qrels_path = self.task_dir / "qrels" / "test.tsv"
        if not qrels_path.is_file():
            raise DataError(f"{qrels_path}: file not found (BEIR layout: qrels/test.tsv with a header row)")
        query_ids, corpus_ids = {str(r["_id"]) for r in queries}, {str(r["_id"]) for r in corpus}
        relevant: dict[str, dict[str, int]] = {}
        with qrels_path.open(encoding="utf-8") as handle:
            for number, fields in enumerate(csv.reader(handle, delimiter="\t"), start=1):
                if number == 1 or not fields:
                    continue
                if len(fields) < 3:
                    raise DataError(f"{qrels_path}:{number}: expected query-id, corpus-id, score")
                try:
                    score = int(float(fields[2]))
                except ValueError:
                    raise DataError(f"{qrels_path}:{number}: score {fields[2]!r} is not a number") from None
                # An unknown id would be scored as a relevant document never retrieved (or a query
                # never asked): NDCG quietly deflated instead of an error.
                if fields[0] not in query_ids:
                    raise DataError(f"{qrels_path}:{number}: query-id {fields[0]!r} is not in queries.jsonl "
                                    "(fix the id or add the query)")
                if fields[1] not in corpus_ids:
                    raise DataError(f"{qrels_path}:{number}: corpus-id {fields[1]!r} is not in corpus.jsonl "
                                    "(fix the id or add the document)")
                relevant.setdefault(fields[0], {})[fields[1]] = score
        split = {
            "corpus": Dataset.from_dict({
                "id": [str(r["_id"]) for r in corpus],
                "title": [str(r.get("title") or "") for r in corpus],
                "text": [str(r["text"]) for r in corpus],
            }),
            "queries": Dataset.from_dict({"id": [str(r["_id"]) for r in queries],
                                          "text": [str(r["text"]) for r in queries]}),
            "relevant_docs": relevant,
            "top_ranked": None,
        }
        self.dataset = {"default": {"test": split}}
        self.data_loaded = True


class LocalClassificationTask(_LocalTask, AbsTaskClassification):
    """Texts with labels; mteb fits logistic regression on 8 examples per label, 10 times.

    Labels of any JSON type become integers here: mteb scores a two-label task's average precision
    with pos_label=1, which fails on strings (SMSSpam's "ham"/"spam", or "0"/"1"). Integer labels
    keep their values; any other labels are numbered in sorted order of their text (so "spam" is
    the positive class of ham/spam) and `label_names[i]` keeps the name of label i for reports.
    """

    label_names: list[str] | None = None

    def load_data(self, num_proc: int | None = None, **kwargs: Any) -> None:
        rows = {split: _read_jsonl(self.task_dir / f"{split}.jsonl", ("text", "label")) for split in ("train", "test")}
        values = [r["label"] for split_rows in rows.values() for r in split_rows]
        if all(isinstance(v, int) and not isinstance(v, bool) for v in values):
            number, self.label_names = (lambda value: value), None
        else:
            self.label_names = sorted({str(v) for v in values})
            index = {name: i for i, name in enumerate(self.label_names)}
            number = lambda value: index[str(value)]  # noqa: E731
        self.dataset = DatasetDict({split: Dataset.from_dict({"text": [str(r["text"]) for r in split_rows],
                                                               "label": [number(r["label"]) for r in split_rows]})
                                    for split, split_rows in rows.items()})
        self.data_loaded = True


class LocalClusteringTask(_LocalTask, AbsTaskClusteringLegacy):
    """Cluster sets, one per line; mteb runs one k-means per set and averages V-measure."""

    def load_data(self, num_proc: int | None = None, **kwargs: Any) -> None:
        path = self.task_dir / "test.jsonl"
        rows = _read_jsonl(path, ("sentences", "labels"))
        for number, row in enumerate(rows, start=1):
            if len(row["sentences"]) != len(row["labels"]):
                raise DataError(f"{path}: set {number} has {len(row['sentences'])} sentences but "
                                f"{len(row['labels'])} labels; they must pair up")
        self.dataset = DatasetDict({"test": Dataset.from_dict({
            "sentences": [[str(s) for s in r["sentences"]] for r in rows],
            "labels": [[str(label) for label in r["labels"]] for r in rows],
        })})
        self.data_loaded = True


_CLASSES = {"sts": LocalSTSTask, "retrieval": LocalRetrievalTask,
            "classification": LocalClassificationTask, "clustering": LocalClusteringTask}


def local_task(task_dir: str | Path, category: str) -> AbsTask:
    """One local task object for the folder `task_dir` (its name is the folder name).

    Args:
        task_dir: `<root>/<category>/<Name>`.
        category: one of "sts", "retrieval", "classification", "clustering".

    Returns:
        An mteb task instance (data not yet loaded).

    Raises:
        UserError: the folder is missing or task.json is not valid JSON.
    """
    task_dir = Path(task_dir)
    if not task_dir.is_dir():
        raise UserError(f"task directory {task_dir} does not exist; expected <root>/<type>/<Name>")
    extra: dict[str, Any] = {}
    if (task_dir / "task.json").is_file():
        try:
            extra = json.loads((task_dir / "task.json").read_text(encoding="utf-8"))
        except json.JSONDecodeError as err:
            raise DataError(f"{task_dir / 'task.json'}:{err.lineno}: not valid JSON ({err.msg})") from None
    base = _CLASSES[category]
    attrs: dict[str, Any] = {"metadata": _metadata(task_dir.name, category, task_dir, extra)}
    if category == "sts":
        attrs["min_score"] = extra.get("min_score", 0)
        attrs["max_score"] = extra.get("max_score", 5)
    cls = type(f"{base.__name__}_{task_dir.name}", (base,), attrs)
    task = cls()
    task.task_dir, task.extra = task_dir, extra
    return task


def load_local_tasks(root: str | Path, names: list[str] | None = None) -> list[AbsTask]:
    """All local tasks under `root` (or those named), in category then name order.

    Args:
        root: folder holding `sts/`, `retrieval/`, `classification/`, `clustering/` (any subset).
        names: keep only these task names; None keeps all.

    Returns:
        mteb task objects.

    Raises:
        UserError: `root` is missing, holds no task, or a requested name is not there.
    """
    root = Path(root)
    if not root.is_dir():
        raise UserError(f"--tasks-dir {root} does not exist; give a folder with sts/, retrieval/, "
                        "classification/ or clustering/ task folders")
    found = [(cat, d) for cat in CATEGORIES if (root / cat).is_dir()
             for d in sorted((root / cat).iterdir()) if d.is_dir()]
    if not found:
        raise UserError(f"--tasks-dir {root} holds no task folders (<root>/<type>/<Name>, type one of "
                        f"{', '.join(CATEGORIES)})")
    if names:
        unknown = sorted(set(names) - {d.name for _, d in found})
        if unknown:
            raise UserError(f"task(s) {unknown} not found under {root}; available: "
                            f"{', '.join(d.name for _, d in found)}")
        found = [(cat, d) for cat, d in found if d.name in names]
    return [local_task(d, cat) for cat, d in found]


def task_containers(task: AbsTask) -> dict[str, Any]:
    """Subset name -> split container of a loaded task (mteb stores "default" flat for most tasks)."""
    data = task.dataset
    subsets = task.hf_subsets or ["default"]
    if subsets == ["default"] and "default" not in data:
        return {"default": data}
    return {s: data[s] for s in subsets if s in data}


def _pairs_within_text_budget(pairs: Dataset, max_texts: int, rng: np.random.Generator) -> list[int]:
    """Rows of an STS split, in seeded random order, kept while their distinct texts fit `max_texts`."""
    first, second = pairs["sentence1"], pairs["sentence2"]
    texts: set[str] = set()
    keep = []
    for i in rng.permutation(len(pairs)).tolist():
        new = {first[i], second[i]} - texts
        if len(texts) + len(new) <= max_texts:
            texts |= new
            keep.append(i)
    return sorted(keep)


def _pick(n_total: int, n: int, rng: np.random.Generator) -> list[int]:
    return sorted(rng.choice(n_total, size=min(n, n_total), replace=False).tolist())


def number_binary_test_labels(task: AbsTask) -> None:
    """Renumber a classification task whose test labels are two values other than 0 and 1.

    mteb scores average precision whenever a test split holds exactly two labels, with pos_label=1:
    labels {0, 2} or {-1, 0} stop the evaluation, and {1, 2} would score the wrong class as
    positive. That happens for tasks labelled so, and for a multi-class task whose limited test
    sample keeps two labels. Then the test's two labels become 0 and 1 (in their order) and every
    other label 2, 3, ... in sorted order; `label_names` keeps the original label of each number
    for reports. Tasks that need nothing are left untouched (their numbers are the data's own).
    """
    if not isinstance(task, AbsTaskClassification):
        return
    column = task.label_column_name
    for box in task_containers(task).values():
        test_labels = sorted({label for split in task.metadata.eval_splits if split in box
                              for label in box[split][column]})
        if len(test_labels) != 2 or test_labels == [0, 1]:
            continue
        others = sorted({label for split in box for label in box[split][column]} - set(test_labels))
        order = test_labels + others
        number = {label: i for i, label in enumerate(order)}
        for split in list(box.keys()):
            box[split] = box[split].map(lambda row: {column: number[row[column]]})
        names = getattr(task, "label_names", None)
        task.label_names = [names[label] if names else str(label) for label in order]


def limit_task(task: AbsTask, limit: int, seed: int = 42) -> None:
    """Shrink a loaded task in place to about `limit` test items (a seeded random subset).

    STS: pairs in seeded random order, kept while their distinct texts number at most 2*`limit`
    (the cost of STS is the texts embedded, not the pairs scored: a task of 50 documents judged in
    all 1,225 pairs stays whole, one of distinct sentence pairs keeps about `limit`).
    Classification: `limit` test and `limit` training texts. Retrieval: `limit` queries that have
    relevant documents, their relevant documents and up to 10*limit other documents. Legacy
    clustering: `limit` texts in total, labels first, so each kept label keeps enough texts that
    random embeddings stay near V-measure 0 (dsembed.evaluation.clustering_limit); fast clustering
    (a flat item table): `limit` items. Works on mteb's own loaded structures, so named hub tasks can be
    limited too.
    """
    rng = np.random.default_rng(seed)
    task.__dict__.pop("_dsembed_chance", None)  # chance.cached_chance_level of the uncut data
    for box in task_containers(task).values():
        for split in list(box.keys()):
            part = box[split]
            if isinstance(task, AbsTaskRetrieval):
                relevant = {q: d for q, d in part["relevant_docs"].items() if d}
                ids = [q for q in part["queries"]["id"] if q in relevant]
                keep = {ids[i] for i in _pick(len(ids), limit, rng)}
                queries = part["queries"].filter(lambda row: row["id"] in keep)
                needed = {doc for q in keep for doc in relevant[q]}
                corpus_ids = part["corpus"]["id"]
                others = [i for i, doc in enumerate(corpus_ids) if doc not in needed]
                extra = {others[i] for i in _pick(len(others), 10 * limit, rng)}
                rows = [i for i, doc in enumerate(corpus_ids) if doc in needed or i in extra]
                box[split] = {**part, "queries": queries, "corpus": part["corpus"].select(rows),
                              "relevant_docs": {q: relevant[q] for q in keep}}
            elif isinstance(task, AbsTaskClusteringLegacy):
                sentences, labels = limit_cluster_sets(part[task.input_column_name], part[task.label_column_name],
                                                       limit, rng)
                box[split] = Dataset.from_dict({task.input_column_name: sentences,
                                                task.label_column_name: labels})
            elif isinstance(task, AbsTaskSTS) and isinstance(part, Dataset):
                box[split] = part.select(_pairs_within_text_budget(part, 2 * limit, rng))
            elif isinstance(part, Dataset):
                box[split] = part.select(_pick(len(part), limit, rng))
