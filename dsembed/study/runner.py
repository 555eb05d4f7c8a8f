"""A study: train several recipes, export each, evaluate them (and the untrained base), compare.

A study file is YAML (schema `StudyConfig`, strict like recipes). Each stage runs as its own process
through the same command lines a user would type, so a multi-rank launcher, DeepSpeed process
groups and memory are fresh for every stage, and a study interrupted anywhere resumes: finished
stages are recognised by what they leave behind.

    <output_dir>/runs/<variant>/        training run (checkpoints/, tensorboard/); TRAINED when done
    <output_dir>/models/<variant>/      consolidated model (dsembed + sentence-transformers folder)
    <output_dir>/results/<name>.json    evaluation results, `base` for the untrained backbone
    <output_dir>/report/                comparison table, CSV/JSON, plots
    <output_dir>/stages.json            what each finished stage was made from (dsembed.study.stages)
    <output_dir>/stage-times.json       each stage's wall time, CPU and threads (report/stage-times.md)

A finished stage whose inputs changed since (recipe, overrides, input model, evaluation settings) is
not reused: the runner names it and stops with exit code 2, or redoes it with `rerun_stale`.
Several nodes: `launcher: deepspeed` with `nnodes` and a `hostfile` (DeepSpeed's launcher starts
every node from this one, over ssh/pdsh); runs and models must be on a shared filesystem.
"""
from __future__ import annotations

import dataclasses
import os
import shlex
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from dsembed.config import load_recipe
from dsembed.recipe_rules import validate
from dsembed.errors import RecipeError, UserError
from dsembed.strict import from_dict, read_yaml_mapping
from dsembed.atomic import write_text_atomic
from dsembed.study.stages import (StageLedger, changes as _changes, check_reuse_sources, recipe_fingerprint, record_time,
                                  reuse_finished, times_table)

BASE_NAME = "base"


@dataclass(frozen=True)
class StudyConfig:
    """What a study trains, how it launches training, and what it evaluates on.

    `variants` maps a short name to a recipe (relative to the study file). `overrides` apply to
    every recipe, `variant_overrides` to one. `tasks_dir: demo` writes the pip-installed demo tasks
    (dsembed.data.demo) to a cache and evaluates on those.
    """

    name: str
    output_dir: str
    variants: dict[str, str]
    overrides: list[str] = field(default_factory=list)
    variant_overrides: dict[str, list[str]] = field(default_factory=dict)
    launcher: Literal["python", "torchrun", "deepspeed"] = "python"
    nproc: int = 1  # processes per node
    nnodes: int = 1  # nodes (launcher deepspeed with a hostfile when more than 1)
    hostfile: str | None = None  # DeepSpeed hostfile ("host slots=N" lines), relative to the study file
    launcher_args: list[str] = field(default_factory=list)  # appended to the launcher's own, e.g. [--master_port, "29600"]
    baseline: str | None = None  # None: the first variant
    include_base: bool = True  # evaluate the untrained backbone of the first variant as "base"
    tasks: list[str] = field(default_factory=list)
    tasks_dir: str | None = None
    eval_batch_size: int = 32
    eval_limit: int | None = None
    eval_limits: dict[str, int] = field(default_factory=dict)  # per task name, over eval_limit
    probe_base: bool = False  # score every layer of the untrained backbone (dsembed-probe-layers) too
    # Holm's correction of the Wilcoxon p-values: false/none (the paper's uncorrected test), all (every
    # variant x category test in one family; true means the same), per_variant (each variant against
    # the baseline over its categories: the paper's question per design)
    holm: bool | Literal["none", "all", "per_variant"] = False
    # train.seed of each training run: every variant trains and is evaluated once per seed (stages
    # "<variant>-s<seed>"); None keeps one run per variant with the recipe's own seed
    seeds: list[int] | None = None


