"""dsembed-evaluate: score a saved dsembed model (or an untrained backbone) on MTEB tasks.

    dsembed-evaluate MODEL_DIR --tasks paper-sts paper-retrieval --output results/model5.json
    dsembed-evaluate MODEL_DIR --tasks-dir ../shared/data/tasks --limit 200 --output r.json --nproc 2
    torchrun --nproc_per_node 8 -m dsembed.cli.evaluate MODEL_DIR --tasks paper-all --output r.json \
        --results-dir mteb-results
    dsembed-evaluate --base recipes/tiny-cpu.yaml --tasks-dir tasks --output base.json

With neither --tasks nor --tasks-dir, the model recipe's `eval` section decides. Task data is loaded
before the model, so a missing folder or an unreachable hub fails in a second.

Ranks: under torchrun or the deepspeed launcher, or with `--nproc N` (N local ranks started here),
every rank embeds a share of each task's texts and rank 0 scores with mteb
(dsembed.evaluation.ranks); the scores equal a one-rank run's.
Resume: each task's result is written to OUTPUT's `<stem>.tasks/` folder as soon as it is scored; the
same command run again skips the tasks finished for the same model weights and settings (and says
so), `--overwrite` recomputes them (dsembed.evaluation.resume).
mteb's layout: `--results-dir DIR` also writes DIR/results/dsembed__<name>/<revision>/<Task>.json with
mteb's ResultCache (revision: the weights' fingerprint). An exported model's README.md gets the scores
(model-index metadata and a table; every evaluation's main scores are kept in MODEL_DIR/eval_results.json).

--truncate-dim D scores the first D coordinates of every embedding, re-normalised (a Matryoshka size
of loss.matryoshka_dims); the name gets "-dD" and the fingerprint the size, so sizes resume apart.
Several sizes (`--truncate-dim 64 128 256 --output r-d{dim}.json`) are scored in one run that embeds
each text once: a score-vs-size curve costs one encoding, not one per size.

The results JSON (format dsembed-eval/1) is described in dsembed.evaluation.run.
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
    p = argparse.ArgumentParser(prog="dsembed-evaluate", description=__doc__.split("\n")[0])
    p.add_argument("model_dir", nargs="?", help="folder written by EmbeddingModel.save")
    p.add_argument("--base", metavar="RECIPE.yaml", help="evaluate the untrained model a recipe builds")
    p.add_argument("--tasks", nargs="+", metavar="PRESET_OR_NAME",
                   help="paper-sts, paper-retrieval, paper-classification, paper-clustering, "
                        "paper-all, or task names")
    p.add_argument("--tasks-dir", metavar="ROOT", help="local tasks in ROOT/<type>/<Name>")
    p.add_argument("--output", required=True, metavar="FILE.json")
    p.add_argument("--results-dir", metavar="DIR", help="also write mteb's results layout (TaskResult JSON per task) here")
    p.add_argument("--overwrite", action="store_true", help="recompute tasks finished by an earlier run")
    p.add_argument("--nproc", type=int, default=None, metavar="N",
                   help="start N local ranks that share the encoding (not under torchrun / deepspeed)")
    p.add_argument("--embedding-cache-gb", type=float, default=4.0, metavar="GB",
                   help="memory for embeddings reused across tasks and calls (default 4; 0: within a call only)")
    p.add_argument("--batch-size", type=int, default=None, help="default: the recipe's eval.batch_size")
    p.add_argument("--instruction", action="append", default=[], metavar="TASK=TEXT",
                   help="query instruction for a task (empty TEXT: none); repeatable")
    p.add_argument("--limit", type=int, default=None, metavar="N", help="about N test items per task (STS: the pairs among at most 2N distinct texts; "
                   "clustering: N texts of a few labels, see dsembed/evaluation/clustering_limit.py)")
    p.add_argument("--task-limit", action="append", default=[], metavar="TASK=N",
                   help="--limit for one task (overrides --limit there); repeatable")
    p.add_argument("--name", help="variant name recorded in the results (default: the folder name)")
    p.add_argument("--device", default=None, help="default: this rank's GPU when CUDA is available, else cpu")
    p.add_argument("--no-progress", action="store_true", help="no encoding progress bars")
    p.add_argument("--truncate-dim", type=int, nargs="+", default=None, metavar="D",
                   help="score the first D coordinates of every embedding, re-normalised (a loss.matryoshka_dims "
                        "size); several sizes share one encoding and need {dim} in --output")
    p.add_argument("--override", action="append", default=[], metavar="KEY=VALUE",
                   help="recipe override for --base (as dsembed-train key=value); repeatable")
    # the deepspeed launcher appends --local_rank=N; the rank is read from LOCAL_RANK
    p.add_argument("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)
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
    argv = sys.argv[1:] if argv is None else list(argv)
    args = _parser().parse_args(argv)
    from dsembed import distributed
    from dsembed.evaluation import ranks

    if args.nproc is not None and args.nproc < 1:
        raise UserError(f"--nproc {args.nproc}: give at least 1")
    sizes = args.truncate_dim or [None]
    if len(sizes) > 1 and "{dim}" not in args.output:
        raise UserError(f"--truncate-dim {' '.join(map(str, sizes))}: several sizes write one file each; "
                        f"put {{dim}} in --output (e.g. --output results-d{{dim}}.json)")
    if args.nproc is not None and args.nproc > 1:
        if distributed.world_size() > 1:
            raise UserError("--nproc starts local ranks itself; under torchrun or the deepspeed launcher leave it out")
        return ranks.launch_local(args.nproc, "dsembed.cli.evaluate", argv)
    shared: dict[tuple, Any] | None = {} if len(sizes) > 1 else None  # one model, one encoding of each text
    ranks.start_ranks()
    try:
        for size in sizes:  # every rank runs the same sizes in the same order
            one = argparse.Namespace(**{**vars(args), "truncate_dim": size, "shared_models": shared, "sizes": sizes,
                                        "output": args.output.replace("{dim}", str(size)) if size else args.output})
            code = _evaluate(one) if distributed.is_main() else _serve(one)
            if code:
                return code
        return 0
    finally:
        ranks.stop_ranks()


def _serve(args: argparse.Namespace) -> int:
    """Ranks 1..N-1: load the model rank 0 names (when it has tasks to run) and embed its requests."""
    from dsembed.evaluation import ranks

    plan = ranks.broadcast_from_main(None)
    if plan is None:
        return 0  # rank 0 stopped before encoding (bad input, or every task finished earlier)
    model = _load_model(args, plan["recipe"], ranks.rank_device(args.device))
    ranks.serve(model)
    return 0


def _compute_dtype(args: argparse.Namespace, recipe) -> str:
    """The dtype the backbone computes in (exported_backbone_dtype for an exported folder)."""
    if args.model_dir:
        from dsembed.modeling.model import exported_backbone_dtype
        from dsembed.modeling.weights import DTYPE_NAMES

        meta = json.loads((Path(args.model_dir) / "dsembed.json").read_text(encoding="utf-8"))
        return DTYPE_NAMES[exported_backbone_dtype(meta, recipe)]
    return str(recipe.model.dtype)


def _load_model(args: argparse.Namespace, recipe, device: str):
    """The model under evaluation on `device`: an exported folder, or --base's untrained model."""
    import torch

    shared, key = getattr(args, "shared_models", None), (args.model_dir, args.base, device)
    loaded = shared.get(key) if shared is not None else None
    if loaded is not None:
        model = loaded
    elif args.base:
        from dsembed.modeling.model import build_model

        # the seed fixes an untrained head: every rank, and a resumed run, scores the same model
        torch.manual_seed(recipe.train.seed)
        model = build_model(recipe, attn_fallback=True).to(device).eval()
    else:
        from dsembed.modeling.model import EmbeddingModel

        model = EmbeddingModel.load(args.model_dir, device=device)
    if args.truncate_dim is None:
        return model
    from dsembed.evaluation.encoder import EncodingMemo, TruncatedModel

    if shared is not None and loaded is None:
        # the full-size rows are kept beneath the truncation: the next size embeds nothing again
        model = shared[key] = EncodingMemo(model, int(args.embedding_cache_gb * 2**30))

    if args.truncate_dim > model.dim:  # every rank loads the same model and stops alike
        raise UserError(f"--truncate-dim {args.truncate_dim}: the model's embeddings have {model.dim} dimensions")
    return TruncatedModel(model, args.truncate_dim)


