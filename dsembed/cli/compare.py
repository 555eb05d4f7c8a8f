"""dsembed-compare: the study report — variants x categories with significance against a baseline.

    dsembed-compare results/model*.json --baseline model1 --output report/ [--holm-family per_variant]
        [--reference base]
        [--headline all|informative]

Writes report.md (category table, best in bold, ▲*/▼* = Wilcoxon p < 0.05 vs the baseline; p-value
table; the same without (or with) the datasets flagged as carrying no information; one answer line
per variant and category; per-dataset chance level and scores with paired bootstrap 95% intervals;
the flagged datasets with their reasons), comparison.csv (one row per dataset x variant),
comparison.json and category_means.png, differences.png, layer_weights.png (when results carry
learned layer weights). A dataset is flagged when every row ties, or every row's own bootstrap
interval contains the task's chance level (dsembed.evaluation.flags); `--headline` picks the view
the first table and the answers use (default all datasets). comparison.json:
  {"baseline", "variants", "references", "seeds": {variant: [train seeds]}, "alpha", "holm", "holm_family",
   "holm_family_size", "headline", "n_tests", "power": [{"category", "n", "min_p", "best_p_after_correction",
   "family_size", "reachable"}], "n_resamples",
   "categories": {CAT: {"tasks", "means": {variant: float},
                        "seeds": {variant: {"seeds", "per_seed", "mean", "sd", "seed_to_seed"}},
                        "tests": {variant: {"statistic", "pvalue", "n", "mean_difference",
                                            "p_holm", "significant"}}}},
   "categories_informative": {CAT: ... as "categories", without flagged datasets},
   "n_tests_informative", "flagged": {TASK: reason},
   "datasets": {TASK: {"category", "scores": {variant: float (mean over seeds)},
                       "seed_scores": {variant: [float per seed]} (variants with several seeds),
                       "chance": {"score", "method", ...} | null (results without chance levels),
                       "flag": reason | null, "problems": [construction problem],
                       "bootstrap": {variant: {"difference", "low", "high", "n_resamples",
                                               "confidence", "significant"} | {"error"}}}},
   "layer_weights": {variant: {"layers", "norms"}},
   "training": {variant: [{"seed", "steps", "first_accuracy", "last_accuracy", "last_loss",
                          "last_cosine_gap", "max_grad_norm", "max_grad_step", "behind"}]}}
A variant's name is the results' model name (dsembed-evaluate --name), else the file name stem.
Results with the same name and different model.train_seed are the seeds of one variant: each
dataset's score is their mean before the tests over datasets (dsembed.evaluation.comparison).
"""
from __future__ import annotations

import argparse
import sys

from dsembed.errors import run_cli


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="dsembed-compare", description=__doc__.split("\n")[0])
    p.add_argument("results", nargs="+", metavar="RESULTS.json")
    p.add_argument("--baseline", required=True, metavar="NAME")
    p.add_argument("--output", required=True, metavar="DIR")
    p.add_argument("--holm", action="store_true", help="Holm-adjust the Wilcoxon p-values "
                   "over all variant x category tests (the paper does not); as --holm-family all")
    p.add_argument("--holm-family", choices=["none", "all", "per_variant"], default=None,
                   help="the Holm family: none (the paper's uncorrected test), all (every variant x category "
                        "test), per_variant (each variant's tests over the categories)")
    p.add_argument("--reference", action="append", default=[], metavar="NAME",
                   help="a variant shown but not tested (no Wilcoxon, not in the Holm family); repeatable")
    p.add_argument("--headline", choices=("all", "informative"), default="all",
                   help="datasets of the first table and the answers: all, or those not flagged as carrying "
                        "no information (both views are reported)")
    p.add_argument("--alpha", type=float, default=0.05)
    p.add_argument("--resamples", type=int, default=1000, help="bootstrap resamples per dataset")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    from dsembed.evaluation.comparison import compare, load_results
    from dsembed.evaluation.report import markdown, write_report

    variants = load_results(args.results)
    comparison = compare(variants, args.baseline, use_holm=args.holm, alpha=args.alpha,
                         n_resamples=args.resamples, seed=args.seed, references=args.reference,
                         headline=args.headline, holm_family=args.holm_family)
    written = write_report(comparison, args.output)
    print(markdown(comparison))
    print("written: " + ", ".join(str(w) for w in written))
    return 0


def cli() -> None:
    """Console-script entry point."""
    sys.exit(run_cli(main))


if __name__ == "__main__":
    cli()
