"""Counts the hand-written study reports quote, read from a study's report/comparison.json.

    python docs/results/data/summarise_comparison.py ~/dsembed-studies/ablations-smollm2/report/comparison.json
    python docs/results/data/summarise_comparison.py --table STUDY/report/comparison.json [STUDY/report/contrasts/*/comparison.json]

Prints, for each tested variant against the baseline: on how many datasets it is below / above, how
many paired bootstrap intervals exclude 0 below / above; per category, whether the difference to the
baseline exceeds the seed-to-seed difference of both (the noise floor); and which trained row is
best on how many datasets. With --table: one markdown table row per row of each comparison, each
category's mean x100 with, for a tested row, its difference to the baseline and the Wilcoxon p
uncorrected / Holm (as the comparison corrected it). Only reads what the comparison already
computed (no new statistics).
"""
from __future__ import annotations

import json
import sys
from collections import Counter
from pathlib import Path


def main(path: Path) -> None:
    comparison = json.loads(path.read_text(encoding="utf-8"))
    baseline = comparison["baseline"]
    references = set(comparison["references"])
    tested = [v for v in comparison["variants"] if v != baseline and v not in references]
    trained = [baseline, *tested]
    datasets = comparison["datasets"]
    print(f"baseline {baseline}; {len(datasets)} datasets; tested: {', '.join(tested)}")

    print("\nper variant: datasets below/above the baseline; bootstrap intervals excluding 0 below/above")
    total_intervals = Counter()
    for variant in tested:
        below = sum(d["scores"][variant] < d["scores"][baseline] for d in datasets.values())
        above = sum(d["scores"][variant] > d["scores"][baseline] for d in datasets.values())
        boot = [d["bootstrap"][variant] for d in datasets.values()]
        sig_below = sum(b["significant"] and b["difference"] < 0 for b in boot)
        sig_above = sum(b["significant"] and b["difference"] > 0 for b in boot)
        total_intervals.update(below=sig_below, above=sig_above, all=len(boot))
        print(f"  {variant:18s} below {below:2d} / above {above:2d}; intervals below {sig_below:2d} / above {sig_above:2d}")
    print(f"  all tested: {total_intervals['below']} of {total_intervals['all']} intervals exclude 0 below, "
          f"{total_intervals['above']} above")

    print("\nper category: difference x100 to the baseline, and whether it exceeds both rows' seed-to-seed difference")
    cells = exceeding = 0
    for category, info in comparison["categories"].items():
        seeds = info.get("seeds", {})
        floor_base = seeds.get(baseline, {}).get("seed_to_seed")
        for variant in tested:
            difference = info["means"][variant] - info["means"][baseline]
            floor = seeds.get(variant, {}).get("seed_to_seed")
            if floor is None or floor_base is None:
                print(f"  {category:15s} {variant:18s} {100 * difference:+7.2f} (one seed: no noise floor)")
                continue
            beyond = abs(difference) > max(floor, floor_base)
            cells += 1
            exceeding += beyond
            print(f"  {category:15s} {variant:18s} {100 * difference:+7.2f}  seed-to-seed {100 * floor:5.2f} "
                  f"(baseline {100 * floor_base:5.2f}) {'beyond' if beyond else 'within'}")
    floors = [s["seed_to_seed"] for info in comparison["categories"].values()
              for s in info.get("seeds", {}).values()]
    if floors:
        print(f"  {exceeding} of {cells} cells beyond both floors; mean seed-to-seed difference "
              f"{100 * sum(floors) / len(floors):.2f} over {len(floors)} variant x category values")

    best = Counter(max(trained, key=lambda v: d["scores"][v]) for d in datasets.values())
    print("\nbest trained row per dataset: " + ", ".join(f"{v} {n}" for v, n in best.most_common()))


def table(paths: list[Path]) -> None:
    """Markdown rows: category means x100, and for tested rows the difference and p / Holm p."""
    for path in paths:
        comparison = json.loads(path.read_text(encoding="utf-8"))
        baseline, categories = comparison["baseline"], comparison["categories"]
        print(f"\n{path} (baseline {baseline})\n")
        print("| row | " + " | ".join(f"{c} ({len(info['tasks'])})" for c, info in categories.items()) + " |")
        print("|---|" + "---:|" * len(categories))
        for variant in comparison["variants"]:
            cells = []
            for info in categories.values():
                cell = f"{100 * info['means'][variant]:.2f}"
                test = info["tests"].get(variant)
                if variant != baseline and test is not None:
                    holm = test.get("p_holm")
                    cell += (f" ({100 * test['mean_difference']:+.2f}; p {test['pvalue']:.3g}"
                             + (f" / {holm:.3g}" if holm is not None else "") + ")")
                cells.append(cell)
            print(f"| {variant} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    args = sys.argv[1:]
    if args[:1] == ["--table"] and len(args) > 1:
        table([Path(a) for a in args[1:]])
    elif len(args) == 1:
        main(Path(args[0]))
    else:
        sys.exit("usage: python docs/results/data/summarise_comparison.py [--table] STUDY/report/comparison.json ...")
