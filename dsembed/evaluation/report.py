"""Tables, files and plots: the evaluate screen table and the study comparison report.

`compare()` turns several evaluate results (one per variant) into one comparison record: per
category the mean over the datasets every variant has, the Wilcoxon test of each variant against
the baseline (Holm-adjusted over all variant x category tests when asked), and per dataset the
task's chance level and the paired bootstrap interval of (variant - baseline). Datasets that carry
no information at their limit are flagged (evaluation.flags); category means and tests are given
with and without them, and the report says which view leads (`headline`). `write_report()` writes
it as Markdown, CSV, JSON and PNG.
"""
from __future__ import annotations

import csv
import json
from pathlib import Path
from typing import Any

import numpy as np

from dsembed.errors import UserError
from dsembed.evaluation import flags, statistics
from dsembed.evaluation.presets import CATEGORIES, MAIN_METRIC


def format_results_table(results: dict[str, Any]) -> str:
    """A plain-text table of per-task main scores, chance levels ('-': not recorded) and per-category
    means (x100)."""
    lines = [f"{'category':<15} {'task':<40} {'metric':<16} {'score':>7} {'chance':>7}", "-" * 89]
    for cat in CATEGORIES:
        for name, entry in results["tasks"].items():
            if entry["category"] == cat:
                chance = entry.get("chance")
                level = f"{100 * chance['score']:.2f}" if chance else "-"
                lines.append(f"{cat:<15} {name:<40} {entry['main_metric']:<16} {100 * entry['main_score']:>7.2f}"
                             f" {level:>7}")
    lines.append("-" * 89)
    for cat, record in results["categories"].items():
        lines.append(f"{cat:<15} {'mean of ' + str(record['n_tasks']) + ' task(s)':<40} "
                     f"{MAIN_METRIC[cat]:<16} {100 * record['mean']:>7.2f}")
    return "\n".join(lines)


def load_results(paths: list[str | Path]) -> dict[str, dict[str, Any]]:
    """Variant name (results' model name, else the file stem) -> results dict, in argument order."""
    out: dict[str, dict[str, Any]] = {}
    for path in map(Path, paths):
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            raise UserError(f"results file {path} does not exist") from None
        except json.JSONDecodeError as err:
            raise UserError(f"{path}:{err.lineno}: not valid JSON ({err.msg})") from None
        if "tasks" not in data:
            raise UserError(f"{path}: not a dsembed-evaluate results file (no 'tasks' key)")
        name = (data.get("model") or {}).get("name") or path.stem
        if name in out:
            name = path.stem if path.stem not in out else str(path)
        out[name] = data
    return out


def _category_view(variants: dict[str, dict[str, Any]], baseline: str, names: list[str], tested: list[str],
                   use_holm: bool, alpha: float) -> tuple[dict[str, Any], int]:
    """Per category over `names`: means, the Wilcoxon test of each tested variant, Holm over them."""
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
            "tests": {v: statistics.wilcoxon_test(score[baseline], score[v]).to_dict() for v in tested},
        }
    tests = [(cat, v) for cat in categories for v in tested]
    adjusted = statistics.holm([categories[c]["tests"][v]["pvalue"] for c, v in tests], alpha) \
        if use_holm and tests else [None] * len(tests)
    for (cat, v), p_adj in zip(tests, adjusted):
        test = categories[cat]["tests"][v]
        test["p_holm"] = p_adj
        p = p_adj if use_holm else test["pvalue"]
        test["significant"] = bool(p is not None and not np.isnan(p) and p < alpha)
    return categories, len(tests)


