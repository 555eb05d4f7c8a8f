"""dsembed-dims: results at several --truncate-dim sizes grouped by model and size, seeds averaged,
each model tested against the baseline size by size, retention of the full-size score; bad input is
one line with exit code 2."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from dsembed.cli.dims import main
from dsembed.errors import UserError
from dsembed.evaluation.dims import compare_sizes, size_curves

STS = [f"S{i}" for i in range(7)]
CLS = [f"C{i}" for i in range(5)]


def _results(path: Path, name: str, size: int | None, score, seed: int | None = 0) -> Path:
    """A results file: every STS dataset scores score(i), every classification one 0.5."""
    tasks = {d: {"category": "sts", "main_score": score(i)} for i, d in enumerate(STS)}
    tasks |= {d: {"category": "classification", "main_score": 0.5} for d in CLS}
    label = name if size is None else f"{name}-d{size}"
    path.write_text(json.dumps({"tasks": tasks, "model": {"name": label, "train_seed": seed},
                                "settings": {"truncate_dim": size}}))
    return path


@pytest.fixture()
def files(tmp_path):
    out = []
    for size, drop in ((None, 0.0), (64, 0.20), (128, 0.10)):  # the plain model loses more when cut
        out.append(_results(tmp_path / f"plain-{size}.json", "plain", size, lambda i, d=drop: 0.7 + 0.01 * i - d))
    for size, drop in ((None, 0.0), (128, 0.02)):
        out.append(_results(tmp_path / f"mrl-{size}.json", "mrl", size, lambda i, d=drop: 0.7 + 0.01 * i - d))
    for seed, drop in ((0, 0.04), (1, 0.06)):  # two seeds at 64: averaged per dataset (0.05 lost)
        out.append(_results(tmp_path / f"mrl-64-s{seed}.json", "mrl", 64, lambda i, d=drop: 0.7 + 0.01 * i - d, seed))
    return out


def test_sizes_group_by_model_and_average_seeds(files):
    curves = size_curves(files)
    assert list(curves) == ["plain", "mrl"]
    assert list(curves["mrl"]) == ["64", "128", "full"]  # ascending, full last
    assert curves["mrl"]["64"]["seeds"] == [0, 1]
    assert curves["mrl"]["64"]["scores"]["S0"] == pytest.approx(0.65)


def test_each_model_is_tested_against_the_baseline_at_the_same_size(files):
    result = compare_sizes(size_curves(files), "plain")
    assert result["categories"] == ["sts", "classification"]
    assert result["means"]["plain"]["64"]["sts"] == pytest.approx(0.53)
    assert result["retention"]["mrl"]["64"]["sts"] == pytest.approx(0.68 / 0.73)
    at64 = result["tests"]["mrl"]["64"]
    assert at64["sts"]["mean_difference"] == pytest.approx(0.15)
    assert at64["sts"]["pvalue"] == pytest.approx(2 / 2 ** 7) and at64["sts"]["n"] == 7
    assert at64["classification"]["pvalue"] == 1.0  # every dataset ties
    # Holm over mrl's 3 sizes x 2 categories: the two STS wins (64, 128) and the tied rest
    assert at64["sts"]["p_holm"] == pytest.approx(6 * 2 / 2 ** 7) and not at64["sts"]["significant"]
    assert result["tests"]["mrl"]["full"]["sts"]["pvalue"] == 1.0  # same model at full size: no difference


def test_cli_writes_the_report_and_refuses_bad_input_in_one_line(files, tmp_path, capsys):
    assert main([*map(str, files), "--baseline", "plain", "--output", str(tmp_path / "out")]) == 0
    assert {p.name for p in (tmp_path / "out").iterdir()} == {"dims.md", "dims.json", "dims.png"}
    report = (tmp_path / "out" / "dims.md").read_text()
    assert "| mrl | 64 | 68.00 | 50.00 |" in report and "+15.00 (p 0.0156, n=7" in report
    with pytest.raises(UserError, match="--baseline nothing: not among the models"):
        compare_sizes(size_curves(files), "nothing")
    with pytest.raises(UserError, match="'plain' at size 64 given twice"):
        size_curves([files[1], _results(tmp_path / "again.json", "plain", 64, lambda i: 0.1, seed=None)])
    from dsembed.errors import run_cli

    code = run_cli(main, [str(files[0]), "--baseline", "nothing", "--output", str(tmp_path / "o2")])
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1 and "--baseline nothing" in err and not (tmp_path / "o2").exists()


def test_without_a_full_size_evaluation_retention_is_of_the_largest_size(tmp_path):
    """`--truncate-dim 64 576` on a 576-dimension model: 576 is the full embedding, scored from the
    same encoding, and the curve needs no separate full-size evaluation."""
    files = [_results(tmp_path / f"{name}-{size}.json", name, size, lambda i, d=drop: 0.6 + 0.01 * i - d)
             for name, size, drop in (("plain", 64, 0.2), ("plain", 576, 0.0), ("mrl", 64, 0.05), ("mrl", 576, 0.1))]
    result = compare_sizes(size_curves(files), "plain")
    assert result["retention_of"] == {"plain": "576", "mrl": "576"}
    assert result["retention"]["mrl"]["64"]["sts"] == pytest.approx(0.58 / 0.53)
    assert result["retention"]["plain"]["576"]["sts"] == pytest.approx(1.0)
    assert result["tests"]["mrl"]["576"]["sts"]["mean_difference"] == pytest.approx(-0.1)
    assert main([*map(str, files), "--baseline", "plain", "--output", str(tmp_path / "out")]) == 0
    assert "largest size scored (plain 576, mrl 576)" in (tmp_path / "out" / "dims.md").read_text()
