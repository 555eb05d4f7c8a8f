"""A study file: its schema (`StudyConfig`, strict like recipes), its checks, and what follows from
it without running anything: the training runs (variant x seed), each run's recipe and overrides,
the Holm family. dsembed.study.runner runs the stages; dsembed.study.plan estimates them."""
from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from dsembed.config import load_recipe
from dsembed.errors import RecipeError
from dsembed.recipe_rules import validate
from dsembed.strict import from_dict, read_yaml_mapping

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
    # how a LoRA run is exported for its evaluation: merged (weights folded in, written in float32 for
    # a bf16 run: loads anywhere without peft) or adapter (evaluated as it trained: a bf16 backbone
    # with bf16 adapters, 1.5x faster to encode than the float32 merge on a bf16 CPU)
    lora_export: Literal["merged", "adapter"] = "merged"
    # exploratory comparisons beside the pre-specified one against the baseline: name -> [variant,
    # the variant it is tested against], e.g. bidirectional vs causal attention with the same head.
    # Each gets its own report (report/contrasts/<name>/; Holm over the contrast's own categories).
    contrasts: dict[str, list[str]] = field(default_factory=dict)


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
        if not hostfile_path(study, path.resolve().parent).is_file():
            raise RecipeError(f"{where}: hostfile {study.hostfile} not found (one 'hostname slots=N' line per node)")
    elif study.nnodes > 1:
        raise RecipeError(f"{where}: nnodes = {study.nnodes} needs a hostfile naming the nodes ('hostname slots=N' lines)")
    unknown = set(study.variant_overrides) - set(study.variants)
    if unknown:
        raise RecipeError(f"{where}: variant_overrides names {sorted(unknown)} that are not in variants")
    names = list(study.variants) + ([BASE_NAME] if study.include_base else [])
    if study.baseline is not None and study.baseline not in names:
        raise RecipeError(f"{where}: baseline = {study.baseline!r} is not one of {names}")
    for label, pair in study.contrasts.items():
        if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]*", label):
            raise RecipeError(f"{where}: contrasts: the name {label!r} names a report folder (letters, digits, . _ -)")
        if len(pair) != 2 or pair[0] == pair[1] or not set(pair) <= set(names):
            raise RecipeError(f"{where}: contrasts: {label} = {pair} should be [variant, variant it is tested "
                              f"against]: two different names of {names}")
    if BASE_NAME in study.variants:
        raise RecipeError(f"{where}: variants: the name {BASE_NAME!r} is reserved for the untrained backbone")
    if not study.tasks and study.tasks_dir is None:
        raise RecipeError(f"{where}: give tasks (presets or MTEB names) or tasks_dir")
    if study.seeds is not None and (not study.seeds or len(set(study.seeds)) != len(study.seeds)):
        raise RecipeError(f"{where}: seeds = {study.seeds} should list distinct seeds (or leave seeds out: one run)")
    root = path.resolve().parent
    for name in study.variants:
        recipe = load_recipe(recipe_path(study, root, name), run_overrides(study, name))
        validate(recipe, world_size=study.nproc * study.nnodes)
        check_data_files(recipe)
    return study, root


def hostfile_path(study: StudyConfig, root: Path) -> Path:
    path = Path(study.hostfile)
    return path if path.is_absolute() else root / path


def recipe_path(study: StudyConfig, root: Path, name: str) -> Path:
    path = Path(study.variants[name])
    return path if path.is_absolute() else root / path


def run_overrides(study: StudyConfig, name: str, seed: int | None = None) -> list[str]:
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
