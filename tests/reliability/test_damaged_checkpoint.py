"""Resuming from a checkpoint with a damaged or missing shard (2 CPU ranks, ZeRO-3).

Behaviour (README, "Failures, restarts and exit codes"): every rank checks its share of the shards
of the checkpoint `latest` names (presence for the saved world size, zip directory and CRC-32 of
every member); a damaged one is moved aside to checkpoints/damaged-step-N (never deleted), one line
names it and its shard, and the run resumes from the newest complete earlier checkpoint. With none
left, every rank stops with one line and exit code 2 and the run directory is left as it was.
dsembed-consolidate refuses such a checkpoint in one line, exit 2, and writes nothing.
"""
from __future__ import annotations

import hashlib
import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from dsembed.training.checkpoint_files import checkpoint_problems

from relhelp import REPO, assert_latest_complete, cli, env, error_lines

COMMON = ["train.max_steps=6", "train.save_steps=2", "train.save_total_limit=2"]
SHARD = "zero_pp_rank_1_mp_rank_00_optim_states.pt"


def _hashes(folder: Path) -> dict[str, str]:
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def _rows(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def _flip(path: Path) -> None:
    """Overwrite bytes in the middle of a file (same size: a half-synced block, not a truncation)."""
    data = bytearray(path.read_bytes())
    middle = len(data) // 2
    data[middle:middle + 64] = bytes(64)
    path.write_bytes(bytes(data))


@pytest.fixture(scope="module")
def stopped(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A 2-rank run stopped after step 4 of 6: checkpoints step-2 and step-4."""
    out = tmp_path_factory.mktemp("damaged") / "run"
    run = cli([f"train.output_dir={out}", *COMMON, "train.stop_after=4"], nproc=2)
    assert run.returncode == 0, run.stderr[-3000:]
    assert assert_latest_complete(out, 2) == "step-4"
    return out


def test_the_check_finds_each_kind_of_damage(stopped: Path, tmp_path: Path) -> None:
    ckpt = tmp_path / "step-4"
    shutil.copytree(stopped / "checkpoints" / "step-4", ckpt)
    assert checkpoint_problems(ckpt)[0] == []
    assert checkpoint_problems(ckpt, rng=False)[1]["step"] == 4
    shard = ckpt / SHARD
    _flip(shard)
    (problem,) = checkpoint_problems(ckpt)[0]
    assert problem.startswith(f"{SHARD} is damaged ({SHARD[:-3]}/data/") and problem.endswith("fails its CRC-32 check)")
    shard.write_bytes(shard.read_bytes()[:1000])
    (problem,) = checkpoint_problems(ckpt)[0]
    assert problem.startswith(f"{SHARD} is truncated or corrupt")
    # split over two ranks: each reads its share, together they find it once
    parts = [checkpoint_problems(ckpt, (r, 2))[0] for r in range(2)]
    assert sorted(p for part in parts for p in part if "truncated" in p) == [problem]
    shard.unlink()
    (problem,) = checkpoint_problems(ckpt)[0]
    assert "rank_1_mp_rank_00_optim_states.pt is missing (1 of 2 optimizer-state shards present" in problem
    (ckpt / "rng_rank0.pt").unlink()
    assert any(p.startswith("rng_rank0.pt is missing") for p in checkpoint_problems(ckpt)[0])
    assert not any("rng" in p for p in checkpoint_problems(ckpt, rng=False)[0])


def test_damaged_latest_resumes_from_the_earlier_checkpoint(stopped: Path, tmp_path: Path) -> None:
    out = tmp_path / "run"
    shutil.copytree(stopped, out)
    before = _rows(out)
    shard = out / "checkpoints" / "step-4" / SHARD
    shard.write_bytes(shard.read_bytes()[: shard.stat().st_size // 3])  # a copy cut short
    damaged = _hashes(out / "checkpoints" / "step-4")

    run = cli([f"train.output_dir={out}", *COMMON], nproc=2)
    assert run.returncode == 0, run.stderr[-3000:]
    warnings = [line for line in run.stderr.splitlines() if line.startswith("warning:")]
    ckpts = out / "checkpoints"
    assert len(warnings) == 1, run.stderr[-3000:]  # rank 0 says it once
    assert warnings[0].startswith(f"warning: {ckpts / 'step-4'}: {SHARD} is truncated or corrupt")
    assert f"moved the checkpoint aside to {ckpts / 'damaged-step-4'} (kept, not deleted)" in warnings[0]
    assert warnings[0].endswith(f"resuming from {ckpts / 'step-2'}")
    assert f"resumed from {ckpts / 'step-2'}" in run.stderr
    assert _hashes(ckpts / "damaged-step-4") == damaged  # set aside byte for byte
    assert assert_latest_complete(out, 2) == "step-6"
    rows = _rows(out)
    assert [r["step"] for r in rows] == list(range(1, 7))  # steps 3-4 recomputed, each logged once
    for a, b in zip(before, rows[:4]):  # from step-2's state the same steps give the same losses
        assert a["train/loss"] == pytest.approx(b["train/loss"], abs=1e-6), (a["step"], a["train/loss"], b["train/loss"])


def test_no_complete_checkpoint_left_stops_with_exit_2(stopped: Path, tmp_path: Path) -> None:
    out = tmp_path / "run"
    shutil.copytree(stopped, out)
    ckpts = out / "checkpoints"
    _flip(ckpts / "step-4" / SHARD)  # same size, bad bytes: only the CRC-32 check sees it
    (ckpts / "step-2" / "rng_rank1.pt").unlink()
    before = _hashes(out)

    run = cli([f"train.output_dir={out}", *COMMON], nproc=2, timeout=240)
    detail = f"exit {run.returncode}\n{run.stderr[-3000:]}"
    assert run.returncode == 1 and "exitcode: 2" in run.stderr, detail  # torchrun's report of the ranks' code
    assert "dsembed/training" not in run.stderr, detail  # no traceback from the ranks themselves
    lines = error_lines(run)
    assert len(lines) == 2, detail  # one per rank, both decided alike
    for line in lines:
        assert line.startswith(f"error: {ckpts / 'step-4'}: {SHARD} is damaged ("), line
        assert "fails its CRC-32 check" in line and "no complete earlier checkpoint to resume from" in line, line
        assert "(1 earlier checkpoint(s) damaged too)" in line and "train.overwrite=true" in line, line
    assert _hashes(out) == before  # nothing moved, deleted or rewritten

    # dsembed-consolidate of the damaged checkpoint: one line, exit 2, nothing written
    export = subprocess.run([sys.executable, "-m", "dsembed.cli.consolidate", str(out), str(tmp_path / "x" / "model")],
                            cwd=REPO, env=env(), capture_output=True, text=True, timeout=120)
    errors = [line for line in export.stderr.splitlines() if line.startswith("error:")]
    assert export.returncode == 2 and "Traceback" not in export.stderr, export.stderr[-3000:]
    assert len(errors) == 1 and errors[0].startswith(f"error: {ckpts / 'step-4'}: {SHARD} is damaged ("), errors
    assert not (tmp_path / "x").exists() and _hashes(out) == before
