"""Run mteb on dsembed models and keep, next to every main score, the per-item numbers.

mteb computes each score; small hooks on the task instance copy out what it computed on the way:
- sts: per-pair cosine and normalised gold score (`_calculate_scores`);
- retrieval: per-query NDCG@10 from mteb's own pytrec_eval run (`task_specific_scores`, mteb's
  documented per-task hook, receives the per-query scores);
- classification: per-test-item predictions of each of mteb's logistic-regression experiments
  (`_run_experiment`), stored as the fraction of experiments that got the item right, whose mean is
  exactly mteb's accuracy (mean over experiments);
- clustering (legacy, one k-means per set): each set's labels and assigned clusters
  (`_compute_metrics`; sets with one label, which mteb scores 1.0 without clustering, are added).
Each task's main score is recomputed from the items and compared with mteb's, so a change in mteb's
internals shows up as a warning instead of silently wrong intervals. Beside it each task keeps the
score of a no-information model at the limit it was run with (`chance`, see evaluation.chance), also
written into mteb's TaskResult as the extra field `dsembed_chance` of every subset's scores.

Results JSON (format "dsembed-eval/1"):
  {"format", "model": {"name", "path"|"recipe", "pooling", "attention", "train_seed", "fingerprint",
             "dtype" (what the backbone computed in), "trained_dtype" (exported models),
             "training" (the run's learning-curve summary, dsembed.training.run_summary; exported
             models that carry one)}, "mteb_version",
   "created", "settings": {"batch_size", "limit", "task_limits", "instructions", "ranks", "truncate_dim"},
   "encoding": {"texts", "embedded", "reused", "texts_per_rank", "finished_earlier": [TASK]},
   "layer_weights": {"layers": [int], "norms": [float]} | null,
   "tasks": {NAME: {"category", "type", "main_metric", "main_score", "items_score", "split",
                    "instruction", "source", "scores": {subset: {metric: value}},
                    "items": {subset: ITEMS} | null, "encoding": {"texts", "embedded"},
                    "chance": CHANCE | null}},
   "categories": {CATEGORY: {"mean", "n_tasks", "tasks"}}}
  ITEMS: sts {"cosine", "gold"}; retrieval {"query_ids", "ndcg_at_10"};
         classification {"gold", "correct"}; clustering {"sets": [{"labels", "clusters"}]}.
  CHANCE: the score of a no-information model at the task's limit (dsembed.evaluation.chance):
         {"score", "method", "subsets": {subset: score}, "n_items"}; classification adds
         "random_embeddings" (mteb's classifier on random vectors), "n_labels", "train_per_label";
         clustering "draws", "n_labels"; retrieval "candidates"; STS "gold_values"; in mteb's files
         "dsembed_chance" in each subset's scores.
"""
from __future__ import annotations

import datetime
import logging
import math
import warnings
from typing import Any, Callable

import mteb
import numpy as np
from mteb.abstasks import AbsTask, AbsTaskClusteringLegacy

from dsembed.errors import UserError
from dsembed.evaluation.chance import cached_chance_level
from dsembed.evaluation.encoder import MtebEncoder, TextEncoder
from dsembed.evaluation.presets import CATEGORY_OF_TYPE, MAIN_METRIC, PRESETS, default_instruction
from dsembed.evaluation.statistics import item_score
from dsembed.evaluation.tasks import limit_task, number_binary_test_labels

logger = logging.getLogger(__name__)
RESULTS_FORMAT = "dsembed-eval/1"
LIMIT_SEED = 42  # the seed of --limit's random subsets (part of a finished task's fingerprint)


def category_of(task: AbsTask) -> str:
    """The study category of an mteb task; UserError for types the study does not use."""
    category = CATEGORY_OF_TYPE.get(task.metadata.type)
    if category is None:
        raise UserError(f"task {task.metadata.name} is of type {task.metadata.type}; dsembed evaluates "
                        "STS, Retrieval, Classification and Clustering tasks")
    return category