def _evaluate(args: argparse.Namespace) -> int:
    """Rank 0 (or the only rank): plan, skip finished tasks, run the rest, write the results."""
    from dsembed.evaluation import ranks

    try:
        job = _plan(args)
    except BaseException:
        ranks.broadcast_from_main(None)  # release the other ranks before the error ends this one
        raise
    ranks.broadcast_from_main({"recipe": job["recipe"]} if job["pending"] else None)
    encoder = None
    try:
        if job["pending"]:
            model = _load_model(args, job["recipe"], ranks.rank_device(args.device))
            encoder = ranks.ShardedEncoder(model)
        results = _run_tasks(args, job, encoder)
    finally:
        if encoder is not None:
            encoder.close()
    return _write(args, job, results)


def _plan(args: argparse.Namespace) -> dict[str, Any]:
    """Validate the command line, read the tasks and split them into finished and pending."""
    from dsembed.config import load_recipe
    from dsembed.evaluation import resume, run
    from dsembed.evaluation.chance import chance_level
    from dsembed.evaluation.tasks import load_local_tasks
    from dsembed.study.stages import base_fingerprint

    if bool(args.model_dir) == bool(args.base):
        raise UserError("give exactly one of MODEL_DIR or --base RECIPE.yaml")
    if args.limit is not None and args.limit < 2:
        raise UserError("--limit must be at least 2")
    if args.embedding_cache_gb < 0:
        raise UserError(f"--embedding-cache-gb {args.embedding_cache_gb}: give 0 or more")
    recipe_path = Path(args.base) if args.base else Path(args.model_dir) / "recipe.yaml"
    if args.model_dir and not Path(args.model_dir).is_dir():
        raise UserError(f"model folder {args.model_dir} does not exist")
    if args.model_dir:  # a damaged file is named now, before tasks load and before other ranks start
        from dsembed.modeling.files import check_exported_files

        check_exported_files(Path(args.model_dir))
    if args.truncate_dim is not None:  # every size checked before the first is scored
        meta = Path(args.model_dir or ".") / "dsembed.json"
        dim = json.loads(meta.read_text(encoding="utf-8")).get("dim") if args.model_dir and meta.is_file() else None
        for size in getattr(args, "sizes", None) or [args.truncate_dim]:
            if size < 1 or (dim is not None and size > dim):
                raise UserError(f"--truncate-dim {size}: give a size from 1 to the model's {dim or 'embedding'} dimensions")
    if args.override and not args.base:
        raise UserError("--override applies to --base RECIPE.yaml only")
    results_dir = Path(args.results_dir) if args.results_dir else None
    resume.check_results_dir(results_dir)
    recipe = load_recipe(recipe_path, args.override) if recipe_path.is_file() else None
    if args.base and recipe is None:
        raise UserError(f"recipe {args.base} does not exist")
    if recipe is not None:  # model.dtype: auto -> the dtype this device computes natively (one printed line)
        from dsembed.modeling.precision import resolve_recipe

        recipe = resolve_recipe(recipe, device=args.device)
    eval_cfg = recipe.eval if recipe is not None else None
    names = args.tasks or ([] if args.tasks_dir or eval_cfg is None else list(eval_cfg.tasks))
    tasks_dir = args.tasks_dir or (str(recipe.resolve_path(eval_cfg.tasks_dir))
                                   if not args.tasks and eval_cfg and eval_cfg.tasks_dir else None)
    if not names and not tasks_dir:
        raise UserError("no tasks: give --tasks PRESET_OR_NAME... or --tasks-dir ROOT")
    tasks = load_local_tasks(tasks_dir, names or None) if tasks_dir else run.named_tasks(names)
    task_limits = run.parse_task_limits(args.task_limit, tasks)
    evaluated = {t.metadata.name for t in tasks}
    # The recipe may hold instructions for tasks not run now; a command-line one must name a task.
    overrides = {k: v for k, v in (eval_cfg.instructions if eval_cfg else {}).items() if k in evaluated}
    overrides.update(_overrides(args.instruction))
    instructions = run.resolve_instructions(tasks, overrides)

    output = Path(args.output)
    store_folder = resume.TaskStore.for_output(output)
    model_files = None
    if args.base:
        fingerprint = "recipe:" + hashlib.sha256(json.dumps(base_fingerprint(recipe), sort_keys=True,
                                                            default=str).encode()).hexdigest()
    else:
        fingerprint, model_files = resume.model_fingerprint(Path(args.model_dir), store_folder, output)
    revision = fingerprint.split(":")[-1][:12]
    if args.truncate_dim is not None:  # another size scores another model
        fingerprint, revision = f"{fingerprint}:truncate_dim={args.truncate_dim}", f"{revision}-d{args.truncate_dim}"
    store = resume.TaskStore(store_folder, fingerprint, model_files)
    keys, finished, pending = {}, {}, []
    for task in tasks:
        name = task.metadata.name
        keys[name] = store.key(task, limit=task_limits.get(name, args.limit), seed=run.LIMIT_SEED,
                               instruction=instructions.get(name))
        record = None if args.overwrite else store.finished(name, keys[name])
        if record is None:
            pending.append(task)
        else:
            finished[name] = record
    stale = [t.metadata.name for t in pending if store.path(t.metadata.name).is_file()]
    if stale and not args.overwrite:
        _log(f"{len(stale)} earlier task result(s) in {store_folder} were made for other weights or settings "
             f"({', '.join(stale[:5])}{', ...' if len(stale) > 5 else ''}): recomputing them")
    # tasks finished before chance levels were recorded get theirs now: the data only, no model
    no_chance = [t for t in tasks if t.metadata.name in finished and "chance" not in finished[t.metadata.name]["entry"]]
    run.prepare_tasks(pending + no_chance, limit=args.limit, task_limits=task_limits, seed=run.LIMIT_SEED)
    for task in no_chance:
        record = finished[task.metadata.name]
        run.attach_chance(record["entry"], record["mteb_task_result"], chance_level(task))
        store.save(task.metadata.name, keys[task.metadata.name], record["entry"], record["mteb_task_result"],
                   record.get("layer_weights"))
    return {"recipe": recipe, "tasks": tasks, "pending": pending, "finished": finished, "keys": keys,
            "store": store, "results_dir": results_dir, "task_limits": task_limits,
            "instructions": instructions, "batch_size": args.batch_size or (eval_cfg.batch_size if eval_cfg else 32),
            "revision": revision}


