"""dsembed-probe-layers: every layer scored on every task, through the same mteb path as evaluate."""
from __future__ import annotations

import contextlib
import dataclasses
import io
import json
from pathlib import Path

import pytest
import torch

from dsembed.config import MeanPooling
from dsembed.errors import run_cli
from dsembed.evaluation import run
from dsembed.evaluation.tasks import load_local_tasks

from tests.conftest import make_tiny_recipe

REPO = Path(__file__).resolve().parents[2]


def _probe(*args: str) -> tuple[int, str, str]:
    from dsembed.cli.probe_layers import main

    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = run_cli(main, list(args))
    return code, out.getvalue(), err.getvalue()


def test_probe_on_a_recipe_scores_every_layer_and_the_last_equals_mean_pooling(task_root: Path, tmp_path: Path) -> None:
    out = tmp_path / "probe"
    code, stdout, stderr = _probe(str(REPO / "recipes" / "tiny-cpu.yaml"), "--tasks-dir", str(task_root),
                                  "--output-dir", str(out), "--batch-size", "8")
    assert code == 0, stderr
    result = json.loads((out / "layers.json").read_text())
    assert result["layers"] == [1, 2, 3, 4]  # the tiny recipe's 4 decoder layers
    assert set(result["tasks"]) == {"TinySTS", "TinyRetrieval", "TinyClassification", "TinyClustering"}
    for task in result["tasks"].values():
        assert sorted(task["scores"]) == ["1", "2", "3", "4"]
    assert len(set(result["tasks"]["TinySTS"]["scores"].values())) == 4  # each layer embeds differently
    assert set(result["best"]) == {"sts", "retrieval", "classification", "clustering"}
    for category, best in result["best"].items():
        means = result["categories"][category]
        assert best["score"] == max(means.values()) and means[str(best["layer"])] == best["score"]
        assert f"best layer for {category}: {best['layer']} of 4" in stdout
    assert (out / "layers.png").read_bytes()[:4] == b"\x89PNG"
    assert sorted(result["mean_norms"]) == ["1", "2", "3", "4"] and min(result["mean_norms"].values()) > 0

    # layer L is the final-normed state: its mean-pooled score is exactly dsembed-evaluate's score of the
    # same backbone with the mean head (same seed -> same random weights, same mteb path and instructions)
    from dsembed.config import load_recipe
    from dsembed.modeling.model import build_model

    recipe = load_recipe(REPO / "recipes" / "tiny-cpu.yaml")
    tasks = load_local_tasks(task_root)
    run.prepare_tasks(tasks)
    torch.manual_seed(0)
    mean_model = build_model(dataclasses.replace(recipe, pooling=MeanPooling())).eval()
    probe_model = build_model(recipe).eval()
    probe_model.backbone.load_state_dict(mean_model.backbone.state_dict())
    evaluated = run.evaluate_tasks(mean_model, tasks, instructions=run.resolve_instructions(tasks), batch_size=8,
                                   log=lambda _: None)["tasks"]
    from dsembed.evaluation.probe import probe_layers

    probed = probe_layers(probe_model, tasks, run.resolve_instructions(tasks), batch_size=8, log=lambda _: None)
    for name, entry in evaluated.items():
        assert probed["tasks"][name]["scores"][4] == pytest.approx(entry["main_score"], abs=1e-6), name


def test_probe_on_an_exported_model_folder_with_limits(task_root: Path, tmp_path: Path) -> None:
    from dsembed.modeling.model import build_model

    folder = build_model(make_tiny_recipe(pooling={"type": "last_token"}, layers=3)).save(tmp_path / "model")
    out = tmp_path / "probe"
    code, stdout, stderr = _probe(str(folder), "--tasks-dir", str(task_root), "--tasks", "TinySTS", "TinyRetrieval",
                                  "--output-dir", str(out), "--limit", "6", "--task-limit", "TinySTS=4")
    assert code == 0, stderr
    result = json.loads((out / "layers.json").read_text())
    assert result["layers"] == [1, 2, 3] and set(result["tasks"]) == {"TinySTS", "TinyRetrieval"}
    assert result["settings"]["task_limits"] == {"TinySTS": 4} and result["settings"]["limit"] == 6


@pytest.mark.parametrize("args, message", [
    (["no/such/recipe.yaml", "--tasks-dir", "x"], "does not exist"),
    ([".", "--tasks-dir", "x"], "neither a recipe"),
    (["RECIPE", "--task-limit", "Nope=5"], "no task 'Nope'"),
    (["RECIPE"], "no tasks"),
])
def test_probe_bad_input_is_one_line_exit_2(task_root: Path, tmp_path: Path, args: list[str], message: str) -> None:
    recipe = str(REPO / "recipes" / "tiny-cpu.yaml")
    args = [recipe if a == "RECIPE" else a for a in args]
    if "--task-limit" in args:
        args += ["--tasks-dir", str(task_root)]
    code, _, stderr = _probe(*args, "--output-dir", str(tmp_path / "out"))
    assert code == 2 and message in stderr and stderr.count("\n") == 1, stderr
    assert not (tmp_path / "out").exists()


def test_probe_of_a_flash_attention_recipe_falls_back_to_sdpa(task_root: Path, tmp_path: Path, monkeypatch) -> None:
    """A GPU recipe (flash_attention_2) is probed on a CPU machine with sdpa, saying so in one line."""
    import importlib.util

    from dsembed.modeling import backbone

    monkeypatch.setattr(backbone, "_FALLBACK_NOTED", [])  # the note is printed once per process
    if importlib.util.find_spec("flash_attn") is not None:
        pytest.skip("flash-attn is installed: nothing to fall back from")
    code, _, stderr = _probe(str(REPO / "recipes" / "tiny-cpu.yaml"), "--override", "model.attn_implementation=flash_attention_2",
                             "--tasks-dir", str(task_root), "--tasks", "TinySTS", "--output-dir", str(tmp_path / "p"))
    assert code == 0, stderr
    assert sum("using sdpa" in line for line in stderr.splitlines()) == 1
    assert json.loads((tmp_path / "p" / "layers.json").read_text())["layers"] == [1, 2, 3, 4]