def compare(variants: dict[str, dict[str, Any]], baseline: str, *, use_holm: bool = False,
            alpha: float = 0.05, n_resamples: int = 1000, seed: int = 0,
            references: tuple[str, ...] | list[str] = (), headline: str = "all") -> dict[str, Any]:
    """The comparison record of all variants against `baseline` (schema in dsembed/cli/compare.py).

    Args:
        references: variants shown in the tables (with bootstrap intervals) but not tested: no
            Wilcoxon test and not in the Holm family (e.g. the untrained `base` of an ablation study,
            whose questions are the ablations against the full method).
        headline: which category means and tests the first table, the answers, the CSV and the
            plots use: "all" datasets, or "informative" ones (without the datasets flagged as
            carrying no information, evaluation.flags). Both are computed and reported.

    Raises:
        UserError: the baseline is not among the variants, a reference is unknown or is the baseline,
            fewer than two variants, or an unknown headline.
    """
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
    categories, n_tests = _category_view(variants, baseline, ordered, tested, use_holm, alpha)
    categories_informative, n_tests_informative = _category_view(variants, baseline, informative, tested,
                                                                 use_holm, alpha)
    datasets: dict[str, Any] = {}
    for name in ordered:
        cat = base_tasks[name]["category"]
        record = {"category": cat, "scores": {v: variants[v]["tasks"][name]["main_score"] for v in variants},
                  **info[name], "bootstrap": {}}
        for v in others:
            a, b = base_tasks[name].get("items"), variants[v]["tasks"][name].get("items")
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
    return {"baseline": baseline, "variants": list(variants), "references": list(references),
            "alpha": alpha, "holm": use_holm, "headline": headline, "n_tests": n_tests,
            "n_resamples": n_resamples, "categories": categories,
            "categories_informative": categories_informative, "n_tests_informative": n_tests_informative,
            "flagged": {n: info[n]["flag"] for n in ordered if info[n]["flag"]},
            "datasets": datasets, "layer_weights": layer_weights}


def headline_view(comparison: dict[str, Any]) -> tuple[dict[str, Any], int]:
    """(categories, number of tests in their Holm family) of the view the comparison leads with."""
    if comparison.get("headline", "all") == "informative":
        return comparison["categories_informative"], comparison["n_tests_informative"]
    return comparison["categories"], comparison["n_tests"]


def _other_view(comparison: dict[str, Any]) -> tuple[dict[str, Any], int, str]:
    if comparison.get("headline", "all") == "informative":
        return comparison["categories"], comparison["n_tests"], "with all datasets"
    return comparison["categories_informative"], comparison["n_tests_informative"], "without flagged datasets"


def _mark(test: dict[str, Any] | None) -> str:
    if not test or not test["significant"]:
        return ""
    return " ▲*" if test["mean_difference"] > 0 else " ▼*"


def _tables(comparison: dict[str, Any], categories: dict[str, Any]) -> list[str]:
    """The means table (best in bold, ▲*/▼*) and the Wilcoxon p table of one view."""
    cats, base = list(categories), comparison["baseline"]
    out = ["| variant | " + " | ".join(f"{c} ({len(categories[c]['tasks'])})" for c in cats) + " |",
           "|---|" + "---:|" * len(cats)]
    for v in comparison["variants"]:
        cells = []
        for c in cats:
            record = categories[c]
            text = f"{100 * record['means'][v]:.2f}"
            if record["means"][v] == max(record["means"].values()):
                text = f"**{text}**"
            cells.append(text + _mark(record["tests"].get(v)))
        out.append(f"| {v}{' (baseline)' if v == base else ''} | " + " | ".join(cells) + " |")
    p_name = "Holm-adjusted p" if comparison["holm"] else "p"
    out += ["", f"Wilcoxon {p_name} per category:", "", "| variant | " + " | ".join(cats) + " |",
            "|---|" + "---:|" * len(cats)]
    references = comparison.get("references", [])
    for v in comparison["variants"]:
        if v == base or v in references:
            continue
        cells = []
        for c in cats:
            t = categories[c]["tests"][v]
            p = t["p_holm"] if comparison["holm"] else t["pvalue"]
            tied = f", {t['n_zero']} tied" if t.get("n_zero") else ""  # zero differences: not in n
            cells.append(f"{p:.3g} (n={t['n']}{tied})")
        out.append(f"| {v} | " + " | ".join(cells) + " |")
    return out


def _which_view(comparison: dict[str, Any]) -> str:
    """The sentence that says which datasets the means and tests use."""
    flagged = comparison.get("flagged", {})
    if not flagged:
        return "No dataset is flagged as carrying no information at its limit: the means and tests use every dataset."
    names = ", ".join(flagged)
    if comparison.get("headline", "all") == "informative":
        return (f"The means and tests leave out the {len(flagged)} dataset(s) flagged as carrying no information "
                f"at their limit ({names}; reasons below); the same with all datasets follows.")
    return (f"The means and tests use all datasets, including the {len(flagged)} flagged as carrying no "
            f"information at their limit ({names}; reasons below); the same without them follows.")


