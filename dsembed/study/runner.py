"""A study: train several recipes, export each, evaluate them (and the untrained base), compare.

A study file is YAML (schema and checks: dsembed.study.config). Each stage runs as its own process
through the same command lines a user would type, so a multi-rank launcher, DeepSpeed process
groups and memory are fresh for every stage, and a study interrupted anywhere resumes: finished
stages are recognised by what they leave behind.

    <output_dir>/runs/<variant>/        training run (checkpoints/, tensorboard/); TRAINED when done
    <output_dir>/models/<variant>/      consolidated model (dsembed + sentence-transformers folder; LoRA merged,
                                        or kept as adapter/ with `lora_export: adapter`)
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

import json
import os
import shlex
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from dsembed.config import load_recipe
from dsembed.errors import UserError
from dsembed.atomic import write_text_atomic
from dsembed.study.config import (BASE_NAME, StudyConfig, holm_family, hostfile_path,
                                  recipe_path, run_overrides, training_runs)
from dsembed.study.stages import (StageLedger, base_fingerprint, changes as _changes, check_reuse_sources, export_form,
                                  recipe_fingerprint, record_time, reuse_finished, times_table)

def _train_command(study: StudyConfig, recipe: Path, overrides: list[str], root: Path = Path(".")) -> list[str]:
    if study.launcher == "torchrun":
        head = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(study.nproc),
                *study.launcher_args, "-m", "dsembed.train"]
    elif study.launcher == "deepspeed":
        nodes = ["--num_nodes", str(study.nnodes)] if study.nnodes > 1 else []
        hostfile = ["--hostfile", str(hostfile_path(study, root))] if study.hostfile is not None else []
        head = ["deepspeed", *hostfile, *nodes, "--num_gpus", str(study.nproc), *study.launcher_args,
                "--no_local_rank", "--module", "dsembed.train"]
    else:
        head = [sys.executable, "-m", "dsembed.train"]
    return head + [str(recipe), *overrides]


class StudyRunner:
    """Runs the stages of one study in order, skipping what is already done."""

    def __init__(self, study: StudyConfig, root: Path, out: Path | None = None, rerun_stale: bool = False,
                 reuse: list[Path] | None = None, models: list[str] | None = None,
                 only: list[str] | None = None) -> None:
        self.study = study
        runs = [run.key for run in training_runs(study)]
        unknown = [name for name in models or [] if name not in runs]
        if unknown:
            raise UserError(f"study {study.name}: --model {unknown[0]} is not a run of the study; "
                            f"name one of: {', '.join(runs)}")
        self.models = list(models or [])  # runs to train and export even where their evaluation is finished
        self.only = None if only is None else list(only)  # stage labels to run now; the others are left as they are
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
        return ["--base", str(recipe_path(self.study, self.root, first)),
                *[f"--override={o}" for o in run_overrides(self.study, first)]]

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
            recipe = load_recipe(recipe_path(study, self.root, run.variant), run_overrides(study, run.variant, run.seed))
            trained = recipe_fingerprint(recipe)
            partial = None
            if not (run_dir / "TRAINED").exists() and (run_dir / "recipe.yaml").is_file():
                # the run directory records what model.dtype: auto resolved to on the machine that
                # began it, and a resume keeps it (bf16 there, float32 here: not one run)
                begun = recipe_fingerprint(load_recipe(run_dir / "recipe.yaml"))
                if recipe.model.dtype == "auto" and begun["recipe"]["model.dtype"] != "auto":
                    begun["recipe"]["model.dtype_resolved"] = begun["recipe"]["model.dtype"]
                    begun["recipe"]["model.dtype"] = "auto"
                partial = {**begun, "model": trained["model"]}  # what a resume would mix with
            stages[f"train {name}"] = {"output": run_dir / "TRAINED", "fingerprint": trained, "partial": partial,
                                       "remove": [run_dir]}
            exported = export_form(recipe, study.lora_export)
            stages[f"export {name}"] = {"output": out / "models" / name / "dsembed.json",
                                        "fingerprint": {"train": trained, **exported}, "remove": [out / "models" / name]}
            stages[f"evaluate {name}"] = {"output": out / "results" / f"{name}.json",
                                          "fingerprint": {"train": trained, **exported, "evaluation": evaluation},
                                          "remove": [out / "results" / f"{name}.json"]}
        if study.include_base:
            first = next(iter(study.variants))
            base = base_fingerprint(load_recipe(recipe_path(study, self.root, first), run_overrides(study, first)))
            stages[f"evaluate {BASE_NAME}"] = {"output": out / "results" / f"{BASE_NAME}.json",
                                               "fingerprint": {"base": base, "evaluation": evaluation},
                                               "remove": [out / "results" / f"{BASE_NAME}.json"]}
        if study.probe_base:
            stages[f"probe {BASE_NAME}"] = {"output": out / "probe" / "layers.json",
                                            "fingerprint": {"base": base, "evaluation": evaluation},
                                            "remove": [out / "probe"]}
        return stages

    def _check_only(self, stages: dict[str, dict[str, Any]]) -> None:
        """The stages `only` names exist and can run: what each reads is there or runs first.

        Raises:
            UserError: an unknown stage label, or a stage whose input is missing.
        """
        for label in self.only or []:
            if label not in stages:
                raise UserError(f"study {self.study.name}: --stage {label!r} is not a stage of the study; stages: "
                                f"{', '.join(list(stages)[:6])}, ... (dsembed-study FILE --plan lists them all)")
            verb, name = label.split(" ", 1)
            needs = {"export": f"train {name}", "evaluate": f"export {name}"}.get(verb) if name != BASE_NAME else None
            if needs and needs not in self.only and not stages[needs]["output"].exists():
                raise UserError(f"study {self.study.name}: --stage {label!r} needs {needs!r}, which has not run here; "
                                f"add --stage {needs!r} (and what it needs), or leave --stage out")

    def not_needed(self, stages: dict[str, dict[str, Any]]) -> set[str]:
        """Train and export stages that no stage of the study still needs: the run's evaluation is
        finished (often reused from an earlier machine), its model is not here and not asked for
        (`models`). Retraining it would cost minutes and change no result of the study."""
        skipped: set[str] = set()
        for name in (run.key for run in training_runs(self.study)):
            if (stages[f"evaluate {name}"]["output"].exists() and name not in self.models
                    and not stages[f"train {name}"]["output"].exists() and not stages[f"export {name}"]["output"].exists()):
                skipped |= {f"train {name}", f"export {name}"}
        return skipped

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
        self._check_only(stages)
        tasks = self.tasks_arguments()
        for sub in ("runs", "models", "results"):
            (out / sub).mkdir(parents=True, exist_ok=True)
        reuse_finished(stages, out, ledger, self.reuse, lambda line: print(f"[study {study.name}] {line}", flush=True))
        runs = training_runs(study)
        skipped = self.not_needed(stages)
        if self.only is not None:  # --stage: the named stages and nothing else
            skipped = set(stages) - set(self.only)

        def stage(key: str, label: str, done: str, command: list[str]) -> None:
            if key in skipped:
                return
            # recorded before the stage runs: a study killed just after the stage finished must
            # not leave an output without the inputs it was made from
            ledger.record(key, stages[key]["fingerprint"])
            if stages[key]["output"].exists():
                print(f"[study {study.name}] {done}", flush=True)
            else:
                self._run(label, command, key)

        for i, run in enumerate(runs, 1):
            name = run.key
            recipe = recipe_path(study, self.root, run.variant)
            run_dir, model_dir = out / "runs" / name, out / "models" / name
            overrides = run_overrides(study, run.variant, run.seed) + [f"train.output_dir={run_dir}"]
            prefix = f"({i}/{len(runs)}) {name}"
            if f"train {name}" in skipped:
                if self.only is None:
                    print(f"[study {study.name}] {prefix}: evaluated already; not trained here (its model is not "
                          f"needed; --model {name} trains it)", flush=True)
                    continue
            elif (run_dir / "TRAINED").exists():
                ledger.record(f"train {name}", stages[f"train {name}"]["fingerprint"])
                print(f"[study {study.name}] {prefix}: trained already", flush=True)
            else:
                ledger.record(f"train {name}", stages[f"train {name}"]["fingerprint"])
                self._run(f"{prefix}: train", _train_command(study, recipe, overrides, self.root), f"train {name}")
                (run_dir / "TRAINED").write_text("ok\n")
            form = stages[f"export {name}"]["fingerprint"].get("export", {}).get("lora")
            keep = ["--keep-adapter"] if form == "adapter" else []
            stage(f"export {name}", f"{prefix}: export", f"{prefix}: exported already",
                  [sys.executable, "-m", "dsembed.cli.consolidate", str(run_dir), str(model_dir), *keep])
            # results of a variant's seeds share its name: dsembed-compare averages them per dataset
            stage(f"evaluate {name}", f"{prefix}: evaluate", f"{prefix}: evaluated already",
                  self._evaluate_command([str(model_dir)], run.variant, tasks, results_name=name))
        if study.include_base:
            stage(f"evaluate {BASE_NAME}", f"{BASE_NAME}: evaluate", f"{BASE_NAME}: evaluated already",
                  self._evaluate_command(self._base_target(), BASE_NAME, tasks))
        if study.probe_base:
            stage(f"probe {BASE_NAME}", f"{BASE_NAME}: probe layers", f"{BASE_NAME}: probed already",
                  self._probe_command(tasks))
        if self.only is not None:
            print(f"[study {study.name}] ran the stages asked for ({', '.join(self.only)}); a run without --stage "
                  "runs the rest and writes the report", flush=True)
            return out / "report"
        results = [str(out / "results" / f"{n}.json")
                   for n in ([BASE_NAME] if study.include_base else []) + [run.key for run in runs]]
        baseline = study.baseline or (BASE_NAME if study.include_base else runs[0].variant)
        compare = [sys.executable, "-m", "dsembed.cli.compare", *results, "--baseline", baseline,
                   "--output", str(out / "report"), "--holm-family", holm_family(study)]
        if study.include_base and baseline != BASE_NAME:
            compare += ["--reference", BASE_NAME]  # shown, not a question of the study: outside the Holm family
        self._run("compare", compare)
        for label, (variant, against) in study.contrasts.items():  # each tested variant is its own Holm family
            keys = {BASE_NAME} if BASE_NAME in (variant, against) else set()
            keys |= {run.key for run in runs if run.variant in (variant, against)}
            self._run(f"compare {label}", [sys.executable, "-m", "dsembed.cli.compare",
                                           *[r for r in results if Path(r).stem in keys], "--baseline", against,
                                           "--output", str(out / "report" / "contrasts" / label),
                                           "--holm-family", holm_family(study)])
        if study.contrasts:  # their answers in the study's report too: a reader of report.md sees them
            report = out / "report" / "report.md"
            write_text_atomic(report, report.read_text(encoding="utf-8") + contrasts_section(out / "report", study))
        write_text_atomic(out / "report" / "stage-times.md", f"# Wall time per stage ({study.name})\n\n{times_table(out)}")
        return out / "report"


def contrasts_section(report_dir: Path, study: StudyConfig) -> str:
    """Markdown: each contrast's answers (one line per category), linking its own report."""
    from dsembed.evaluation.report import answers

    out = ["", "## Contrasts (exploratory, beside the comparison against the baseline)", ""]
    for label, (variant, against) in study.contrasts.items():
        comparison = json.loads((report_dir / "contrasts" / label / "comparison.json").read_text(encoding="utf-8"))
        out += [f"### {label}: {variant} against {against} ([report](contrasts/{label}/report.md))", ""]
        out += [f"- {line}" for line in answers(comparison)] + [""]
    return "\n".join(out)

