"""An existing run directory is never overwritten silently.

- train.resume: auto (the default) resumes it (covered step by step in test_kill_resume.py);
- train.resume: never refuses it (one line, exit 2, nothing touched), also when the previous run
  stopped before its first checkpoint (it left recipe.yaml);
- train.overwrite: true replaces it: checkpoints/, tensorboard/ and metrics.jsonl of the old run are
  deleted up front, after the new run's input checks pass (a bad recipe leaves the old run intact).
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from relhelp import cli, error_lines


def _snapshot(out: Path) -> dict[str, int]:
    return {str(p.relative_to(out)): p.stat().st_mtime_ns for p in sorted(out.rglob("*"))}


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("existing") / "run"
    run = cli([f"train.output_dir={out}", "train.max_steps=2", "train.save_steps=1"])
    assert run.returncode == 0, run.stderr[-3000:]
    return out


def _copy(finished_run: Path, tmp_path: Path) -> Path:
    out = tmp_path / "run"
    shutil.copytree(finished_run, out)
    return out


def test_resume_never_refuses_an_existing_run(finished_run: Path, tmp_path: Path) -> None:
    out = _copy(finished_run, tmp_path)
    before = _snapshot(out)
    run = cli([f"train.output_dir={out}", "train.max_steps=2", "train.resume=never"])
    assert run.returncode == 2 and "Traceback" not in run.stderr, run.stderr[-3000:]
    (line,) = error_lines(run)
    assert "train.resume is never" in line and str(out) in line and "train.overwrite=true" in line
    assert _snapshot(out) == before


def test_resume_never_refuses_a_run_that_never_checkpointed(tmp_path: Path) -> None:
    out = tmp_path / "run"
    out.mkdir()
    (out / "recipe.yaml").write_text("# a previous run that was killed before its first checkpoint\n")
    (out / "metrics.jsonl").write_text('{"step": 1, "train/loss": 1.0}\n')
    run = cli([f"train.output_dir={out}", "train.resume=never"])
    assert run.returncode == 2, run.stderr[-3000:]
    (line,) = error_lines(run)
    assert "previous run" in line and "train.resume is never" in line
    assert (out / "metrics.jsonl").read_text() == '{"step": 1, "train/loss": 1.0}\n'


def test_bad_recipe_with_overwrite_leaves_the_old_run(finished_run: Path, tmp_path: Path) -> None:
    out = _copy(finished_run, tmp_path)
    before = _snapshot(out)
    run = cli([f"train.output_dir={out}", "train.overwrite=true", "model.attn_implementation=flash_attention_2"])
    assert run.returncode == 2, run.stderr[-3000:]
    assert _snapshot(out) == before


def test_overwrite_replaces_the_old_run(finished_run: Path, tmp_path: Path) -> None:
    out = _copy(finished_run, tmp_path)
    (out / "notes.txt").write_text("the user's own file")
    run = cli([f"train.output_dir={out}", "train.max_steps=1", "train.save_steps=1", "train.overwrite=true",
               "train.resume=never"])
    assert run.returncode == 0, run.stderr[-3000:]
    assert "resumed from" not in run.stderr
    ckpts = out / "checkpoints"
    assert sorted(p.name for p in ckpts.glob("step-*")) == ["step-1"]  # the old step-2 is gone
    assert (ckpts / "latest").read_text().strip() == "step-1"
    assert [json.loads(r)["step"] for r in (out / "metrics.jsonl").read_text().splitlines()] == [1]
    assert (out / "notes.txt").read_text() == "the user's own file"  # only the run's own outputs go
