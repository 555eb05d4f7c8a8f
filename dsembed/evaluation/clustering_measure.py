"""The measurement behind dsembed.evaluation.clustering_limit: random-embedding V-measure of every
clustering task of a folder, cut set by set (the old scheme) and labels first (the current one)."""
from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from dsembed.evaluation.chance import CHANCE_SEED, random_v_measure_of_sets
from dsembed.evaluation.clustering_limit import limit_cluster_sets, set_by_set
from dsembed.evaluation.tasks import load_local_tasks


def measure_random_v_measure(root: str | Path, limits: list[int], seed: int = 42,
                             draws: int = 5) -> list[dict[str, Any]]:
    """Random-embedding V-measure of every clustering task under `root`, before and after.

        python -c "from dsembed.evaluation.clustering_measure import measure_random_v_measure as m, \\
            format_measurements as f; print(f(m('../shared/data/tasks', [96, 192, 384, 1000])))"

    Args:
        root: a tasks folder with clustering/<Name>/test.jsonl.
        limits: text limits to measure.
        seed: the limit's seed (run.LIMIT_SEED).
        draws: random-vector draws averaged.

    Returns:
        One row per task: {"task", "labels", limit: {"before", "after", "labels_kept", "texts_kept"}}.
    """
    rows = []
    for task in load_local_tasks(root):
        if task.metadata.type != "Clustering":
            continue
        task.load_data()
        labels = [list(map(str, x)) for x in task.dataset["test"]["labels"]]
        row: dict[str, Any] = {"task": task.metadata.name, "labels": len({x for s in labels for x in s})}
        for limit in limits:
            before = set_by_set(labels, limit, np.random.default_rng(seed))
            _, after = limit_cluster_sets(labels, labels, limit, np.random.default_rng(seed))
            row[limit] = {"before": float(np.mean(random_v_measure_of_sets(before, CHANCE_SEED, draws))),
                          "after": float(np.mean(random_v_measure_of_sets(after, CHANCE_SEED, draws))),
                          "labels_kept": max(len(set(s)) for s in after), "texts_kept": sum(map(len, after))}
        rows.append(row)
    return rows


def format_measurements(rows: list[dict[str, Any]]) -> str:
    """The measured rows as the Markdown table of the module docstring."""
    limits = [key for key in rows[0] if isinstance(key, int)] if rows else []
    lines = ["| task (labels) | " + " | ".join(f"{n} before | {n} after" for n in limits) + " |",
             "|---|" + "---:|---:|" * len(limits)]
    for row in rows:
        cells = [f"{row[n]['before']:.3f} | {row[n]['after']:.3f} ({row[n]['labels_kept']} x "
                 f"{row[n]['texts_kept'] // row[n]['labels_kept']})" for n in limits]
        lines.append(f"| {row['task']} ({row['labels']}) | " + " | ".join(cells) + " |")
    return "\n".join(lines)
