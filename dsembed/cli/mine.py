"""dsembed-mine: write training data with K mined hard negatives per example, positive-aware.

    dsembed-mine MODEL_OR_RECIPE DATA... --output FILE [--negatives K] [--corpus FILE] [--margin 0.95]
        [--skip-top N] [--nproc N] [--batch-size B] [--overwrite] [--keep-shards]

MODEL_OR_RECIPE: an exported model folder (EmbeddingModel.load) or a recipe (its untrained model, as
`dsembed-evaluate --base`; seeded by train.seed). DATA: training entries as in data.train (JSONL
files, hf:, demo:, synthetic:). Queries are embedded with the instruction the model's recipe gives
their source; candidates are the positives and negatives of the same source (the `source` field,
else the file), or the texts of `--corpus` (JSONL, one {"text": ...} per line). A candidate equal to
the positive or the query, or scoring above margin x score(query, positive), is dropped; the
first --skip-top ranks are skipped; the next K are written (dsembed.mining.select). Output: JSONL rows
{"query", "positive", "negatives": [...], "source"} that data.train reads (data.num_negatives: K),
and FILE's record `<stem>.mining.json` (settings, the model's fingerprint, counts).
Ranks (torchrun, the deepspeed launcher or --nproc) share the encoding; finished shards are kept in
`<stem>.shards/` and a rerun resumes from them (dsembed.mining.job). Bad input: one line, exit 2,
nothing written.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import sys
from pathlib import Path
from typing import Any

from dsembed.errors import UserError, run_cli

def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="dsembed-mine", description=__doc__.split("\n")[0])
    p.add_argument("model", metavar="MODEL_OR_RECIPE", help="exported model folder, or a recipe YAML (untrained model)")
    p.add_argument("data", nargs="+", metavar="DATA", help="JSONL file (or hf:/demo:/synthetic: entry)")
    p.add_argument("--output", required=True, metavar="FILE.jsonl")
    p.add_argument("--negatives", type=int, default=4, metavar="K", help="hard negatives per example (default 4)")
    p.add_argument("--corpus", metavar="FILE.jsonl", help="candidate texts (default: each source's positives and negatives)")
    p.add_argument("--margin", type=float, default=0.95, help="drop candidates scoring above margin x the positive's score")
    p.add_argument("--skip-top", type=int, default=0, metavar="N", help="skip the N best remaining candidates")
    p.add_argument("--nproc", type=int, default=None, metavar="N", help="start N local ranks that share the encoding")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--shard-size", type=int, default=4096, metavar="N", help="texts / examples per resumable shard")
    p.add_argument("--device", default=None, help="default: this rank's GPU when CUDA is available, else cpu")
    p.add_argument("--override", action="append", default=[], metavar="KEY=VALUE", help="recipe override (recipes only)")
    p.add_argument("--skip-malformed", action="store_true", help="skip malformed data rows instead of failing")
    p.add_argument("--overwrite", action="store_true", help="replace an existing output; recompute stored shards")
    p.add_argument("--keep-shards", action="store_true", help="keep <stem>.shards/ (document embeddings) after success")
    p.add_argument("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)
    return p


def _log(line: str) -> None:
    print(line, file=sys.stderr, flush=True)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    args = _parser().parse_args(argv)
    from dsembed import distributed
    from dsembed.evaluation import ranks

    if args.nproc is not None and args.nproc < 1:
        raise UserError(f"--nproc {args.nproc}: give at least 1")
    if args.nproc is not None and args.nproc > 1:
        if distributed.world_size() > 1:
            raise UserError("--nproc starts local ranks itself; under torchrun or the deepspeed launcher leave it out")
        return ranks.launch_local(args.nproc, "dsembed.cli.mine", argv)
    ranks.start_ranks()
    try:
        if not distributed.is_main():
            spec = ranks.broadcast_from_main(None)
            if spec is not None:
                ranks.serve(_load_model(spec, args.device))
            return 0
        return _mine(args)
    finally:
        ranks.stop_ranks()


def _load_model(spec: dict[str, Any], device: str | None):
    """The model `spec` names, on this rank's device, in eval mode."""
    import torch

    from dsembed.evaluation import ranks
    from dsembed.modeling.model import EmbeddingModel, build_model

    if spec["folder"]:
        return EmbeddingModel.load(spec["folder"], device=ranks.rank_device(device))
    torch.manual_seed(spec["recipe"].train.seed)  # the untrained head: the same model on every rank and rerun
    return build_model(spec["recipe"], attn_fallback=True).to(ranks.rank_device(device)).eval()


