"""Wilcoxon pinned to textbook numbers; paired bootstrap intervals cover the true difference."""
from __future__ import annotations

import numpy as np
import pytest
from scipy.stats import spearmanr

from dsembed.evaluation import statistics as st


def test_wilcoxon_darwin_zea_mays_textbook_example():
    # Darwin's cross- vs self-fertilised Zea mays height differences (Fisher 1935, eighths of an
    # inch): the two negative differences rank 10 and 14, so T = 24; exact two-sided p = 0.04126.
    diffs = [6, 8, 14, 16, 23, 24, 28, 29, 41, -48, 49, 56, 60, -67, 75]
    baseline = {f"d{i}": 100.0 for i in range(len(diffs))}
    variant = {f"d{i}": 100.0 + d for i, d in enumerate(diffs)}
    result = st.wilcoxon_test(baseline, variant)
    assert result.statistic == 24.0
    assert result.pvalue == pytest.approx(0.041259765625, abs=1e-12)
    assert result.n == 15


def test_wilcoxon_smallest_p_with_six_datasets_is_2_over_64():
    base = {f"t{i}": 0.5 for i in range(6)}
    better = {f"t{i}": 0.5 + 0.01 * (i + 1) for i in range(6)}
    assert st.wilcoxon_test(base, better).pvalue == pytest.approx(2 / 64)
    five = {k: v for k, v in better.items() if k != "t5"}
    assert st.wilcoxon_test(base, five).pvalue == pytest.approx(2 / 32)  # n=5 can never reach 0.05
    assert st.wilcoxon_test(base, base).pvalue == 1.0
    assert np.isnan(st.wilcoxon_test(base, {"other": 1.0}).pvalue)


def test_wilcoxon_n_counts_only_the_nonzero_differences_scipy_uses():
    base = {f"t{i}": 0.5 for i in range(7)}
    variant = {**{f"t{i}": 0.5 + 0.01 * (i + 1) for i in range(6)}, "t6": 0.5}  # one tie
    result = st.wilcoxon_test(base, variant)
    assert (result.n, result.n_zero) == (6, 1)
    assert result.pvalue == pytest.approx(2 / 64)  # the exact p of 6 datasets: the tie was dropped
    tied = st.wilcoxon_test(base, base)
    assert (tied.n, tied.n_zero, tied.pvalue) == (0, 7, 1.0)


def test_holm_matches_hand_computation():
    # sorted p: 0.01*3 = 0.03; 0.03*2 = 0.06; max(0.06, 0.04*1) = 0.06
    assert st.holm([0.01, 0.04, 0.03]) == pytest.approx([0.03, 0.06, 0.06])
    out = st.holm([0.02, float("nan")])
    assert out[0] == pytest.approx(0.02) and np.isnan(out[1])


def _classification(rng, n, p):
    return {"default": {"gold": ["x"] * n, "correct": (rng.random(n) < p).astype(float).tolist()}}


def test_bootstrap_interval_covers_true_difference_at_nominal_rate():
    rng = np.random.default_rng(1)
    covered = 0
    runs = 40
    for i in range(runs):
        base, var = _classification(rng, 400, 0.70), _classification(rng, 400, 0.78)
        result = st.paired_bootstrap("classification", base, var, n_resamples=300, seed=i)
        covered += result.low <= 0.08 <= result.high
    assert covered / runs >= 0.85  # nominal 0.95; 40 runs leave room for sampling noise


def test_bootstrap_sts_spearman_covers_population_difference():
    rng = np.random.default_rng(2)
    population = 200_000
    gold = rng.normal(size=population)
    noisy, clean = gold + rng.normal(scale=2.0, size=population), gold + rng.normal(scale=0.7, size=population)
    truth = spearmanr(gold, clean)[0] - spearmanr(gold, noisy)[0]
    pick = rng.choice(population, size=1500, replace=False)
    items = lambda cos: {"default": {"gold": gold[pick].tolist(), "cosine": cos[pick].tolist()}}  # noqa: E731
    result = st.paired_bootstrap("sts", items(noisy), items(clean), n_resamples=500, seed=0)
    assert result.low <= truth <= result.high
    assert result.significant and result.low > 0
    assert result.difference == pytest.approx(
        st.item_score("sts", items(clean)) - st.item_score("sts", items(noisy)))


