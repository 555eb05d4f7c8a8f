"""Study files: every one under recipes/ loads with its recipes validated; bad ones fail in one line."""
from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

from dsembed.errors import RecipeError
from dsembed.study.config import load_study
from dsembed.study.runner import StudyRunner, _train_command

REPO = Path(__file__).resolve().parents[2]
STUDIES = sorted((REPO / "recipes").rglob("studies/*.yaml"))


def _files_written_before_the_study(path: Path) -> list[str]:
    """Data files a study's variant_overrides name that a command writes first (the mined
    negatives of features-smollm2: `dsembed-mine ... --output runs/mined/...`)."""
    text = path.read_text()
    return re.findall(r"data\.train=\[(runs/[^\]]+\.jsonl)\]", text)


@pytest.mark.parametrize("path", STUDIES, ids=[p.name for p in STUDIES])
def test_every_study_file_loads(path, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # such files are relative to where the study is launched
    for name in _files_written_before_the_study(path):
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_text('{"query": "q", "positive": "p", "negative": "n"}\n')
    study, root = load_study(path)
    assert study.variants and root == path.parent
    for name, recipe in study.variants.items():
        assert (root / recipe).is_file(), f"{path.name}: {name} -> {recipe}"


def test_paper_studies_cover_the_five_designs():
    for model in ("mistral-7b", "qwen2-0.5b"):
        study, _ = load_study(REPO / "recipes" / "studies" / f"paper-{model}.yaml")
        assert list(study.variants) == [f"model{i}" for i in range(1, 6)]
        ablation, _ = load_study(REPO / "recipes" / "studies" / f"ablations-{model}.yaml")
        assert {"top4", "top8", "top16", "all", "no-layer-weights", "model1"} <= set(ablation.variants)
        assert ablation.baseline == "all" and ablation.holm  # each ablation is tested against the full method


def write(tmp_path, text):
    (tmp_path / "r.yaml").write_text("model:\n  random_init: {model_type: llama, num_hidden_layers: 4}\n  tokenizer: bytes\n"
                                     "data:\n  train: ['synthetic:8']\n")
    path = tmp_path / "s.yaml"
    path.write_text(text)
    return path


@pytest.mark.parametrize("text, message", [
    ("name: x\noutput_dir: o\nvariants: {a: r.yaml}\ntasks_dir: t\nlauncher: mpirun\n", "launcher = 'mpirun' is not one of"),
    ("name: x\noutput_dir: o\nvariants: {a: r.yaml}\ntasks_dir: t\nvariants_overrides: {}\n", "unknown key variants_overrides (did you mean 'variant_overrides'?)"),
    ("name: x\noutput_dir: o\nvariants: {}\ntasks_dir: t\n", "variants is empty"),
    ("name: x\noutput_dir: o\nvariants: {a: missing.yaml}\ntasks_dir: t\n", "missing.yaml: recipe file not found"),
    ("name: x\noutput_dir: o\nvariants: {a: r.yaml}\n", "give tasks"),
    ("name: x\noutput_dir: o\nvariants: {a: r.yaml}\ntasks_dir: t\nbaseline: b\n", "baseline = 'b' is not one of"),
    ("name: x\noutput_dir: o\nvariants: {a: r.yaml}\ntasks_dir: t\ncontrasts: {c: [a, b]}\n", "contrasts: c = ['a', 'b'] should be [variant, variant it is tested against]"),
    ("name: x\noutput_dir: o\nvariants: {a: r.yaml}\ntasks_dir: t\ncontrasts: {c: [a, a]}\n", "two different names of ['a', 'base']"),
    ("name: x\noutput_dir: o\nvariants: {a: r.yaml}\ntasks_dir: t\ninclude_base: false\ncontrasts: {c: [a, base]}\n", "two different names of ['a']"),
    ("name: x\noutput_dir: o\nvariants: {a: r.yaml, b: r.yaml}\ntasks_dir: t\ncontrasts: {../c: [a, b]}\n", "names a report folder"),
    ("name: x\noutput_dir: o\nvariants: {base: r.yaml}\ntasks_dir: t\n", "reserved"),
    ("name: x\noutput_dir: o\nvariants: {a: r.yaml}\ntasks_dir: t\nnproc: 2\n", "launcher python runs one process"),
    ("name: x\noutput_dir: o\nvariants: {a: r.yaml}\ntasks_dir: t\noverrides: [train.max_stepz=3]\n", "train.max_stepz"),
])
def test_bad_study_files(tmp_path, text, message):
    with pytest.raises(RecipeError, match=re.escape(message)):
        load_study(write(tmp_path, text))


def test_study_cli_bad_file_is_one_line(tmp_path):
    path = write(tmp_path, "name: x\noutput_dir: o\nvariants: {a: r.yaml}\ntasks_dir: t\nlauncher: mpirun\n")
    result = subprocess.run([sys.executable, "-m", "dsembed.cli.study", str(path)], capture_output=True, text=True, cwd=REPO)
    assert result.returncode == 2
    assert "Traceback" not in result.stderr
    assert result.stderr.strip().count("\n") == 0 and str(path) in result.stderr


def test_launch_commands(tmp_path):
    base = "name: x\noutput_dir: o\nvariants: {a: r.yaml}\ntasks_dir: t\n"
    for launcher, head in [("python", ["-m", "dsembed.train"]), ("torchrun", ["torch.distributed.run", "--nproc_per_node", "2"]),
                           ("deepspeed", ["deepspeed", "--num_gpus", "2", "--no_local_rank", "--module"])]:
        nproc = "" if launcher == "python" else "nproc: 2\n"
        study, root = load_study(write(tmp_path, base + f"launcher: {launcher}\n" + nproc))
        command = _train_command(study, root / "r.yaml", ["train.max_steps=1"])
        joined = " ".join(command)
        assert " ".join(head) in joined and command[-2:] == [str(root / "r.yaml"), "train.max_steps=1"]
    runner = StudyRunner(study, root, tmp_path / "out")
    assert runner.tasks_arguments() == ["--tasks-dir", str(root / "t")]
    evaluate = runner._evaluate_command(["m"], "a", ["--tasks-dir", "T"])
    assert evaluate[evaluate.index("--nproc") + 1] == "2"  # the study's ranks share the encoding


def test_ablation_study_runs_against_the_full_method_with_its_limits_and_probe(tmp_path):
    rows = tmp_path / "x.jsonl"
    rows.write_text('{"query": "q", "positive": "p"}\n')
    study, root = load_study(REPO / "recipes" / "studies" / "ablations-smollm2.yaml",
                             overrides=[f"data.train=[{rows}]"], tasks_dir=str(tmp_path))
    assert study.baseline == "model5" and study.holm and study.probe_base and study.include_base
    assert list(study.variants)[:2] == ["model1", "model5"]  # base = model1's untrained backbone (EOS, causal)
    assert {"top4", "top8", "top16", "no-layer-weights"} <= set(study.variants)
    assert study.overrides[-1] == f"data.train=[{rows}]" and study.tasks_dir == str(tmp_path.resolve())
    runner = StudyRunner(study, root, tmp_path / "out")
    evaluate = runner._evaluate_command(["m"], "top4", ["--tasks-dir", "T"])
    assert evaluate[evaluate.index("--limit") + 1] == str(study.eval_limit)
    assert "--nproc" not in evaluate  # one process: no ranks to start
    assert evaluate[evaluate.index("--results-dir") + 1] == str(tmp_path / "out" / "mteb-results")
    assert f"SciFact={study.eval_limits['SciFact']}" in evaluate
    probe = runner._probe_command(["--tasks-dir", "T"])
    assert probe[2] == "dsembed.cli.probe_layers" and probe[3].endswith("paper/smollm2-135m/model1.yaml")
    assert f"--override=data.train=[{rows}]" in probe and probe[probe.index("--output-dir") + 1] == str(tmp_path / "out" / "probe")
    assert f"NFCorpus={study.eval_limits['NFCorpus']}" in probe


def test_feature_study_changes_one_thing_per_variant_after_the_data_override(tmp_path, monkeypatch):
    from dsembed.config import load_recipe
    from dsembed.study.config import recipe_path as _recipe_path, run_overrides as _overrides

    monkeypatch.chdir(tmp_path)
    rows = tmp_path / "x.jsonl"
    rows.write_text('{"query": "q", "positive": "p", "negative": "n"}\n')
    (tmp_path / "runs" / "mined").mkdir(parents=True)
    (tmp_path / "runs" / "mined" / "paper-model1-s0.jsonl").write_text(rows.read_text())
    study, root = load_study(REPO / "recipes" / "studies" / "features-smollm2.yaml",
                             overrides=[f"data.train=[{rows}]"], tasks_dir=str(tmp_path))
    paper, _ = load_study(REPO / "recipes" / "studies" / "paper-smollm2.yaml")
    assert study.seeds == [0] and (study.eval_limit, study.eval_limits) == (paper.eval_limit, paper.eval_limits)

    def recipe(name):
        return load_recipe(_recipe_path(study, root, name), _overrides(study, name, 0)).to_dict()

    for model in ("model1", "model5"):
        own = recipe(model)
        assert own["data"]["train"] == [str(rows)] and own["data"]["num_negatives"] == 1
        assert recipe(f"{model}-inbatch")["data"]["num_negatives"] == 0
        assert recipe(f"{model}-bysource")["data"]["batching"] == "by_source"
        mined = recipe(f"{model}-mined")  # the variant's own data.train comes after the study's override
        assert mined["data"]["train"] == ["runs/mined/paper-model1-s0.jsonl"]
        for variant, key in (("inbatch", "num_negatives"), ("bysource", "batching"), ("mined", "train")):
            other = recipe(f"{model}-{variant}")
            changed = {f"{part}.{k}" for part in own if isinstance(own[part], dict)
                       for k in own[part] if own[part][k] != other[part][k] and k != "output_dir"}
            assert changed == {f"data.{key}"}, (variant, changed)
    assert recipe("model1-mrl")["loss"]["matryoshka_dims"] == [64, 128, 256, 576]


def test_studies_share_the_paper_runs_they_reuse(tmp_path, monkeypatch):
    """tools/smollm2_studies.sh passes --reuse of the paper study to the ablation and feature
    studies: their runs of model1 / model5 (and base) must be the same stages, same label, same
    fingerprint, or each would be trained and evaluated again (about 20 minutes per run)."""
    from dsembed.study.config import recipe_path, run_overrides
    from dsembed.config import load_recipe
    from dsembed.study.stages import recipe_fingerprint

    monkeypatch.chdir(tmp_path)
    rows = tmp_path / "x.jsonl"
    rows.write_text('{"query": "q", "positive": "p", "negative": "n"}\n')
    (tmp_path / "runs" / "mined").mkdir(parents=True)
    (tmp_path / "runs" / "mined" / "paper-model1-s0.jsonl").write_text(rows.read_text())

    def stages(name):
        study, root = load_study(REPO / "recipes" / "studies" / f"{name}.yaml", overrides=[f"data.train=[{rows}]"],
                                 tasks_dir=str(tmp_path))
        return StudyRunner(study, root, tmp_path / name)._stages()

    paper = stages("paper-smollm2")
    for name, shared in (("ablations-smollm2", {"evaluate model1-s0", "evaluate model1-s1", "evaluate model5-s0",
                                                "evaluate model5-s1", "evaluate base"}),
                         ("features-smollm2", {"evaluate model1-s0", "evaluate model5-s0"})):
        other = stages(name)
        assert shared <= set(other) & set(paper), name
        for label in set(other) & set(paper):
            assert other[label]["fingerprint"] == paper[label]["fingerprint"], (name, label)
    # the ablations' full method is the same recipe as its ablation file all.yaml (kept for users)
    study, root = load_study(REPO / "recipes" / "studies" / "ablations-smollm2.yaml", overrides=[f"data.train=[{rows}]"],
                             tasks_dir=str(tmp_path))
    all_layers = load_recipe(REPO / "recipes" / "ablations" / "smollm2-135m" / "all.yaml", run_overrides(study, "model5", 0))
    model5 = load_recipe(recipe_path(study, root, "model5"), run_overrides(study, "model5", 0))
    assert recipe_fingerprint(all_layers) == recipe_fingerprint(model5)


def test_contrast_answers_are_appended_to_the_study_report(tmp_path):
    """Each contrast's answers reach report.md, under its name, linking its own report."""
    import dataclasses
    import json

    from dsembed.evaluation.comparison import compare, load_results
    from dsembed.study.runner import contrasts_section
    from tests.unit.test_compare_cli import _fake_results

    files = []
    for name, quality in (("causal", 0.4), ("bidir", 0.6)):
        files.append(tmp_path / f"{name}.json")
        files[-1].write_text(json.dumps(_fake_results(name, quality, seed=len(files))))
    folder = tmp_path / "report" / "contrasts" / "attention"
    folder.mkdir(parents=True)
    comparison = compare(load_results(files), "causal", n_resamples=20)
    (folder / "comparison.json").write_text(json.dumps(comparison))
    study, _ = load_study(write(tmp_path, "name: x\noutput_dir: o\nvariants: {bidir: r.yaml, causal: r.yaml}\ntasks_dir: t\n"))
    study = dataclasses.replace(study, contrasts={"attention": ["bidir", "causal"]})
    text = contrasts_section(tmp_path / "report", study)
    assert "### attention: bidir against causal ([report](contrasts/attention/report.md))" in text
    lines = [line for line in text.splitlines() if line.startswith("- bidir vs causal, ")]
    assert len(lines) == len(comparison["categories"]) and all("points" in line for line in lines)
