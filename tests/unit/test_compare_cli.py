"""dsembed-compare writes the Markdown table, CSV, JSON and PNG plots from two results files."""
from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from dsembed.evaluation.run import category_means
from dsembed.evaluation.statistics import item_score
from dsembed.cli.compare import main

REPO = Path(__file__).resolve().parents[2]


def _fake_results(name: str, quality: float, seed: int, layer_weights: bool = False) -> dict:
    """Results in the dsembed-evaluate schema; higher `quality` = less noise on every task."""
    rng = np.random.default_rng(seed)
    data = np.random.default_rng(99)  # the items themselves are shared by both variants
    tasks = {}
    for i in range(6):
        gold = data.normal(size=120)
        items = {"gold": gold.tolist(), "cosine": (gold + rng.normal(scale=1.5 - quality, size=120)).tolist()}
        tasks[f"STS{i}"] = ("sts", items)
    for i in range(2):
        ids = [f"q{j}" for j in range(50)]
        tasks[f"Retr{i}"] = ("retrieval", {"query_ids": ids,
                                           "ndcg_at_10": np.clip(rng.normal(quality / 2, 0.2, 50), 0, 1).tolist()})
        tasks[f"Cls{i}"] = ("classification", {"gold": ["x"] * 80,
                                                "correct": (rng.random(80) < 0.5 + quality / 3).astype(float).tolist()})
    labels = np.repeat(["a", "b"], 30)
    clusters = np.where(rng.random(60) < quality, np.repeat([0, 1], 30), rng.integers(0, 2, 60))
    tasks["Clu0"] = ("clustering", {"sets": [{"labels": labels.tolist(), "clusters": clusters.tolist()}]})
    metric = {"sts": "cosine_spearman", "retrieval": "ndcg_at_10", "classification": "accuracy",
              "clustering": "v_measure"}
    entries = {}
    for task, (cat, items) in tasks.items():
        score = item_score(cat, {"default": items})
        entries[task] = {"category": cat, "main_metric": metric[cat], "main_score": score,
                         "items_score": score, "items": {"default": items}}
    out = {"format": "dsembed-eval/1", "model": {"name": name}, "tasks": entries,
           "categories": category_means(entries), "layer_weights": None}
    if layer_weights:
        out["layer_weights"] = {"layers": [1, 2, 3, 4], "norms": [0.2, 0.4, 0.9, 1.3]}
    return out