def load_study(path: str | Path, launch: dict[str, Any] | None = None, overrides: list[str] | tuple[str, ...] = (),
               tasks_dir: str | None = None) -> tuple[StudyConfig, Path]:
    """Read and check a study file; recipes are loaded and validated up front, data files checked.

    Args:
        path: the study YAML.
        launch: study keys given on the command line (nnodes, hostfile, launcher_args), which win.
        overrides: recipe `key=value` overrides for every variant, after the study's own (the
            command line's --override: e.g. local training data instead of a hub dataset).
        tasks_dir: local tasks to evaluate on instead of the study's tasks (relative to the
            working directory).

    Returns:
        The study and the folder that relative paths resolve against.

    Raises:
        RecipeError: schema errors, unknown variant names, missing or invalid recipes, a launcher
            that cannot start the nodes asked for.
        DataError: a recipe's data file does not exist.
    """
    from dsembed.data.rows import check_data_files

    path = Path(path)
    data = read_yaml_mapping(path, "study")
    data.update({k: v for k, v in (launch or {}).items() if v not in (None, [])})
    study = from_dict(StudyConfig, data, "", str(path))
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
    if study.nnodes < 1:
        raise RecipeError(f"{where}: nnodes = {study.nnodes} must be at least 1")
    if study.nnodes > 1 and study.launcher != "deepspeed":
        raise RecipeError(f"{where}: nnodes = {study.nnodes} needs launcher: deepspeed with a hostfile ({study.launcher} "
                          "starts processes on this node only; DeepSpeed's launcher starts every node)")
    if study.hostfile is not None:
        if study.launcher != "deepspeed":
            raise RecipeError(f"{where}: hostfile is read by launcher: deepspeed only (launcher is {study.launcher})")
        if not _hostfile(study, path.resolve().parent).is_file():
            raise RecipeError(f"{where}: hostfile {study.hostfile} not found (one 'hostname slots=N' line per node)")
    elif study.nnodes > 1:
        raise RecipeError(f"{where}: nnodes = {study.nnodes} needs a hostfile naming the nodes ('hostname slots=N' lines)")
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
    if study.seeds is not None and (not study.seeds or len(set(study.seeds)) != len(study.seeds)):
        raise RecipeError(f"{where}: seeds = {study.seeds} should list distinct seeds (or leave seeds out: one run)")
    root = path.resolve().parent
    for name in study.variants:
        recipe = load_recipe(_recipe_path(study, root, name), _overrides(study, name))
        validate(recipe, world_size=study.nproc * study.nnodes)
        check_data_files(recipe)
    return study, root


def _hostfile(study: StudyConfig, root: Path) -> Path:
    path = Path(study.hostfile)
    return path if path.is_absolute() else root / path


def _recipe_path(study: StudyConfig, root: Path, name: str) -> Path:
    path = Path(study.variants[name])
    return path if path.is_absolute() else root / path


def _overrides(study: StudyConfig, name: str, seed: int | None = None) -> list[str]:
    seeded = [] if seed is None else [f"train.seed={seed}"]
    return list(study.overrides) + list(study.variant_overrides.get(name, [])) + seeded


@dataclass(frozen=True)
class TrainingRun:
    """One training run of a study: a variant at one seed (seed None: the recipe's own, one run)."""

    variant: str
    seed: int | None
    key: str  # folder and results name: the variant, or "<variant>-s<seed>"


def training_runs(study: StudyConfig) -> list[TrainingRun]:
    """Every (variant, seed) run of the study, variant by variant."""
    if study.seeds is None:
        return [TrainingRun(name, None, name) for name in study.variants]
    return [TrainingRun(name, seed, f"{name}-s{seed}") for name in study.variants for seed in study.seeds]


def holm_family(study: StudyConfig) -> str:
    """The study's Holm family: "none", "all" or "per_variant" (true means all)."""
    if study.holm is True:
        return "all"
    return "none" if study.holm is False else study.holm


