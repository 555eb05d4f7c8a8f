"""Significance tests for the study: Wilcoxon over datasets, paired bootstrap over items, Holm.

As in the paper, a category's variants are compared with a two-sided Wilcoxon signed-rank test
paired over the category's datasets (scipy.stats.wilcoxon). Per dataset, a paired bootstrap
resamples the dataset's items (the same resampled items for both models) and recomputes each
model's score, giving a percentile 95% interval for the difference (variant - baseline):
- sts: pairs; Spearman (scipy) of cosine against gold on the resampled pairs;
- retrieval: queries; mean per-query NDCG@10 (mteb's pytrec_eval numbers, paired by query id);
- classification: test items; mean per-item correctness (averaged over mteb's 10 classifiers);
- clustering: items, resampled within each cluster set; V-measure (sklearn's) of the fixed k-means
  assignment on the resampled items, averaged over sets. The clustering itself is not refit, so
  the interval covers sampling of items, not k-means' own randomness.
Subsets (languages) are resampled separately and averaged, like mteb's main score. The same
resampling gives one result's own interval (`score_interval`), which the report holds against the
task's chance level.
Holm's step-down correction comes from statsmodels.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
from scipy.special import entr
from scipy.stats import spearmanr, wilcoxon
from sklearn.metrics import mutual_info_score


@dataclass(frozen=True)
class WilcoxonResult:
    """Two-sided Wilcoxon signed-rank test of variant vs baseline over n paired datasets."""

    statistic: float
    pvalue: float
    n: int  # datasets the test used: scipy drops zero differences (zero_method="wilcox")
    mean_difference: float  # mean over all paired datasets of (variant - baseline)
    n_zero: int = 0  # paired datasets with a zero difference, left out of the test

    def to_dict(self) -> dict[str, float]:
        return asdict(self)


@dataclass(frozen=True)
class BootstrapResult:
    """Paired bootstrap of (variant - baseline) on one dataset."""

    difference: float  # on the full data
    low: float
    high: float
    n_resamples: int
    confidence: float

    @property
    def significant(self) -> bool:
        """True when the interval excludes zero."""
        return self.low > 0 or self.high < 0

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "significant": self.significant}


def wilcoxon_test(baseline: dict[str, float], variant: dict[str, float]) -> WilcoxonResult:
    """Wilcoxon signed-rank test paired over the datasets both dicts score.

    Args:
        baseline: dataset name -> main score of the baseline.
        variant: dataset name -> main score of the variant.

    Returns:
        The statistic and two-sided p-value (scipy's exact distribution for small n without ties);
        p = 1.0 when every difference is zero, NaN when no dataset is shared. `n` counts the
        datasets the test used: scipy drops zero differences, which `n_zero` counts.
    """
    names = sorted(set(baseline) & set(variant))
    a = np.array([baseline[n] for n in names], dtype=float)
    b = np.array([variant[n] for n in names], dtype=float)
    if not names:
        return WilcoxonResult(float("nan"), float("nan"), 0, float("nan"))
    diff = float(np.mean(b - a))
    zeros = int(np.sum(b - a == 0))
    if zeros == len(names):
        return WilcoxonResult(0.0, 1.0, 0, diff, zeros)
    result = wilcoxon(b, a, alternative="two-sided", zero_method="wilcox")
    return WilcoxonResult(float(result.statistic), float(result.pvalue), len(names) - zeros, diff, zeros)


def holm(pvalues: list[float], alpha: float = 0.05) -> list[float]:
    """Holm-adjusted p-values (statsmodels multipletests, method "holm"); NaNs pass through."""
    from statsmodels.stats.multitest import multipletests

    values = np.asarray(pvalues, dtype=float)
    adjusted = np.full_like(values, np.nan)
    ok = ~np.isnan(values)
    if ok.any():
        adjusted[ok] = multipletests(values[ok], alpha=alpha, method="holm")[1]
    return adjusted.tolist()


# --- per-item scores -------------------------------------------------------------------------

def _sts(items: dict, idx: np.ndarray) -> float:
    gold = np.asarray(items["gold"])[idx]
    cos = np.asarray(items["cosine"])[idx]
    return float(spearmanr(gold, cos)[0])


def _mean_of(key: str):
    def score(items: dict, idx: np.ndarray) -> float:
        return float(np.mean(np.asarray(items[key], dtype=float)[idx]))
    return score


def _coded(cluster_set: dict) -> dict:
    """A clustering set's gold labels and k-means clusters as integer codes (done once per set, not
    per bootstrap draw)."""
    if "label_codes" in cluster_set:
        return cluster_set
    labels = np.unique(np.asarray(cluster_set["labels"]), return_inverse=True)[1].ravel()  # (n,)
    clusters = np.unique(np.asarray(cluster_set["clusters"]), return_inverse=True)[1].ravel()  # (n,)
    return {**cluster_set, "label_codes": labels, "cluster_codes": clusters,
            "n_clusters": int(clusters.max(initial=-1)) + 1}


def _v_measure(cluster_set: dict, idx: np.ndarray) -> float:
    """sklearn's V-measure (beta 1) of the items idx, from their contingency table.

    Why not v_measure_score: its input checks (type_of_target, check_array) cost ~2 ms a call, 80%
    of a study's comparison time (24,000 calls for one pair of results). The contingency of a draw
    is one bincount; mutual information (sklearn, from the contingency) and the marginal entropies
    (scipy.special.entr: the scipy.stats wrapper's own checks cost as much again) then give
    homogeneity, completeness and V exactly as sklearn combines them (tests/unit/test_statistics.py
    checks equality with v_measure_score on random and degenerate draws)."""
    coded = _coded(cluster_set)
    labels, clusters, k = coded["label_codes"][idx], coded["cluster_codes"][idx], coded["n_clusters"]
    if labels.size == 0:
        return 1.0  # sklearn's value for no items
    pairs = np.bincount(labels * k + clusters, minlength=(int(labels.max()) + 1) * k)  # (L * K,)
    contingency = pairs.reshape(-1, k)  # (L, K) items per (gold label, cluster)
    entropy_labels = float(entr(contingency.sum(axis=1) / labels.size).sum())  # nats, as sklearn
    entropy_clusters = float(entr(contingency.sum(axis=0) / labels.size).sum())
    information = float(mutual_info_score(None, None, contingency=contingency))
    homogeneity = information / entropy_labels if entropy_labels else 1.0
    completeness = information / entropy_clusters if entropy_clusters else 1.0
    if homogeneity + completeness == 0.0:
        return 0.0
    return 2.0 * homogeneity * completeness / (homogeneity + completeness)


def _clustering(items: dict, idx: list[np.ndarray]) -> float:
    return float(np.mean([_v_measure(s, i) for s, i in zip(items["sets"], idx)]))


_SCORE = {"sts": _sts, "retrieval": _mean_of("ndcg_at_10"),
          "classification": _mean_of("correct"), "clustering": _clustering}


def _sizes(category: str, items: dict) -> list[int] | int:
    if category == "clustering":
        return [len(s["labels"]) for s in items["sets"]]
    key = {"sts": "gold", "retrieval": "ndcg_at_10", "classification": "correct"}[category]
    return len(items[key])


def _full_index(category: str, items: dict):
    sizes = _sizes(category, items)
    return [np.arange(n) for n in sizes] if isinstance(sizes, list) else np.arange(sizes)


def _resample(category: str, items: dict, rng: np.random.Generator):
    """One bootstrap draw of item indices (clustering: within each set)."""
    sizes = _sizes(category, items)
    return [rng.integers(0, n, n) for n in sizes] if isinstance(sizes, list) else rng.integers(0, sizes, sizes)


def item_score(category: str, items_by_subset: dict[str, dict]) -> float:
    """A task's main score recomputed from its kept items (mean over subsets, as mteb)."""
    return float(np.mean([_SCORE[category](items, _full_index(category, items))
                          for items in items_by_subset.values()]))


def _runs(items: dict | list[dict]) -> list[dict]:
    """One result's items, or several seeds' items of one variant, as a list of runs."""
    return list(items) if isinstance(items, (list, tuple)) else [items]


def _align(category: str, runs: list[dict]) -> list[dict]:
    """Pair retrieval queries by id across runs; check the other categories hold the same items."""
    if category == "retrieval":
        common = sorted(set.intersection(*(set(r["query_ids"]) for r in runs)))
        return [{"query_ids": common, "ndcg_at_10": [dict(zip(r["query_ids"], r["ndcg_at_10"]))[q] for q in common]}
                for r in runs]
    if any(_sizes(category, r) != _sizes(category, runs[0]) for r in runs):
        raise ValueError(f"{category} items differ in number between the results "
                         "(were they evaluated with the same --limit and data?)")
    if category == "clustering":  # coded once here, not on each of the bootstrap's draws
        return [{**r, "sets": [_coded(s) for s in r["sets"]]} for r in runs]
    return runs


def _percentiles(draws: np.ndarray, confidence: float) -> tuple[float, float]:
    """The percentile interval of bootstrap draws; a degenerate resample (constant ranks: no
    Spearman) is left out."""
    draws = draws[~np.isnan(draws)]
    tail = (1.0 - confidence) / 2 * 100
    low, high = np.percentile(draws, [tail, 100 - tail]) if draws.size else (np.nan, np.nan)
    return float(low), float(high)


def paired_bootstrap(category: str, baseline: dict[str, dict] | list[dict[str, dict]],
                     variant: dict[str, dict] | list[dict[str, dict]], n_resamples: int = 1000,
                     confidence: float = 0.95, seed: int = 0) -> BootstrapResult:
    """Paired percentile bootstrap interval of (variant - baseline) for one dataset.

    A side given as a list holds one run per training seed: its score on a draw is the mean of the
    seeds' scores on the same items (every run of both sides is resampled with one index draw).

    Args:
        category: "sts", "retrieval", "classification" or "clustering".
        baseline: the baseline's `items` for the task (subset -> per-item record, see run.py), or a
            list of them (seeds).
        variant: the variant's `items` for the same task, or a list of them (seeds).
        n_resamples: bootstrap resamples.
        confidence: interval coverage.
        seed: numpy Generator seed (results are reproducible).

    Returns:
        The full-data difference and the percentile interval.

    Raises:
        ValueError: the results do not hold the same items.
    """
    rng = np.random.default_rng(seed)
    score = _SCORE[category]
    bases, variants = _runs(baseline), _runs(variant)
    subsets = sorted(set.intersection(*(set(r) for r in bases + variants)))
    if not subsets:
        raise ValueError("the results share no subset of this task")
    aligned = [_align(category, [r[s] for r in bases + variants]) for s in subsets]

    def difference(draw: bool) -> float:
        diffs = []
        for runs in aligned:
            idx = _resample(category, runs[0], rng) if draw else _full_index(category, runs[0])
            scores = [score(r, idx) for r in runs]
            diffs.append(np.mean(scores[len(bases):]) - np.mean(scores[:len(bases)]))
        return float(np.mean(diffs))

    full = difference(draw=False)
    draws = np.array([difference(draw=True) for _ in range(n_resamples)])
    low, high = _percentiles(draws, confidence)
    return BootstrapResult(full, low, high, n_resamples, confidence)


def score_interval(category: str, items_by_subset: dict[str, dict] | list[dict[str, dict]], n_resamples: int = 1000,
                   confidence: float = 0.95, seed: int = 0) -> tuple[float, float, float]:
    """Percentile bootstrap interval of one result's own main score (items resampled as above).

    Args:
        category: "sts", "retrieval", "classification" or "clustering".
        items_by_subset: the result's `items` for the task, or a list of them (one per seed: the
            score is the seeds' mean on the same draw).
        n_resamples: bootstrap resamples.
        confidence: interval coverage.
        seed: numpy Generator seed.

    Returns:
        (score on the full items, low, high).
    """
    rng = np.random.default_rng(seed)
    score = _SCORE[category]
    runs = _runs(items_by_subset)
    aligned = [_align(category, [r[s] for r in runs]) for s in sorted(set.intersection(*(set(r) for r in runs)))]

    def value(draw: bool) -> float:
        means = []
        for subset_runs in aligned:
            idx = _resample(category, subset_runs[0], rng) if draw else _full_index(category, subset_runs[0])
            means.append(np.mean([score(r, idx) for r in subset_runs]))
        return float(np.mean(means))

    full = value(draw=False)
    draws = np.array([value(draw=True) for _ in range(n_resamples)])
    return (full, *_percentiles(draws, confidence))


# --- power of a study: what a Wilcoxon test over n datasets can ever say ------------------------

def smallest_wilcoxon_p(n: int) -> float:
    """The smallest two-sided p of an exact Wilcoxon signed-rank test over n paired datasets:
    2 / 2^n, when every difference has the same sign."""
    return 1.0 if n < 1 else min(1.0, 2.0 / 2 ** n)


def power_table(datasets_per_category: dict[str, int], family: str, n_tested: int,
                alpha: float = 0.05) -> list[dict[str, Any]]:
    """Per category: n datasets, the smallest Wilcoxon p, and whether it can go below alpha at all.

    The best case of the study's Holm family: every test at the smallest p its category allows.
    "all" holds n_tested x categories tests, "per_variant" one test per category (for each variant),
    "none" leaves the p-values uncorrected. A category that cannot reach alpha even then cannot
    reach it with any data.
    """
    categories = list(datasets_per_category)
    smallest = [smallest_wilcoxon_p(datasets_per_category[c]) for c in categories]
    copies = max(n_tested, 1) if family == "all" else 1
    adjusted = holm(smallest * copies, alpha)[:len(categories)] if family != "none" and smallest else smallest
    size = {"none": 1, "all": copies * len(categories), "per_variant": len(categories)}[family]
    return [{"category": c, "n": datasets_per_category[c], "min_p": p, "best_p_after_correction": a,
             "family_size": size, "reachable": bool(a < alpha)}
            for c, p, a in zip(categories, smallest, adjusted)]
