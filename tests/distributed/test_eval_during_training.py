"""eval.every_steps: the live model is scored on a local STS task during training (2 CPU ranks,
ZeRO-3, so every rank evaluates collectively); scores land in TensorBoard and metrics.jsonl at the
right steps, best.json names the best step and its checkpoint survives train.save_total_limit."""
from __future__ import annotations

import json
import math
from pathlib import Path

from dsembed.training.run_dir import steps_to_prune

from launch import check, launch, metrics, write_sts_task


def test_scores_logged_every_n_steps_and_best_checkpoint_kept(tmp_path: Path) -> None:
    out, tasks = tmp_path / "run", write_sts_task(tmp_path / "tasks")
    check(launch([f"train.output_dir={out}", "train.max_steps=5", "train.save_steps=1", "train.save_total_limit=1",
                  "eval.every_steps=2", f"eval.tasks_dir={tasks}", "eval.batch_size=8"], timeout=600))

    rows = metrics(out)
    assert [r["step"] for r in rows] == [1, 2, 3, 4, 5]
    scored = {r["step"]: r["eval/TinySTS"] for r in rows if "eval/TinySTS" in r}
    assert sorted(scored) == [2, 4, 5]  # every 2 steps, and at train.max_steps
    assert all(-1.0 <= s <= 1.0 and not math.isnan(s) for s in scored.values()), scored
    assert all(r["eval/mean"] == r["eval/TinySTS"] for r in rows if "eval/mean" in r)

    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(out / "tensorboard"), size_guidance={"scalars": 0})
    events.Reload()
    assert [(e.step, round(e.value, 5)) for e in events.Scalars("eval/TinySTS")] == \
        [(s, round(v, 5)) for s, v in sorted(scored.items())]

    best = json.loads((out / "best.json").read_text())
    first_best = max(scored, key=lambda s: (scored[s], -s))  # the earliest step of the highest score
    assert best["step"] == first_best and best["score"] == scored[first_best]
    assert best["checkpoint"] == f"checkpoints/step-{first_best}"
    kept = sorted(p.name for p in (out / "checkpoints").glob("step-*"))
    assert kept == sorted({"step-5", f"step-{first_best}"})  # the newest (limit 1) and the best
    assert (out / "checkpoints" / "latest").read_text().strip() == "step-5"


def test_pruning_keeps_the_newest_and_the_best() -> None:
    assert steps_to_prune([2, 4, 6, 8], keep_last=2) == [2, 4]
    assert steps_to_prune([2, 4, 6, 8], keep_last=2, best=2) == [4]
    assert steps_to_prune([2, 4, 6, 8], keep_last=1, best=8) == [2, 4, 6]
    assert steps_to_prune([2], keep_last=1, best=None) == []
