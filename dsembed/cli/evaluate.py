"""dsembed-evaluate: score a saved dsembed model (or an untrained backbone) on MTEB tasks.

    dsembed-evaluate MODEL_DIR --tasks paper-sts paper-retrieval --output results/model5.json
    dsembed-evaluate MODEL_DIR --tasks-dir ../shared/data/tasks --limit 200 --output r.json
    dsembed-evaluate --base recipes/tiny-cpu.yaml --tasks-dir tasks --output base.json

With neither --tasks nor --tasks-dir, the model recipe's `eval` section decides. An exported model's
README.md (model card) gets the scores: the hub's model-index metadata and a results table (the
main scores of every evaluation so far are kept in MODEL_DIR/eval_results.json). With both, --tasks
picks task names under --tasks-dir. Task data is loaded before the model, so a missing folder or an
unreachable hub fails in a second. Results JSON (format "dsembed-eval/1"):
  {"format", "model": {"name", "path"|"recipe", "pooling", "attention"}, "mteb_version", "created",
   "settings": {"batch_size", "limit", "task_limits", "instructions"},
   "layer_weights": {"layers": [int], "norms": [float]} | null,
   "tasks": {NAME: {"category", "type", "main_metric", "main_score", "items_score", "split",
                    "instruction", "source", "scores": {subset: {metric: value}},
                    "items": {subset: ITEMS} | null}},
   "categories": {CATEGORY: {"mean", "n_tasks", "tasks"}}}
  ITEMS: sts {"cosine", "gold"}; retrieval {"query_ids", "ndcg_at_10"};
         classification {"gold", "correct"}; clustering {"sets": [{"labels", "clusters"}]}.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

from dsembed.errors import UserError, run_cli


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="dsembed-evaluate", description=__doc__.split("\n")[0])
    p.add_argument("model_dir", nargs="?", help="folder written by EmbeddingModel.save")
    p.add_argument("--base", metavar="RECIPE.yaml", help="evaluate the untrained model a recipe builds")
    p.add_argument("--tasks", nargs="+", metavar="PRESET_OR_NAME",
                   help="paper-sts, paper-retrieval, paper-classification, paper-clustering, "
                        "paper-all, or task names")
    p.add_argument("--tasks-dir", metavar="ROOT", help="local tasks in ROOT/<type>/<Name>")
    p.add_argument("--output", required=True, metavar="FILE.json")
    p.add_argument("--batch-size", type=int, default=None, help="default: the recipe's eval.batch_size")
    p.add_argument("--instruction", action="append", default=[], metavar="TASK=TEXT",
                   help="query instruction for a task (empty TEXT: none); repeatable")
    p.add_argument("--limit", type=int, default=None, metavar="N", help="about N test items per task (STS: the pairs among at most 2N distinct texts)")
    p.add_argument("--task-limit", action="append", default=[], metavar="TASK=N",
                   help="--limit for one task (overrides --limit there); repeatable")
    p.add_argument("--name", help="variant name recorded in the results (default: the folder name)")
    p.add_argument("--device", default=None, help="default: cuda when available, else cpu")
    p.add_argument("--no-progress", action="store_true", help="no encoding progress bars")
    p.add_argument("--override", action="append", default=[], metavar="KEY=VALUE",
                   help="recipe override for --base (as dsembed-train key=value); repeatable")
    return p


def _overrides(pairs: list[str]) -> dict[str, str]:
    out = {}
    for pair in pairs:
        task, sep, text = pair.partition("=")
        if not sep or not task:
            raise UserError(f"--instruction {pair!r}: expected TASK=TEXT")
        out[task] = text
    return out


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    from dsembed.config import load_recipe
    from dsembed.evaluation import run
    from dsembed.evaluation.report import format_results_table
    from dsembed.evaluation.tasks import load_local_tasks

    if bool(args.model_dir) == bool(args.base):
        raise UserError("give exactly one of MODEL_DIR or --base RECIPE.yaml")
    if args.limit is not None and args.limit < 2:
        raise UserError("--limit must be at least 2")
    recipe_path = Path(args.base) if args.base else Path(args.model_dir) / "recipe.yaml"
    if args.model_dir and not Path(args.model_dir).is_dir():
        raise UserError(f"model folder {args.model_dir} does not exist")
    if args.override and not args.base:
        raise UserError("--override applies to --base RECIPE.yaml only")
    recipe = load_recipe(recipe_path, args.override) if recipe_path.is_file() else None
    if args.base and recipe is None:
        raise UserError(f"recipe {args.base} does not exist")
    eval_cfg = recipe.eval if recipe is not None else None
    names = args.tasks or ([] if args.tasks_dir or eval_cfg is None else list(eval_cfg.tasks))
    tasks_dir = args.tasks_dir or (str(recipe.resolve_path(eval_cfg.tasks_dir))
                                   if not args.tasks and eval_cfg and eval_cfg.tasks_dir else None)
    if not names and not tasks_dir:
        raise UserError("no tasks: give --tasks PRESET_OR_NAME... or --tasks-dir ROOT")
    tasks = load_local_tasks(tasks_dir, names or None) if tasks_dir else run.named_tasks(names)
    task_limits = run.parse_task_limits(args.task_limit, tasks)
    run.prepare_tasks(tasks, limit=args.limit, task_limits=task_limits)
    evaluated = {t.metadata.name for t in tasks}
    # The recipe may hold instructions for tasks not run now; a command-line one must name a task.
    overrides = {k: v for k, v in (eval_cfg.instructions if eval_cfg else {}).items() if k in evaluated}
    overrides.update(_overrides(args.instruction))
    instructions = run.resolve_instructions(tasks, overrides)
    batch_size = args.batch_size or (eval_cfg.batch_size if eval_cfg else 32)

    import torch

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    if args.base:
        from dsembed.modeling.model import build_model

        model = build_model(recipe, attn_fallback=True).to(device).eval()
        info = {"name": args.name or f"base-{Path(args.base).stem}", "recipe": str(args.base)}
    else:
        from dsembed.modeling.model import EmbeddingModel

        model = EmbeddingModel.load(args.model_dir, device=device)
        info = {"name": args.name or Path(args.model_dir).resolve().name, "path": str(args.model_dir)}
    if recipe is not None:
        info.update(pooling=recipe.pooling.type, attention=recipe.attention.mode)
    results = run.evaluate_tasks(model, tasks, model_name=info["name"], instructions=instructions,
                                 batch_size=batch_size, show_progress=not args.no_progress,
                                 log=lambda line: print(line, file=sys.stderr, flush=True))
    results["model"] = info
    results["settings"] = {"batch_size": batch_size, "limit": args.limit, "task_limits": task_limits,
                           "instructions": instructions}
    results["layer_weights"] = run.layer_weight_info(model)
    output = Path(args.output)
    output.parent.mkdir(parents=True, exist_ok=True)
    # atomic: dsembed-study treats an existing results file as a finished stage
    partial = output.with_name(f"{output.name}.tmp-{os.getpid()}")
    partial.write_text(json.dumps(results), encoding="utf-8")
    os.replace(partial, output)
    print(format_results_table(results))
    print(f"results written to {output}")
    if args.model_dir:
        from dsembed.model_card import add_results

        card = add_results(args.model_dir, results)
        if card is not None:
            print(f"model card updated with the scores (model-index): {card}")
    return 0


def cli() -> None:
    """Console-script entry point."""
    sys.exit(run_cli(main))


if __name__ == "__main__":
    cli()
