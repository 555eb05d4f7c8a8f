"""Tables, files and plots: the evaluate screen table and the study comparison report.

`compare()` turns several evaluate results (one per variant) into one comparison record: per
category the mean over the datasets every variant has, the Wilcoxon test of each variant against
the baseline (Holm-adjusted over all variant x category tests when asked), and per dataset the
paired bootstrap interval of (variant - baseline). `write_report()` writes it as Markdown, CSV,
JSON and PNG.
"""
from __future__ import annotations

import csv
import json
from pathlib import Path
from typing import Any

import numpy as np

from dsembed.errors import UserError
from dsembed.evaluation import statistics
from dsembed.evaluation.presets import CATEGORIES, MAIN_METRIC


def format_results_table(results: dict[str, Any]) -> str:
    """A plain-text table of per-task main scores and per-category means (x100)."""
    lines = [f"{'category':<15} {'task':<40} {'metric':<16} {'score':>7}", "-" * 81]
    for cat in CATEGORIES:
        for name, entry in results["tasks"].items():
            if entry["category"] == cat:
                lines.append(f"{cat:<15} {name:<40} {entry['main_metric']:<16} {100 * entry['main_score']:>7.2f}")
    lines.append("-" * 81)
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


HOLM_FAMILIES = ("none", "all", "per_variant")


def compare(variants: dict[str, dict[str, Any]], baseline: str, *, use_holm: bool = False,
            alpha: float = 0.05, n_resamples: int = 1000, seed: int = 0,
            references: tuple[str, ...] | list[str] = (), holm_family: str | None = None) -> dict[str, Any]:
    """The comparison record of all variants against `baseline` (schema in dsembed/cli/compare.py).

    Args:
        use_holm: Holm over every variant x category test (the same as holm_family="all").
        holm_family: "none", "all" (every variant x category test) or "per_variant" (each variant's
            tests over the categories: the paper's question per design); overrides use_holm.
        references: variants shown in the tables (with bootstrap intervals) but not tested: no
            Wilcoxon test and not in the Holm family (e.g. the untrained `base` of an ablation study,
            whose questions are the ablations against the full method).

    Raises:
        UserError: the baseline is not among the variants, a reference is unknown or is the baseline,
            or fewer than two variants.
    """
    family = holm_family or ("all" if use_holm else "none")
    if family not in HOLM_FAMILIES:
        raise UserError(f"--holm-family {family!r}: use one of {', '.join(HOLM_FAMILIES)}")
    use_holm = family != "none"
    if baseline not in variants:
        raise UserError(f"--baseline {baseline!r} is not one of the results: {', '.join(variants)}")
    if len(variants) < 2:
        raise UserError("compare needs at least two results files")
    bad = [r for r in references if r not in variants or r == baseline]
    if bad:
        raise UserError(f"--reference {bad[0]!r} is not one of the non-baseline results: "
                        f"{', '.join(v for v in variants if v != baseline)}")
    others = [v for v in variants if v != baseline]
    tested = [v for v in others if v not in references]
    common = set.intersection(*(set(r["tasks"]) for r in variants.values()))
    base_tasks = variants[baseline]["tasks"]
    categories: dict[str, Any] = {}
    for cat in CATEGORIES:
        names = sorted(n for n in common if base_tasks[n]["category"] == cat)
        if not names:
            continue
        score = {v: {n: variants[v]["tasks"][n]["main_score"] for n in names} for v in variants}
        categories[cat] = {
            "tasks": names,
            "means": {v: float(np.mean(list(score[v].values()))) for v in variants},
            "tests": {v: statistics.wilcoxon_test(score[baseline], score[v]).to_dict() for v in tested},
        }
    tests = [(cat, v) for cat in categories for v in tested]
    families = [tests] if family == "all" else [[(c, v) for c, t in tests if t == v] for v in tested] \
        if family == "per_variant" else []
    adjusted_of = {test: None for test in tests}
    for members in families:
        if members:
            values = statistics.holm([categories[c]["tests"][v]["pvalue"] for c, v in members], alpha)
            adjusted_of.update(zip(members, values))
    adjusted = [adjusted_of[test] for test in tests]
    for (cat, v), p_adj in zip(tests, adjusted):
        test = categories[cat]["tests"][v]
        test["p_holm"] = p_adj
        p = p_adj if use_holm else test["pvalue"]
        test["significant"] = bool(p is not None and not np.isnan(p) and p < alpha)
    datasets: dict[str, Any] = {}
    for name in sorted(common, key=lambda n: (CATEGORIES.index(base_tasks[n]["category"]), n)):
        cat = base_tasks[name]["category"]
        record = {"category": cat, "scores": {v: variants[v]["tasks"][name]["main_score"] for v in variants},
                  "bootstrap": {}}
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
            "alpha": alpha, "holm": use_holm, "holm_family": family,
            "holm_family_size": max((len(m) for m in families), default=1), "n_tests": len(tests), "n_resamples": n_resamples, "categories": categories, "datasets": datasets,
            "layer_weights": layer_weights}


