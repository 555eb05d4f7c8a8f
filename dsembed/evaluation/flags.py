"""Datasets of a comparison that carry no information at the limit they were run with.

A dataset is flagged when
- every row (variants, references and the baseline) scores the same (within TIE_TOLERANCE: a
  binary task cut so far that every model answers the majority class), or
- every row's own 95% bootstrap interval (statistics.score_interval, items resampled as the paired
  bootstrap does) contains a no-information level of the task (evaluation.chance; classification
  has two, the majority share and mteb's classifier on random embeddings): nothing measured there
  is distinguishable from a model that knows nothing.
The chance record is the baseline's (every row of a study is cut alike); results written before
chance levels existed have none, so only the tie rule applies to them. Construction problems
(chance.construction_problems: a random-embedding V-measure of 0.3, one training text per label)
are reported as notes beside the flags; they do not flag a dataset on their own, since a strong
model can still rise above a high chance level.
"""
from __future__ import annotations

from typing import Any

import numpy as np

from dsembed.evaluation import statistics
from dsembed.evaluation.chance import chance_levels, construction_problems

TIE_TOLERANCE = 1e-6  # scores of one model differ by float noise across rank counts (1e-4 at most)


def task_chance(rows: dict[str, dict[str, Any]], baseline: str) -> dict[str, Any] | None:
    """The chance record of one task: the baseline's, else the first row's that has one."""
    ordered = [rows[baseline], *(entry for name, entry in rows.items() if name != baseline)]
    return next((entry["chance"] for entry in ordered if entry.get("chance")), None)


def flag_reason(category: str, rows: dict[str, dict[str, Any]], chance: dict[str, Any] | None, *,
                n_resamples: int = 1000, confidence: float = 0.95, seed: int = 0) -> str | None:
    """Why a dataset carries no information in this comparison, or None.

    Args:
        category: the task's category.
        rows: variant name -> that variant's results entry of the task ("main_score", "items").
        chance: the task's chance record (`task_chance`), or None.
        n_resamples, confidence, seed: of each row's bootstrap interval.

    Returns:
        A one-line reason, or None when some row differs from the others and from chance (or a
        row has no per-item scores to tell).
    """
    scores = np.array([entry["main_score"] for entry in rows.values()], dtype=float)
    if np.ptp(scores) <= TIE_TOLERANCE:
        return f"every row scores {100 * scores[0]:.2f} (all {len(scores)} tied)"
    levels = chance_levels(chance)
    if not levels:
        return None
    for entry in rows.values():
        items = entry.get("seed_items") or entry.get("items")  # several seeds: their mean's interval
        if not items:
            return None
        _, low, high = statistics.score_interval(category, items, n_resamples, confidence, seed)
        if not any(low <= level <= high for level in levels):
            return None
    shown = " or ".join(f"{100 * level:.2f}" for level in levels)
    return f"every row's {confidence:.0%} bootstrap interval contains chance ({shown})"


def flag_datasets(variants: dict[str, dict[str, Any]], baseline: str, names: list[str], *,
                  n_resamples: int = 1000, seed: int = 0) -> dict[str, dict[str, Any]]:
    """Chance, flag and construction notes of every dataset `names` of a comparison.

    Args:
        variants: variant name -> its results dict.
        baseline: the baseline's name.
        names: datasets every variant has.
        n_resamples, seed: of the rows' bootstrap intervals.

    Returns:
        {dataset: {"chance": {"score", "method", ...} | None, "flag": reason | None,
                   "problems": [construction problem, ...]}}.
    """
    out = {}
    for name in names:
        rows = {v: results["tasks"][name] for v, results in variants.items()}
        category = rows[baseline]["category"]
        chance = task_chance(rows, baseline)
        shown = None if chance is None else {k: v for k, v in chance.items() if k not in ("subsets", "draws")}
        out[name] = {"chance": shown,
                     "flag": flag_reason(category, rows, chance, n_resamples=n_resamples, seed=seed),
                     "problems": construction_problems(category, chance)}
    return out