def _log(line: str) -> None:
    print(line, file=sys.stderr, flush=True)


def _run_tasks(args: argparse.Namespace, job: dict[str, Any], encoder) -> dict[str, Any]:
    """Score the pending tasks (each saved as soon as it is scored); the results of all tasks
    (`_write` adds the model record, the settings and the time)."""
    from dsembed.evaluation import resume, run
    from dsembed.evaluation.encoder import MtebEncoder

    tasks, store = job["tasks"], job["store"]
    place = {t.metadata.name: f"{i}/{len(tasks)}" for i, t in enumerate(tasks, start=1)}
    name = _model_name(args)
    # the meta mteb writes with results of tasks finished earlier (the model is not loaded for them)
    meta_encoder = MtebEncoder(encoder or _NoModel(), {}, name=name, revision=job["revision"])
    for task in tasks:
        record = job["finished"].get(task.metadata.name)
        if record is not None:
            _log(f"[{place[task.metadata.name]}] {task.metadata.name}: finished earlier "
                 f"({store.path(task.metadata.name)}), skipped")
            if job["results_dir"] is not None and not resume.mteb_result_path(
                    job["results_dir"], task.metadata.name, meta_encoder).is_file():
                resume.save_mteb_result(job["results_dir"], record["mteb_task_result"], meta_encoder, job["batch_size"])
    layer_weights = run.layer_weight_info(encoder.model) if encoder is not None else None

    def saved(task, entry, task_result):
        store.save(task.metadata.name, job["keys"][task.metadata.name], entry, task_result, layer_weights)
        if job["results_dir"] is not None:
            resume.save_mteb_result(job["results_dir"], task_result, meta_encoder, job["batch_size"])

    computed: dict[str, Any] = {"tasks": {}, "encoding": {"texts": 0, "embedded": 0, "reused": 0}}
    if job["pending"]:
        computed = run.evaluate_tasks(encoder, job["pending"], model_name=name, instructions=job["instructions"],
                                      batch_size=job["batch_size"], show_progress=not args.no_progress, log=_log,
                                      cache_bytes=int(args.embedding_cache_gb * 2**30), revision=job["revision"],
                                      on_task=saved, numbering=lambda t: place[t.metadata.name])
    entries = {}
    for task in tasks:
        task_name = task.metadata.name
        entries[task_name] = computed["tasks"].get(task_name) or job["finished"][task_name]["entry"]
    if layer_weights is None and job["finished"]:
        layer_weights = next(iter(job["finished"].values())).get("layer_weights")
    encoding = dict(computed["encoding"], finished_earlier=sorted(job["finished"]),
                    texts_per_rank=list(encoder.texts_per_rank) if encoder is not None else [])
    return {"format": run.RESULTS_FORMAT, "tasks": entries, "categories": run.category_means(entries),
            "encoding": encoding, "layer_weights": layer_weights}


