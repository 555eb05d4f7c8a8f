"""Training with what practitioners use, all at once, on 2 CPU ranks under ZeRO-3: several hard
negatives per example (as dsembed-mine writes them), same-source batches, duplicate and
false-negative masking, Matryoshka sizes, cached steps and accumulation."""
from __future__ import annotations

import json
import math
from pathlib import Path

from launch import check, launch, metrics

TOPICS = ["otter", "falcon", "badger", "lynx", "heron", "walrus"]


def _data(path: Path) -> Path:
    rows = []
    for i in range(48):
        source = "animals" if i < 32 else "numbers"
        positive = f"{TOPICS[i % 6]} record {i % 24}"  # rows i and i + 24 share a positive (a duplicate)
        # the second negative is another row's positive: a false negative the loss must not push away
        rows.append({"query": f"which record is {TOPICS[i % 6]} {i % 24}?", "positive": positive,
                     "negatives": [f"{TOPICS[(i + 1) % 6]} note {i}", f"{TOPICS[(i + 1) % 6]} record {(i + 1) % 24}"],
                     "source": source})
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def test_mined_style_data_by_source_masked_matryoshka_cached_and_resumed(tmp_path: Path) -> None:
    whole, split = tmp_path / "whole", tmp_path / "split"
    data = _data(tmp_path / "mined.jsonl")
    common = [f"data.train=[{data}]", "data.num_negatives=2", "data.batching=by_source",
              "loss.false_negative_margin=0.95", "loss.matryoshka_dims=[16, 32, 64]", "train.micro_batch_size=4",
              "train.cache_chunk_size=2", "train.gradient_accumulation_steps=2", "train.max_steps=3",
              "train.save_steps=1", "logging.tensorboard=false"]
    check(launch([f"train.output_dir={whole}", *common]))
    rows = metrics(whole)
    assert [r["step"] for r in rows] == [1, 2, 3]
    assert all(math.isfinite(r["train/loss"]) for r in rows)
    # with 2 negatives that repeat other rows' positives, every batch masks something
    assert all(r["train/masked_per_query"] > 0 for r in rows)
    # stopped after step 2 and resumed: the same batches (by source), masks and losses
    check(launch([f"train.output_dir={split}", *common, "train.stop_after=2"]))
    check(launch([f"train.output_dir={split}", *common]))
    for a, b in zip(rows, metrics(split)):
        assert a["step"] == b["step"] and abs(a["train/loss"] - b["train/loss"]) < 1e-5, (a, b)
        assert a["train/masked_per_query"] == b["train/masked_per_query"]