def markdown(comparison: dict[str, Any]) -> str:
    """Markdown: variants x categories (best in bold, * = significant vs baseline), then datasets."""
    base = comparison["baseline"]
    categories, _ = headline_view(comparison)
    p_name = "Holm-adjusted p" if comparison["holm"] else "p"
    out = [f"# Comparison against `{base}`", "",
           f"Category means x100 over the datasets all variants have. ▲*/▼*: Wilcoxon signed-rank "
           f"(two-sided, paired over datasets) {p_name} < {comparison['alpha']} vs the baseline.", "",
           _which_view(comparison), ""] + _tables(comparison, categories)
    if comparison.get("flagged"):
        other, _, label = _other_view(comparison)
        out += ["", f"### The same {label}", ""]
        out += _tables(comparison, other) if other else ["(no dataset left)"]
    out += ["", f"## Answers: each variant against `{base}`", ""] + [f"- {line}" for line in answers(comparison)]
    references = comparison.get("references", [])
    if references:
        out += ["", f"Not tested (reference rows): {', '.join(references)}."]
    others = [v for v in comparison["variants"] if v != base]
    out += ["", "Per dataset x100: chance (the score of a no-information model at the task's limit; "
            "'-': not in the results), variant score, difference to the baseline and its paired bootstrap "
            "95% interval (* = interval excludes 0); † = carries no information at this limit.", "",
            "| dataset | category | chance | " + base + " | " + " | ".join(others) + " |",
            "|---|---|---:|---:|" + "---:|" * len(others)]
    for name, d in comparison["datasets"].items():
        cells = []
        for v in others:
            boot = d["bootstrap"][v]
            text = f"{100 * d['scores'][v]:.2f}"
            if "error" not in boot:
                star = "*" if boot["significant"] else ""
                text += (f" ({100 * boot['difference']:+.2f} [{100 * boot['low']:+.2f}, "
                         f"{100 * boot['high']:+.2f}]{star})")
            cells.append(text)
        chance = d.get("chance")
        level = "-" if not chance else f"{100 * chance['score']:.2f}"
        mark = " †" if d.get("flag") else ""
        out.append(f"| {name}{mark} | {d['category']} | {level} | {100 * d['scores'][base]:.2f} | "
                   + " | ".join(cells) + " |")
    flagged = comparison.get("flagged", {})
    notes = {n: d["problems"] for n, d in comparison["datasets"].items() if d.get("problems")}
    if flagged or notes:
        out += ["", "## Datasets that carry no information at this limit", ""]
        out += [f"- † {n} ({comparison['datasets'][n]['category']}): {reason}" for n, reason in flagged.items()]
        out += [f"- {n}: by construction, {'; '.join(problems)}" for n, problems in notes.items()]
    return "\n".join(out) + "\n"


def answers(comparison: dict[str, Any]) -> list[str]:
    """One line per tested variant and category: the difference to the baseline, the Wilcoxon test
    over datasets and whether the difference holds at alpha, before and after Holm; where datasets
    are flagged, the same in the other view (with or without them)."""
    base, alpha = comparison["baseline"], comparison["alpha"]
    categories, n_tests = headline_view(comparison)
    other, _, label = _other_view(comparison) if comparison.get("flagged") else ({}, 0, "")
    lines = []
    for v in comparison["variants"]:
        for cat, record in categories.items():
            test = record["tests"].get(v)
            if test is None:
                continue
            diff = 100 * (record["means"][v] - record["means"][base])
            p = test["pvalue"]
            held = "yes" if p == p and p < alpha else "no"  # p != p: NaN (every difference 0)
            line = (f"{v} vs {base}, {cat}: {diff:+.2f} points (mean over {len(record['tasks'])} datasets); "
                    f"Wilcoxon p = {p:.3g} (n = {test['n']}); p < {alpha}: {held}")
            if comparison["holm"]:
                holds = "yes" if test["significant"] else "no"
                line += f"; after Holm over {n_tests} tests (p = {test['p_holm']:.3g}): {holds}"
            alt = other.get(cat)
            if comparison.get("flagged") and (alt is None or alt["tasks"] != record["tasks"]):
                if alt is None:
                    line += f"; {label}: no dataset left"
                else:
                    alt_test = alt["tests"][v]
                    alt_diff = 100 * (alt["means"][v] - alt["means"][base])
                    line += (f"; {label} ({len(alt['tasks'])}): {alt_diff:+.2f} points, "
                             f"Wilcoxon p = {alt_test['pvalue']:.3g} (n = {alt_test['n']})")
            lines.append(line)
    return lines


