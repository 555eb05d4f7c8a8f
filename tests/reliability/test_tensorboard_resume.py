"""After kill -9 and resume, TensorBoard holds each step once (as metrics.jsonl does).

The run saves every 4 steps and is SIGKILLed at step 7 (DSEMBED_CRASH_AT), after steps 5 and 6
were logged; the restart resumes from step 4 and logs 5..8 again. The event files are read back
raw (every record of every file, not TensorBoard's purged view), so a duplicate cannot hide.
"""
from __future__ import annotations

import collections
import json
from pathlib import Path

import pytest
from relhelp import cli

COMMON = ["train.max_steps=8", "train.save_steps=4", "logging.histogram_steps=2"]


def _events(folder: Path) -> collections.Counter:
    """(tag, step) -> how many records of every event file hold it."""
    from tensorboard.backend.event_processing.event_file_loader import EventFileLoader

    seen: collections.Counter = collections.Counter()
    for path in sorted(folder.glob("*tfevents*")):
        for event in EventFileLoader(str(path)).Load():
            for value in event.summary.value:
                seen[(value.tag, event.step)] += 1
    return seen


def test_kill_and_resume_logs_each_step_once(tmp_path: Path) -> None:
    out = tmp_path / "run"
    killed = cli([f"train.output_dir={out}", *COMMON], DSEMBED_CRASH_AT="step@7")
    assert killed.returncode == -9, killed.stderr[-2000:]
    before = _events(out / "tensorboard")
    killed_rows = {r["step"]: r for r in map(json.loads, (out / "metrics.jsonl").read_text().splitlines())}
    assert before[("train/loss", 5)] == 1 and before[("train/loss", 6)] == 1  # logged after the step-4 checkpoint
    assert (out / "checkpoints" / "latest").read_text().strip() == "step-4"

    resumed = cli([f"train.output_dir={out}", *COMMON])
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "resumed from" in resumed.stderr
    after = _events(out / "tensorboard")
    twice = sorted(key for key, count in after.items() if count > 1)
    assert not twice, f"logged more than once: {twice}"
    assert sorted(step for tag, step in after if tag == "train/loss") == list(range(1, 9))
    assert sorted(step for tag, step in after if tag == "layer_weights/values") == [2, 4, 6, 8]
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == list(range(1, 9))
    # W's change is measured from step 0's W, which the checkpoint carries: step 6, logged before the
    # kill and again after the resume from step 4, reads the same
    changes = {r["step"]: r["layer_weights/change"] for r in rows if "layer_weights/change" in r}
    assert sorted(changes) == [2, 4, 6, 8] and 0 < changes[2] < changes[8]
    assert changes[6] == pytest.approx(killed_rows[6]["layer_weights/change"], rel=1e-6)
    assert not list((out / "tensorboard").glob(".rewrite-*"))
