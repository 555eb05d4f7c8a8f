"""dsembed-probe-layers: score the mean-pooled states of every layer of a model on every task.

    dsembed-probe-layers MODEL_DIR --tasks-dir ../shared/data/tasks --output-dir probe/ [--limit 128]
    dsembed-probe-layers recipes/paper/smollm2-135m/model1.yaml --tasks-dir TASKS --output-dir probe/

SOURCE is an exported model folder (dsembed-consolidate) or a recipe (its untrained backbone; any
`--override KEY=VALUE` applies). One forward per batch with taps on all layers; each layer's masked
means are scored through the same mteb path as dsembed-evaluate, with the same instructions and
limits. Writes OUT/layers.json (layer -> task -> main score, category means, best layer per
category) and OUT/layers.png, and prints the best layer per category.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from dsembed.errors import UserError, run_cli


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="dsembed-probe-layers", description=__doc__.split("\n")[0])
    p.add_argument("source", help="exported model folder, or a recipe YAML (its untrained backbone)")
    p.add_argument("--tasks-dir", metavar="ROOT", help="local tasks in ROOT/<type>/<Name>")
    p.add_argument("--tasks", nargs="+", metavar="PRESET_OR_NAME",
                   help="presets or MTEB task names (with --tasks-dir: names of local tasks to keep)")
    p.add_argument("--output-dir", required=True, metavar="OUT")
    p.add_argument("--limit", type=int, default=None, metavar="N", help="about N test items per task, as dsembed-evaluate")
    p.add_argument("--task-limit", action="append", default=[], metavar="TASK=N", help="--limit for one task; repeatable")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--override", action="append", default=[], metavar="KEY=VALUE",
                   help="recipe override when SOURCE is a recipe; repeatable")
    p.add_argument("--device", default=None, help="default: cuda when available, else cpu")
    return p


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    from dsembed.config import load_recipe
    from dsembed.evaluation import run
    from dsembed.evaluation.probe import probe_layers, write_probe
    from dsembed.evaluation.tasks import load_local_tasks

    source = Path(args.source)
    is_recipe = source.suffix in (".yaml", ".yml")
    if is_recipe and not source.is_file():
        raise UserError(f"recipe {source} does not exist")
    if not is_recipe and not (source / "dsembed.json").is_file():
        raise UserError(f"{source} is neither a recipe (.yaml) nor an exported model folder with dsembed.json (export a run with dsembed-consolidate)")
    if args.override and not is_recipe:
        raise UserError("--override applies to a recipe SOURCE only")
    if not args.tasks and not args.tasks_dir:
        raise UserError("no tasks: give --tasks-dir ROOT and/or --tasks PRESET_OR_NAME...")
    if args.limit is not None and args.limit < 2:
        raise UserError("--limit must be at least 2")
    recipe = load_recipe(source, args.override) if is_recipe else None
    tasks = load_local_tasks(args.tasks_dir, args.tasks or None) if args.tasks_dir else run.named_tasks(args.tasks)
    task_limits = run.parse_task_limits(args.task_limit, tasks)
    run.prepare_tasks(tasks, limit=args.limit, task_limits=task_limits)
    instructions = run.resolve_instructions(tasks)

    import torch

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    if recipe is not None:
        from dsembed.modeling.model import build_model
        from dsembed.modeling.precision import resolve_recipe

        recipe = resolve_recipe(recipe, device=device)  # auto: bf16 where this device computes it natively
        model = build_model(recipe, attn_fallback=True).to(device).eval()  # GPU recipes probe on CPU machines too
    else:
        from dsembed.modeling.model import EmbeddingModel

        model = EmbeddingModel.load(source, device=device)
    result = probe_layers(model, tasks, instructions, batch_size=args.batch_size,
                          log=lambda line: print(line, file=sys.stderr, flush=True))
    result["source"] = str(source)
    result["settings"] = {"limit": args.limit, "task_limits": task_limits,
                          "batch_size": args.batch_size, "instructions": instructions}
    paths = write_probe(result, Path(args.output_dir))
    for category, best in result["best"].items():
        print(f"best layer for {category}: {best['layer']} of {len(result['layers'])} ({100 * best['score']:.2f})")
    print(f"probe written to {paths[0]} and {paths[1]}")
    return 0


def cli() -> None:
    """Console-script entry point."""
    sys.exit(run_cli(main))


if __name__ == "__main__":
    cli()
