"""The comparison record of a study: variants against a baseline, per category and per dataset.

`compare()` turns evaluate results into one record: per category the mean over the datasets every
variant has, the Wilcoxon test of each variant against the baseline (Holm-adjusted in the chosen
family), and per dataset the task's chance level and the paired bootstrap interval of (variant -
baseline). Datasets that carry no information at their limit are flagged (evaluation.flags);
category means and tests are given with and without them (`headline` says which leads).

Seeds: results files with the same model name and different `model.train_seed` are one variant
trained several times (`load_results` groups them). Each dataset's score is the mean over the
seeds before any test over datasets; a bootstrap draw resamples the same items for every seed
and averages the seeds' scores. Per category the record keeps each seed's mean, their standard
deviation and the seed-to-seed difference of the same variant: the noise floor a difference
between designs must exceed. Each trained run's learning-curve summary (`training`) comes along, so a
seed that collapsed is named as such rather than only averaged in.
"""
from __future__ import annotations

import itertools
import json
from pathlib import Path
from typing import Any

import numpy as np

from dsembed.errors import UserError
from dsembed.evaluation import flags, statistics
from dsembed.evaluation.presets import CATEGORIES

HOLM_FAMILIES = ("none", "all", "per_variant")


def _read(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise UserError(f"results file {path} does not exist") from None
    except json.JSONDecodeError as err:
        raise UserError(f"{path}:{err.lineno}: not valid JSON ({err.msg})") from None
    if "tasks" not in data:
        raise UserError(f"{path}: not a dsembed-evaluate results file (no 'tasks' key)")
    return data


def merge_seeds(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """One results dict for a variant trained with several seeds (the runs of `runs`).

    Each task's `main_score` is the mean over the seeds; `seed_scores` keeps each seed's, and
    `seed_items` each seed's per-item record (`items` stays the first seed's, for readers that
    take one). Only tasks every seed has are kept.

    Raises:
        UserError: two runs of the same seed.
    """
    seeds = [(r.get("model") or {}).get("train_seed") for r in runs]
    if len(set(seeds)) != len(seeds):
        raise UserError(f"results of {(runs[0].get('model') or {}).get('name')!r} repeat train seed(s) {seeds}: "
                        "give each seed's results once (or name the runs apart with dsembed-evaluate --name)")
    common = set.intersection(*(set(r["tasks"]) for r in runs))
    tasks = {}
    for name in [n for n in runs[0]["tasks"] if n in common]:
        entries = [r["tasks"][name] for r in runs]
        merged = dict(entries[0], main_score=float(np.mean([e["main_score"] for e in entries])),
                      seed_scores=[e["main_score"] for e in entries])
        if all(e.get("items") for e in entries):
            merged["seed_items"] = [e["items"] for e in entries]
        tasks[name] = merged
    return dict(runs[0], tasks=tasks, seeds=seeds, seed_training=[(r.get("model") or {}).get("training") for r in runs])


def load_results(paths: list[str | Path]) -> dict[str, dict[str, Any]]:
    """Variant name (results' model name, else the file stem) -> results dict, in argument order.

    Files that share a model name and differ in `model.train_seed` are the seeds of one variant
    (`merge_seeds`); a repeated name with the same seed is told apart by its file name.
    """
    groups: dict[str, list[tuple[Path, dict[str, Any]]]] = {}
    for path in map(Path, paths):
        data = _read(path)
        groups.setdefault((data.get("model") or {}).get("name") or path.stem, []).append((path, data))
    out: dict[str, dict[str, Any]] = {}
    for name, members in groups.items():
        seeds = [(data.get("model") or {}).get("train_seed") for _, data in members]
        if len(members) > 1 and None not in seeds and len(set(seeds)) == len(seeds):
            out[name] = merge_seeds([data for _, data in members])
            continue
        for path, data in members:
            key = name if name not in out else (path.stem if path.stem not in out else str(path))
            out[key] = data
    return out


# a seed whose final in-batch accuracy is below this fraction of its best sibling's did not learn what
# the others learned (a collapse, or a run cut short): its scores pull the variant's mean down
FAR_BEHIND = 0.5


def training_runs(variants: dict[str, dict[str, Any]]) -> dict[str, list[dict[str, Any]]]:
    """Per variant, each trained run's summary (dsembed.training.run_summary; results of models
    exported with one) with its seed and `behind`: far behind the variant's best seed (FAR_BEHIND)."""
    out: dict[str, list[dict[str, Any]]] = {}
    for v, results in variants.items():
        model = results.get("model") or {}
        seeds = results.get("seeds") or [model.get("train_seed")]
        summaries = results.get("seed_training") or [model.get("training")]
        runs = [dict(summary, seed=seed) for seed, summary in zip(seeds, summaries) if summary]
        if not runs:
            continue
        best = max((r["last_accuracy"] or 0.0) for r in runs)
        for r in runs:
            r["behind"] = bool(len(runs) > 1 and (r["last_accuracy"] or 0.0) < FAR_BEHIND * best)
        out[v] = runs
    return out


def items_of(entry: dict[str, Any]) -> Any:
    """A task entry's per-item record: one dict, or one per seed (statistics accept both)."""
    return entry.get("seed_items") or entry.get("items")


def _seed_statistics(variants: dict[str, dict[str, Any]], names: list[str]) -> dict[str, Any]:
    """Per variant with several seeds: each seed's mean over `names`, their sd and seed-to-seed gap."""
    out = {}
    for v, results in variants.items():
        if len(results.get("seeds") or []) < 2:
            continue
        per_seed = np.mean([results["tasks"][n]["seed_scores"] for n in names], axis=0)  # [seeds]
        gaps = [abs(a - b) for a, b in itertools.combinations(per_seed.tolist(), 2)]
        out[v] = {"seeds": results["seeds"], "per_seed": per_seed.tolist(), "mean": float(per_seed.mean()),
                  "sd": float(per_seed.std(ddof=1)), "seed_to_seed": float(np.mean(gaps))}
    return out


def _category_view(variants: dict[str, dict[str, Any]], baseline: str, names: list[str], tested: list[str],
                   family: str, alpha: float) -> tuple[dict[str, Any], int]:
    """Per category over `names`: means, seed statistics, the Wilcoxon test of each tested variant,
    Holm in `family`; (categories, the largest Holm family's size)."""
    base_tasks = variants[baseline]["tasks"]
    categories: dict[str, Any] = {}
    for cat in CATEGORIES:
        chosen = sorted(n for n in names if base_tasks[n]["category"] == cat)
        if not chosen:
            continue
        score = {v: {n: variants[v]["tasks"][n]["main_score"] for n in chosen} for v in variants}
        categories[cat] = {
            "tasks": chosen,
            "means": {v: float(np.mean(list(score[v].values()))) for v in variants},
            "seeds": _seed_statistics(variants, chosen),
            "tests": {v: statistics.wilcoxon_test(score[baseline], score[v]).to_dict() for v in tested},
        }
    tests = [(cat, v) for cat in categories for v in tested]
    families = {"none": [], "all": [tests], "per_variant": [[t for t in tests if t[1] == v] for v in tested]}[family]
    adjusted: dict[tuple[str, str], float | None] = {t: None for t in tests}
    for members in filter(None, families):
        adjusted.update(zip(members, statistics.holm([categories[c]["tests"][v]["pvalue"] for c, v in members], alpha)))
    for (cat, v), p_adj in adjusted.items():
        test = categories[cat]["tests"][v]
        test["p_holm"] = p_adj
        p = p_adj if family != "none" else test["pvalue"]
        test["significant"] = bool(p is not None and not np.isnan(p) and p < alpha)
    return categories, max((len(m) for m in families), default=len(tests))


def compare(variants: dict[str, dict[str, Any]], baseline: str, *, use_holm: bool = False,
            alpha: float = 0.05, n_resamples: int = 1000, seed: int = 0,
            references: tuple[str, ...] | list[str] = (), headline: str = "all",
            holm_family: str | None = None) -> dict[str, Any]:
    """The comparison record of all variants against `baseline` (schema in dsembed/cli/compare.py).

    Args:
        use_holm: Holm over every variant x category test (the same as holm_family="all").
        holm_family: "none" (the paper's uncorrected test), "all" (every variant x category test) or
            "per_variant" (each variant's tests over the categories: the paper's question per
            design); overrides use_holm.
        references: variants shown in the tables (with bootstrap intervals) but not tested: no
            Wilcoxon test and not in the Holm family (e.g. the untrained `base`).
        headline: which category means and tests the first table, the answers, the CSV and the
            plots use: "all" datasets, or "informative" ones (without the datasets flagged as
            carrying no information, evaluation.flags). Both are computed and reported.

    Raises:
        UserError: the baseline is not among the variants, a reference is unknown or is the baseline,
            fewer than two variants, an unknown headline or Holm family.
    """
    family = holm_family or ("all" if use_holm else "none")
    if family not in HOLM_FAMILIES:
        raise UserError(f"--holm-family {family!r}: use one of {', '.join(HOLM_FAMILIES)}")
    if baseline not in variants:
        raise UserError(f"--baseline {baseline!r} is not one of the results: {', '.join(variants)}")
    if len(variants) < 2:
        raise UserError("compare needs at least two results files")
    bad = [r for r in references if r not in variants or r == baseline]
    if bad:
        raise UserError(f"--reference {bad[0]!r} is not one of the non-baseline results: "
                        f"{', '.join(v for v in variants if v != baseline)}")
    if headline not in ("all", "informative"):
        raise UserError(f"--headline {headline!r}: give all or informative")
    others = [v for v in variants if v != baseline]
    tested = [v for v in others if v not in references]
    common = set.intersection(*(set(r["tasks"]) for r in variants.values()))
    base_tasks = variants[baseline]["tasks"]
    ordered = sorted(common, key=lambda n: (CATEGORIES.index(base_tasks[n]["category"]), n))
    info = flags.flag_datasets(variants, baseline, ordered, n_resamples=n_resamples, seed=seed)
    informative = [n for n in ordered if not info[n]["flag"]]
    categories, family_size = _category_view(variants, baseline, ordered, tested, family, alpha)
    categories_informative, family_size_informative = _category_view(variants, baseline, informative, tested,
                                                                     family, alpha)
    datasets: dict[str, Any] = {}
    for name in ordered:
        cat = base_tasks[name]["category"]
        record = {"category": cat, "scores": {v: variants[v]["tasks"][name]["main_score"] for v in variants},
                  **info[name], "bootstrap": {}}
        seeds = {v: variants[v]["tasks"][name]["seed_scores"] for v in variants
                 if "seed_scores" in variants[v]["tasks"][name]}
        if seeds:
            record["seed_scores"] = seeds
        for v in others:
            a, b = items_of(base_tasks[name]), items_of(variants[v]["tasks"][name])
            if a and b:
                try:
                    record["bootstrap"][v] = statistics.paired_bootstrap(
                        cat, a, b, n_resamples=n_resamples, seed=seed).to_dict()
                except ValueError as err:
                    record["bootstrap"][v] = {"error": str(err)}
            else:
                record["bootstrap"][v] = {"error": "no per-item scores in the results"}
        datasets[name] = record
    layer_weights = {v: r["layer_weights"] for v, r in variants.items() if r.get("layer_weights")}
    lead = categories_informative if headline == "informative" else categories  # the power of the tests it leads with
    n_datasets = {c: len(r["tasks"]) for c, r in lead.items()}
    return {"baseline": baseline, "variants": list(variants), "references": list(references),
            "seeds": {v: r["seeds"] for v, r in variants.items() if r.get("seeds")},
            "alpha": alpha, "holm": family != "none", "holm_family": family, "headline": headline,
            "n_tests": len(categories) * len(tested), "holm_family_size": family_size,
            "n_tests_informative": len(categories_informative) * len(tested),
            "holm_family_size_informative": family_size_informative,
            "power": statistics.power_table(n_datasets, family, len(tested), alpha),
            "n_resamples": n_resamples, "categories": categories,
            "categories_informative": categories_informative,
            "flagged": {n: info[n]["flag"] for n in ordered if info[n]["flag"]},
            "datasets": datasets, "layer_weights": layer_weights, "training": training_runs(variants)}


def headline_view(comparison: dict[str, Any]) -> tuple[dict[str, Any], int]:
    """(categories, the size of their Holm family) of the view the comparison leads with."""
    if comparison.get("headline", "all") == "informative":
        return comparison["categories_informative"], comparison.get("holm_family_size_informative", 0)
    return comparison["categories"], comparison.get("holm_family_size", comparison["n_tests"])


def other_view(comparison: dict[str, Any]) -> tuple[dict[str, Any], int, str]:
    """(categories, Holm family size, label) of the view the comparison does not lead with."""
    if comparison.get("headline", "all") == "informative":
        return comparison["categories"], comparison.get("holm_family_size", 0), "with all datasets"
    return (comparison["categories_informative"], comparison.get("holm_family_size_informative", 0),
            "without flagged datasets")
