"""A training run in a few numbers, read from its metrics.jsonl: did it learn, and did it stay sound.

A short contrastive run can collapse — every text embedded alike, positive and negative cosines
both near 1, in-batch accuracy stuck near chance — and still export a model that evaluates without
error; only its scores give it away, mixed into a variant's mean. The numbers below travel with the
exported model (`training.json`, written by dsembed-consolidate), into its evaluation results
(`model.training`) and into the comparison report, so a seed that failed is seen as a failed run.
Pure JSON: no torch import.
"""
from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

SUMMARY_FILE = "training.json"
WINDOW = 10  # steps averaged at the start and at the end: one step's batch is too noisy to read


def _mean(rows: list[dict[str, Any]], key: str) -> float | None:
    values = [float(r[key]) for r in rows if isinstance(r.get(key), (int, float)) and math.isfinite(r[key])]
    return sum(values) / len(values) if values else None


def summarize_metrics(path: str | Path, up_to_step: int | None = None, window: int = WINDOW) -> dict[str, Any] | None:
    """The run's first and last `window` logged steps (up to `up_to_step`: an export of an earlier
    checkpoint), averaged, and its largest gradient norm.

    Returns:
        {"steps", "window", "first_accuracy", "last_accuracy", "last_loss", "last_cosine_gap"
        (positive minus negative cosine: near 0 when every text is embedded alike),
        "max_grad_norm", "max_grad_step", "layer_weights_change" (||W - W0|| / ||W0|| of a
        multi-layer head's layer weights at the last step that logged it; None without)}; None when
        the file is absent or logs no training step
        (unreadable lines are skipped: a run killed mid-write leaves a cut last line).
    """
    path = Path(path)
    if not path.is_file():
        return None
    rows = []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            continue
        if not isinstance(row, dict) or not isinstance(row.get("train/loss"), (int, float)):
            continue
        if up_to_step is None or not isinstance(row.get("step"), int) or row["step"] <= up_to_step:
            rows.append(row)
    if not rows:
        return None
    first, last = rows[:window], rows[-window:]
    pos, neg = _mean(last, "train/positive_cosine"), _mean(last, "train/negative_cosine")
    grads = [(float(r["train/grad_norm"]), r.get("step")) for r in rows
             if isinstance(r.get("train/grad_norm"), (int, float)) and math.isfinite(r["train/grad_norm"])]
    top = max(grads, default=(None, None))
    changes = [r["layer_weights/change"] for r in rows if isinstance(r.get("layer_weights/change"), (int, float))]
    return {"steps": len(rows), "window": min(window, len(rows)),
            "first_accuracy": _mean(first, "train/accuracy"), "last_accuracy": _mean(last, "train/accuracy"),
            "last_loss": _mean(last, "train/loss"),
            "last_cosine_gap": None if pos is None or neg is None else pos - neg,
            "max_grad_norm": top[0], "max_grad_step": top[1],
            "layer_weights_change": changes[-1] if changes else None}


def read_summary(model_dir: str | Path) -> dict[str, Any] | None:
    """An exported model's training summary, or None (a model exported before summaries existed,
    or not trained by dsembed)."""
    path = Path(model_dir) / SUMMARY_FILE
    if not path.is_file():
        return None
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError):
        return None
    return data if isinstance(data, dict) else None
