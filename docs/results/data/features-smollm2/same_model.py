"""Whether two evaluations scored the same model: main scores per dataset side by side.

    python docs/results/data/features-smollm2/same_model.py STUDY_RESULT.json RESCORED.json

Used for the Matryoshka section of docs/results/training-features.md: the curve's runs were trained
again on a CPU without bf16 (float32), and their size-576 evaluations (the full embedding) set beside
the study's bf16 evaluations of the same recipes show what the precision alone changes. Prints each
run's training summary and weights fingerprint, then per category both means x100 and the largest
difference of a dataset's main score.
"""
from __future__ import annotations

import json
import sys


def main(first: str, second: str) -> None:
    a, b = (json.load(open(path, encoding="utf-8")) for path in (first, second))
    for label, results, path in (("first", a, first), ("second", b, second)):
        model, training = results["model"], results["model"].get("training") or {}
        print(f"{label}: {path}: {model['name']}, trained loss over the last {training.get('window')} steps "
              f"{training.get('last_loss')}, weights {model.get('fingerprint')}")
    print("main scores x100:")
    print("| category | datasets | first mean | second mean | largest |difference| (dataset) |")
    print("|---|---:|---:|---:|---|")
    for category, info in a["categories"].items():
        gaps = {name: abs(a["tasks"][name]["main_score"] - b["tasks"][name]["main_score"]) * 100
                for name in info["tasks"]}
        worst = max(gaps, key=gaps.get)
        mean_b = b["categories"][category]["mean"]
        print(f"| {category} | {len(gaps)} | {info['mean'] * 100:.4f} | {mean_b * 100:.4f} | "
              f"{gaps[worst]:.2g} ({worst}) |")


if __name__ == "__main__":
    if len(sys.argv) != 3:
        sys.exit(__doc__)
    main(sys.argv[1], sys.argv[2])