def named_tasks(names: list[str]) -> list[AbsTask]:
    """mteb task objects for preset names (paper-sts, ..., paper-all) and task names."""
    expanded: list[str] = []
    for name in names:
        for task in PRESETS.get(name, [name]):
            if task not in expanded:
                expanded.append(task)
    try:
        tasks = list(mteb.get_tasks(tasks=expanded, languages=["eng"]))
    except KeyError as err:
        detail = str(err.args[0] if err.args else err).removeprefix("KeyError: ")
        raise UserError(f"unknown task ({detail}); use a preset ({', '.join(PRESETS)}), an mteb task "
                        "name, or --tasks-dir for local tasks") from None
    found = {t.metadata.name for t in tasks}
    missing = [n for n in expanded if n not in found]
    if missing:
        raise UserError(f"unknown mteb task(s) {missing}; presets: {', '.join(PRESETS)}")
    for task in tasks:
        category_of(task)
    return sorted(tasks, key=lambda t: expanded.index(t.metadata.name))


def _hub_errors() -> tuple[type[BaseException], ...]:
    from huggingface_hub.errors import LocalEntryNotFoundError, OfflineModeIsEnabled

    return (ConnectionError, LocalEntryNotFoundError, OfflineModeIsEnabled)


def parse_task_limits(pairs: list[str], tasks: list[AbsTask]) -> dict[str, int]:
    """`--task-limit TASK=N` arguments -> {task: N}.

    Raises:
        UserError: a malformed pair, N below 2, or a task that is not among `tasks`.
    """
    names = {t.metadata.name for t in tasks}
    out = {}
    for pair in pairs:
        task, _, text = pair.partition("=")
        if not task or not text.isdigit() or int(text) < 2:
            raise UserError(f"--task-limit {pair!r}: expected TASK=N with N at least 2")
        if task not in names:
            raise UserError(f"--task-limit {pair!r}: no task {task!r} among those evaluated ({', '.join(sorted(names))})")
        out[task] = int(text)
    return out


def prepare_tasks(tasks: list[AbsTask], limit: int | None = None, seed: int = LIMIT_SEED,
                  task_limits: dict[str, int] | None = None) -> None:
    """Load every task's data (before any model is loaded) and apply --limit.

    `task_limits` (task name -> N) overrides `limit` for the tasks it names: retrieval tasks embed
    10 x N documents besides the relevant ones, so they usually need a smaller N than STS.

    Raises:
        UserError: a named task's data cannot be downloaded (hub unreachable), or a local file is bad.
    """
    for task in tasks:
        task.__dict__.pop("_dsembed_chance", None)  # chance.cached_chance_level of earlier data
        try:
            task.load_data()
        except _hub_errors() as err:
            first = str(err).splitlines()[0] if str(err) else type(err).__name__
            raise UserError(f"the Hugging Face hub is unreachable (loading task {task.metadata.name}: "
                            f"{first}); evaluate local tasks with --tasks-dir ROOT instead") from None
        task_limit = (task_limits or {}).get(task.metadata.name, limit)
        if task_limit is not None:
            limit_task(task, task_limit, seed)
        number_binary_test_labels(task)  # after the limit: the kept sample decides whether AP applies


def resolve_instructions(tasks: list[AbsTask], overrides: dict[str, str] | None = None) -> dict[str, str]:
    """Task name -> query instruction (E5 defaults, the task's own, then `overrides`; "" = none)."""
    names = {t.metadata.name for t in tasks}
    unknown = sorted(set(overrides or {}) - names)
    if unknown:
        raise UserError(f"--instruction names task(s) {unknown} that are not evaluated; tasks: {sorted(names)}")
    chosen = {t.metadata.name: default_instruction(t.metadata.name, category_of(t),
                                                   getattr(t, "own_instruction", None))
              for t in tasks}
    chosen.update(overrides or {})
    return {name: text for name, text in chosen.items() if text}


