"""NaN / inf in the loss or the gradients: the run stops at that step on every rank with a one-line
error naming the step (exit code 3, a training failure rather than a user mistake), and `latest`
still names the last good checkpoint (the failed step is never saved).

Causes: a real one (an absurd learning rate blows the weights up, so the next loss is NaN) and the
trainer's DSEMBED_INJECT_NAN hook ("loss@N[:rank]" / "grad@N[:rank]") for the gradient path and for
a NaN on one rank only (the decision must be collective, or the other rank would hang).
"""
from __future__ import annotations

import json
from pathlib import Path

from relhelp import assert_latest_complete, cli, error_lines


def _check_stopped(out: Path, run, failed_step: int, world: int, what: str) -> None:
    detail = f"exit {run.returncode}\n{run.stderr[-3000:]}"
    if world == 1:
        assert run.returncode == 3 and "Traceback" not in run.stderr, detail
    else:  # torchrun exits 1 and prints its own ChildFailedError traceback, naming each rank's code
        assert run.returncode == 1 and "exitcode: 3" in run.stderr, detail
        assert "dsembed/training/trainer.py" not in run.stderr, detail  # no traceback from the ranks themselves
    lines = error_lines(run)
    assert len(lines) == world, detail  # one line per rank, every rank stopped at the same step
    for line in lines:
        assert f"step {failed_step}: the {what} is not finite" in line, line
        assert f"last good checkpoint: {out / 'checkpoints' / f'step-{failed_step - 1}'}" in line, line
    assert assert_latest_complete(out, world) == f"step-{failed_step - 1}"
    ckpts = out / "checkpoints"
    assert not (ckpts / f"step-{failed_step}").exists() and not list(ckpts.glob("tmp-step-*"))
    rows = [json.loads(line)["step"] for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert rows == list(range(1, failed_step))


def test_absurd_learning_rate_stops_at_the_first_nan_loss(tmp_path: Path) -> None:
    out = tmp_path / "run"
    run = cli([f"train.output_dir={out}", "optim.lr=1e30", "optim.warmup_steps=0", "train.max_steps=4",
               "train.save_steps=1"])
    _check_stopped(out, run, 2, 1, "loss")  # step 1 applies lr 1e30; step 2's loss overflows


def test_nan_gradients_are_not_applied(tmp_path: Path) -> None:
    out = tmp_path / "run"
    run = cli([f"train.output_dir={out}", "train.max_steps=4", "train.save_steps=2"], DSEMBED_INJECT_NAN="grad@3")
    _check_stopped(out, run, 3, 1, "gradient norm")


def test_nan_loss_on_one_rank_stops_both_ranks(tmp_path: Path) -> None:
    out = tmp_path / "run"
    run = cli([f"train.output_dir={out}", "train.max_steps=4", "train.save_steps=2"], nproc=2,
              timeout=150, DSEMBED_INJECT_NAN="loss@3:1")
    _check_stopped(out, run, 3, 2, "loss")