def _source(args: argparse.Namespace) -> tuple[Any, str | None, str]:
    """(the model's recipe, the exported folder or None, the model's fingerprint)."""
    from dsembed.config import load_recipe
    from dsembed.recipe_rules import validate

    path = Path(args.model)
    if path.is_dir():
        from dsembed.evaluation.resume import folder_fingerprint
        from dsembed.modeling.files import check_exported_files

        if args.override:
            raise UserError("--override applies to a recipe, not to an exported model folder")
        if not (path / "dsembed.json").is_file():
            raise UserError(f"{path}: not a dsembed model folder (no dsembed.json) nor a recipe")
        check_exported_files(path)
        digest, _ = folder_fingerprint(path, skip={"README.md", "eval_results.json"})
        return load_recipe(path / "recipe.yaml"), str(path), f"sha256:{digest}"
    if not path.is_file():
        raise UserError(f"{path}: no such model folder or recipe")
    from dsembed.study.stages import recipe_fingerprint

    recipe = validate(load_recipe(path, args.override))
    digest = hashlib.sha256(json.dumps(recipe_fingerprint(recipe), sort_keys=True, default=str).encode()).hexdigest()
    return recipe, None, f"recipe:{digest}"


def _mine(args: argparse.Namespace) -> int:
    """Rank 0: check every input, then embed (shared over the ranks), select and write."""
    from dsembed.evaluation import ranks
    from dsembed.mining import job

    encoder = None
    try:
        if args.negatives < 1 or args.skip_top < 0 or args.batch_size < 1 or args.shard_size < 1:
            raise UserError("--negatives, --batch-size and --shard-size must be at least 1, --skip-top at least 0")
        if not 0 < args.margin <= 1:
            raise UserError(f"--margin {args.margin}: give a number in (0, 1] (0.95 drops candidates above 95% of the positive's score)")
        output = Path(args.output)
        if output.is_dir():
            raise UserError(f"--output {output} is a folder; give a file name such as mined.jsonl")
        recipe, folder, fingerprint = _source(args)
        plan = _plan(args, recipe, fingerprint, job)
        if not args.overwrite and job.up_to_date(output, plan.key):
            _log(f"{output} is up to date (same model, data and settings): nothing to do")
            ranks.broadcast_from_main(None)
            return 0
        if output.exists() and not args.overwrite:
            raise UserError(f"{output} exists and was mined from another model, data or settings (use --overwrite to replace it)")
    except BaseException:
        ranks.broadcast_from_main(None)  # release the other ranks before the error ends this one
        raise
    spec = {"folder": folder, "recipe": recipe}
    ranks.broadcast_from_main(spec)
    try:
        encoder = ranks.ShardedEncoder(_load_model(spec, args.device))
        store = job.ShardStore(job.shards_path(output), fresh=args.overwrite)
        negatives, counts = job.mine(encoder, plan, job.MineSettings(**_settings(args)), store, _log)
    finally:
        if encoder is not None:
            encoder.close()
    info = {"model": {"source": str(args.model), "fingerprint": fingerprint}, "data": list(args.data),
            "ranks": encoder.world}
    job.write_output(output, plan, negatives, counts, info, args.keep_shards)
    print(f"mined {counts['negatives_written']} negatives for {counts['examples']} examples "
          f"({counts['with_fewer_than_k']} with fewer than {args.negatives}) -> {output} "
          f"(record: {job.record_path(output)})")
    return 0


def _settings(args: argparse.Namespace) -> dict[str, Any]:
    corpus = str(Path(args.corpus).resolve()) if args.corpus else None
    return {"negatives": args.negatives, "margin": args.margin, "skip_top": args.skip_top, "corpus": corpus,
            "shard_size": args.shard_size, "batch_size": args.batch_size}


def _plan(args: argparse.Namespace, recipe: Any, fingerprint: str, job: Any):
    """Read the data (and corpus) and lay out the job; every data problem is one line here."""
    examples = job.read_data(args.data, recipe, args.skip_malformed)
    corpus_texts = job.read_corpus(Path(args.corpus)) if args.corpus else None
    return job.plan_mining(examples, recipe, job.MineSettings(**_settings(args)), fingerprint, corpus_texts)


def cli() -> None:
    """Console-script entry point."""
    from dsembed.distributed import exit_process

    exit_process(run_cli(main))  # a rank skips finalization, where gloo threads can abort it


if __name__ == "__main__":
    cli()
