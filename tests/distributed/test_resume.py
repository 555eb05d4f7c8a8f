"""Stopping after step 10 of 20 and resuming gives the uninterrupted run's step-20 weights.

2 CPU ranks, ZeRO-3, LoRA with dropout (so the restored RNG state matters) and gradient
checkpointing. `train.stop_after` ends the first job without changing the 20-step schedule.
"""
from __future__ import annotations

from pathlib import Path

from dsembed.training.engine import fp32_state_dict

from launch import check, launch, metrics

COMMON = ["train.max_steps=20", "train.save_steps=10", "lora.dropout=0.1", "model.gradient_checkpointing=true"]


def test_stop_and_resume_matches_uninterrupted(tmp_path: Path) -> None:
    whole, split = tmp_path / "whole", tmp_path / "split"
    check(launch([f"train.output_dir={whole}", *COMMON]))
    check(launch([f"train.output_dir={split}", *COMMON, "train.stop_after=10"]))
    assert (split / "checkpoints" / "latest").read_text().strip() == "step-10"
    assert [r["step"] for r in metrics(split)] == list(range(1, 11))
    resumed = launch([f"train.output_dir={split}", *COMMON])  # train.resume: auto (the default)
    check(resumed)
    assert "resumed from" in resumed.stderr

    rows_whole, rows_split = metrics(whole), metrics(split)
    assert [r["step"] for r in rows_split] == list(range(1, 21))
    for a, b in zip(rows_whole, rows_split):  # same batches, schedule and dropout, step by step
        assert abs(a["train/loss"] - b["train/loss"]) < 1e-5, (a["step"], a["train/loss"], b["train/loss"])
        assert abs(a["train/lr"] - b["train/lr"]) < 1e-12

    expected = fp32_state_dict(whole / "checkpoints", "step-20")
    got = fp32_state_dict(split / "checkpoints", "step-20")
    assert expected.keys() == got.keys() and any("lora_B" in k for k in got)
    diff = max((expected[k].float() - got[k].float()).abs().max().item() for k in expected)
    assert diff <= 1e-6, diff
    # LoRA B starts at zero: after 20 steps it moved, so the comparison is not trivially of zeros.
    assert max(got[k].abs().max().item() for k in got if "lora_B" in k) > 1e-3
