"""A study: train several recipes, export each, evaluate them (and the untrained base), compare.

A study file is YAML (schema `StudyConfig`, strict like recipes). Each stage runs as its own process
through the same command lines a user would type, so a multi-rank launcher, DeepSpeed process
groups and memory are fresh for every stage, and a study interrupted anywhere resumes: finished
stages are recognised by what they leave behind.

    <output_dir>/runs/<variant>/        training run (checkpoints/, tensorboard/); TRAINED when done
    <output_dir>/models/<variant>/      consolidated model (dsembed + sentence-transformers folder)
    <output_dir>/results/<name>.json    evaluation results, `base` for the untrained backbone
    <output_dir>/report/                comparison table, CSV/JSON, plots
"""
from __future__ import annotations

import dataclasses
import os
import shlex
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from dsembed.config import load_recipe, validate
from dsembed.errors import RecipeError, UserError
from dsembed.strict import from_dict, read_yaml_mapping

BASE_NAME = "base"


@dataclass(frozen=True)
class StudyConfig:
    """What a study trains, how it launches training, and what it evaluates on.

    `variants` maps a short name to a recipe (relative to the study file). `overrides` apply to
    every recipe, `variant_overrides` to one. `tasks_dir: demo` writes the pip-installed demo tasks
    (dsembed.demo_data) to a cache and evaluates on those.
    """

    name: str
    output_dir: str
    variants: dict[str, str]
    overrides: list[str] = field(default_factory=list)
    variant_overrides: dict[str, list[str]] = field(default_factory=dict)
    launcher: Literal["python", "torchrun", "deepspeed"] = "python"
    nproc: int = 1
    baseline: str | None = None  # None: the first variant
    include_base: bool = True  # evaluate the untrained backbone of the first variant as "base"
    tasks: list[str] = field(default_factory=list)
    tasks_dir: str | None = None
    eval_batch_size: int = 32
    eval_limit: int | None = None
    eval_limits: dict[str, int] = field(default_factory=dict)  # per task name, over eval_limit
    probe_base: bool = False  # score every layer of the untrained backbone (dsembed-probe-layers) too
    holm: bool = False


def load_study(path: str | Path, overrides: list[str] | tuple[str, ...] = (),
               tasks_dir: str | None = None) -> tuple[StudyConfig, Path]:
    """Read and check a study file; recipes are loaded and validated up front.

    Args:
        path: the study YAML.
        overrides: recipe `key=value` overrides for every variant, after the study's own (the
            command line's --override: e.g. local training data instead of a hub dataset).
        tasks_dir: local tasks to evaluate on instead of the study's tasks (relative to the
            working directory).

    Returns:
        The study and the folder that relative paths resolve against.

    Raises:
        RecipeError: schema errors, unknown variant names, missing or invalid recipes.
    """
    path = Path(path)
    study = from_dict(StudyConfig, read_yaml_mapping(path, "study"), "", str(path))
    if overrides:
        study = dataclasses.replace(study, overrides=[*study.overrides, *overrides])
    if tasks_dir is not None:
        study = dataclasses.replace(study, tasks=[], tasks_dir=str(Path(tasks_dir).resolve()))
    where = str(path)
    if not study.variants:
        raise RecipeError(f"{where}: variants is empty (name at least one recipe)")
    if study.nproc < 1:
        raise RecipeError(f"{where}: nproc = {study.nproc} must be at least 1")
    if study.launcher == "python" and study.nproc != 1:
        raise RecipeError(f"{where}: launcher python runs one process; use launcher: torchrun for nproc {study.nproc}")
    unknown = set(study.variant_overrides) - set(study.variants)
    if unknown:
        raise RecipeError(f"{where}: variant_overrides names {sorted(unknown)} that are not in variants")
    names = list(study.variants) + ([BASE_NAME] if study.include_base else [])
    if study.baseline is not None and study.baseline not in names:
        raise RecipeError(f"{where}: baseline = {study.baseline!r} is not one of {names}")
    if BASE_NAME in study.variants:
        raise RecipeError(f"{where}: variants: the name {BASE_NAME!r} is reserved for the untrained backbone")
    if not study.tasks and study.tasks_dir is None:
        raise RecipeError(f"{where}: give tasks (presets or MTEB names) or tasks_dir")
    root = path.resolve().parent
    for name in study.variants:
        validate(load_recipe(_recipe_path(study, root, name), _overrides(study, name)), world_size=study.nproc)
    return study, root


def _recipe_path(study: StudyConfig, root: Path, name: str) -> Path:
    path = Path(study.variants[name])
    return path if path.is_absolute() else root / path


def _overrides(study: StudyConfig, name: str) -> list[str]:
    return list(study.overrides) + list(study.variant_overrides.get(name, []))


def _train_command(study: StudyConfig, recipe: Path, overrides: list[str]) -> list[str]:
    if study.launcher == "torchrun":
        head = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(study.nproc), "-m", "dsembed.train"]
    elif study.launcher == "deepspeed":
        head = ["deepspeed", "--num_gpus", str(study.nproc), "--no_local_rank", "--module", "dsembed.train"]
    else:
        head = [sys.executable, "-m", "dsembed.train"]
    return head + [str(recipe), *overrides]


