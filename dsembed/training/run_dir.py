"""The run directory of a training run: checkpoint tags, the resume decision, pruning, log truncation.

    recipe.yaml, metrics.jsonl, tensorboard/, checkpoints/step-N/, checkpoints/latest
(the layout is described in dsembed.training.trainer). Nothing here imports deepspeed; the
checkpoints themselves are written and read by dsembed.training.engine.
"""
from __future__ import annotations

import dataclasses
import json
import re
import shutil
import sys
from pathlib import Path

import yaml


from dsembed import distributed as dist
from dsembed.atomic import write_text_atomic
from dsembed.config import Recipe
from dsembed.errors import RecipeError, UserError


STEP_DIR = re.compile(r"^step-(\d+)$")


# ----------------------------------------------------------------------------- run directory


def checkpoint_dir(recipe: Recipe) -> Path:
    return Path(recipe.train.output_dir) / "checkpoints"


def latest_tag(folder: Path) -> str | None:
    """The tag named in folder/latest, else the newest step-N (complete: renamed only when done)."""
    latest = folder / "latest"
    if latest.is_file():
        tag = latest.read_text(encoding="utf-8").strip()
        if (folder / tag).is_dir():
            return tag
    steps = sorted((int(m.group(1)), p.name) for p in folder.glob("step-*") if (m := STEP_DIR.match(p.name)))
    return steps[-1][1] if steps else None


def check_run_dir(recipe: Recipe) -> str | None:
    """Decide between resuming and starting fresh, before anything is built or written.

    A run directory "exists" when it holds checkpoints or a previous run's recipe.yaml (a run that
    stopped before its first checkpoint).

    Returns:
        The checkpoint tag to resume from, or None to start fresh.

    Raises:
        RecipeError: a run exists, train.resume is never and train.overwrite is false.
    """
    folder = checkpoint_dir(recipe)
    checkpoints = folder.is_dir() and any(STEP_DIR.match(p.name) for p in folder.iterdir())
    existing = checkpoints or (Path(recipe.train.output_dir) / "recipe.yaml").is_file()
    if recipe.train.overwrite or not existing:
        return None
    if recipe.train.resume == "never":
        held = "checkpoints" if checkpoints else "a previous run (recipe.yaml)"
        raise RecipeError(f"{recipe.source or '<recipe>'}: train.output_dir {recipe.train.output_dir} already holds {held} "
                          "and train.resume is never (set train.overwrite=true, train.resume=auto or another output_dir)")
    return latest_tag(folder) if checkpoints else None


def run_dtype(recipe: Recipe, resume_tag: str | None) -> Recipe:
    """The recipe with a concrete `model.dtype`, decided once per run (the printed line on rank 0).

    A resumed run keeps the dtype it trained in (the run directory's recipe.yaml records the
    concrete dtype), so `auto` on another machine still resumes exactly; a new run resolves `auto`
    for this machine (dsembed.modeling.precision).

    Raises:
        RecipeError: resuming with an explicit dtype other than the one the run trained in.
    """
    from dsembed.modeling.precision import AUTO, resolve_recipe

    say = (lambda line: print(line, file=sys.stderr, flush=True)) if dist.is_main() else (lambda line: None)
    earlier = _recorded_dtype(Path(recipe.train.output_dir) / "recipe.yaml") if resume_tag is not None else None
    if earlier in (None, AUTO):
        return resolve_recipe(recipe, say=say)
    asked = recipe.model.dtype
    if asked == AUTO:
        say(f"dtype: auto -> {earlier} (resuming {recipe.train.output_dir}, which trained in {earlier})")
        return dataclasses.replace(recipe, model=dataclasses.replace(recipe.model, dtype=earlier))
    if asked != earlier:
        raise RecipeError(f"{recipe.source or '<recipe>'}: model.dtype = {asked} but the run in {recipe.train.output_dir} "
                          f"trained in {earlier} (resume with model.dtype={earlier} or auto, or set train.overwrite=true)")
    return recipe


def _recorded_dtype(path: Path) -> str | None:
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
        return str(data["model"]["dtype"])
    except (OSError, yaml.YAMLError, KeyError, TypeError):
        return None


def check_shared_run_dir(recipe: Recipe) -> None:
    """Every rank must see what global rank 0 writes (checkpoint renames, `latest`, recipe.yaml):
    across nodes, train.output_dir must be on a shared filesystem. Without one, each node would
    write its shards to its own disk and `latest` would name checkpoints no disk holds complete, so
    the run is refused (on every rank) before anything is written. Collective."""
    out = Path(recipe.train.output_dir)
    blind = dist.ranks_not_sharing(out)
    if blind:
        raise UserError(f"{recipe.source or '<recipe>'}: train.output_dir {out} is not shared between the nodes "
                        f"({', '.join(blind)} cannot see the files rank 0 writes there); put it on a filesystem "
                        "every node mounts at the same path (NFS, Lustre, ...), see README 'Multi-node training'")


def prepare_run_dir(recipe: Recipe, fresh: bool) -> None:
    check_shared_run_dir(recipe)
    out = Path(recipe.train.output_dir)
    if dist.is_main():
        if fresh:  # overwrite, or a previous attempt that never checkpointed: its logs would mix in
            for name in ("checkpoints", "tensorboard"):
                shutil.rmtree(out / name, ignore_errors=True)
            (out / "metrics.jsonl").unlink(missing_ok=True)
        (out / "checkpoints").mkdir(parents=True, exist_ok=True)
        for stale in (out / "checkpoints").glob("tmp-step-*"):
            shutil.rmtree(stale, ignore_errors=True)  # a save interrupted before its rename
        write_text_atomic(out / "recipe.yaml", recipe.to_yaml())
    dist.barrier()


def steps_to_prune(steps: list[int], keep_last: int, best: int | None = None) -> list[int]:
    """Checkpoint steps beyond the newest `keep_last`, except `best` (the best evaluated step)."""
    return [s for s in sorted(steps)[:-keep_last] if s != best]


def drop_logs_after(out: Path, step: int) -> None:
    """A run killed after its last checkpoint logged steps the resumed run logs again: forget them
    in metrics.jsonl and TensorBoard, so each step is recorded once."""
    from dsembed.training.monitor import drop_events_after

    metrics = out / "metrics.jsonl"
    if metrics.is_file():
        rows = [line for line in metrics.read_text(encoding="utf-8").splitlines()
                if line.strip() and json.loads(line)["step"] <= step]
        write_text_atomic(metrics, "".join(row + "\n" for row in rows))
    if (out / "tensorboard").is_dir():
        drop_events_after(out / "tensorboard", step)
