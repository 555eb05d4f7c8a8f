"""`dsembed-study FILE --plan`: what a study would run, how long it would take here, and what it can decide.

Nothing is trained or evaluated. The plan
- lists every stage and whether it is finished already;
- estimates each stage's wall time on this machine from a few timed passes of each recipe's model
  (seconds in all) on the device the runs use (a GPU where there is one): a training step is one
  forward + backward of a real micro-batch of the recipe's data (x 1.5 with cached steps, which
  embed the batch once more without a graph), an evaluation is the tokens of every task at the
  study's limits divided by the model's measured encode throughput (in float32 where the study
  merges a bf16 LoRA run: the merge computes in float32). With `nproc` processes: on GPUs each rank
  steps its own micro-batch in the measured time and evaluation splits the texts over the ranks;
  on a CPU the ranks share the cores, so a step takes about nproc times as long and evaluation as
  long as in one process. The comparisons are listed, not estimated (their paired bootstrap scales
  with the items scored, minutes on a CPU);
- prints each task's chance level at the study's limits and names the tasks that carry no
  information there by construction (evaluation.chance), before anything is trained;
- gives per category the number of datasets, the smallest two-sided p a Wilcoxon signed-rank test
  over them can reach (2 / 2^n, every sign the same), and whether the study's Holm family can reach
  p < alpha at all (Holm rejects nothing unless the smallest p times the family size is below alpha).
"""
from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from dsembed.config import Recipe, load_recipe
from dsembed.evaluation.presets import CATEGORIES
from dsembed.evaluation.statistics import power_table
from dsembed.study.config import BASE_NAME, StudyConfig, holm_family, recipe_path, run_overrides, training_runs
from dsembed.study.runner import StudyRunner

CACHED_STEP_FACTOR = 1.5  # GradCache: a no-graph forward of the batch before the forward + backward


@dataclass
class Timing:
    """Measured costs of one recipe's model on this machine."""

    build_s: float  # building the model (backbone load + LoRA + head)
    step_s: float  # one optimizer step (forward + backward of the contrastive batch, all accumulation)
    tokens_per_s: float  # encode throughput in eval mode, as the recipe computes (the untrained base)
    exported_tokens_per_s: float  # ... as the study's export computes: float32 for a bf16 LoRA merge
    device: str = "cpu"  # where it was timed: "cuda" where a GPU is visible, as training and evaluation use


def time_recipe(recipe: Recipe, texts: list[str], repeats: int = 2, merged: bool = False,
                device: str | None = None) -> Timing:
    """Time a model build, `repeats` forward+backward passes of one real micro-batch, and an encode.

    Args:
        recipe: the variant's recipe (with the study's overrides).
        texts: sample evaluation texts for the encode throughput.
        repeats: passes of each kind; the fastest counts (the first warms the kernels up).
        merged: the study exports LoRA merged (`lora_export: merged`): a bf16 / fp16 run's merge
            computes in float32, so its evaluation is timed in float32 too.
        device: where to time; None: the first GPU if one is visible (the runs use it), else the CPU.
    """
    import torch

    from dsembed.data.batches import collate
    from dsembed.data.rows import load_examples
    from dsembed.modeling.model import build_model
    from dsembed.modeling.weights import merged_dtype
    from dsembed.training.loss import info_nce

    device = device or ("cuda" if torch.cuda.is_available() else "cpu")

    def now() -> float:  # GPU kernels run asynchronously: wait for them before reading the clock
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        return time.perf_counter()

    start = now()
    model = build_model(recipe, attn_fallback=True).to(device)
    build_s = now() - start
    examples = load_examples(recipe)[: recipe.train.micro_batch_size]
    batch = {side: {k: v.to(device) for k, v in inputs.items()}
             for side, inputs in collate(examples, model.tokenizer, recipe).items() if side in ("query", "documents")}
    model.train()
    passes = []
    for _ in range(repeats):
        begin = now()
        q = model(**batch["query"])  # [b, D]
        d = model(**batch["documents"])  # [b*(1+n), D]
        info_nce(q, d, recipe.loss.temperature, gather=False).loss.backward()
        model.zero_grad(set_to_none=True)
        passes.append(now() - begin)
    factor = CACHED_STEP_FACTOR if recipe.train.cache_chunk_size else 1.0
    step_s = min(passes) * recipe.train.gradient_accumulation_steps * factor
    sample = texts[:64] or ["a short text"]
    tokens = sum(len(ids) for ids in model._token_ids(sample, None))

    def encode_seconds() -> float:
        encodes = []
        with torch.no_grad():
            for _ in range(repeats):
                begin = now()
                model.encode(sample, batch_size=32)
                encodes.append(now() - begin)
        return min(encodes)

    as_recipe = encode_seconds()
    exported = as_recipe
    dtype = next(model.backbone.parameters()).dtype
    if merged and recipe.lora.enabled and merged_dtype(dtype) != dtype:
        # the merge's backbone computes in float32; timed unmerged (the LoRA branch runs too) and with
        # the head in float32 as well: slightly slower than the merged export, an upper bound
        model.float()
        exported = encode_seconds()
    return Timing(build_s, step_s, tokens / as_recipe, tokens / exported, device)


