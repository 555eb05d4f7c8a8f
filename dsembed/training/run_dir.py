"""The run directory of a training run: checkpoint tags, the resume decision, pruning, log truncation.

A resume first checks the checkpoint it would load (`verify_resume`): a damaged or missing shard
sets that checkpoint aside as checkpoints/damaged-step-N (never deleted) and the run resumes from the
newest complete earlier one, or stops with exit code 2 when there is none.

    recipe.yaml, metrics.jsonl, tensorboard/, checkpoints/step-N/, checkpoints/latest
(the layout is described in dsembed.training.trainer). Nothing here imports deepspeed; the
checkpoints themselves are written and read by dsembed.training.engine.
"""
from __future__ import annotations

import dataclasses
import json
import os
import re
import shutil
import sys
from pathlib import Path

import yaml


from dsembed import distributed as dist
from dsembed.atomic import write_text_atomic
from dsembed.config import Recipe
from dsembed.errors import CheckpointError, RecipeError, UserError


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


def verify_resume(recipe: Recipe, tag: str | None) -> tuple[str | None, list[tuple[str, str]]]:
    """The checkpoint to resume from: `tag` when every shard is present and whole, else the newest
    complete earlier one. Collective: every rank calls it and reads its share of each checkpoint's
    shards (dsembed.training.checkpoint_files); the problems are gathered, so all ranks decide alike.

    Returns:
        (tag to resume from or None, [(damaged tag, its first problem), ...] newest first): the
        damaged checkpoints that `prepare_run_dir` moves aside.

    Raises:
        CheckpointError: no complete checkpoint is left; names the newest one and its shard, and the fix.
    """
    from dsembed.training.checkpoint_files import checkpoint_problems

    if tag is None or any(t != tag for t in dist.gather_objects(tag)):
        return tag, []  # ranks that see different run directories are refused by check_shared_run_dir
    folder = checkpoint_dir(recipe)
    newest = int(m.group(1)) if (m := STEP_DIR.match(tag)) else None
    older = sorted(((int(m.group(1)), p.name) for p in folder.iterdir() if (m := STEP_DIR.match(p.name))
                    and p.name != tag and (newest is None or int(m.group(1)) < newest)), reverse=True)
    damaged: list[tuple[str, str]] = []
    for candidate in [tag, *(name for _, name in older)]:
        mine, _ = checkpoint_problems(folder / candidate, (dist.rank(), dist.world_size()))
        problems = sorted({p for part in dist.gather_objects(mine) for p in part})
        if not problems:
            return candidate, damaged
        damaged.append((candidate, problems[0]))
    also = f" ({len(damaged) - 1} earlier checkpoint(s) damaged too)" if len(damaged) > 1 else ""
    raise CheckpointError(f"{folder / tag}: {damaged[0][1]}; no complete earlier checkpoint to resume from{also}: restore "
                          f"the shard from a good copy, or start again with train.overwrite=true (deletes {folder}) "
                          "or another train.output_dir")


def _set_aside(folder: Path, damaged: list[tuple[str, str]], resume_tag: str | None) -> None:
    """Rename each damaged checkpoint to damaged-<tag> (never deleted; pruning ignores it), say so
    in one line, and point `latest` at the checkpoint the run resumes from."""
    for tag, problem in damaged:
        aside = folder / f"damaged-{tag}"
        n = 1
        while aside.exists():
            n += 1
            aside = folder / f"damaged-{tag}.{n}"
        os.rename(folder / tag, aside)
        print(f"warning: {folder / tag}: {problem}; moved the checkpoint aside to {aside} (kept, not deleted); resuming from "
              f"{folder / resume_tag}", file=sys.stderr, flush=True)
    if damaged:
        write_text_atomic(folder / "latest", str(resume_tag))


def prepare_run_dir(recipe: Recipe, fresh: bool, damaged: list[tuple[str, str]] | None = None,
                    resume_tag: str | None = None) -> None:
    """Make the run directory ready (collective): delete it for a fresh start, or set damaged
    checkpoints aside (`verify_resume`) and drop unfinished tmp-step-* saves for a resume."""
    check_shared_run_dir(recipe)
    out = Path(recipe.train.output_dir)
    if dist.is_main():
        if fresh:  # overwrite, or a previous attempt that never checkpointed: its logs would mix in
            for name in ("checkpoints", "tensorboard"):
                shutil.rmtree(out / name, ignore_errors=True)
            (out / "metrics.jsonl").unlink(missing_ok=True)
        (out / "checkpoints").mkdir(parents=True, exist_ok=True)
        _set_aside(out / "checkpoints", damaged or [], resume_tag)
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
