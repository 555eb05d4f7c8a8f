"""A finished study stage whose inputs changed is not silently reused.

A two-variant study of the tiny model (one process each, 2 steps, a local STS task) runs to the
end; then variant b's overrides change. The runner names the stale stages (train, export and
evaluate of b, nothing of a) and exits 2 without touching anything; with --rerun-stale it
retrains and re-evaluates b only. A second study in another folder with `--reuse` takes a's
stages from the first (same recipe and settings) and runs only what differs.
"""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import yaml

from conftest import REPO, study_env

sys.path.insert(0, str(REPO / "tests" / "distributed"))
from launch import write_sts_task  # noqa: E402

STUDY = {"name": "stale", "output_dir": "out", "launcher": "python", "include_base": False, "baseline": "a",
         "variants": {"a": str(REPO / "recipes" / "tiny-cpu.yaml"), "b": str(REPO / "recipes" / "tiny-cpu.yaml")},
         "overrides": ["train.max_steps=2", "train.save_steps=2", "logging.progress_bar=false"],
         "variant_overrides": {"a": ["pooling={type: last_token}"], "b": []}, "tasks_dir": "tasks"}


def _study(tmp_path: Path, **changes) -> Path:
    path = tmp_path / "study.yaml"
    path.write_text(yaml.safe_dump({**STUDY, **changes}))
    return path


def _run(tmp_path: Path, *extra: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "tools.study", str(tmp_path / "study.yaml"), *extra], cwd=tmp_path,
                          env=study_env(tmp_path), capture_output=True, text=True, timeout=900)


def test_changed_variant_is_named_then_redone_with_rerun_stale(tmp_path: Path) -> None:
    write_sts_task(tmp_path / "tasks")
    _study(tmp_path)
    first = _run(tmp_path)
    assert first.returncode == 0, first.stdout[-3000:] + first.stderr[-3000:]
    out = tmp_path / "out"
    ledger = json.loads((out / "stages.json").read_text())
    assert sorted(ledger) == ["evaluate a", "evaluate b", "export a", "export b", "train a", "train b"]
    results = {p.name: p.stat().st_mtime_ns for p in (out / "results").glob("*.json")}

    _study(tmp_path, variant_overrides={"a": ["pooling={type: last_token}"], "b": ["optim.lr=1.0e-3"]})
    stale = _run(tmp_path)
    assert stale.returncode == 2, stale.stdout[-2000:] + stale.stderr[-2000:]
    errors = [line for line in stale.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "Traceback" not in stale.stderr, stale.stderr[-2000:]
    line = errors[0]
    assert "3 finished stage(s)" in line and "train b (optim.lr 0.002 -> 0.001)" in line, line
    assert "export b (its training stage changed)" in line and "evaluate b" in line
    assert not any(f"{stage} a" in line for stage in ("train", "export", "evaluate"))
    assert "--rerun-stale" in line
    assert (out / "runs" / "b" / "TRAINED").is_file() and ": train:" not in stale.stdout  # nothing redone
    assert {p.name: p.stat().st_mtime_ns for p in (out / "results").glob("*.json")} == results

    rerun = _run(tmp_path, "--rerun-stale")
    assert rerun.returncode == 0, rerun.stdout[-3000:] + rerun.stderr[-3000:]
    assert "(1/2) a: trained already" in rerun.stdout and "(2/2) b: train:" in rerun.stdout
    assert "(1/2) a: evaluated already" in rerun.stdout and "(2/2) b: evaluate:" in rerun.stdout
    assert "lr: 0.001" in (out / "runs" / "b" / "recipe.yaml").read_text()
    after = {p.name: p.stat().st_mtime_ns for p in (out / "results").glob("*.json")}
    assert after["a.json"] == results["a.json"] and after["b.json"] != results["b.json"]
    assert json.loads((out / "stages.json").read_text())["train b"]["recipe"]["optim.lr"] == 0.001

    again = _run(tmp_path)  # current again: nothing stale, nothing retrained
    assert again.returncode == 0 and "(2/2) b: trained already" in again.stdout, again.stderr[-2000:]

    # another study sharing variant a: --reuse copies a's finished stages, runs only c
    bad = _run(tmp_path, "--output-dir", "out2", "--reuse", "nowhere")
    assert bad.returncode == 2 and bad.stderr.strip().splitlines()[-1].startswith("error: --reuse"), bad.stderr[-2000:]
    assert "Traceback" not in bad.stderr and not (tmp_path / "out2").exists()
    _study(tmp_path, variants={"a": STUDY["variants"]["a"], "c": STUDY["variants"]["b"]},
           variant_overrides={"a": ["pooling={type: last_token}"], "c": ["optim.lr=5.0e-4"]})
    shared = _run(tmp_path, "--output-dir", "out2", "--reuse", "out")
    assert shared.returncode == 0, shared.stdout[-3000:] + shared.stderr[-3000:]
    for stage in ("train a", "export a", "evaluate a"):
        assert f"{stage}: reused from {out}" in shared.stdout, shared.stdout[-3000:]
    assert "c: reused" not in shared.stdout and "(2/2) c: train:" in shared.stdout and ": a: train:" not in shared.stdout
    out2 = tmp_path / "out2"
    assert (out2 / "results" / "a.json").read_bytes() == (out / "results" / "a.json").read_bytes()
    assert (out2 / "models" / "a" / "dsembed.json").is_file() and (out2 / "runs" / "a" / "TRAINED").is_file()
    assert sorted(json.loads((out2 / "stages.json").read_text())) == sorted([
        "evaluate a", "evaluate c", "export a", "export c", "train a", "train c"])
    assert not list(out2.rglob(".*.reusing"))
    # wall time per stage: measured where run, carried with a reused stage, tabled in the report
    times = json.loads((out / "stage-times.json").read_text())
    assert {"train a", "export a", "evaluate a", "train b", "compare"} <= set(times)
    assert all(t["seconds"] > 0 and t["cpu"] and t["threads"] for t in times.values())
    times2 = json.loads((out2 / "stage-times.json").read_text())
    assert times2["train a"]["seconds"] == times["train a"]["seconds"] and times2["train a"]["reused_from"] == str(out)
    assert "reused_from" not in times2["train c"]
    table = (out2 / "report" / "stage-times.md").read_text()
    assert "| train c |" in table and f"reused from {out}" in table and "| all stages |" in table