def _task_texts(task: Any) -> list[str]:
    """The distinct texts an evaluation of this loaded (and limited) task embeds."""
    from mteb.abstasks import AbsTaskClassification, AbsTaskClusteringLegacy, AbsTaskRetrieval, AbsTaskSTS

    from dsembed.evaluation.tasks import task_containers

    texts: list[str] = []
    for box in task_containers(task).values():
        for part in box.values():
            if isinstance(task, AbsTaskRetrieval):
                texts += list(part["queries"]["text"]) + [f"{t} {x}".strip() for t, x in
                                                          zip(part["corpus"]["title"], part["corpus"]["text"])]
            elif isinstance(task, AbsTaskSTS):
                texts += list(part["sentence1"]) + list(part["sentence2"])
            elif isinstance(task, AbsTaskClusteringLegacy):
                texts += [s for row in part["sentences"] for s in row]
            elif isinstance(task, AbsTaskClassification):
                texts += list(part["text"])
    return list(dict.fromkeys(texts))


def _minutes(seconds: float) -> str:
    return f"{seconds / 60:.1f} min" if seconds >= 60 else f"{seconds:.0f} s"


def plan(study: StudyConfig, root: Path, out: Path | None = None, alpha: float = 0.05,
         log: Callable[[str], None] = print) -> dict[str, Any]:
    """Print and return the plan of a study: stages, estimated wall times, power, chance levels.

    Returns:
        {"stages": [{"stage", "finished", "estimate_s"}], "total_s", "power": [...], "tasks": {...}}
    """
    from dsembed.evaluation.chance import chance_plan, format_chance_plan
    from dsembed.evaluation.run import category_of, named_tasks, prepare_tasks
    from dsembed.evaluation.tasks import load_local_tasks

    runner = StudyRunner(study, root, out)
    arguments = runner.tasks_arguments()
    tasks = load_local_tasks(arguments[1]) if arguments[0] == "--tasks-dir" else named_tasks(arguments[1:])
    prepare_tasks(tasks, study.eval_limit, task_limits=dict(study.eval_limits))
    chance = chance_plan(tasks)
    texts = {t.metadata.name: _task_texts(t) for t in tasks}
    by_category = {c: sum(1 for t in tasks if category_of(t) == c) for c in CATEGORIES}
    by_category = {c: n for c, n in by_category.items() if n}
    sample = [text for name in texts for text in texts[name][:8]]

    timings: dict[str, Timing] = {}
    for variant in study.variants:
        recipe = load_recipe(recipe_path(study, root, variant), run_overrides(study, variant))
        t = timings[variant] = time_recipe(recipe, sample, merged=study.lora_export == "merged")
        exported = (f" ({t.exported_tokens_per_s:.0f} as exported: float32 LoRA merge)"
                    if t.exported_tokens_per_s != t.tokens_per_s else "")
        log(f"[plan] timed {variant} on {t.device}: build {t.build_s:.1f} s, step {t.step_s:.2f} s, "
            f"encode {t.tokens_per_s:.0f} tokens/s{exported}")
    first = load_recipe(recipe_path(study, root, next(iter(study.variants))), run_overrides(study, next(iter(study.variants))))
    from dsembed.modeling.backbone import load_backbone

    _, tokenizer = load_backbone(first.model, attn_fallback=True)
    m = first.model
    tokens = {name: sum(min(len(ids), m.max_length) for ids in tokenizer(list(batch), add_special_tokens=False)["input_ids"])
              + len(batch) * int(m.append_eos) for name, batch in texts.items() if batch}

    def on_gpu(timing: Timing) -> bool:
        return timing.device.startswith("cuda")

    def eval_seconds(timing: Timing, exported: bool = True) -> float:
        rate = timing.exported_tokens_per_s if exported else timing.tokens_per_s
        ranks = study.nproc if on_gpu(timing) else 1  # CPU ranks share the cores: no faster
        return timing.build_s + sum(tokens.values()) / rate / ranks

    def step_seconds(timing: Timing) -> float:
        return timing.step_s * (1 if on_gpu(timing) else study.nproc)  # each rank steps its own micro-batch

    stages = runner._stages()
    skipped = runner.not_needed(stages)  # evaluated already: their training would change nothing
    rows = []
    for run in training_runs(study):
        t = timings[run.variant]
        recipe = load_recipe(recipe_path(study, root, run.variant), run_overrides(study, run.variant, run.seed))
        estimates = {f"train {run.key}": t.build_s + recipe.train.max_steps * step_seconds(t),
                     f"export {run.key}": 2 * t.build_s, f"evaluate {run.key}": eval_seconds(t)}
        rows += [{"stage": label, "finished": stages[label]["output"].exists() or label in skipped, "estimate_s": seconds}
                 for label, seconds in estimates.items()]
    base_timing = timings[next(iter(study.variants))]
    for label in (f"evaluate {BASE_NAME}",) * study.include_base + (f"probe {BASE_NAME}",) * study.probe_base:
        rows.append({"stage": label, "finished": stages[label]["output"].exists(), "estimate_s": eval_seconds(base_timing, exported=False)})
    for label in ["compare", *(f"compare {name}" for name in study.contrasts)]:  # always rerun: cheap next to the rest
        rows.append({"stage": label, "finished": False, "estimate_s": None})
    total = sum(r["estimate_s"] for r in rows if not r["finished"] and r["estimate_s"] is not None)

    family = holm_family(study)
    baseline = study.baseline or (BASE_NAME if study.include_base else next(iter(study.variants)))
    tested = sum(1 for v in study.variants if v != baseline)  # base is a reference row unless it is the baseline
    power = power_table(by_category, family, tested, alpha)
    log(f"Study {study.name}: {len(rows)} stages, {sum(r['finished'] for r in rows)} finished; "
        f"estimated {_minutes(total)} for the rest on this machine")
    for r in rows:
        when = ("finished" if r["finished"] else "not estimated (paired bootstrap over every item)"
                if r["estimate_s"] is None else _minutes(r["estimate_s"]))
        log(f"  {r['stage']:<40} {when}")
    log(f"Power: Wilcoxon over the datasets of a category, Holm family '{family}' "
        f"({power[0]['family_size'] if power else 0} test(s) per family), alpha {alpha}:")
    for row in power:
        log(f"  {row['category']:<15} n = {row['n']:<3} smallest p = {row['min_p']:.4g}  "
            f"best case after correction {row['best_p_after_correction']:.4g}: "
            f"{'can' if row['reachable'] else 'CANNOT'} reach p < {alpha}")
    log("Chance level of each task at the study's limits (x100):")
    log(format_chance_plan(chance))
    return {"stages": rows, "total_s": total, "power": power, "family": family, "chance": chance,
            "tasks": {name: {"texts": len(texts[name]), "tokens": tokens.get(name, 0)} for name in texts}}
