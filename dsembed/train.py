"""Entry point: `python -m dsembed.train RECIPE [key=value ...] [--dry-run]`.

Launch on several processes with either launcher (both set RANK / WORLD_SIZE / LOCAL_RANK):
    torchrun --nproc_per_node 8 -m dsembed.train recipes/x.yaml
    deepspeed --num_gpus 8 --no_local_rank --module dsembed.train recipes/x.yaml
A stray `--local_rank N` (deepspeed without --no_local_rank) is accepted and ignored. User mistakes
print one line `error: ...` and exit with code 2, before any run directory is created.
"""
from __future__ import annotations

import argparse
import sys
from typing import Any

from dsembed.config import Recipe, load_recipe
from dsembed.recipe_rules import validate
from dsembed.errors import RecipeError, run_cli


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="dsembed-train", description="Fine-tune a decoder LLM into an embedding model.")
    parser.add_argument("recipe", help="recipe YAML (see recipes/)")
    parser.add_argument("overrides", nargs="*", metavar="key=value", help="dotted overrides, e.g. train.max_steps=10")
    parser.add_argument("--dry-run", action="store_true", help="validate, print the resolved recipe and head size, exit")
    parser.add_argument("--world-size", type=int, default=None, metavar="N",
                        help="with --dry-run: check the batch arithmetic for N ranks (e.g. 8 GPUs) on a machine without them")
    parser.add_argument("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)
    return parser


def _backbone_shape(recipe: Recipe) -> tuple[int, int] | None:
    """(hidden_size, num_layers) without loading weights, or None when no config is available offline."""
    m = recipe.model
    try:
        from transformers import AutoConfig

        if m.random_init is not None:
            options = dict(m.random_init)
            config = AutoConfig.for_model(options.pop("model_type"), **options)
        elif not m.name_or_path.startswith("pkg:") and not m.name_or_path.endswith(".gguf") and m.gguf_file is None:
            local = recipe.resolve_path(m.name_or_path)
            config = AutoConfig.from_pretrained(str(local) if local.exists() else m.name_or_path, revision=m.revision,
                                                local_files_only=True, trust_remote_code=m.trust_remote_code)
        else:
            return None
        return int(config.hidden_size), int(config.num_hidden_layers)
    except (OSError, ValueError, KeyError, AttributeError):
        return None


def dry_run(recipe: Recipe) -> None:
    """Check the data files, print the resolved recipe and the pooling head's parameter count (meta device, no weights).

    Raises:
        DataError: a `data.train` file that does not exist.
    """
    from dsembed.data.rows import check_data_files
    from dsembed.modeling.pooling import count_head_parameters

    from dsembed.modeling.precision import resolve_recipe

    check_data_files(recipe)
    # model.dtype: auto as this machine would train it; the line is a YAML comment, the output stays YAML
    recipe = resolve_recipe(recipe, say=lambda line: print(f"# {line}"))
    print(recipe.to_yaml(), end="")
    shape = _backbone_shape(recipe)
    if shape is None:
        print(f"pooling head ({recipe.pooling.type}) parameters: unknown (config not available offline)")
        return
    hidden, layers = shape
    validate(recipe, num_layers=layers)
    count = count_head_parameters(recipe.pooling, hidden, layers)
    print(f"backbone: hidden size {hidden}, {layers} decoder layers")
    print(f"pooling head ({recipe.pooling.type}) parameters: {count:,}")


def main(argv: list[str] | None = None) -> int:
    """Parse the command line, validate the recipe, then dry-run or train.

    Raises:
        RecipeError: an invalid recipe, override or run directory state.
    """
    args = _parser().parse_intermixed_args(argv)
    recipe = load_recipe(args.recipe, args.overrides)  # before torch is imported: schema errors in ~0.2 s
    from dsembed.distributed import world_size

    if args.world_size is not None and (not args.dry_run or args.world_size < 1):
        raise RecipeError(f"--world-size {args.world_size}: give a positive number of ranks, together with --dry-run "
                          "(a real run takes its world size from the launcher)")
    validate(recipe, world_size=args.world_size or world_size())
    if args.dry_run:
        dry_run(recipe)
        return 0
    from dsembed.training.trainer import train

    step = train(recipe)
    _say(f"finished at step {step}; checkpoints in {recipe.train.output_dir}/checkpoints")
    return 0


def _say(message: Any) -> None:
    from dsembed.distributed import is_main

    if is_main():
        print(message, file=sys.stderr, flush=True)


def cli() -> None:
    """Console script `dsembed-train`."""
    from dsembed.distributed import exit_process

    exit_process(run_cli(main))  # a rank skips finalization, where gloo threads can abort it


if __name__ == "__main__":
    cli()