def test_bootstrap_retrieval_pairs_queries_by_id():
    base = {"default": {"query_ids": ["a", "b", "c", "d"], "ndcg_at_10": [0.1, 0.2, 0.3, 0.4]}}
    shuffled = {"default": {"query_ids": ["d", "c", "b", "a"], "ndcg_at_10": [0.4, 0.3, 0.2, 0.1]}}
    same = st.paired_bootstrap("retrieval", base, shuffled, n_resamples=50)
    assert same.difference == 0.0 and same.low == 0.0 and same.high == 0.0


def test_bootstrap_clustering_resamples_items_within_sets():
    rng = np.random.default_rng(3)
    labels = np.repeat(["a", "b", "c"], 60)
    perfect = {"default": {"sets": [{"labels": labels.tolist(), "clusters": np.repeat([0, 1, 2], 60).tolist()}]}}
    random = {"default": {"sets": [{"labels": labels.tolist(), "clusters": rng.integers(0, 3, 180).tolist()}]}}
    result = st.paired_bootstrap("clustering", random, perfect, n_resamples=200)
    assert st.item_score("clustering", perfect) == pytest.approx(1.0)
    assert result.significant and result.low > 0.5
    with pytest.raises(ValueError, match="differ in number"):
        short = {"default": {"sets": [{"labels": ["a"], "clusters": [0]}]}}
        st.paired_bootstrap("clustering", perfect, short)


def test_bootstrap_v_measure_equals_sklearns_on_random_and_degenerate_draws():
    from sklearn.metrics import v_measure_score

    rng = np.random.default_rng(7)
    cases = [(rng.choice(["x", "y", "z", "w"], 120), rng.integers(0, 5, 120)),  # string labels, 5 clusters
             (rng.integers(0, 9, 300), rng.integers(0, 9, 300)),
             (np.array(["a"] * 40), rng.integers(0, 3, 40)),  # one gold label: homogeneity 1
             (rng.choice(["a", "b"], 40), np.zeros(40, dtype=int)),  # one cluster: completeness 1
             (np.array(["a"] * 10), np.array([3] * 10))]  # both single: V 1
    for labels, clusters in cases:
        cluster_set = {"labels": labels.tolist(), "clusters": clusters.tolist()}
        for _ in range(30):
            idx = rng.integers(0, len(labels), len(labels))  # a bootstrap draw, with repeats
            assert st._v_measure(cluster_set, idx) == pytest.approx(v_measure_score(labels[idx], clusters[idx]), abs=1e-12)
    assert st._v_measure({"labels": ["a"], "clusters": [0]}, np.array([], dtype=int)) == 1.0  # sklearn's value


def test_score_interval_of_one_result_is_the_binomial_interval_and_is_seeded():
    rng = np.random.default_rng(3)
    correct = (rng.random(400) < 0.3).astype(float).tolist()
    items = {"default": {"gold": ["x"] * 400, "correct": correct}}
    score, low, high = st.score_interval("classification", items, n_resamples=2000, seed=1)
    assert score == pytest.approx(np.mean(correct))
    half = 1.96 * np.sqrt(score * (1 - score) / 400)  # normal approximation of the binomial interval
    assert low == pytest.approx(score - half, abs=0.01) and high == pytest.approx(score + half, abs=0.01)
    assert st.score_interval("classification", items, n_resamples=2000, seed=1) == (score, low, high)
    perfect = {"default": {"gold": ["x"] * 10, "correct": [1.0] * 10}}
    assert st.score_interval("classification", perfect, n_resamples=50) == (1.0, 1.0, 1.0)
    sets = {"default": {"sets": [{"labels": list("aabb" * 10), "clusters": [0, 0, 1, 1] * 10}]}}
    assert st.score_interval("clustering", sets, n_resamples=50) == pytest.approx((1.0, 1.0, 1.0), abs=1e-12)