def _wrap(task: AbsTask, attr: str, after: Callable[..., None]) -> None:
    """Replace a bound method on this instance only; `after(result, *args, **kwargs)` observes."""
    original = getattr(task, attr)

    def hooked(*args: Any, **kwargs: Any) -> Any:
        result = original(*args, **kwargs)
        after(result, *args, **kwargs)
        return result

    setattr(task, attr, hooked)


def _install_capture(task: AbsTask, category: str, store: dict[str, dict]) -> None:
    """Hooks that copy mteb's per-item numbers into store[subset]."""
    if category == "clustering" and not isinstance(task, AbsTaskClusteringLegacy):
        return  # "fast" clustering scores internal resamples: no per-item record, no bootstrap
    state: dict[str, Any] = {"subset": "default"}
    original_subset = task._evaluate_subset

    def evaluate_subset(model, data_split, *args, **kwargs):
        state["subset"] = kwargs.get("hf_subset", "default")
        store[state["subset"]] = {"sets": []} if category == "clustering" else {}
        result = original_subset(model, data_split, *args, **kwargs)
        if category == "clustering" and isinstance(task, AbsTaskClusteringLegacy):
            sets, recorded = [], iter(store[state["subset"]]["sets"])
            for row in data_split:  # mteb skips sets with a single label (V-measure 1.0)
                labels = [str(x) for x in row[task.label_column_name]]
                sets.append(next(recorded) if len(set(labels)) > 1
                            else {"labels": labels, "clusters": [0] * len(labels)})
            store[state["subset"]]["sets"] = sets
        return result

    task._evaluate_subset = evaluate_subset

    if category == "sts":
        def sts(result, scores, normalized, *a, **k):
            store[state["subset"]].update(cosine=[float(x) for x in scores["cosine_scores"]],
                                          gold=[float(x) for x in normalized])
        _wrap(task, "_calculate_scores", sts)
    elif category == "retrieval":
        def retrieval(result, scores, *a, **k):
            ids = sorted(scores)
            store[k.get("hf_subset", state["subset"])].update(
                query_ids=ids, ndcg_at_10=[float(scores[q]["ndcg_cut_10"]) for q in ids])
        _wrap(task, "task_specific_scores", retrieval)
    elif category == "classification":
        def classification(result, train_split, eval_split, *a, **k):
            gold = np.asarray(eval_split[task.label_column_name])
            record = store[state["subset"]]
            record.setdefault("predictions", []).append(result[1])
            record["gold"] = [str(x) for x in gold.tolist()]
            hits = [np.asarray(p) == gold for p in record["predictions"]]
            record["correct"] = np.mean(hits, axis=0).tolist()
        _wrap(task, "_run_experiment", classification)
    else:
        def clustering(result, labels, assignment, *a, **k):
            store[state["subset"]]["sets"].append({"labels": [str(x) for x in labels],
                                                   "clusters": [int(x) for x in assignment]})
        _wrap(task, "_compute_metrics", clustering)


_CAPTURED = ("_evaluate_subset", "_calculate_scores", "task_specific_scores", "_run_experiment", "_compute_metrics")


def _remove_capture(task: AbsTask) -> None:
    """Undo `_install_capture`: its hooks are instance attributes shadowing the class methods."""
    for attr in _CAPTURED:
        task.__dict__.pop(attr, None)


def _main_score(task_result, task: AbsTask) -> tuple[float, dict[str, Any]]:
    split = task.metadata.eval_splits[0]
    per_subset = task_result.scores[split]
    main = float(np.mean([s["main_score"] for s in per_subset]))
    return main, {s["hf_subset"]: {k: v for k, v in s.items() if isinstance(v, (int, float))}
                  for s in per_subset}


