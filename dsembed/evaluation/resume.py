"""Finished tasks are never recomputed: one result file per task, written as soon as it is scored.

An evaluation writing `--output results/model5.json` keeps its finished tasks in
`results/model5.tasks/<Task>.json`. Each file holds the task's entry of the results JSON, mteb's own
TaskResult (to write mteb's layout again later) and the fingerprint it was made under:
- the model: the SHA-256 of every file of the model folder except those evaluation writes (README.md,
  eval_results.json), so re-exported identical weights match and different weights never do (the
  hashes are kept in `model.json` beside the task files, keyed by size and mtime, so an unchanged
  7B folder is not hashed again); for `--base RECIPE`, the recipe's fingerprint (its model-relevant
  keys with the seed, which fixes an untrained head, and the input model's identity);
- the task: name, where it comes from (mteb dataset path and revision, or a local folder's file
  hashes), the item limit and sampling seed, the query instruction, mteb's version.
Batch size and rank count are not in it: they do not change a score (beyond float noise), so a run
killed on 8 GPUs can finish on 4. A file is written to a temporary name and renamed, so a kill
leaves either the whole result or none: a kill in the middle of a task loses only that task.
"""
from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import mteb
from mteb.abstasks import AbsTask

from dsembed.atomic import write_text_atomic
from dsembed.errors import UserError

# Files `dsembed-evaluate MODEL_DIR` itself writes into the model folder (the model card).
_WRITTEN_BY_EVALUATION = {"README.md", "eval_results.json"}
RECORD_FORMAT = "dsembed-task/1"


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for block in iter(lambda: handle.read(1 << 24), b""):
            digest.update(block)
    return digest.hexdigest()


def folder_fingerprint(folder: Path, known: dict[str, list] | None = None,
                       skip: frozenset[str] | set[str] = frozenset()) -> tuple[str, dict[str, list]]:
    """SHA-256 over a folder's files (relative name and content hash).

    Args:
        folder: the folder.
        known: {relative name: [size, mtime_ns, sha256]} from an earlier call; a file whose size and
            modification time are unchanged is not read again.
        skip: relative names left out (a file, or a folder and everything in it).

    Returns:
        (hex digest, the updated `known` table).
    """
    table: dict[str, list] = {}
    digest = hashlib.sha256()
    for file in sorted(p for p in folder.rglob("*") if p.is_file()):
        name = file.relative_to(folder).as_posix()
        if file.name.startswith(".") or any(name == s or name.startswith(s + "/") for s in skip):
            continue
        stat = file.stat()
        old = (known or {}).get(name)
        sha = old[2] if old and old[:2] == [stat.st_size, stat.st_mtime_ns] else _sha256(file)
        table[name] = [stat.st_size, stat.st_mtime_ns, sha]
        digest.update(f"{name}\0{sha}\n".encode())
    return digest.hexdigest(), table


def task_source(task: AbsTask) -> dict[str, Any]:
    """Where a task's data comes from: a local folder's file hashes, or mteb's dataset path and revision."""
    task_dir = getattr(task, "task_dir", None)
    if task_dir is not None:
        return {"local": str(Path(task_dir).resolve()), "files": folder_fingerprint(Path(task_dir))[0]}
    dataset = task.metadata.dataset or {}
    return {"dataset": dataset.get("path"), "revision": dataset.get("revision")}


