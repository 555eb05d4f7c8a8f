"""A training run's learning curve in a few numbers (dsembed.training.run_summary), and how it reaches
the comparison: a seed that collapsed is named, not only averaged into its variant."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from dsembed.training.run_summary import read_summary, summarize_metrics


def _write_metrics(path: Path, accuracies: list[float], gap: float = 0.4, spike_at: int | None = None,
                   cut_last_line: bool = False, w_change_every: int | None = None) -> Path:
    lines = []
    for step, acc in enumerate(accuracies, 1):
        row = {"step": step, "train/loss": 2.0 - acc, "train/accuracy": acc,
               "train/positive_cosine": 0.9, "train/negative_cosine": 0.9 - gap,
               "train/grad_norm": 30.0 if step == spike_at else 2.0, "perf/step_time_s": 1.0}
        if w_change_every and step % w_change_every == 0:  # the trainer logs W's change on histogram steps
            row["layer_weights/change"] = step / 1000
        lines.append(json.dumps(row))
        if step == 3:
            lines.append(json.dumps({"step": step, "eval/sts": 0.5}))  # a periodic-evaluation line: no loss
    text = "\n".join(lines) + "\n"
    if cut_last_line:
        text += '{"step": 99, "train/lo'  # a run killed while writing
    path.write_text(text)
    return path


def test_summary_averages_the_first_and_last_steps_and_finds_the_spike(tmp_path):
    accs = [0.1] * 10 + [0.5] * 10 + [0.9] * 10
    summary = summarize_metrics(_write_metrics(tmp_path / "m.jsonl", accs, spike_at=6, cut_last_line=True))
    assert summary["steps"] == 30 and summary["window"] == 10
    assert summary["first_accuracy"] == pytest.approx(0.1) and summary["last_accuracy"] == pytest.approx(0.9)
    assert summary["last_loss"] == pytest.approx(1.1) and summary["last_cosine_gap"] == pytest.approx(0.4)
    assert (summary["max_grad_norm"], summary["max_grad_step"]) == (30.0, 6)
    assert summary["layer_weights_change"] is None  # no multi-layer head with layer weights
    # an export of an earlier checkpoint summarizes the steps up to it
    early = summarize_metrics(tmp_path / "m.jsonl", up_to_step=20)
    assert early["steps"] == 20 and early["last_accuracy"] == pytest.approx(0.5)


def test_no_metrics_no_summary(tmp_path):
    assert summarize_metrics(tmp_path / "absent.jsonl") is None
    (tmp_path / "empty.jsonl").write_text('{"step": 1, "eval/sts": 0.3}\n')
    assert summarize_metrics(tmp_path / "empty.jsonl") is None
    assert read_summary(tmp_path) is None
    (tmp_path / "training.json").write_text("{not json")
    assert read_summary(tmp_path) is None


def test_a_seed_far_behind_its_sibling_is_marked_in_the_comparison(tmp_path):
    from dsembed.evaluation.comparison import compare, load_results
    from dsembed.evaluation.report import markdown
    from tests.unit.test_compare_cli import _fake_results

    good = summarize_metrics(_write_metrics(tmp_path / "good.jsonl", [0.2] * 10 + [0.85] * 10))
    collapsed = summarize_metrics(_write_metrics(tmp_path / "bad.jsonl", [0.2] * 10 + [0.3] * 10, gap=0.02))
    files = []
    for name, seed, training in (("model1", 0, good), ("model1", 1, good), ("model5", 0, collapsed), ("model5", 1, good)):
        results = _fake_results(name, 0.5, seed=len(files))
        results["model"].update(train_seed=seed, training=training)
        files.append(tmp_path / f"{name}-s{seed}.json")
        files[-1].write_text(json.dumps(results))
    comparison = compare(load_results(files), "model1", n_resamples=20)
    runs = comparison["training"]
    assert [(r["seed"], r["behind"]) for r in runs["model5"]] == [(0, True), (1, False)]
    assert not any(r["behind"] for r in runs["model1"])
    text = markdown(comparison)
    assert "| model5 ⚠ | 0 | 20 | 0.20 → 0.30 |" in text
    assert "Far behind their variant's other seeds: model5 seed 0." in text
    # each seed's category mean is shown beside the mean ± sd
    per_seed = comparison["categories"]["sts"]["seeds"]["model5"]["per_seed"]
    assert f"({100 * per_seed[0]:.2f}, {100 * per_seed[1]:.2f})" in text


def test_results_without_training_summaries_have_no_training_table(tmp_path):
    from dsembed.evaluation.comparison import compare, load_results
    from dsembed.evaluation.report import markdown
    from tests.unit.test_compare_cli import _fake_results

    files = []
    for name in ("a", "b"):
        files.append(tmp_path / f"{name}.json")
        files[-1].write_text(json.dumps(_fake_results(name, 0.5, seed=len(files))))
    comparison = compare(load_results(files), "a", n_resamples=20)
    assert comparison["training"] == {} and "Training runs" not in markdown(comparison)


def test_the_layer_weights_change_of_the_last_step_that_logged_it_reaches_the_training_table(tmp_path):
    from dsembed.evaluation.comparison import compare, load_results
    from dsembed.evaluation.report import markdown
    from tests.unit.test_compare_cli import _fake_results

    summary = summarize_metrics(_write_metrics(tmp_path / "m.jsonl", [0.5] * 23, w_change_every=5))
    assert summary["layer_weights_change"] == pytest.approx(0.020)  # step 20, not a step without the key
    assert summarize_metrics(tmp_path / "m.jsonl", up_to_step=12)["layer_weights_change"] == pytest.approx(0.010)
    plain = summarize_metrics(_write_metrics(tmp_path / "p.jsonl", [0.5] * 23))
    files = []
    for name, training in (("model1", plain), ("model5", summary)):
        results = _fake_results(name, 0.5, seed=len(files))
        results["model"].update(train_seed=0, training=training)
        files.append(tmp_path / f"{name}.json")
        files[-1].write_text(json.dumps(results))
    text = markdown(compare(load_results(files), "model1", n_resamples=20))
    assert "| W change |" in text and "||W - W0|| / ||W0||" in text
    assert "| model5 | 0 | 23 | 0.50 → 0.50 |" in text and text.count(" 0.0200 |") == 1
    model1_row = next(line for line in text.splitlines() if line.startswith("| model1 | 0 | 23 |"))
    assert model1_row.endswith("| - |")  # no layer weights: a dash, not a number