def _train_command(study: StudyConfig, recipe: Path, overrides: list[str], root: Path = Path(".")) -> list[str]:
    if study.launcher == "torchrun":
        head = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(study.nproc),
                *study.launcher_args, "-m", "dsembed.train"]
    elif study.launcher == "deepspeed":
        nodes = ["--num_nodes", str(study.nnodes)] if study.nnodes > 1 else []
        hostfile = ["--hostfile", str(_hostfile(study, root))] if study.hostfile is not None else []
        head = ["deepspeed", *hostfile, *nodes, "--num_gpus", str(study.nproc), *study.launcher_args,
                "--no_local_rank", "--module", "dsembed.train"]
    else:
        head = [sys.executable, "-m", "dsembed.train"]
    return head + [str(recipe), *overrides]


class StudyRunner:
    """Runs the stages of one study in order, skipping what is already done."""

    def __init__(self, study: StudyConfig, root: Path, out: Path | None = None, rerun_stale: bool = False,
                 reuse: list[Path] | None = None) -> None:
        self.study = study
        self.root = root
        out_dir = Path(out or study.output_dir)
        self.out = out_dir if out_dir.is_absolute() else Path.cwd() / out_dir
        self.rerun_stale = rerun_stale
        self.reuse = [Path(p).resolve() for p in reuse or []]  # other studies' output folders
        check_reuse_sources(self.reuse)  # before anything is written

    def _run(self, label: str, command: list[str], key: str | None = None) -> None:
        """Run one stage's command; `key` (the stage label) records its wall time in stage-times.json."""
        print(f"[study {self.study.name}] {label}: {shlex.join(command)}", flush=True)
        start = time.perf_counter()
        env = dict(os.environ)
        env.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // self.study.nproc)))  # per node
        result = subprocess.run(command, env=env)
        if result.returncode != 0:
            raise UserError(f"study {self.study.name}: {label} failed (exit {result.returncode}); fix the cause above and run the study again to resume")
        seconds = time.perf_counter() - start
        record_time(self.out, key or label, seconds, threads=env["OMP_NUM_THREADS"])
        print(f"[study {self.study.name}] {label}: done in {seconds:.0f} s", flush=True)

    def tasks_arguments(self) -> list[str]:
        if self.study.tasks_dir == "demo":
            from dsembed.data.demo import write_demo_tasks

            return ["--tasks-dir", str(write_demo_tasks(self.out / "demo-tasks"))]
        if self.study.tasks_dir is not None:
            tasks_dir = Path(self.study.tasks_dir)
            return ["--tasks-dir", str(tasks_dir if tasks_dir.is_absolute() else self.root / tasks_dir)]
        return ["--tasks", *self.study.tasks]

    def _evaluate_command(self, target: list[str], name: str, tasks: list[str], results_name: str | None = None) -> list[str]:
        command = [sys.executable, "-m", "dsembed.cli.evaluate", *target, *tasks, "--name", name,
                   "--output", str(self.out / "results" / f"{results_name or name}.json"),
                   "--results-dir", str(self.out / "mteb-results"),  # mteb's own layout, beside dsembed's
                   "--batch-size", str(self.study.eval_batch_size)]
        if self.study.nproc > 1:  # the training processes' devices encode in parallel (rank 0 scores)
            command += ["--nproc", str(self.study.nproc)]
        return command + self._limit_arguments()

    def _limit_arguments(self) -> list[str]:
        command = [] if self.study.eval_limit is None else ["--limit", str(self.study.eval_limit)]
        for task, limit in self.study.eval_limits.items():
            command += ["--task-limit", f"{task}={limit}"]
        return command

    def _probe_command(self, tasks: list[str]) -> list[str]:
        """dsembed-probe-layers on the untrained backbone, with the evaluation's tasks and limits."""
        recipe_and_overrides = self._base_target()[1:]  # the probe takes the recipe as SOURCE, not --base
        return [sys.executable, "-m", "dsembed.cli.probe_layers", *recipe_and_overrides, *tasks,
                "--output-dir", str(self.out / "probe"), "--batch-size", str(self.study.eval_batch_size),
                *self._limit_arguments()]

    def _base_target(self) -> list[str]:
        """--base RECIPE --override ... for the untrained backbone of the first variant."""
        first = next(iter(self.study.variants))
        return ["--base", str(_recipe_path(self.study, self.root, first)),
                *[f"--override={o}" for o in _overrides(self.study, first)]]

    def _stages(self) -> dict[str, dict[str, Any]]:
        """Every stage: its output (present when finished), the fingerprint of its inputs, and
        `partial` (a training run begun with other settings, not finished)."""
        study, out = self.study, self.out
        # as the study file says (not resolved paths): a moved output folder stays current
        evaluation = {"tasks": study.tasks, "tasks_dir": study.tasks_dir, "batch_size": study.eval_batch_size,
                      "limit": study.eval_limit, "limits": study.eval_limits}
        stages: dict[str, dict[str, Any]] = {}
        for run in training_runs(study):
            name = run.key
            run_dir = out / "runs" / name
            recipe = load_recipe(_recipe_path(study, self.root, run.variant), _overrides(study, run.variant, run.seed))
            trained = recipe_fingerprint(recipe)
            partial = None
            if not (run_dir / "TRAINED").exists() and (run_dir / "recipe.yaml").is_file():
                # the run directory records what model.dtype: auto resolved to, and a resume keeps it
                auto = ["model.dtype=auto"] if recipe.model.dtype == "auto" else []
                begun = recipe_fingerprint(load_recipe(run_dir / "recipe.yaml", auto))
                partial = {**begun, "model": trained["model"]}  # what a resume would mix with
            stages[f"train {name}"] = {"output": run_dir / "TRAINED", "fingerprint": trained, "partial": partial,
                                       "remove": [run_dir]}
            stages[f"export {name}"] = {"output": out / "models" / name / "dsembed.json",
                                        "fingerprint": {"train": trained}, "remove": [out / "models" / name]}
            stages[f"evaluate {name}"] = {"output": out / "results" / f"{name}.json",
                                          "fingerprint": {"train": trained, "evaluation": evaluation},
                                          "remove": [out / "results" / f"{name}.json"]}
        if study.include_base:
            first = next(iter(study.variants))
            base = recipe_fingerprint(load_recipe(_recipe_path(study, self.root, first), _overrides(study, first)))
            stages[f"evaluate {BASE_NAME}"] = {"output": out / "results" / f"{BASE_NAME}.json",
                                               "fingerprint": {"base": base, "evaluation": evaluation},
                                               "remove": [out / "results" / f"{BASE_NAME}.json"]}
        if study.probe_base:
            stages[f"probe {BASE_NAME}"] = {"output": out / "probe" / "layers.json",
                                            "fingerprint": {"base": base, "evaluation": evaluation},
                                            "remove": [out / "probe"]}
        return stages

    def _check_stale(self, stages: dict[str, dict[str, Any]], ledger: StageLedger) -> None:
        """Stop (exit 2) naming the finished stages whose inputs changed, or with rerun_stale
        delete their outputs so that they run again.

        Raises:
            UserError: a stale stage and no rerun_stale.
        """
        stale: dict[str, list[str]] = {}
        for label, entry in stages.items():
            begun = _changes(entry["partial"], entry["fingerprint"]) if entry.get("partial") is not None else []
            if begun:
                stale[label] = [f"begun with other settings: {c}" for c in begun]
            elif entry["output"].exists():
                found = ledger.stale(label, entry["fingerprint"])
                if found is not None:
                    stale[label] = found
        for name in (run.key for run in training_runs(self.study)):  # a retrained run's export and evaluation are stale too
            for label in (f"export {name}", f"evaluate {name}"):
                if f"train {name}" in stale and label not in stale and stages[label]["output"].exists():
                    stale[label] = ["its training stage changed"]
        if not stale:
            return
        if not self.rerun_stale:
            named = "; ".join(f"{label} ({', '.join(found[:3])}{', ...' if len(found) > 3 else ''})"
                              for label, found in stale.items())
            raise UserError(f"study {self.study.name}: {len(stale)} finished stage(s) in {self.out} no longer match "
                            f"the study: {named}; run again with --rerun-stale to redo them, or restore the old settings")
        for label in stale:
            print(f"[study {self.study.name}] {label}: stale, running it again ({', '.join(stale[label][:3])})", flush=True)
            for path in stages[label]["remove"]:
                if path.is_dir():
                    shutil.rmtree(path)
                else:
                    path.unlink(missing_ok=True)
            ledger.forget(label)

    def run(self) -> Path:
        """Train, export and evaluate every variant, evaluate the base, write the report.

        Returns:
            The report folder.
        """
        study, out = self.study, self.out
        stages = self._stages()
        ledger = StageLedger(out)
        self._check_stale(stages, ledger)  # before anything is written
        tasks = self.tasks_arguments()
        for sub in ("runs", "models", "results"):
            (out / sub).mkdir(parents=True, exist_ok=True)
        reuse_finished(stages, out, ledger, self.reuse, lambda line: print(f"[study {study.name}] {line}", flush=True))
        runs = training_runs(study)

        def stage(key: str, label: str, done: str, command: list[str]) -> None:
            # recorded before the stage runs: a study killed just after the stage finished must
            # not leave an output without the inputs it was made from
            ledger.record(key, stages[key]["fingerprint"])
            if stages[key]["output"].exists():
                print(f"[study {study.name}] {done}", flush=True)
            else:
                self._run(label, command, key)

        for i, run in enumerate(runs, 1):
            name = run.key
            recipe = _recipe_path(study, self.root, run.variant)
            run_dir, model_dir = out / "runs" / name, out / "models" / name
            overrides = _overrides(study, run.variant, run.seed) + [f"train.output_dir={run_dir}"]
            prefix = f"({i}/{len(runs)}) {name}"
            ledger.record(f"train {name}", stages[f"train {name}"]["fingerprint"])
            if (run_dir / "TRAINED").exists():
                print(f"[study {study.name}] {prefix}: trained already", flush=True)
            else:
                self._run(f"{prefix}: train", _train_command(study, recipe, overrides, self.root), f"train {name}")
                (run_dir / "TRAINED").write_text("ok\n")
            stage(f"export {name}", f"{prefix}: export", f"{prefix}: exported already",
                  [sys.executable, "-m", "dsembed.cli.consolidate", str(run_dir), str(model_dir)])
            # results of a variant's seeds share its name: dsembed-compare averages them per dataset
            stage(f"evaluate {name}", f"{prefix}: evaluate", f"{prefix}: evaluated already",
                  self._evaluate_command([str(model_dir)], run.variant, tasks, results_name=name))
        if study.include_base:
            stage(f"evaluate {BASE_NAME}", f"{BASE_NAME}: evaluate", f"{BASE_NAME}: evaluated already",
                  self._evaluate_command(self._base_target(), BASE_NAME, tasks))
        if study.probe_base:
            stage(f"probe {BASE_NAME}", f"{BASE_NAME}: probe layers", f"{BASE_NAME}: probed already",
                  self._probe_command(tasks))
        results = [str(out / "results" / f"{n}.json")
                   for n in ([BASE_NAME] if study.include_base else []) + [run.key for run in runs]]
        baseline = study.baseline or (BASE_NAME if study.include_base else runs[0].variant)
        compare = [sys.executable, "-m", "dsembed.cli.compare", *results, "--baseline", baseline,
                   "--output", str(out / "report"), "--holm-family", holm_family(study)]
        if study.include_base and baseline != BASE_NAME:
            compare += ["--reference", BASE_NAME]  # shown, not a question of the study: outside the Holm family
        self._run("compare", compare)
        write_text_atomic(out / "report" / "stage-times.md", f"# Wall time per stage ({study.name})\n\n{times_table(out)}")
        return out / "report"