class TaskStore:
    """The finished tasks of one evaluation of one model, in `<output>.tasks/`.

    Args:
        folder: the store folder (created on the first write).
        model: the model's fingerprint (`model_fingerprint` or a recipe's); tasks recorded for
            another model are never returned.
    """

    def __init__(self, folder: Path, model: str, model_files: dict[str, Any] | None = None) -> None:
        self.folder = Path(folder)
        self.model = model
        self._model_files = model_files  # written to model.json with the first result

    @staticmethod
    def for_output(output: Path) -> Path:
        """The store folder of results file `output`: results/model5.json -> results/model5.tasks."""
        return output.with_name(f"{output.stem}.tasks")

    def key(self, task: AbsTask, *, limit: int | None, seed: int, instruction: str | None) -> dict[str, Any]:
        """Everything a task's scores depend on besides the batch layout."""
        return {"format": RECORD_FORMAT, "model": self.model, "task": task.metadata.name,
                "source": task_source(task), "limit": limit, "seed": seed, "instruction": instruction,
                "mteb": mteb.__version__}

    def path(self, name: str) -> Path:
        return self.folder / f"{name}.json"

    def finished(self, name: str, key: dict[str, Any]) -> dict[str, Any] | None:
        """The record of task `name` made under `key`, or None (not finished, or made under another key)."""
        path = self.path(name)
        if not path.is_file():
            return None
        try:
            record = json.loads(path.read_text(encoding="utf-8"))
        except (json.JSONDecodeError, UnicodeDecodeError):
            return None  # cannot happen through write_atomic; a hand-edited file is recomputed
        return record if record.get("key") == key else None

    def save(self, name: str, key: dict[str, Any], entry: dict[str, Any], task_result: dict[str, Any],
             layer_weights: dict[str, list] | None) -> Path:
        """Record a scored task (atomically)."""
        if self._model_files is not None:
            write_text_atomic(self.folder / "model.json", json.dumps(self._model_files))
            self._model_files = None
        path = self.path(name)
        write_text_atomic(path, json.dumps({"key": key, "entry": entry, "mteb_task_result": task_result,
                                            "layer_weights": layer_weights}))
        return path


def model_fingerprint(model_dir: Path, store_folder: Path, output: Path) -> tuple[str, dict[str, Any] | None]:
    """The weights' fingerprint of an exported model folder, and the file table to cache.

    The file hashes are read from the store folder's model.json when size and mtime still match;
    the returned table (None when unchanged) is for `TaskStore(..., model_files=...)`, which writes
    it with the first result, so a run refused later leaves nothing behind. The results file and
    the store folder are left out when they lie inside the model folder.
    """
    skip = set(_WRITTEN_BY_EVALUATION)
    for written in (output, store_folder):
        try:
            skip.add(written.resolve().relative_to(model_dir.resolve()).as_posix())
        except ValueError:
            pass  # not inside the model folder
    table_path = store_folder / "model.json"
    known = None
    if table_path.is_file():
        try:
            known = json.loads(table_path.read_text(encoding="utf-8")).get("files")
        except (json.JSONDecodeError, UnicodeDecodeError):
            known = None
    digest, table = folder_fingerprint(model_dir, known, skip)
    changed = {"folder": str(model_dir.resolve()), "files": table} if table != known else None
    return f"sha256:{digest}", changed


def check_results_dir(results_dir: Path | None) -> None:
    """UserError when --results-dir names something that is not a folder."""
    if results_dir is not None and results_dir.exists() and not results_dir.is_dir():
        raise UserError(f"--results-dir {results_dir} is a file; give a folder for mteb's results layout")


def mteb_result_path(results_dir: Path, task_name: str, encoder: Any) -> Path:
    """Where mteb's layout keeps `task_name`'s result for this encoder's model name and revision."""
    from mteb.cache import ResultCache

    return ResultCache(results_dir).get_task_result_path(task_name, encoder.mteb_model_meta)


def save_mteb_result(results_dir: Path, task_result: dict[str, Any], encoder: Any,
                     batch_size: int) -> Path:
    """Write one task's result in mteb's layout: results/<model>/<revision>/<Task>.json + model_meta.json.

    mteb's own ResultCache writes it, so mteb's loaders (`TaskResult.from_disk`,
    `ResultCache(results_dir).load_results(...)`) read it back.
    """
    from mteb.cache import ResultCache

    result = mteb.TaskResult.from_dict(task_result)
    cache = ResultCache(results_dir)
    cache.save_to_cache(result, encoder.mteb_model_meta, encode_kwargs={"batch_size": batch_size})
    return cache.get_task_result_path(result.task_name, encoder.mteb_model_meta)