def _mark(test: dict[str, Any] | None) -> str:
    if not test or not test["significant"]:
        return ""
    return " ▲*" if test["mean_difference"] > 0 else " ▼*"


def markdown(comparison: dict[str, Any]) -> str:
    """Markdown: variants x categories (best in bold, * = significant vs baseline), then datasets."""
    cats, base = list(comparison["categories"]), comparison["baseline"]
    p_name = "Holm-adjusted p" if comparison["holm"] else "p"
    family = comparison.get("holm_family", "all" if comparison["holm"] else "none")
    family_text = {"none": "no correction (the paper's uncorrected Wilcoxon)",
                   "all": f"Holm over all {comparison['n_tests']} variant x category tests",
                   "per_variant": f"Holm per variant over its {comparison.get('holm_family_size')} category tests "
                                  "(the paper's question for each design)"}[family]
    out = [f"# Comparison against `{base}`", "",
           f"Category means x100 over the datasets all variants have. ▲*/▼*: Wilcoxon signed-rank "
           f"(two-sided, paired over datasets) {p_name} < {comparison['alpha']} vs the baseline. "
           f"Multiple testing: {family_text}.", "",
           "| variant | " + " | ".join(f"{c} ({len(comparison['categories'][c]['tasks'])})" for c in cats) + " |",
           "|---|" + "---:|" * len(cats)]
    for v in comparison["variants"]:
        cells = []
        for c in cats:
            record = comparison["categories"][c]
            text = f"{100 * record['means'][v]:.2f}"
            if record["means"][v] == max(record["means"].values()):
                text = f"**{text}**"
            cells.append(text + _mark(record["tests"].get(v)))
        out.append(f"| {v}{' (baseline)' if v == base else ''} | " + " | ".join(cells) + " |")
    both = " (uncorrected, as the paper / Holm-adjusted)" if comparison["holm"] else ""
    out += ["", f"Wilcoxon p per category{both}:", "", "| variant | " + " | ".join(cats) + " |",
            "|---|" + "---:|" * len(cats)]
    references = comparison.get("references", [])
    for v in comparison["variants"]:
        if v == base or v in references:
            continue
        cells = []
        for c in cats:
            t = comparison["categories"][c]["tests"][v]
            p = f"{t['pvalue']:.3g}" + (f" / {t['p_holm']:.3g}" if comparison["holm"] else "")
            tied = f", {t['n_zero']} tied" if t.get("n_zero") else ""  # zero differences: not in n
            cells.append(f"{p} (n={t['n']}{tied})")
        out.append(f"| {v} | " + " | ".join(cells) + " |")
    out += ["", f"## Answers: each variant against `{base}`", ""] + [f"- {line}" for line in answers(comparison)]
    if references:
        out += ["", f"Not tested (reference rows): {', '.join(references)}."]
    others = [v for v in comparison["variants"] if v != base]
    out += ["", "Per dataset x100: variant score, difference to the baseline and its paired bootstrap "
            "95% interval (* = interval excludes 0).", "",
            "| dataset | category | " + base + " | " + " | ".join(others) + " |",
            "|---|---|---:|" + "---:|" * len(others)]
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
        out.append(f"| {name} | {d['category']} | {100 * d['scores'][base]:.2f} | " + " | ".join(cells) + " |")
    return "\n".join(out) + "\n"


def answers(comparison: dict[str, Any]) -> list[str]:
    """One line per tested variant and category: the difference to the baseline, the Wilcoxon test
    over datasets and whether the difference holds at alpha, before and after Holm."""
    base, alpha = comparison["baseline"], comparison["alpha"]
    lines = []
    for v in comparison["variants"]:
        for cat, record in comparison["categories"].items():
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
                size = comparison.get("holm_family_size", comparison["n_tests"])
                scope = f"{v}'s {size} tests" if comparison.get("holm_family") == "per_variant" else f"{size} tests"
                line += f"; after Holm over {scope} (p = {test['p_holm']:.3g}): {holds}"
            lines.append(line)
    return lines


def write_csv(comparison: dict[str, Any], path: Path) -> None:
    """One row per (dataset, variant): scores, bootstrap difference/interval, category test p."""
    with path.open("w", newline="", encoding="utf-8") as handle:
        writer = csv.writer(handle)
        writer.writerow(["dataset", "category", "variant", "score", "baseline_score", "difference",
                         "ci_low", "ci_high", "ci_significant", "category_mean", "wilcoxon_p", "holm_p"])
        base = comparison["baseline"]
        for name, d in comparison["datasets"].items():
            cat = comparison["categories"][d["category"]]
            for v in comparison["variants"]:
                boot = d["bootstrap"].get(v, {})
                test = cat["tests"].get(v, {})
                writer.writerow([name, d["category"], v, d["scores"][v], d["scores"][base],
                                 boot.get("difference", ""), boot.get("low", ""), boot.get("high", ""),
                                 boot.get("significant", ""), cat["means"][v], test.get("pvalue", ""),
                                 test.get("p_holm", "") if test.get("p_holm") is not None else ""])


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
