"""kill -9 at seeded random points (between steps and inside a checkpoint save), then resume.

Each scenario: one uninterrupted reference run; then the same run killed (SIGKILL) one or more
times and restarted with the same command (train.resume: auto) until it finishes. After every kill
`latest` must name a complete checkpoint; after the final run no tmp-step-* is left and the final
weights (consolidated fp32 state dicts) and per-step losses equal the reference's.

Kill points: an outside SIGKILL of every process after a seeded step has been logged, and the
trainer's DSEMBED_CRASH_AT hook (SIGKILL inside save(): shards written / renamed / `latest` moved).
"""
from __future__ import annotations

import json
import random
from pathlib import Path

import pytest

from dsembed.training.engine import fp32_state_dict

from relhelp import assert_latest_complete, cli, kill_tree, start, wait_for_step

SEED = 2409  # the paper's arXiv number: change it to explore other kill points
STEPS, SAVE = 6, 2
COMMON = [f"train.max_steps={STEPS}", f"train.save_steps={SAVE}", "train.save_total_limit=2"]
SAVE_POINTS = {"save-shards": "tmp-step-{s} left, not renamed", "save-renamed": "renamed, latest not moved",
               "save-latest": "latest moved, not pruned"}


def _rows(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def _compare(reference: Path, resumed: Path, world: int) -> None:
    assert assert_latest_complete(resumed, world) == f"step-{STEPS}"
    assert not list((resumed / "checkpoints").glob("tmp-step-*")), "a leftover tmp-step-* survived the resume"
    rows_ref, rows = _rows(reference), _rows(resumed)
    assert [r["step"] for r in rows] == list(range(1, STEPS + 1))
    for a, b in zip(rows_ref, rows):
        assert a["train/loss"] == pytest.approx(b["train/loss"], abs=1e-6), (a["step"], a["train/loss"], b["train/loss"])
    expected = fp32_state_dict(reference / "checkpoints", f"step-{STEPS}")
    got = fp32_state_dict(resumed / "checkpoints", f"step-{STEPS}")
    assert expected.keys() == got.keys()
    diff = max((expected[k].float() - got[k].float()).abs().max().item() for k in expected)
    assert diff <= 1e-6, diff


def _resumed_step(out: Path, world: int) -> int:
    tag = assert_latest_complete(out, world)
    return int(tag.split("-")[1]) if tag else 0


def _crash_in_save(out: Path, world: int, rng: random.Random, nproc: int, not_before: int = 0) -> str | None:
    """Restart, and SIGKILL inside the save of a seeded later checkpoint; check what the kill left.

    Returns:
        The tag `latest` names after the kill.
    """
    before = max(_resumed_step(out, world), not_before)
    step = rng.choice([s for s in range(SAVE, STEPS + 1, SAVE) if s > before])
    point = rng.choice(sorted(SAVE_POINTS))
    # shards are written by every rank (kill only the last one: the others wait at the barrier);
    # the rename and `latest` are rank 0's.
    rank = world - 1 if point == "save-shards" else 0
    run = cli([f"train.output_dir={out}", *COMMON], nproc=nproc, DSEMBED_CRASH_AT=f"{point}@{step}:{rank}")
    assert run.returncode != 0, f"the crash hook {point}@{step} did not fire:\n{run.stderr[-2000:]}"
    latest = assert_latest_complete(out, world)
    ckpts = out / "checkpoints"
    if point == "save-shards":
        assert (ckpts / f"tmp-step-{step}").is_dir() and latest != f"step-{step}", SAVE_POINTS[point]
    elif point == "save-renamed":
        assert (ckpts / f"step-{step}").is_dir() and latest != f"step-{step}", SAVE_POINTS[point]
    else:
        assert latest == f"step-{step}", SAVE_POINTS[point]
    return latest


def test_one_rank_killed_twice_resumes_to_identical_weights(tmp_path: Path) -> None:
    rng = random.Random(SEED)
    reference, out = tmp_path / "reference", tmp_path / "killed"
    run = cli([f"train.output_dir={reference}", *COMMON])
    assert run.returncode == 0, run.stderr[-3000:]

    # 1. an outside kill -9 shortly after a seeded step was logged (before or after the first save)
    after = rng.randint(1, 3)
    proc = start([f"train.output_dir={out}", *COMMON], log=tmp_path / "first.log")
    wait_for_step(out, after, proc)
    assert proc.poll() is None, "the run ended before it could be killed"
    kill_tree(proc)
    _resumed_step(out, 1)

    # 2. a kill inside a checkpoint save (seeded window and step)
    _crash_in_save(out, 1, rng, nproc=1)

    # 3. the same command runs to the end
    final = cli([f"train.output_dir={out}", *COMMON])
    assert final.returncode == 0, final.stderr[-3000:]
    _compare(reference, out, 1)


def test_two_ranks_killed_in_a_save_resume_to_identical_weights(tmp_path: Path) -> None:
    rng = random.Random(SEED + 1)
    reference, out = tmp_path / "reference", tmp_path / "killed"
    run = cli([f"train.output_dir={reference}", *COMMON], nproc=2)
    assert run.returncode == 0, run.stderr[-3000:]

    latest = _crash_in_save(out, 2, rng, nproc=2, not_before=SAVE)  # after step-2 exists: a real resume

    final = cli([f"train.output_dir={out}", *COMMON], nproc=2)
    assert final.returncode == 0, final.stderr[-3000:]
    assert ("resumed from" in final.stderr) == (latest is not None), final.stderr[-2000:]
    _compare(reference, out, 2)


def test_by_source_batches_resume_to_identical_weights_after_a_kill_in_a_save(tmp_path: Path) -> None:
    """`data.batching: by_source` over two ranks (two sources): after a kill inside a save the resumed
    run draws the uninterrupted run's batches (same losses, same weights); that each global batch
    comes from one source is tests/unit/test_source_batches.py's."""
    from dsembed.data.rows import synthetic_rows

    data = tmp_path / "two_sources.jsonl"
    rows = [{**row, "source": "first" if i % 3 else "second"} for i, row in enumerate(synthetic_rows(256))]
    data.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    by_source = [f"data.train=[{data}]", "data.batching=by_source", *COMMON]
    rng = random.Random(SEED + 2)
    reference, out = tmp_path / "reference", tmp_path / "killed"
    run = cli([f"train.output_dir={reference}", *by_source], nproc=2)
    assert run.returncode == 0, run.stderr[-3000:]

    point = rng.choice(sorted(SAVE_POINTS))
    crashed = cli([f"train.output_dir={out}", *by_source], nproc=2, DSEMBED_CRASH_AT=f"{point}@{2 * SAVE}:0")
    assert crashed.returncode != 0, f"the crash hook {point} did not fire:\n{crashed.stderr[-2000:]}"
    final = cli([f"train.output_dir={out}", *by_source], nproc=2)
    assert final.returncode == 0, final.stderr[-3000:]
    assert "resumed from" in final.stderr, final.stderr[-2000:]
    _compare(reference, out, 2)
