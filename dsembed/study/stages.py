"""Which finished study stages are still current: fingerprints of what each stage was made from.

A study skips a stage whose output exists. That is only right while the stage's inputs are the
same: a recipe edited, an override added, a local input model replaced or the evaluation settings
changed make the old output stale. After each stage the runner records a fingerprint of its inputs
in `<output_dir>/stages.json`; before running anything it compares every finished stage's record
with the fingerprint the study would make now. A stage's fingerprint includes the stage it reads
(evaluate <- export <- train), so a retrained variant makes its export and evaluation stale too.

Fingerprints:
- train: the resolved recipe (overrides applied) without the keys that do not change the model
  (logging.*, train.resume / overwrite / stop_after / output_dir) and the input model: a local
  file or folder by its files' names, sizes and modification times, a `pkg:` model by the installed
  package's version, a hub id by the recipe's `model.revision`;
- export: its variant's train fingerprint and, where a LoRA run keeps its adapter, the export form;
- evaluate: the model's fingerprint (export, or for `base` the recipe's) and the evaluation arguments.
A stage finished before fingerprints were recorded (no entry) is taken as current, and recipe keys
that only one side knows (added or removed by a dsembed upgrade) are not compared.
"""
from __future__ import annotations

import hashlib
import importlib.metadata
import json
import os
import shutil
from pathlib import Path
from typing import Any, Callable

from dsembed.atomic import write_text_atomic
from dsembed.config import Recipe

LEDGER = "stages.json"
# Keys that change how a run is logged or continued, not the model it trains.
_IGNORED = ("logging", "train.resume", "train.overwrite", "train.stop_after", "train.output_dir")


