"""Tables, files and plots: the evaluate screen table and the study comparison report.

The comparison record itself is computed by dsembed.evaluation.comparison (`compare`);
`write_report()` writes it as Markdown, CSV, JSON and PNG.
"""
from __future__ import annotations

import csv
import json
from pathlib import Path
from typing import Any

import numpy as np

from dsembed.evaluation.comparison import headline_view, other_view
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
    both = " (uncorrected, the paper's test / Holm-adjusted)" if comparison["holm"] else ""
    out += ["", f"Wilcoxon p per category{both}:", "", "| variant | " + " | ".join(cats) + " |",
            "|---|" + "---:|" * len(cats)]
    references = comparison.get("references", [])
    for v in comparison["variants"]:
        if v == base or v in references:
            continue
        cells = []
        for c in cats:
            t = categories[c]["tests"][v]
            p = f"{t['pvalue']:.3g}" + (f" / {t['p_holm']:.3g}" if comparison["holm"] else "")
            tied = f", {t['n_zero']} tied" if t.get("n_zero") else ""  # zero differences: not in n
            cells.append(f"{p} (n={t['n']}{tied})")
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


def family_text(comparison: dict[str, Any]) -> str:
    """The multiple-testing family of a comparison, in words."""
    family = comparison.get("holm_family", "all" if comparison["holm"] else "none")
    size = comparison.get("holm_family_size", comparison["n_tests"])
    return {"none": "none (the paper's uncorrected Wilcoxon)",
            "all": f"Holm over all {size} variant x category tests",
            "per_variant": f"Holm per variant over its {size} category tests (the paper's question for each design)"}[family]


def power_text(comparison: dict[str, Any]) -> str:
    """What the study can decide at all: per category n, the smallest Wilcoxon p, and whether the
    Holm family lets it reach alpha."""
    rows = comparison.get("power") or []
    if not rows:
        return ""
    alpha = comparison["alpha"]
    parts = [f"{r['category']} n = {r['n']} (smallest p {r['min_p']:.3g}"
             + (f", best after correction {r['best_p_after_correction']:.3g}" if comparison["holm"] else "")
             + f": {'can' if r['reachable'] else 'cannot'} reach p < {alpha})" for r in rows]
    return ("Power: a Wilcoxon signed-rank test over n datasets cannot give p below 2/2^n, whatever the "
            f"scores; with this study's datasets and multiple-testing family ({family_text(comparison)}): "
            + "; ".join(parts) + ".")


def seed_lines(comparison: dict[str, Any], categories: dict[str, Any]) -> list[str]:
    """Per category the mean ± sd over seeds of each variant trained with several seeds, and the
    seed-to-seed difference of the same variant (the noise floor of a design difference)."""
    seeded = [v for v in comparison["variants"] if any(v in r.get("seeds", {}) for r in categories.values())]
    if not seeded:
        return []
    cats = list(categories)
    out = ["", "Seeds: category mean x100 ± sd over training seeds (each seed's mean over the datasets), "
           "the mean seed-to-seed difference of the same variant in brackets (a difference between designs "
           "below it is within training noise), and each seed's mean in parentheses.", "",
           "| variant | seeds | " + " | ".join(cats) + " |", "|---|---|" + "---:|" * len(cats)]
    for v in seeded:
        cells = []
        for c in cats:
            st = categories[c].get("seeds", {}).get(v)
            cells.append("-" if st is None else f"{100 * st['mean']:.2f} ± {100 * st['sd']:.2f} [{100 * st['seed_to_seed']:.2f}] ("
                         + ", ".join(f"{100 * x:.2f}" for x in st["per_seed"]) + ")")
        seeds = next(iter(categories[c]["seeds"][v]["seeds"] for c in cats if v in categories[c].get("seeds", {})))
        out.append(f"| {v} | {', '.join(map(str, seeds))} | " + " | ".join(cells) + " |")
    floors = [categories[c]["seeds"][v]["seed_to_seed"] for c in cats for v in seeded if v in categories[c].get("seeds", {})]
    out += ["", f"Mean seed-to-seed difference over variants and categories: {100 * float(np.mean(floors)):.2f} points."]
    return out