def evaluate_tasks(model: TextEncoder, tasks: list[AbsTask], *, model_name: str = "model",
                   instructions: dict[str, str] | None = None, batch_size: int = 32,
                   show_progress: bool = False, log: Callable[[str], None] = print,
                   cache_bytes: int = 0, revision: str = "local",
                   on_task: Callable[[AbsTask, dict[str, Any], dict[str, Any]], None] | None = None,
                   numbering: Callable[[AbsTask], str] | None = None) -> dict[str, Any]:
    """Evaluate `model` on loaded mteb tasks; the results dict that evaluate writes as JSON.

    Args:
        model: EmbeddingModel, a ranks.ShardedEncoder, or any object with a matching `encode`.
        tasks: mteb tasks, ideally already loaded by `prepare_tasks`.
        model_name: recorded in the results and used as the variant name by compare.
        instructions: task name -> query instruction (see `resolve_instructions`).
        batch_size: encode batch size.
        show_progress: passed to the model's encode.
        log: where per-task progress lines go.
        cache_bytes: memory for embeddings shared between calls and tasks (see encoder.EmbeddingCache).
        revision: the model revision recorded in mteb's TaskResult meta.
        on_task: called as on_task(task, entry, mteb_task_result_dict) as soon as a task is scored
            (dsembed-evaluate writes the task's result file there).
        numbering: the "[k/N]" label of a task in the progress lines (default: its place in `tasks`).

    Returns:
        {"format", "model": {"name"}, "mteb_version", "created", "tasks": {name: {...}},
         "categories": {category: {"mean", "n_tasks", "tasks"}},
         "encoding": {"texts", "embedded", "reused"}} (schema in dsembed/cli/evaluate.py).
    """
    instructions = resolve_instructions(tasks) if instructions is None else instructions
    encoder = MtebEncoder(model, instructions, name=model_name, batch_size=batch_size,
                          show_progress=show_progress, cache_bytes=cache_bytes, revision=revision)
    results: dict[str, Any] = {}
    for number, task in enumerate(tasks, start=1):
        name, category = task.metadata.name, category_of(task)
        label = numbering(task) if numbering else f"{number}/{len(tasks)}"
        log(f"[{label}] {name} ({category})")
        calls_before = len(encoder.calls)
        entry, task_result = evaluate_task(encoder, task, instructions, batch_size)
        calls = encoder.calls[calls_before:]
        entry["encoding"] = {"texts": sum(c["n"] for c in calls), "embedded": sum(c["embedded"] for c in calls)}
        results[name] = entry
        if on_task is not None:
            on_task(task, entry, task_result)
        chance = f", chance {entry['chance']['score']:.4f}" if entry.get("chance") else ""
        log(f"    {MAIN_METRIC[category]} = {entry['main_score']:.4f}{chance} ({entry['encoding']['embedded']} of "
            f"{entry['encoding']['texts']} texts embedded, the rest repeated or reused)")
    return {"format": RESULTS_FORMAT, "model": {"name": model_name}, "mteb_version": mteb.__version__,
            "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "tasks": results, "categories": category_means(results),
            "encoding": {"texts": sum(c["n"] for c in encoder.calls), "embedded": encoder.cache.embedded,
                         "reused": encoder.cache.reused}}


def evaluate_task(encoder: MtebEncoder, task: AbsTask, instructions: dict[str, str],
                  batch_size: int) -> tuple[dict[str, Any], dict[str, Any]]:
    """Score one loaded task through mteb; (its results entry, mteb's TaskResult as a dict)."""
    if not getattr(task, "data_loaded", False):
        # mteb would load (and afterwards drop) the data itself; loaded here, the chance level is
        # computed on the same items mteb scores
        task.load_data()
    name, category = task.metadata.name, category_of(task)
    items: dict[str, dict] = {}
    _install_capture(task, category, items)
    try:
        try:
            with warnings.catch_warnings():
                # sklearn warns about ill-defined precision on tiny or limited test sets; the study
                # reads accuracy only.
                warnings.filterwarnings("ignore", module=r"sklearn\.")
                # cache=None: mteb's default cache would return stale scores for a reused model name;
                # dsembed keeps its own per-task results (evaluation.resume) and writes mteb's layout.
                outcome = mteb.evaluate(encoder, task, cache=None, overwrite_strategy="always",
                                        encode_kwargs={"batch_size": batch_size}, co2_tracker=False,
                                        show_progress_bar=False, raise_error=True)
        finally:
            _remove_capture(task)  # a task evaluated again (the layer probe) is hooked afresh, not twice
        return _scored_entry(task, outcome.task_results[0], items, instructions)
    except UserError:
        raise
    except Exception as err:
        # One line instead of a traceback, whether mteb or the scoring after it (item scores, chance
        # level) failed; tasks scored before this one are already stored (on_task), so the rerun
        # resumes after fixing the cause.
        cause = (str(err).strip().splitlines() or [""])[0][:300]
        raise UserError(f"task {name} ({category}) failed while evaluated: {type(err).__name__}: {cause}; "
                        "tasks scored before it are stored and the same command resumes after them") from err


