"""dsembed-study end to end on the tiny random model: 5 variants trained (2 CPU ranks), exported,
evaluated on the pip-installed demo tasks with the untrained base, compared; report and plots written."""
from __future__ import annotations

import json

VARIANTS = ["base", "model1", "model2", "model3", "model4", "model5"]


def test_tiny_study_writes_report_with_every_variant_and_plots(tiny_study):
    out, proc = tiny_study
    report = (out / "report" / "report.md").read_text(encoding="utf-8")
    table = [line for line in report.splitlines() if line.startswith("|")]
    for name in VARIANTS:
        assert any(f"| {name} " in line or f"| **{name}" in line or f"|{name}|" in line for line in table), name
    for png in ("category_means.png", "differences.png"):
        assert (out / "report" / png).stat().st_size > 1000, png
    comparison = json.loads((out / "report" / "comparison.json").read_text())
    assert sorted(comparison["variants"]) == sorted(VARIANTS)
    assert set(comparison["categories"]) == {"sts", "retrieval", "classification", "clustering"}
    for name in VARIANTS[1:]:
        assert (out / "runs" / name / "TRAINED").is_file()
        assert (out / "models" / name / "dsembed.json").is_file()
        assert any((out / "runs" / name / "tensorboard").iterdir())
    assert "(5/5) model5: train" in proc.stdout
    # the study file's contrasts: each pair compared on its own, against the second name
    for label, variant, against in (("attention-multi-layer", "model5", "model3"), ("trained-vs-base", "model1", "base")):
        folder = out / "report" / "contrasts" / label
        contrast = json.loads((folder / "comparison.json").read_text())
        assert (contrast["baseline"], sorted(contrast["variants"])) == (against, sorted([variant, against]))
        assert f"# Comparison against `{against}`" in (folder / "report.md").read_text(encoding="utf-8")
    section = report[report.index("## Contrasts"):]  # their answers in the study's report too
    assert "### attention-multi-layer: model5 against model3 ([report](contrasts/attention-multi-layer/report.md))" in section
    assert section.count("- model5 vs model3, ") == 4 and section.count("- model1 vs base, ") == 4
    times = json.loads((out / "stage-times.json").read_text())
    assert {"compare attention-multi-layer", "compare trained-vs-base"} <= set(times)