def write_csv(comparison: dict[str, Any], path: Path) -> None:
    """One row per (dataset, variant): scores, bootstrap difference/interval, category mean and test
    p over all datasets, the task's chance level and its flag (empty: none or not recorded)."""
    with path.open("w", newline="", encoding="utf-8") as handle:
        writer = csv.writer(handle)
        writer.writerow(["dataset", "category", "variant", "score", "baseline_score", "difference",
                         "ci_low", "ci_high", "ci_significant", "category_mean", "wilcoxon_p", "holm_p", "chance", "flag"])
        base = comparison["baseline"]
        for name, d in comparison["datasets"].items():
            cat = comparison["categories"][d["category"]]
            for v in comparison["variants"]:
                boot = d["bootstrap"].get(v, {})
                test = cat["tests"].get(v, {})
                writer.writerow([name, d["category"], v, d["scores"][v], d["scores"][base],
                                 boot.get("difference", ""), boot.get("low", ""), boot.get("high", ""),
                                 boot.get("significant", ""), cat["means"][v], test.get("pvalue", ""),
                                 test.get("p_holm", "") if test.get("p_holm") is not None else "",
                                 (d.get("chance") or {}).get("score", ""), d.get("flag") or ""])


def _save(fig: Any, path: Path) -> Path:
    """Lay out, write as PNG and close one matplotlib figure."""
    import matplotlib.pyplot as plt

    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def plot(comparison: dict[str, Any], out_dir: Path) -> list[Path]:
    """category_means.png, differences.png (bootstrap intervals) and, when any, layer_weights.png."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    written, variants, base = [], comparison["variants"], comparison["baseline"]
    cats = list(comparison["categories"])
    fig, ax = plt.subplots(figsize=(1.8 + 1.6 * len(cats), 3.6))
    width = 0.8 / len(variants)
    for i, v in enumerate(variants):
        means = [100 * comparison["categories"][c]["means"][v] for c in cats]
        ax.bar(np.arange(len(cats)) + i * width, means, width, label=v)
    ax.set_xticks(np.arange(len(cats)) + 0.4 - width / 2, cats)
    ax.set_ylabel("mean main score x100")
    ax.legend(fontsize=8)
    written.append(_save(fig, out_dir / "category_means.png"))

    others = [v for v in variants if v != base]
    fig, axes = plt.subplots(1, len(cats), figsize=(3.2 * len(cats), 3.8), squeeze=False)
    for ax, c in zip(axes[0], cats):
        names = comparison["categories"][c]["tasks"]
        w = 0.8 / max(len(others), 1)
        for i, v in enumerate(others):
            boots = [comparison["datasets"][n]["bootstrap"][v] for n in names]
            diff = np.array([100 * b.get("difference", np.nan) for b in boots])
            low = np.array([100 * b.get("low", np.nan) for b in boots])
            high = np.array([100 * b.get("high", np.nan) for b in boots])
            ax.bar(np.arange(len(names)) + i * w, diff, w, label=v,
                   yerr=np.clip(np.nan_to_num(np.vstack([diff - low, high - diff])), 0, None), capsize=2)
        ax.axhline(0, color="black", linewidth=0.6)
        ax.set_xticks(np.arange(len(names)) + 0.4 - w / 2, names, rotation=60, ha="right", fontsize=7)
        ax.set_title(c)
    axes[0][0].set_ylabel(f"difference to {base} x100 (95% CI)")
    axes[0][-1].legend(fontsize=7)
    written.append(_save(fig, out_dir / "differences.png"))

    if comparison["layer_weights"]:
        fig, ax = plt.subplots(figsize=(5, 3.4))
        for v, lw in comparison["layer_weights"].items():
            ax.plot(lw["layers"], lw["norms"], marker="o", label=v)
        ax.set_xlabel("decoder layer")
        ax.set_ylabel("L2 norm of learned layer weight")
        ax.legend(fontsize=8)
        written.append(_save(fig, out_dir / "layer_weights.png"))
    return written


def write_report(comparison: dict[str, Any], out_dir: str | Path) -> list[Path]:
    """Write report.md, comparison.csv, comparison.json and the PNG plots into `out_dir`."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "report.md").write_text(markdown(comparison), encoding="utf-8")
    write_csv(comparison, out_dir / "comparison.csv")
    (out_dir / "comparison.json").write_text(json.dumps(comparison, indent=1), encoding="utf-8")
    return [out_dir / "report.md", out_dir / "comparison.csv", out_dir / "comparison.json",
            *plot(comparison, out_dir)]