def _scored_entry(task: AbsTask, task_result: Any, items: dict[str, dict],
                  instructions: dict[str, str]) -> tuple[dict[str, Any], dict[str, Any]]:
    """A task's results entry from mteb's TaskResult and the captured items, plus the TaskResult as a dict."""
    name, category = task.metadata.name, category_of(task)
    main, scores = _main_score(task_result, task)
    for record in items.values():
        record.pop("predictions", None)
    entry = {"category": category, "type": task.metadata.type, "main_metric": MAIN_METRIC[category],
             "main_score": main, "split": task.metadata.eval_splits[0],
             "instruction": instructions.get(name), "source": str(getattr(task, "task_dir", "mteb")),
             "scores": scores, "items": items or None}
    if getattr(task, "label_names", None):
        entry["label_names"] = list(task.label_names)  # label i of the items' "gold" is label_names[i]
    if items and all(items.values()):
        entry["items_score"] = item_score(category, items)
        if not math.isclose(entry["items_score"], main, abs_tol=1e-4):
            logger.warning("%s: score recomputed from items %.5f differs from mteb's %.5f",
                           name, entry["items_score"], main)
    else:
        entry["items"] = None
    dumped = task_result.model_dump(mode="json")  # JSON-safe (dates as text); TaskResult.from_dict reads it
    attach_chance(entry, dumped, cached_chance_level(task))
    return entry, dumped


def attach_chance(entry: dict[str, Any], task_result: dict[str, Any], chance: dict[str, Any] | None) -> None:
    """Put a task's chance record into its results entry and, per subset, into mteb's TaskResult dict.

    mteb's scores are free-form dicts per subset, so `dsembed_chance` (the record without its
    per-subset parts, with the subset's own score) travels through TaskResult.from_dict, mteb's
    ResultCache and TaskResult.from_disk unchanged.
    """
    entry["chance"] = chance
    if chance is None:
        return
    for split_scores in task_result.get("scores", {}).values():
        for scores in split_scores:
            level = chance["subsets"].get(scores.get("hf_subset", "default"), chance["score"])
            scores["dsembed_chance"] = {**{k: v for k, v in chance.items() if k not in ("subsets", "draws")},
                                        "score": level}


def category_means(tasks: dict[str, dict]) -> dict[str, dict[str, Any]]:
    """Per category: mean main score over its tasks, their number and names."""
    out: dict[str, dict[str, Any]] = {}
    for name, entry in tasks.items():
        out.setdefault(entry["category"], {"tasks": []})["tasks"].append(name)
    for category, record in out.items():
        record["mean"] = float(np.mean([tasks[n]["main_score"] for n in record["tasks"]]))
        record["n_tasks"] = len(record["tasks"])
    return out


def layer_weight_info(model: Any) -> dict[str, list] | None:
    """Per-layer L2 norms of a multi-layer head's `layer_weights` [K, D] and the layer indices."""
    pooler = getattr(model, "pooler", None)
    weights = getattr(pooler, "layer_weights", None)
    if weights is None:
        return None
    norms = weights.detach().float().norm(dim=-1).cpu().tolist()  # [K]
    layers = list(getattr(pooler, "tapped_layers", []) or range(1, len(norms) + 1))
    return {"layers": [int(x) for x in layers], "norms": [float(x) for x in norms]}