class _NoModel:
    """Stands in for the model when every task finished earlier (mteb's meta needs an encoder)."""

    def encode(self, texts, instruction=None, batch_size=32):  # pragma: no cover - never called
        raise RuntimeError("no model loaded")


def _model_name(args: argparse.Namespace) -> str:
    if args.name:
        return args.name
    name = f"base-{Path(args.base).stem}" if args.base else Path(args.model_dir).resolve().name
    return f"{name}-d{args.truncate_dim}" if args.truncate_dim is not None else name


def _write(args: argparse.Namespace, job: dict[str, Any], results: dict[str, Any]) -> int:
    """The results JSON (atomically), the table, and the model card."""
    import datetime

    import mteb

    from dsembed.evaluation.report import format_results_table
    from dsembed.atomic import write_text_atomic
    from dsembed.training.run_summary import read_summary
    from dsembed import distributed

    recipe = job["recipe"]
    info: dict[str, Any] = {"name": _model_name(args)}
    info.update({"recipe": str(args.base)} if args.base else {"path": str(args.model_dir)})
    if recipe is not None:
        # train_seed: results of one variant trained with several seeds are told apart (and
        # averaged per dataset) by dsembed-compare
        info.update(pooling=recipe.pooling.type, attention=recipe.attention.mode, train_seed=recipe.train.seed,
                    dtype=_compute_dtype(args, recipe))
        if args.model_dir:
            info["trained_dtype"] = recipe.model.dtype  # a bf16 run's LoRA merge is exported (and computes) in float32
            training = read_summary(args.model_dir)
            if training is not None:  # a collapsed seed is then seen in the comparison, not only in its scores
                info["training"] = training
    info["fingerprint"] = job["store"].model
    results["model"] = info
    results["mteb_version"] = mteb.__version__
    results["created"] = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
    results["settings"] = {"batch_size": job["batch_size"], "limit": args.limit, "task_limits": job["task_limits"],
                           "instructions": job["instructions"], "ranks": distributed.world_size(),
                           "truncate_dim": args.truncate_dim}
    output = Path(args.output)
    # atomic: dsembed-study treats an existing results file as a finished stage
    write_text_atomic(output, json.dumps(results))
    print(format_results_table(results))
    print(f"results written to {output}")
    if job["results_dir"] is not None:
        print(f"mteb results layout written under {job['results_dir']}")
    if args.model_dir:
        from dsembed.export.model_card import add_results

        card = add_results(args.model_dir, results)
        if card is not None:
            print(f"model card updated with the scores (model-index): {card}")
    return 0


def cli() -> None:
    """Console-script entry point (a rank skips finalization, where gloo threads can abort it)."""
    from dsembed.distributed import exit_process
    exit_process(run_cli(main))


if __name__ == "__main__":
    cli()