def test_compare_writes_table_csv_json_png(tmp_path, capsys):
    paths = []
    for name, quality, lw in (("model1", 0.3, False), ("model5", 0.9, True)):
        paths.append(tmp_path / f"{name}.json")
        paths[-1].write_text(json.dumps(_fake_results(name, quality, seed=len(paths), layer_weights=lw)))
    out = tmp_path / "report"
    assert main([*map(str, paths), "--baseline", "model1", "--output", str(out), "--resamples", "200"]) == 0
    for png in ("category_means.png", "differences.png", "layer_weights.png"):
        assert (out / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", png
    comparison = json.loads((out / "comparison.json").read_text())
    sts = comparison["categories"]["sts"]
    assert sts["tests"]["model5"]["pvalue"] == 2 / 64  # all six STS datasets improve
    assert sts["tests"]["model5"]["significant"]
    assert comparison["datasets"]["STS0"]["bootstrap"]["model5"]["low"] > 0
    assert comparison["layer_weights"]["model5"]["layers"] == [1, 2, 3, 4]
    report = (out / "report.md").read_text()
    row = next(line for line in report.splitlines() if line.startswith("| model5 |"))
    assert f"**{100 * sts['means']['model5']:.2f}** ▲*" in row
    rows = list(csv.DictReader((out / "comparison.csv").open()))
    assert len(rows) == 11 * 2 and {r["variant"] for r in rows} == {"model1", "model5"}
    assert "written:" in capsys.readouterr().out


def test_compare_holm_adjusts_category_p_values(tmp_path):
    paths = []
    for name, quality in (("a", 0.3), ("b", 0.9)):
        paths.append(tmp_path / f"{name}.json")
        paths[-1].write_text(json.dumps(_fake_results(name, quality, seed=len(paths))))
    assert main([*map(str, paths), "--baseline", "a", "--output", str(tmp_path / "r"), "--holm",
                 "--resamples", "50"]) == 0
    comparison = json.loads((tmp_path / "r" / "comparison.json").read_text())
    test = comparison["categories"]["sts"]["tests"]["b"]
    assert comparison["holm"] and test["p_holm"] >= test["pvalue"]


def test_compare_unknown_baseline_is_one_line_exit_2(tmp_path):
    path = tmp_path / "x.json"
    path.write_text(json.dumps(_fake_results("x", 0.5, 0)))
    done = subprocess.run([sys.executable, "-m", "dsembed.cli.compare", str(path), str(path), "--baseline", "nope",
                           "--output", str(tmp_path / "o")], cwd=REPO, capture_output=True, text=True,
                          timeout=120, env=dict(os.environ))
    assert done.returncode == 2
    assert "Traceback" not in done.stderr
    assert done.stderr.startswith("error: --baseline 'nope' is not one of the results")


def test_ablation_answers_with_a_reference_row_outside_the_holm_family(tmp_path):
    """The ablation study's report: each variant vs the full method in one line per category, Holm over
    the tested variants only; the untrained base is a reference row (shown, not tested)."""
    paths = []
    for name, quality in (("all", 0.9), ("top4", 0.3), ("no-layer-weights", 0.88), ("base", 0.0)):
        paths.append(tmp_path / f"{name}.json")
        paths[-1].write_text(json.dumps(_fake_results(name, quality, seed=len(paths))))
    out = tmp_path / "r"
    assert main([*map(str, paths), "--baseline", "all", "--output", str(out), "--holm", "--reference", "base",
                 "--resamples", "50"]) == 0
    comparison = json.loads((out / "comparison.json").read_text())
    assert comparison["references"] == ["base"] and comparison["n_tests"] == 2 * 4  # 2 variants x 4 categories
    sts = comparison["categories"]["sts"]
    assert set(sts["tests"]) == {"top4", "no-layer-weights"}
    # Holm over 8 tests: the smallest p (2/64) times 8 = 0.25, not significant after Holm
    assert sts["tests"]["top4"]["pvalue"] == 2 / 64 and sts["tests"]["top4"]["p_holm"] == 8 * 2 / 64
    assert not sts["tests"]["top4"]["significant"]
    assert "base" in comparison["datasets"]["STS0"]["bootstrap"]  # intervals still shown for the reference
    report = (out / "report.md").read_text()
    answer = next(line for line in report.splitlines() if line.startswith("- top4 vs all, sts:"))
    diff = 100 * (sts["means"]["top4"] - sts["means"]["all"])
    assert f"{diff:+.2f} points (mean over 6 datasets)" in answer and diff < 0
    assert "Wilcoxon p = 0.0312 (n = 6); p < 0.05: yes; after Holm over 8 tests (p = 0.25): no" in answer
    assert not any(line.startswith("- base vs all") for line in report.splitlines())
    assert "Not tested (reference rows): base." in report
    from dsembed.errors import run_cli

    assert run_cli(main, [*map(str, paths), "--baseline", "all", "--output", str(tmp_path / "x"),
                          "--reference", "all"]) == 2  # the baseline cannot be a reference
    assert not (tmp_path / "x").exists()


_CHANCE = {"sts": {"score": 0.0}, "retrieval": {"score": 0.05},
           "classification": {"score": 0.25, "random_embeddings": 0.2}, "clustering": {"score": 0.02}}


def _with_chance(results: dict, row: int) -> dict:
    """Chance records on every task, plus ClsChance (every row near chance) and ClsTied (all tied)."""
    for entry in results["tasks"].values():
        entry["chance"] = dict(_CHANCE[entry["category"]], method="test")
    hits = [19, 20, 22][row]  # of 80: 0.24-0.28, all within a bootstrap interval of 0.25
    for name, correct in (("ClsChance", [1.0] * hits + [0.0] * (80 - hits)), ("ClsTied", [1.0, 0.0] * 40)):
        items = {"default": {"gold": ["x"] * 80, "correct": correct}}
        score = item_score("classification", items)
        results["tasks"][name] = {"category": "classification", "main_metric": "accuracy", "main_score": score,
                                  "items_score": score, "items": items,
                                  "chance": dict(_CHANCE["classification"], method="test")}
    results["categories"] = category_means(results["tasks"])
    return results


def _chance_study(tmp_path) -> list[str]:
    paths = []
    for row, (name, quality) in enumerate((("a", 0.3), ("b", 0.9), ("base", 0.0))):
        paths.append(str(tmp_path / f"{name}.json"))
        Path(paths[-1]).write_text(json.dumps(_with_chance(_fake_results(name, quality, seed=row + 1), row)))
    return paths


def test_compare_flags_datasets_without_information_and_reports_both_views(tmp_path):
    paths = _chance_study(tmp_path)
    out = tmp_path / "r"
    assert main([*paths, "--baseline", "a", "--reference", "base", "--output", str(out), "--resamples", "200"]) == 0
    comparison = json.loads((out / "comparison.json").read_text())
    assert set(comparison["flagged"]) == {"ClsChance", "ClsTied"}
    assert comparison["flagged"]["ClsTied"] == "every row scores 50.00 (all 3 tied)"
    assert "bootstrap interval contains chance (25.00 or 20.00)" in comparison["flagged"]["ClsChance"]
    assert comparison["datasets"]["Cls0"]["flag"] is None and comparison["datasets"]["STS0"]["flag"] is None
    assert comparison["headline"] == "all"
    assert comparison["categories"]["classification"]["tasks"] == ["Cls0", "Cls1", "ClsChance", "ClsTied"]
    informative = comparison["categories_informative"]["classification"]
    assert informative["tasks"] == ["Cls0", "Cls1"]
    assert informative["means"]["b"] == pytest.approx(np.mean([comparison["datasets"][n]["scores"]["b"]
                                                               for n in ("Cls0", "Cls1")]))
    report = (out / "report.md").read_text()
    assert "The means and tests use all datasets, including the 2 flagged" in report
    assert "### The same without flagged datasets" in report
    assert "| ClsTied † | classification | 25.00 | 50.00 |" in report
    assert "| STS0 | sts | 0.00 |" in report
    assert "- † ClsChance (classification): every row's 95% bootstrap interval contains chance" in report
    answer = next(line for line in report.splitlines() if line.startswith("- b vs a, classification:"))
    assert "(mean over 4 datasets)" in answer and "; without flagged datasets (2): " in answer
    sts_answer = next(line for line in report.splitlines() if line.startswith("- b vs a, sts:"))
    assert "without flagged" not in sts_answer  # no STS dataset is flagged
    rows = list(csv.DictReader((out / "comparison.csv").open()))
    tied = [r for r in rows if r["dataset"] == "ClsTied"]
    assert {r["chance"] for r in tied} == {"0.25"} and all(r["flag"].startswith("every row") for r in tied)


def test_compare_headline_informative_leads_with_the_datasets_that_carry_information(tmp_path):
    paths = _chance_study(tmp_path)
    out = tmp_path / "r"
    assert main([*paths, "--baseline", "a", "--reference", "base", "--output", str(out), "--resamples", "200",
                 "--headline", "informative", "--holm"]) == 0
    comparison = json.loads((out / "comparison.json").read_text())
    assert comparison["headline"] == "informative"
    assert comparison["n_tests_informative"] == comparison["n_tests"] == 4  # one tested variant x 4 categories
    report = (out / "report.md").read_text()
    first_table = report.split("### The same with all datasets")[0]
    assert "classification (2)" in first_table and "classification (4)" not in first_table
    power = {row["category"]: row["n"] for row in comparison["power"]}
    assert power["classification"] == 2  # the power of the tests the report leads with
    assert "The means and tests leave out the 2 dataset(s) flagged" in report
    answer = next(line for line in report.splitlines() if line.startswith("- b vs a, classification:"))
    assert "(mean over 2 datasets)" in answer and "; with all datasets (4): " in answer


def test_results_without_chance_levels_still_compare(tmp_path):
    paths = []
    for name, quality in (("old", 0.3), ("new", 0.9)):
        paths.append(tmp_path / f"{name}.json")
        paths[-1].write_text(json.dumps(_fake_results(name, quality, seed=len(paths))))  # no "chance" keys
    out = tmp_path / "r"
    assert main([*map(str, paths), "--baseline", "old", "--output", str(out), "--resamples", "50"]) == 0
    comparison = json.loads((out / "comparison.json").read_text())
    assert comparison["datasets"]["STS0"]["chance"] is None and comparison["flagged"] == {}
    report = (out / "report.md").read_text()
    assert "| STS0 | sts | - |" in report
    assert "No dataset is flagged" in report


def test_holm_families_all_and_per_variant_differ_and_the_report_names_them():
    from dsembed.evaluation.comparison import compare
    from dsembed.evaluation.report import markdown
    from dsembed.evaluation.statistics import holm

    variants = {"model1": _fake_results("model1", 0.3, seed=1), "model2": _fake_results("model2", 0.9, seed=2),
                "model3": _fake_results("model3", 0.6, seed=3)}
    per = compare(variants, "model1", holm_family="per_variant", n_resamples=20)
    every = compare(variants, "model1", use_holm=True, n_resamples=20)
    none = compare(variants, "model1", n_resamples=20)
    cats = list(per["categories"])
    assert per["holm_family_size"] == len(cats) and every["holm_family_size"] == 2 * len(cats)
    for v in ("model2", "model3"):
        raw = [per["categories"][c]["tests"][v]["pvalue"] for c in cats]
        assert [per["categories"][c]["tests"][v]["p_holm"] for c in cats] == holm(raw)
    pairs = [(c, v) for c in cats for v in ("model2", "model3")]
    all_raw = [every["categories"][c]["tests"][v]["pvalue"] for c, v in pairs]
    assert [every["categories"][c]["tests"][v]["p_holm"] for c, v in pairs] == holm(all_raw)
    assert all(t["p_holm"] is None for c in cats for t in none["categories"][c]["tests"].values())
    text = markdown(per)
    assert "Holm per variant over its 4 category tests" in text and "after Holm over model2's 4 tests" in text
    sts = per["categories"]["sts"]["tests"]["model2"]
    assert f"{sts['pvalue']:.3g} / {sts['p_holm']:.3g}" in text  # the paper's uncorrected p stays beside Holm's
    assert "none (the paper's uncorrected Wilcoxon)" in markdown(none)
    # the first paragraph says what the datasets can decide: 6 STS datasets -> 2/64, 1 clustering -> 1.0
    assert text.index("Power:") < text.index("Category means")
    power = {r["category"]: r for r in per["power"]}
    assert power["sts"]["min_p"] == 2 / 2 ** 6 and not power["clustering"]["reachable"]


def _with_seed(results: dict, seed: int) -> dict:
    results["model"]["train_seed"] = seed
    return results


def test_seeds_of_a_variant_are_averaged_per_dataset_before_the_tests(tmp_path):
    from dsembed.evaluation.comparison import compare, load_results
    from dsembed.evaluation.report import markdown
    from dsembed.evaluation.statistics import paired_bootstrap, wilcoxon_test

    files = []
    for name, quality, seed in (("model1", 0.3, 0), ("model5", 0.8, 0), ("model5", 0.5, 1), ("model1", 0.35, 1)):
        files.append(tmp_path / f"{name}-s{seed}.json")
        files[-1].write_text(json.dumps(_with_seed(_fake_results(name, quality, seed=10 + len(files)), seed)))
    variants = load_results(files)
    assert list(variants) == ["model1", "model5"] and variants["model5"]["seeds"] == [0, 1]
    runs = [json.loads(f.read_text()) for f in files]
    sts0 = variants["model5"]["tasks"]["STS0"]
    assert sts0["main_score"] == pytest.approx((runs[1]["tasks"]["STS0"]["main_score"] + runs[2]["tasks"]["STS0"]["main_score"]) / 2)
    comparison = compare(variants, "model1", n_resamples=50)
    sts = comparison["categories"]["sts"]
    names = sts["tasks"]
    expected = wilcoxon_test({n: variants["model1"]["tasks"][n]["main_score"] for n in names},
                             {n: variants["model5"]["tasks"][n]["main_score"] for n in names})
    assert sts["tests"]["model5"]["pvalue"] == pytest.approx(expected.pvalue)
    seeds = sts["seeds"]["model5"]
    per_seed = [np.mean([r["tasks"][n]["main_score"] for n in names]) for r in (runs[1], runs[2])]
    assert seeds["per_seed"] == pytest.approx(per_seed) and seeds["sd"] == pytest.approx(np.std(per_seed, ddof=1))
    assert seeds["seed_to_seed"] == pytest.approx(abs(per_seed[0] - per_seed[1]))
    boot = comparison["datasets"]["STS0"]["bootstrap"]["model5"]
    both = paired_bootstrap("sts", [runs[0]["tasks"]["STS0"]["items"], runs[3]["tasks"]["STS0"]["items"]],
                            [runs[1]["tasks"]["STS0"]["items"], runs[2]["tasks"]["STS0"]["items"]], n_resamples=50)
    assert boot["difference"] == pytest.approx(both.difference) and boot["low"] == pytest.approx(both.low)
    assert boot["difference"] == pytest.approx(sts0["main_score"] - variants["model1"]["tasks"]["STS0"]["main_score"])
    text = markdown(comparison)
    assert "± " in text and "seed-to-seed" in text and "| model5 | 0, 1 |" in text


def test_a_repeated_seed_is_not_averaged(tmp_path):
    from dsembed.evaluation.comparison import load_results

    for i in range(2):
        (tmp_path / f"m{i}.json").write_text(json.dumps(_with_seed(_fake_results("model1", 0.3, seed=i), 0)))
    variants = load_results([tmp_path / "m0.json", tmp_path / "m1.json"])
    assert list(variants) == ["model1", "m1"] and "seeds" not in variants["model1"]