def _flat(data: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(data, dict) and data:
        return {k: v for key, value in data.items() for k, v in _flat(value, f"{prefix}{key}.").items()}
    return {prefix.rstrip("."): data}


def _without(flat: dict[str, Any], sections: tuple[str, ...]) -> dict[str, Any]:
    """`flat` without the dotted keys that are, or lie under, one of `sections`."""
    return {k: v for k, v in flat.items() if not any(k == key or k.startswith(key + ".") for key in sections)}


def recipe_fingerprint(recipe: Recipe) -> dict[str, Any]:
    """The recipe's model-relevant keys (dotted -> value) and its input model's identity.

    With `model.dtype: auto` it also records what auto means here (`model.dtype_resolved`): a CPU
    without bf16 trains and evaluates in float32, another in bf16, and those are different models;
    a study reusing stages across such machines would otherwise mix them. Resolved where the study
    runs (cuda when this machine has it), as the stages it launches resolve it on this machine;
    ledgers from before this key do not know it and are not compared on it (see `changes`)."""
    from dsembed.modeling.precision import AUTO, resolve_dtype

    flat = _without(_flat(recipe.to_dict()), _IGNORED)
    if recipe.model.dtype == AUTO:
        flat["model.dtype_resolved"] = resolve_dtype(AUTO).dtype
    return {"recipe": flat, "model": model_identity(recipe)}


# what only training reads: the untrained base is evaluated the same whatever these say, so a new
# learning rate or data mix does not re-evaluate it (train.seed stays: it seeds a trainable head's init)
_TRAINING_ONLY = ("optim", "loss", "deepspeed", "eval", "data.train", "data.num_negatives", "data.batching",
                  "data.source_weights", "data.skip_malformed", "data.max_rows", "data.seed", "train.max_steps",
                  "train.micro_batch_size", "train.gradient_accumulation_steps", "train.global_batch_size",
                  "train.cache_chunk_size", "train.save_steps", "train.save_total_limit", "train.log_steps")


def base_fingerprint(recipe: Recipe) -> dict[str, Any]:
    """recipe_fingerprint without the keys only training reads (_TRAINING_ONLY): what the untrained
    base's evaluation and layer probe are made from."""
    full = recipe_fingerprint(recipe)
    return {"recipe": _without(full["recipe"], _TRAINING_ONLY), "model": full["model"]}


def export_form(recipe: Recipe, lora_export: str) -> dict[str, Any]:
    """How a study exports a run, as a part of its export and evaluation fingerprints.

    Args:
        recipe: the run's recipe.
        lora_export: the study's `lora_export` (merged | adapter).

    Returns:
        {"export": {"lora": "adapter"}} when a LoRA run keeps its adapter; {} for a merge or a run
        without LoRA, so those fingerprints stay as older ledgers recorded them.
    """
    return {"export": {"lora": "adapter"}} if recipe.lora.enabled and lora_export == "adapter" else {}


def model_identity(recipe: Recipe) -> str | None:
    """What the input model is: a hash of a local model's file list (name, size, mtime), a `pkg:`
    package's version, or None (a random_init model or a hub id: the recipe already names it)."""
    name = recipe.model.name_or_path
    if name is None:
        return None
    if name.startswith("pkg:"):
        package = name[4:]
        try:
            return f"{package}=={importlib.metadata.version(package)}"
        except importlib.metadata.PackageNotFoundError:
            return f"{package} (not installed)"
    path = recipe.resolve_path(name)
    if not path.exists():
        return None
    files = [path] if path.is_file() else sorted(p for p in path.rglob("*") if p.is_file())
    digest = hashlib.sha256()
    for file in files:
        stat = file.stat()
        digest.update(f"{file.relative_to(path) if file != path else file.name}\0{stat.st_size}\0{stat.st_mtime_ns}\n".encode())
    return f"{path.resolve()} sha256:{digest.hexdigest()[:16]}"


def changes(old: dict[str, Any], new: dict[str, Any]) -> list[str]:
    """Human-readable differences between two fingerprints: dotted recipe keys with old -> new
    values, "the input model", or the upstream stage / settings that changed."""
    out: list[str] = []
    for key in sorted(set(old) | set(new)):
        a, b = old.get(key), new.get(key)
        if a == b:
            continue
        if key == "recipe":
            # keys on one side only come from a dsembed version that added or removed them, not
            # from the study: compare the keys both sides know
            a, b = a or {}, b or {}
            out += [f"{k} {a[k]!r} -> {b[k]!r}" for k in sorted(set(a) & set(b)) if a[k] != b[k]]
        elif key == "model":
            out.append("the input model")
        elif key == "base" and isinstance(a, dict) and isinstance(b, dict):
            out += changes(a, b)
        elif key == "train":
            if not (isinstance(a, dict) and isinstance(b, dict)) or changes(a, b):
                out.append("its training stage changed")
        else:
            out.append(f"the {key} settings")
    return out


class StageLedger:
    """`<output_dir>/stages.json`: stage label -> the fingerprint its output was made from."""

    def __init__(self, out: Path) -> None:
        self.path = out / LEDGER
        self.entries: dict[str, Any] = self._read()

    def _read(self) -> dict[str, Any]:
        return json.loads(self.path.read_text(encoding="utf-8")) if self.path.is_file() else {}

    def stale(self, label: str, fingerprint: dict[str, Any]) -> list[str] | None:
        """None when the recorded fingerprint matches (or none was recorded); else what changed."""
        recorded = self.entries.get(label)
        if recorded is None:
            return None
        return changes(recorded, _plain(fingerprint)) or None

    def record(self, label: str, fingerprint: dict[str, Any]) -> None:
        """Store a finished stage's fingerprint (the file read again first: a `--stage` run beside
        this one may have recorded its own stages since)."""
        self.entries = {**self._read(), label: _plain(fingerprint)}
        self._write()

    def forget(self, label: str) -> None:
        """Drop a stage's record (its output is being redone)."""
        self.entries = self._read()
        if self.entries.pop(label, None) is not None:
            self._write()

    def _write(self) -> None:
        """stages.json, written to a temporary file and os.replace'd."""
        write_text_atomic(self.path, json.dumps(self.entries, indent=1, sort_keys=True) + "\n")


def _plain(fingerprint: dict[str, Any]) -> dict[str, Any]:
    """JSON round trip, so tuples and lists compare equal to what was read back from disk."""
    return json.loads(json.dumps(fingerprint, sort_keys=True))


def reuse_finished(stages: dict[str, dict[str, Any]], out: Path, ledger: StageLedger, sources: list[Path],
                   say: Callable[[str], None]) -> list[str]:
    """Copy stages another study already finished from the same inputs, instead of running them.

    Studies share runs: the ablation study's model1 is the paper study's model1, and a feature study
    compares against the same seed-0 runs. A stage is taken from a source output folder when it is
    not done here (none of its files exist), the source's ledger records the same stage label with
    a fingerprint equal to the one this study would make, and the source holds its output. Its
    files (and an evaluation's per-task store) are copied under a temporary name and renamed, and
    the fingerprint is recorded here, so a later change of settings makes the copy stale as usual.

    Args:
        stages: label -> {"output", "fingerprint", "remove": the stage's files} (StudyRunner._stages).
        out: this study's output folder (the stage paths are inside it).
        ledger: this study's ledger.
        sources: other studies' output folders, tried in order.
        say: prints one line per reused stage.

    Returns:
        The labels reused.

    Raises:
        UserError: a source folder without a stages.json (not a study output folder).
    """
    check_reuse_sources(sources)
    # each source's ledger and stage times, read once
    found = [(source, StageLedger(source).entries, _read_times(source)) for source in sources]
    reused: list[str] = []
    for label, entry in stages.items():
        files = list(entry["remove"])  # an evaluation's results JSON comes with its per-task store
        files += [path.with_suffix(".tasks") for path in entry["remove"] if path.suffix == ".json"]
        if any(p.exists() for p in files):
            continue
        for source, recorded, timed in found:
            if label not in recorded or changes(recorded[label], _plain(entry["fingerprint"])):
                continue
            if not (source / entry["output"].relative_to(out)).exists():
                continue
            for path in files:
                _copy_atomic(source / path.relative_to(out), path)
            ledger.record(label, entry["fingerprint"])
            if label in timed:
                _write_time(out, label, dict(timed[label], reused_from=str(source)))
            say(f"{label}: reused from {source} (made from the same recipe, inputs and settings)")
            reused.append(label)
            break
    return reused


def check_reuse_sources(sources: list[Path]) -> None:
    """Every --reuse folder is a study output folder (has a stages.json).

    Raises:
        UserError: one that is not, named.
    """
    from dsembed.errors import UserError

    for source in sources:
        if not (source / LEDGER).is_file():
            raise UserError(f"--reuse {source}: no {LEDGER} there (give the --output-dir of a study that ran)")


def _copy_atomic(src: Path, dst: Path) -> None:
    """Copy a file or folder to dst through a temporary sibling: no half-copied output."""
    if not src.exists():
        return
    dst.parent.mkdir(parents=True, exist_ok=True)
    tmp = dst.with_name(f".{dst.name}.reusing")
    if tmp.is_dir():
        shutil.rmtree(tmp)
    if src.is_dir():
        shutil.copytree(src, tmp, symlinks=True)
    else:
        shutil.copy2(src, tmp)
    os.replace(tmp, dst)


TIMES = "stage-times.json"


def record_time(out: Path, label: str, seconds: float, threads: str | None = None) -> None:
    """Add a stage's wall time to `<out>/stage-times.json` (label -> seconds, CPU, threads, when).

    Reports give the wall time of every stage on the machine that ran it; a reused stage keeps the
    entry of the study that ran it, with where it came from (`reuse_finished`)."""
    from datetime import datetime, timezone

    from dsembed.modeling.precision import cpu_model

    _write_time(out, label, {"seconds": round(seconds, 1), "cpu": cpu_model(), "cores": os.cpu_count(),
                             "threads": threads or os.environ.get("OMP_NUM_THREADS"),
                             "finished": datetime.now(timezone.utc).isoformat(timespec="seconds")})


def _read_times(out: Path) -> dict[str, Any]:
    path = out / TIMES
    return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else {}


def _write_time(out: Path, label: str, entry: dict[str, Any]) -> None:
    times = _read_times(out)
    times[label] = entry
    write_text_atomic(out / TIMES, json.dumps(times, indent=1, sort_keys=True) + "\n")


def times_table(out: Path) -> str:
    """Markdown table of `<out>/stage-times.json` in the order the stages finished, with the total."""
    times = _read_times(out)
    rows = ["| stage | wall s | CPU (cores, threads) | finished | note |", "|---|---:|---|---|---|"]
    for label, entry in sorted(times.items(), key=lambda item: item[1].get("finished", "")):
        note = f"reused from {entry['reused_from']}" if entry.get("reused_from") else ""
        rows.append(f"| {label} | {entry['seconds']:.0f} | {entry['cpu']} ({entry['cores']}, {entry['threads']}) "
                    f"| {entry['finished']} | {note} |")
    total = sum(entry["seconds"] for entry in times.values())
    rows.append(f"| all stages | {total:.0f} | | | {total / 3600:.2f} h |")
    return "\n".join(rows) + "\n"


def save_finished(out: Path, dest: Path) -> list[str]:
    """Copy a study's finished evaluations (results JSON + their stages.json entries), its layer
    probe (probe/) and its stage times to `dest`, a folder `--reuse` takes: a new machine then
    retrains (minutes) but does not re-evaluate what was scored from the same recipe and settings.

    What `dest` held is merged, not replaced: a new machine's output folder holds the stages it
    reused from `dest` with only their evaluations and stage times, so the training and export
    times recorded by the machine that ran them (and saved entries this machine has not reached)
    stay. A reused stage's time stays as its first machine recorded it; a stage run again here
    replaces it.

    Returns:
        The evaluation and probe labels finished in `out`.

    Raises:
        UserError: `out` is not a study output folder.
    """
    from dsembed.errors import UserError

    if not (out / LEDGER).is_file():
        raise UserError(f"--save-finished: {out} has no {LEDGER} (give the --output-dir of a study that ran)")
    ledger = StageLedger(out).entries
    finished = {label: output for label in ledger if (output := _finished_output(out, label))}
    kept = {label: ledger[label] for label in finished}
    for label, output in finished.items():
        # an evaluation's results JSON (not its per-task store); the probe's files (layers.json, plot)
        for file in sorted(output.parent.iterdir()) if label.startswith("probe ") else [output]:
            if file.is_file() and not file.name.startswith("."):
                _copy_atomic(file, dest / file.relative_to(out))
    saved = {label: entry for label, entry in StageLedger(dest).entries.items() if _finished_output(dest, label)}
    write_text_atomic(dest / LEDGER, json.dumps({**saved, **kept}, indent=1, sort_keys=True) + "\n")
    times = _read_times(dest)
    for label, entry in _read_times(out).items():
        if not (entry.get("reused_from") and label in times):
            times[label] = entry
    if times:
        write_text_atomic(dest / TIMES, json.dumps(times, indent=1, sort_keys=True) + "\n")
    return sorted(kept)


def _finished_output(root: Path, label: str) -> Path | None:
    """The output of a stage --save-finished keeps, when that stage is finished (an entry is recorded
    before its stage runs, so the output's presence is what says so): results/<name>.json for
    "evaluate <name>", probe/layers.json for "probe <name>" (the runner's probe folder). None for a
    stage not finished and for those not kept (train, export, compare: a new machine retrains in
    minutes and compares from the evaluations)."""
    if label.startswith("evaluate "):
        output = root / "results" / f"{label.removeprefix('evaluate ')}.json"
    elif label.startswith("probe "):
        output = root / "probe" / "layers.json"
    else:
        return None
    return output if output.is_file() else None