class StudyRunner:
    """Runs the stages of one study in order, skipping what is already done."""

    def __init__(self, study: StudyConfig, root: Path, out: Path | None = None) -> None:
        self.study = study
        self.root = root
        out_dir = Path(out or study.output_dir)
        self.out = out_dir if out_dir.is_absolute() else Path.cwd() / out_dir

    def _run(self, label: str, command: list[str]) -> None:
        print(f"[study {self.study.name}] {label}: {shlex.join(command)}", flush=True)
        start = time.perf_counter()
        env = dict(os.environ)
        env.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // self.study.nproc)))
        result = subprocess.run(command, env=env)
        if result.returncode != 0:
            raise UserError(f"study {self.study.name}: {label} failed (exit {result.returncode}); fix the cause above and run the study again to resume")
        print(f"[study {self.study.name}] {label}: done in {time.perf_counter() - start:.0f} s", flush=True)

    def tasks_arguments(self) -> list[str]:
        if self.study.tasks_dir == "demo":
            from dsembed.demo_data import write_demo_tasks

            return ["--tasks-dir", str(write_demo_tasks(self.out / "demo-tasks"))]
        if self.study.tasks_dir is not None:
            tasks_dir = Path(self.study.tasks_dir)
            return ["--tasks-dir", str(tasks_dir if tasks_dir.is_absolute() else self.root / tasks_dir)]
        return ["--tasks", *self.study.tasks]

    def _evaluate_command(self, target: list[str], name: str, tasks: list[str]) -> list[str]:
        command = [sys.executable, "-m", "dsembed.cli.evaluate", *target, *tasks, "--name", name,
                   "--output", str(self.out / "results" / f"{name}.json"),
                   "--batch-size", str(self.study.eval_batch_size)]
        return command + self._limit_arguments()

    def _limit_arguments(self) -> list[str]:
        command = [] if self.study.eval_limit is None else ["--limit", str(self.study.eval_limit)]
        for task, limit in self.study.eval_limits.items():
            command += ["--task-limit", f"{task}={limit}"]
        return command

    def _probe_command(self, tasks: list[str]) -> list[str]:
        """dsembed-probe-layers on the untrained backbone, with the evaluation's tasks and limits."""
        first = next(iter(self.study.variants))
        return [sys.executable, "-m", "dsembed.cli.probe_layers", str(_recipe_path(self.study, self.root, first)),
                *[f"--override={o}" for o in _overrides(self.study, first)], *tasks,
                "--output-dir", str(self.out / "probe"), "--batch-size", str(self.study.eval_batch_size),
                *self._limit_arguments()]

    def _base_target(self) -> list[str]:
        """--base RECIPE --override ... for the untrained backbone of the first variant."""
        first = next(iter(self.study.variants))
        return ["--base", str(_recipe_path(self.study, self.root, first)),
                *[f"--override={o}" for o in _overrides(self.study, first)]]

    def run(self) -> Path:
        """Train, export and evaluate every variant, evaluate the base, write the report.

        Returns:
            The report folder.
        """
        study, out = self.study, self.out
        for sub in ("runs", "models", "results"):
            (out / sub).mkdir(parents=True, exist_ok=True)
        tasks = self.tasks_arguments()
        names = list(study.variants)
        for i, name in enumerate(names, 1):
            recipe = _recipe_path(study, self.root, name)
            run_dir, model_dir = out / "runs" / name, out / "models" / name
            overrides = _overrides(study, name) + [f"train.output_dir={run_dir}"]
            prefix = f"({i}/{len(names)}) {name}"
            if (run_dir / "TRAINED").exists():
                print(f"[study {study.name}] {prefix}: trained already", flush=True)
            else:
                self._run(f"{prefix}: train", _train_command(study, recipe, overrides))
                (run_dir / "TRAINED").write_text("ok\n")
            if not (model_dir / "dsembed.json").exists():
                self._run(f"{prefix}: export", [sys.executable, "-m", "dsembed.cli.consolidate", str(run_dir), str(model_dir)])
            if not (out / "results" / f"{name}.json").exists():
                self._run(f"{prefix}: evaluate", self._evaluate_command([str(model_dir)], name, tasks))
        if study.include_base and not (out / "results" / f"{BASE_NAME}.json").exists():
            self._run(f"{BASE_NAME}: evaluate", self._evaluate_command(self._base_target(), BASE_NAME, tasks))
        if study.probe_base and not (out / "probe" / "layers.json").exists():
            self._run(f"{BASE_NAME}: probe layers", self._probe_command(tasks))
        results = [str(out / "results" / f"{n}.json") for n in ([BASE_NAME] if study.include_base else []) + names]
        baseline = study.baseline or (BASE_NAME if study.include_base else names[0])
        compare = [sys.executable, "-m", "dsembed.cli.compare", *results, "--baseline", baseline, "--output", str(out / "report")]
        if study.holm:
            compare.append("--holm")
        if study.include_base and baseline != BASE_NAME:
            compare += ["--reference", BASE_NAME]  # shown, not a question of the study: outside the Holm family
        self._run("compare", compare)
        return out / "report"
