"""`dsembed-study STUDY.yaml [--output-dir DIR]`: train, export, evaluate and compare every recipe
of a study; run it again to resume after an interruption (finished stages are skipped)."""
from __future__ import annotations

import argparse
from pathlib import Path

from dsembed.errors import run_cli
from dsembed.study.config import load_study
from dsembed.study.runner import StudyRunner


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="dsembed-study", description=__doc__)
    parser.add_argument("study", help="study YAML (see recipes/studies/)")
    parser.add_argument("--output-dir", help="where runs, models, results and the report go (default: the study's output_dir)")
    parser.add_argument("--override", action="append", default=[], metavar="KEY=VALUE",
                        help="recipe override for every variant, after the study's own; repeatable")
    parser.add_argument("--tasks-dir", metavar="ROOT", help="evaluate on the local tasks in ROOT instead of the study's tasks")
    parser.add_argument("--rerun-stale", action="store_true",
                        help="redo finished stages whose recipe, overrides, input model or evaluation settings changed "
                             "(default: name them and exit with code 2)")
    parser.add_argument("--reuse", action="append", default=[], metavar="DIR",
                        help="another study's output folder: copy its finished stages that were made from the same "
                             "recipe, inputs and settings instead of running them; repeatable")
    parser.add_argument("--save-finished", metavar="DEST",
                        help="copy the finished evaluations and layer probe of --output-dir (results, probe/, stages.json "
                             "entries, stage times), merged into what DEST holds, to DEST, a folder --reuse takes on "
                             "another machine; runs nothing")
    parser.add_argument("--model", action="append", default=[], metavar="RUN",
                        help="train and export RUN (e.g. model1-s0) even where its evaluation is already finished; "
                             "by default such runs are not retrained (their model is not needed); repeatable")
    parser.add_argument("--stage", action="append", default=None, metavar="LABEL",
                        help="run only this stage (e.g. 'evaluate base', 'train model2-s1'; --plan lists them), "
                             "for instance on another machine beside the main run; no report; repeatable")
    parser.add_argument("--nnodes", type=int, help="nodes per training run (launcher deepspeed; overrides the study's nnodes)")
    parser.add_argument("--hostfile", help="DeepSpeed hostfile naming the nodes (overrides the study's hostfile)")
    parser.add_argument("--launcher-arg", action="append", default=[], metavar="ARG",
                        help="extra launcher argument, repeatable, e.g. --launcher-arg=--master_port=29600 "
                             "(replaces the study's launcher_args)")
    parser.add_argument("--plan", action="store_true",
                        help="print the stages, their estimated wall time here and the study's statistical power; "
                             "train and evaluate nothing")
    args = parser.parse_args(argv)
    hostfile = str(Path(args.hostfile).resolve()) if args.hostfile else None  # relative to the working directory
    study, root = load_study(args.study, {"nnodes": args.nnodes, "hostfile": hostfile, "launcher_args": args.launcher_arg,
                                          "output_dir": args.output_dir},
                             args.override, args.tasks_dir)
    if args.save_finished:
        from dsembed.study.stages import save_finished

        saved = save_finished(StudyRunner(study, root, args.output_dir).out, Path(args.save_finished))
        print(f"[study {study.name}] {args.save_finished}: {len(saved)} finished evaluation(s) and probe(s): {', '.join(saved)}")
        return 0
    if args.plan:
        from dsembed.study.plan import plan

        plan(study, root, Path(args.output_dir) if args.output_dir else None)
        return 0
    report = StudyRunner(study, root, args.output_dir, rerun_stale=args.rerun_stale, reuse=args.reuse,
                         models=args.model, only=args.stage).run()
    if args.stage is None:
        print(f"[study {study.name}] report: {report}/report.md", flush=True)
    return 0


def cli() -> None:
    raise SystemExit(run_cli(main))


if __name__ == "__main__":
    cli()
