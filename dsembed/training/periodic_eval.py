"""Watching a run: score the live model on evaluation tasks every `eval.every_steps` steps.

The recipe's `eval` section names the tasks (local tasks under `eval.tasks_dir`, mteb task names or
presets in `eval.tasks`); they are scored by `dsembed.evaluation.run.evaluate_tasks`, the same path
`dsembed-evaluate` takes (the live model instead of an exported one). The mean main score over the tasks decides the best step, recorded in
`<output_dir>/best.json` {"step", "score", "scores", "checkpoint"}; the trainer keeps that step's
checkpoint out of `train.save_total_limit`'s pruning. Off by default (`eval.every_steps: null`): then
nothing here is imported and training pays nothing.

Under ZeRO-3 every rank holds a slice of the weights, so every rank runs the same evaluation (the
forwards gather parameters collectively) and only rank 0 logs. mteb seeds the global random
generators, so their states are saved before and restored after: training's dropout streams go on
as if no evaluation had run.
"""
from __future__ import annotations

import contextlib
import json
from pathlib import Path
from typing import Any, Iterator

import numpy as np

from dsembed import distributed as dist
from dsembed.atomic import write_text_atomic
from dsembed.config import Recipe
from dsembed.errors import RecipeError

BEST_FILE = "best.json"
MEAN_TAG = "eval/mean"


class PeriodicEval:
    """Loaded evaluation tasks and the best score so far.

    Build with `PeriodicEval.create(recipe)` before the run directory is touched: a missing task
    folder or a bad task file is a `UserError` then, not after the first training steps.
    """

    def __init__(self, recipe: Recipe) -> None:
        from dsembed.evaluation import run
        from dsembed.evaluation.tasks import load_local_tasks

        cfg = recipe.eval
        self.recipe = recipe
        self.every = int(cfg.every_steps)
        with _kept_rng():  # mteb seeds the global generators when it builds a task
            if cfg.tasks_dir is not None:
                root = recipe.resolve_path(cfg.tasks_dir)
                if not root.is_dir():
                    raise RecipeError(f"eval.tasks_dir = {cfg.tasks_dir!r}: folder {root} not found (local tasks "
                                      "in <root>/<type>/<Name>, relative to the recipe's folder)")
                self.tasks = load_local_tasks(root, cfg.tasks or None)
            else:
                self.tasks = run.named_tasks(cfg.tasks)
            run.prepare_tasks(self.tasks, limit=cfg.limit)
        names = {t.metadata.name for t in self.tasks}
        self.instructions = run.resolve_instructions(
            self.tasks, {k: v for k, v in cfg.instructions.items() if k in names})
        self.best: dict[str, Any] | None = None

    @classmethod
    def create(cls, recipe: Recipe) -> "PeriodicEval | None":
        """None when `eval.every_steps` is not set (evaluation during training is off)."""
        return cls(recipe) if recipe.eval.every_steps is not None else None

    def due(self, step: int) -> bool:
        """Every `eval.every_steps` steps, and at `train.max_steps` (the end of the schedule)."""
        return step % self.every == 0 or step == self.recipe.train.max_steps

    def evaluate(self, model: Any, step: int) -> tuple[dict[str, float], bool]:
        """Score `model` now (collective under ZeRO-3: every rank calls it at the same step).

        Returns:
            ({"eval/<task>": main score, ..., "eval/mean": mean over tasks}, whether it is the best so far).
        """
        from dsembed.evaluation.run import evaluate_tasks

        with _kept_rng():
            results = evaluate_tasks(model, self.tasks, model_name=f"step-{step}", instructions=self.instructions,
                                     batch_size=self.recipe.eval.batch_size, log=lambda line: None)
        scores = {f"eval/{name}": float(entry["main_score"]) for name, entry in results["tasks"].items()}
        scores[MEAN_TAG] = float(np.mean(list(scores.values())))
        improved = self.best is None or scores[MEAN_TAG] > self.best["score"]
        if improved:
            self.best = {"step": step, "score": scores[MEAN_TAG], "scores": scores,
                         "checkpoint": f"checkpoints/step-{step}"}
        return scores, improved

    @property
    def best_step(self) -> int | None:
        return None if self.best is None else int(self.best["step"])

    def write_best(self, output_dir: Path) -> None:
        """best.json on rank 0 (written to a temporary file and os.replace'd)."""
        if self.best is None or not dist.is_main():
            return
        write_text_atomic(output_dir / BEST_FILE, json.dumps(self.best, indent=1) + "\n")

    def resume(self, output_dir: Path, step: int) -> None:
        """Take up the best score recorded before a restart from `step` (read on every rank alike).

        A best found after the checkpoint was logged by steps the resumed run repeats: forgotten, as
        those steps' metrics are.
        """
        path = output_dir / BEST_FILE
        if not path.is_file():
            return
        best = json.loads(path.read_text(encoding="utf-8"))
        self.best = best if int(best["step"]) <= step else None


@contextlib.contextmanager
def _kept_rng() -> Iterator[None]:
    """Restore the python / numpy / torch generator states on exit."""
    from dsembed.distributed import rng_states, set_rng_states

    states = rng_states()
    try:
        yield
    finally:
        set_rng_states(states)