def _number(value: float | None, digits: int = 2) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def training_lines(comparison: dict[str, Any]) -> list[str]:
    """The trained runs' learning curves in a few numbers, a seed far behind its siblings marked."""
    runs = comparison.get("training") or {}
    if not runs:
        return []
    # runs trained before the change was recorded have no such key: the column shows only where some run has it
    w_change = any(r.get("layer_weights_change") is not None for rows in runs.values() for r in rows)
    out = ["", "Training runs (results of models exported with a training summary): in-batch accuracy over the "
           "first and the last 10 logged steps, loss and positive - negative cosine over the last 10 (near 0: "
           "every text embedded alike), the largest gradient norm and its step"
           + (", and how far the layer weights W moved from their initialisation by the last step "
              "(||W - W0|| / ||W0||; a W near its random start is a code, not a learned weighting)" if w_change else "")
           + ". ⚠ = final accuracy below half "
           "of the variant's best seed: a collapsed or failed run, averaged into the variant's scores.", "",
           "| variant | seed | steps | accuracy first → last | loss (last) | cosine gap (last) | max grad norm (step) |"
           + (" W change |" if w_change else ""),
           "|---|---:|---:|---|---:|---:|---:|" + ("---:|" if w_change else "")]
    for v, rows in runs.items():
        for r in rows:
            out.append(f"| {v}{' ⚠' if r['behind'] else ''} | {r['seed']} | {r['steps']} | "
                       f"{_number(r['first_accuracy'])} → {_number(r['last_accuracy'])} | {_number(r['last_loss'])} | "
                       f"{_number(r['last_cosine_gap'], 3)} | {_number(r['max_grad_norm'], 1)} ({r['max_grad_step']}) |"
                       + (f" {_number(r.get('layer_weights_change'), 4)} |" if w_change else ""))
    behind = [f"{v} seed {r['seed']}" for v, rows in runs.items() for r in rows if r["behind"]]
    if behind:
        out += ["", f"Far behind their variant's other seeds: {', '.join(behind)}."]
    return out


def markdown(comparison: dict[str, Any]) -> str:
    """Markdown: variants x categories (best in bold, * = significant vs baseline), then datasets."""
    base = comparison["baseline"]
    categories, _ = headline_view(comparison)
    p_name = "Holm-adjusted p" if comparison["holm"] else "p"
    power = power_text(comparison)
    out = [f"# Comparison against `{base}`", ""] + ([power, ""] if power else []) + [
           f"Category means x100 over the datasets all variants have (a variant trained with several seeds: "
           f"each dataset's mean over its seeds). ▲*/▼*: Wilcoxon signed-rank (two-sided, paired over "
           f"datasets) {p_name} < {comparison['alpha']} vs the baseline. Multiple testing: {family_text(comparison)}.", "",
           _which_view(comparison), ""] + _tables(comparison, categories) + seed_lines(comparison, categories) + training_lines(comparison)
    if comparison.get("flagged"):
        other, _, label = other_view(comparison)
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
    categories, family_size = headline_view(comparison)
    other, _, label = other_view(comparison) if comparison.get("flagged") else ({}, 0, "")
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
                scope = (f"{v}'s {family_size} tests" if comparison.get("holm_family") == "per_variant"
                         else f"{family_size} tests")
                line += f"; after Holm over {scope} (p = {test['p_holm']:.3g}): {holds}"
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


def save_figure(fig: Any, path: Path) -> Path:
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
    written.append(save_figure(fig, out_dir / "category_means.png"))

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
    written.append(save_figure(fig, out_dir / "differences.png"))

    if comparison["layer_weights"]:
        fig, ax = plt.subplots(figsize=(5, 3.4))
        for v, lw in comparison["layer_weights"].items():
            ax.plot(lw["layers"], lw["norms"], marker="o", label=v)
        ax.set_xlabel("decoder layer")
        ax.set_ylabel("L2 norm of learned layer weight")
        ax.legend(fontsize=8)
        written.append(save_figure(fig, out_dir / "layer_weights.png"))
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
