"""dsembed-evaluate at study scale: 2 ranks score as 1 rank does, a killed evaluation resumes without
recomputing finished tasks, changed weights never reuse old results, and mteb reads the results layout.

A tiny random model (multi-layer head, bidirectional) on the four tiny local tasks of tests/conftest.py;
the multi-rank runs are real processes (`--nproc 2`: gloo on CPU), the one-rank runs are in-process;
batches of 4 texts, so that every encode call has batches for both ranks.
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from dsembed.bench.evaluation import differences
from dsembed.errors import run_cli

REPO = Path(__file__).resolve().parents[2]
TASKS = ["TinySTS", "TinyRetrieval", "TinyClassification", "TinyClustering"]


def _evaluate_in_process(model_dir: Path, tasks: Path, output: Path, *extra: str) -> int:
    from dsembed.cli.evaluate import main

    return run_cli(main, [str(model_dir), "--tasks-dir", str(tasks), "--output", str(output), "--no-progress",
                          "--batch-size", "4", *extra])


def _evaluate_ranks(model_dir: Path, tasks: Path, output: Path, *extra: str, **env: str) -> subprocess.CompletedProcess:
    command = [sys.executable, "-m", "dsembed.cli.evaluate", str(model_dir), "--tasks-dir", str(tasks),
               "--output", str(output), "--no-progress", "--batch-size", "4", "--nproc", "2", *extra]
    return subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=300,
                          env={**os.environ, "OMP_NUM_THREADS": "1", **env})


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    import torch

    from dsembed.modeling.model import build_model
    from tests.conftest import make_tiny_recipe

    torch.manual_seed(0)
    recipe = make_tiny_recipe(pooling={"type": "multi_layer_attention", "layers": "all", "layer_weights": True},
                              attention="bidirectional", layers=3)
    out = tmp_path_factory.mktemp("eval-ranks") / "model"
    build_model(recipe).save(out)
    return out


@pytest.fixture(scope="module")
def one_rank(model_dir, task_root, tmp_path_factory) -> dict:
    """The uninterrupted one-rank run every other run is compared with."""
    output = tmp_path_factory.mktemp("one") / "one.json"
    assert _evaluate_in_process(model_dir, task_root, output) == 0
    return json.loads(output.read_text())


def test_two_ranks_give_the_one_rank_scores_and_items(model_dir, task_root, one_rank, tmp_path):
    import mteb
    from mteb.cache import ResultCache

    done = _evaluate_ranks(model_dir, task_root, tmp_path / "two.json", "--results-dir", str(tmp_path / "mteb"))
    assert done.returncode == 0, done.stderr[-3000:]
    two = json.loads((tmp_path / "two.json").read_text())
    assert two["settings"]["ranks"] == 2
    per_rank = two["encoding"]["texts_per_rank"]
    # batches of 4 dealt whole to the less loaded rank: both work, about equally
    assert len(per_rank) == 2 and sum(per_rank) == two["encoding"]["embedded"]
    assert min(per_rank) >= 0.3 * sum(per_rank), per_rank
    assert list(two["tasks"]) == TASKS
    main_diff, item_diff = differences(one_rank, two)
    assert main_diff <= 1e-4 and item_diff <= 1e-4, (main_diff, item_diff)
    for name in TASKS:
        assert two["tasks"][name]["items"] is not None, name

    # mteb reads every per-task file (TaskResult.from_disk) and its loader finds all four tasks.
    files = sorted((tmp_path / "mteb" / "results").rglob("Tiny*.json"))
    assert [f.stem for f in files] == sorted(TASKS)
    revision = files[0].parent.name
    assert revision == two["model"]["fingerprint"].split(":")[1][:12]  # the weights' fingerprint
    assert (files[0].parent / "model_meta.json").is_file()
    for file in files:
        result = mteb.TaskResult.from_disk(file)
        assert result.get_score() == pytest.approx(two["tasks"][result.task_name]["main_score"], abs=1e-6)
    loaded = ResultCache(tmp_path / "mteb").load_results(include_remote=False)
    (model,) = loaded.model_results
    assert model.model_name == "dsembed/model" and model.model_revision == revision
    assert sorted(r.task_name for r in model.task_results) == sorted(TASKS)


def test_killed_evaluation_resumes_without_recomputing(model_dir, task_root, one_rank, tmp_path):
    output = tmp_path / "run.json"
    # SIGKILL rank 0 in the middle of the second task (its first encode call)
    killed = _evaluate_ranks(model_dir, task_root, output, DSEMBED_CRASH_AT="eval-encode@2")
    assert killed.returncode != 0
    store = tmp_path / "run.tasks"
    assert sorted(p.stem for p in store.glob("Tiny*.json")) == ["TinySTS"]  # only the finished task
    assert not output.exists()
    first = store / "TinySTS.json"
    before = (first.read_bytes(), first.stat().st_mtime_ns)

    rerun = _evaluate_ranks(model_dir, task_root, output)
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    assert "TinySTS: finished earlier" in rerun.stderr
    assert "[1/4] TinySTS (sts)" not in rerun.stderr  # not evaluated again
    assert (first.read_bytes(), first.stat().st_mtime_ns) == before
    resumed = json.loads(output.read_text())
    assert resumed["encoding"]["finished_earlier"] == ["TinySTS"]
    assert list(resumed["tasks"]) == TASKS
    main_diff, item_diff = differences(one_rank, resumed)
    assert main_diff <= 1e-4 and item_diff <= 1e-4, (main_diff, item_diff)


def test_changed_weights_never_reuse_results_and_overwrite_recomputes(model_dir, task_root, tmp_path, capsys):
    from safetensors.torch import load_file, save_file

    model = tmp_path / "model"
    shutil.copytree(model_dir, model)
    output = tmp_path / "r.json"
    assert _evaluate_in_process(model, task_root, output, "--task-limit", "TinySTS=6") == 0
    old = json.loads(output.read_text())
    capsys.readouterr()

    assert _evaluate_in_process(model, task_root, output, "--task-limit", "TinySTS=6") == 0
    same = json.loads(output.read_text())
    assert same["encoding"]["finished_earlier"] == sorted(TASKS)  # nothing recomputed
    assert differences(old, same) == (0.0, 0.0)

    # another limit for one task: only that task is recomputed
    assert _evaluate_in_process(model, task_root, output, "--task-limit", "TinySTS=8") == 0
    assert json.loads(output.read_text())["encoding"]["finished_earlier"] == sorted(set(TASKS) - {"TinySTS"})

    pooler = load_file(str(model / "pooler.safetensors"))
    save_file({k: v * 2.0 for k, v in pooler.items()}, str(model / "pooler.safetensors"))
    capsys.readouterr()
    assert _evaluate_in_process(model, task_root, output, "--task-limit", "TinySTS=8") == 0
    changed = json.loads(output.read_text())
    assert changed["encoding"]["finished_earlier"] == []
    assert changed["model"]["fingerprint"] != old["model"]["fingerprint"]
    assert "made for other weights or settings" in capsys.readouterr().err

    assert _evaluate_in_process(model, task_root, output, "--task-limit", "TinySTS=8", "--overwrite") == 0
    assert json.loads(output.read_text())["encoding"]["finished_earlier"] == []


@pytest.mark.parametrize("extra, message", [
    (["--nproc", "0"], "--nproc 0: give at least 1"),
    (["--results-dir", "FILE"], "is a file; give a folder"),
    (["--embedding-cache-gb", "-1"], "--embedding-cache-gb -1"),
])
def test_bad_evaluation_options_are_one_line_exit_2(model_dir, task_root, tmp_path, capsys, extra, message):
    (tmp_path / "FILE").write_text("x")
    extra = [str(tmp_path / "FILE") if x == "FILE" else x for x in extra]
    assert _evaluate_in_process(model_dir, task_root, tmp_path / "out.json", *extra) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and message in err[0], err
    assert not (tmp_path / "out.json").exists() and not (tmp_path / "out.tasks").exists()


def test_tasks_finished_before_chance_levels_get_them_when_resumed(model_dir, task_root, tmp_path):
    output = tmp_path / "r.json"
    assert _evaluate_in_process(model_dir, task_root, output) == 0
    first = json.loads(output.read_text())
    store = tmp_path / "r.tasks"
    for file in store.glob("Tiny*.json"):  # as a dsembed without chance levels wrote them
        record = json.loads(file.read_text())
        del record["entry"]["chance"]
        for scores in record["mteb_task_result"]["scores"]["test"]:
            del scores["dsembed_chance"]
        file.write_text(json.dumps(record))
    assert _evaluate_in_process(model_dir, task_root, output) == 0
    again = json.loads(output.read_text())
    assert again["encoding"]["finished_earlier"] == sorted(TASKS)  # nothing scored again
    for name in TASKS:
        assert again["tasks"][name]["main_score"] == first["tasks"][name]["main_score"]
        assert again["tasks"][name]["chance"] == first["tasks"][name]["chance"], name
        stored = json.loads((store / f"{name}.json").read_text())
        assert stored["entry"]["chance"] == first["tasks"][name]["chance"]
        assert stored["mteb_task_result"]["scores"]["test"][0]["dsembed_chance"]["score"] == pytest.approx(
            first["tasks"][name]["chance"]["score"])


def test_two_ranks_score_several_sizes_in_one_run_as_one_rank_does(model_dir, task_root, tmp_path):
    done = _evaluate_ranks(model_dir, task_root, tmp_path / "two-d{dim}.json", "--truncate-dim", "8", "16",
                           "--tasks", "TinySTS", "TinyClassification")
    assert done.returncode == 0, done.stderr[-3000:]
    for size in (8, 16):
        assert _evaluate_in_process(model_dir, task_root, tmp_path / f"one-d{size}.json", "--truncate-dim", str(size),
                                    "--tasks", "TinySTS", "TinyClassification") == 0
        two, one = (json.loads((tmp_path / f"{run}-d{size}.json").read_text()) for run in ("two", "one"))
        assert two["settings"]["ranks"] == 2 and two["settings"]["truncate_dim"] == size
        assert two["encoding"]["embedded"] == one["encoding"]["embedded"] > 0
        main_diff, item_diff = differences(one, two)
        assert main_diff <= 1e-4 and item_diff <= 1e-4, (size, main_diff, item_diff)
