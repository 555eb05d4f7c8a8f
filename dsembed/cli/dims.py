"""dsembed-dims: score against embedding size — Matryoshka curves of models, tested size by size.

    dsembed-evaluate MODEL --truncate-dim 64 128 256 --name NAME --output r/NAME-d{dim}.json   (each model)
    dsembed-dims r/*.json --baseline NAME --output DIR

A results file's size is its `settings.truncate_dim` (none: the full embedding) and its model the
results' name without the `-d<size>` suffix, so a model's full-size evaluation (a study's
results/<run>.json) joins its truncated ones; files of one model and size with different train seeds
are averaged per dataset, as in dsembed-compare. Writes dims.md (category means x100 per model and
size; retention = mean at a size / the model's full-size mean; each model against the baseline at
the same size: mean difference, Wilcoxon p over the datasets of a category, Holm over the model's
size x category tests), dims.json (the same, machine-readable) and dims.png (one panel per category).
"""
from __future__ import annotations

import argparse
import sys

from dsembed.errors import run_cli


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="dsembed-dims", description=__doc__.split("\n")[0])
    p.add_argument("results", nargs="+", metavar="RESULTS.json")
    p.add_argument("--baseline", required=True, metavar="NAME", help="the model the others are tested against, size by size")
    p.add_argument("--output", required=True, metavar="DIR")
    p.add_argument("--alpha", type=float, default=0.05)
    args = p.parse_args(argv)
    from dsembed.evaluation.dims import compare_sizes, markdown, size_curves, write_dims_report

    result = compare_sizes(size_curves(args.results), args.baseline, alpha=args.alpha)
    written = write_dims_report(result, args.output)
    print(markdown(result))
    print("written: " + ", ".join(str(w) for w in written))
    return 0


def cli() -> None:
    """Console-script entry point."""
    sys.exit(run_cli(main))


if __name__ == "__main__":
    cli()
