"""Score against embedding size: the Matryoshka curve of one or more models, tested size by size.

`dsembed-evaluate MODEL --truncate-dim 64 128 256 --output r-d{dim}.json` scores a model at several
sizes (`settings.truncate_dim`, model name `<name>-d<size>`); its evaluation without the flag is the
full size. `size_curves` groups such results files by model and size (seeds of one model merged as
dsembed-compare does), `compare_sizes` tests every model against a baseline model at the same size
(Wilcoxon over the datasets of a category, Holm over each model's size x category tests) and gives
each model's retention (score at a size / its full-size score, or its largest size's), and
`write_dims_report` writes dims.md, dims.json and dims.png.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np

from dsembed.atomic import write_text_atomic
from dsembed.errors import UserError
from dsembed.evaluation import statistics
from dsembed.evaluation.comparison import load_results
from dsembed.evaluation.presets import CATEGORIES
from dsembed.evaluation.report import save_figure

FULL = "full"


def _model_and_size(results: dict[str, Any]) -> tuple[str, str]:
    """(model name without its -d<size> suffix, size label: "64", ... or "full")."""
    size = (results.get("settings") or {}).get("truncate_dim")
    name = (results.get("model") or {}).get("name") or ""
    suffix = f"-d{size}"
    if size is None:
        return name, FULL
    return (name[: -len(suffix)] if name.endswith(suffix) else name), str(size)


def _size_order(label: str) -> float:
    return float("inf") if label == FULL else float(label)


def size_curves(paths: list[str | Path]) -> dict[str, dict[str, dict[str, Any]]]:
    """model -> size label (ascending, "full" last) -> {"scores": {dataset: main score}, "category":
    {dataset: category}, "seeds": [train seeds]}.

    Raises:
        UserError: no results, or one model given twice at one size.
    """
    curves: dict[str, dict[str, dict[str, Any]]] = {}
    for key, results in load_results(paths).items():
        model, size = _model_and_size(results)
        model = model or key
        if size in curves.get(model, {}):
            raise UserError(f"results of {model!r} at size {size} given twice (file {key}): give each model and size once")
        tasks = results["tasks"]
        curves.setdefault(model, {})[size] = {
            "scores": {t: float(e["main_score"]) for t, e in tasks.items()},
            "category": {t: e.get("category") for t, e in tasks.items()},
            "seeds": results.get("seeds") or [(results.get("model") or {}).get("train_seed")]}
    if not curves:
        raise UserError("no results files given")
    return {m: dict(sorted(sizes.items(), key=lambda kv: _size_order(kv[0]))) for m, sizes in curves.items()}


def _by_category(entry: dict[str, Any], datasets: list[str]) -> dict[str, dict[str, float]]:
    out: dict[str, dict[str, float]] = {}
    for name in datasets:
        out.setdefault(entry["category"][name], {})[name] = entry["scores"][name]
    return out


def compare_sizes(curves: dict[str, dict[str, dict[str, Any]]], baseline: str, alpha: float = 0.05) -> dict[str, Any]:
    """Category means per model and size over the datasets every entry has, each other model's
    Wilcoxon test against the baseline at the same size (Holm over that model's tests), and each
    model's retention of its full-size score (or, without one, of its largest size's).

    Raises:
        UserError: the baseline is not among the models, or the entries share no dataset.
    """
    if baseline not in curves:
        raise UserError(f"--baseline {baseline}: not among the models ({', '.join(curves)}); "
                        "a model's name is its results' name without the -d<size> suffix")
    entries = [e for sizes in curves.values() for e in sizes.values()]
    datasets = sorted(set.intersection(*(set(e["scores"]) for e in entries)))
    if not datasets:
        raise UserError("the results share no dataset: evaluate every model and size on the same tasks")
    cats = [c for c in CATEGORIES if any(entries[0]["category"][d] == c for d in datasets)]
    grouped = {m: {s: _by_category(e, datasets) for s, e in sizes.items()} for m, sizes in curves.items()}
    means = {m: {s: {c: float(np.mean(list(by_cat.get(c, {}).values()))) for c in cats}
                 for s, by_cat in sizes.items()} for m, sizes in grouped.items()}
    # retention of the full size, or of the largest size scored: `--truncate-dim 64 ... 576` on a 576-dim
    # model scores the full embedding (re-normalised) from the same encoding as the other sizes
    reference = {m: max(sizes, key=_size_order) for m, sizes in curves.items() if len(sizes) > 1}
    retention = {m: {s: {c: means[m][s][c] / means[m][top][c] if means[m][top][c] else None for c in cats}
                     for s in curves[m]} for m, top in reference.items()}
    tests: dict[str, dict[str, dict[str, Any]]] = {}
    for model, sizes in curves.items():
        if model == baseline:
            continue
        found = {}
        for size in (s for s in sizes if s in curves[baseline]):
            base, other = grouped[baseline][size], grouped[model][size]
            for c in cats:
                found[(size, c)] = statistics.wilcoxon_test(base.get(c, {}), other.get(c, {})).to_dict()
        adjusted = statistics.holm([t["pvalue"] for t in found.values()], alpha)
        for (size, c), test, p in zip(found, found.values(), adjusted):
            tests.setdefault(model, {}).setdefault(size, {})[c] = {**test, "p_holm": p, "significant": bool(p < alpha)}
    return {"baseline": baseline, "alpha": alpha, "categories": cats, "datasets": datasets,
            "sizes": {m: list(s) for m, s in curves.items()}, "seeds": {m: next(iter(s.values()))["seeds"] for m, s in curves.items()},
            "means": means, "retention": retention, "retention_of": reference, "tests": tests,
            "holm": "per model: its size x category tests against the baseline"}


def _table_head(cats: list[str]) -> list[str]:
    return ["| model | size | " + " | ".join(cats) + " |", "|---|---:|" + "---:|" * len(cats)]


def markdown(result: dict[str, Any]) -> str:
    """dims.md: category means x100 per model and size, retention, tests against the baseline."""
    cats, base = result["categories"], result["baseline"]
    lines = [f"# Score against embedding size (baseline `{base}`)", "",
             f"Category means x100 over the {len(result['datasets'])} datasets every model and size has.", "",
             *_table_head(cats)]
    for model, sizes in result["means"].items():
        for size, row in sizes.items():
            lines.append(f"| {model} | {size} | " + " | ".join(f"{100 * row[c]:.2f}" for c in cats) + " |")
    if result["retention"]:
        of = ", ".join(f"{m} {s}" for m, s in result["retention_of"].items())
        lines += ["", f"Retention: the category mean at a size / the same model's mean at its largest size scored ({of}).",
                  "", *_table_head(cats)]
        for model, sizes in result["retention"].items():
            for size, row in sizes.items():
                lines.append(f"| {model} | {size} | " + " | ".join("-" if row[c] is None else f"{row[c]:.3f}" for c in cats) + " |")
    lines += ["", f"Each model against `{base}` at the same size: mean difference x100, Wilcoxon p over the datasets "
              f"of a category (n), Holm over the model's size x category tests; * = Holm p < {result['alpha']}.", "",
              *_table_head(cats)]
    for model, sizes in result["tests"].items():
        for size, row in sizes.items():
            cells = [f"{100 * t['mean_difference']:+.2f} (p {t['pvalue']:.3g}, n={t['n']}; Holm {t['p_holm']:.3g})"
                     f"{'*' if t['significant'] else ''}" for t in (row[c] for c in cats)]
            lines.append(f"| {model} | {size} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def plot(result: dict[str, Any], path: Path) -> Path:
    """dims.png: one panel per category, the category mean against the size, one line per model."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cats = result["categories"]
    labels = sorted({s for sizes in result["sizes"].values() for s in sizes}, key=_size_order)
    fig, axes = plt.subplots(1, len(cats), figsize=(3.2 * len(cats), 3.4), squeeze=False)
    for ax, c in zip(axes[0], cats):
        for model, sizes in result["means"].items():
            ax.plot([labels.index(s) for s in sizes], [100 * sizes[s][c] for s in sizes], marker="o", label=model)
        ax.set_xticks(range(len(labels)), labels)
        ax.set_title(c)
        ax.set_xlabel("embedding size")
    axes[0][0].set_ylabel("mean main score x100")
    axes[0][0].legend(fontsize=8)
    return save_figure(fig, path)


def write_dims_report(result: dict[str, Any], out_dir: str | Path) -> list[Path]:
    """dims.md, dims.json and dims.png in out_dir (created)."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    write_text_atomic(out / "dims.md", markdown(result))
    write_text_atomic(out / "dims.json", json.dumps(result, indent=1))
    return [out / "dims.md", out / "dims.json", plot(result, out / "dims.png")]
