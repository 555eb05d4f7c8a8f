"""2 CPU ranks, ZeRO-3, LoRA + gradient checkpointing: the paper's model1 and model5 designs train.

One launch per variant (30 steps of the tiny recipe); each checks the loss falls, the checkpoint
layout (atomic save, keep-last-K, `latest`, client state), the resolved recipe and TensorBoard.
"""
from __future__ import annotations

from pathlib import Path

import pytest
import torch

from dsembed.config import load_recipe

from launch import check, launch, metrics

VARIANTS = {
    "model1": ["pooling={type: last_token}", "attention.mode=causal"],
    "model5": [],  # the tiny recipe: multi_layer_attention, bidirectional
}
SCALARS = ["train/loss", "train/lr", "train/grad_norm", "train/accuracy", "train/positive_cosine",
           "train/negative_cosine", "perf/tokens_per_s", "perf/samples_per_s", "perf/peak_memory_mib",
           "perf/step_time_s"]


def _events(folder: Path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(folder), size_guidance={"scalars": 0, "histograms": 0, "images": 0, "tensors": 0})
    acc.Reload()
    return acc


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_zero3_two_ranks_lora_checkpointing_trains(tmp_path: Path, variant: str) -> None:
    out = tmp_path / "run"
    run = launch([f"train.output_dir={out}", "model.gradient_checkpointing=true", "lora.enabled=true",
                  "train.max_steps=30", "train.save_steps=10", "train.save_total_limit=2",
                  "logging.histogram_steps=10", *VARIANTS[variant]])
    check(run)

    rows = metrics(out)
    assert [r["step"] for r in rows] == list(range(1, 31))
    losses = [r["train/loss"] for r in rows]
    first, last = sum(losses[:5]) / 5, sum(losses[-5:]) / 5
    assert last < 0.8 * first, f"{variant}: loss did not fall: first5 {first:.3f} last5 {last:.3f}: {losses}"

    ckpt = out / "checkpoints"
    assert sorted(p.name for p in ckpt.iterdir() if p.is_dir()) == ["step-20", "step-30"]
    assert (ckpt / "latest").read_text().strip() == "step-30"
    assert sorted(p.name for p in (ckpt / "step-30").glob("rng_rank*.pt")) == ["rng_rank0.pt", "rng_rank1.pt"]
    state = torch.load(next((ckpt / "step-30").glob("*model_states.pt")), weights_only=False)
    assert state["step"] == 30 and state["world_size"] == 2
    resolved = load_recipe(out / "recipe.yaml")
    assert resolved.to_yaml() == state["recipe"]
    assert resolved.model.gradient_checkpointing and resolved.pooling.type == ("last_token" if variant == "model1" else "multi_layer_attention")

    acc = _events(out / "tensorboard")
    tags = acc.Tags()
    for tag in SCALARS:
        assert tag in tags["scalars"], f"missing scalar {tag}: {tags['scalars']}"
        assert len(acc.Scalars(tag)) == 30
    assert any("recipe" in t for t in tags["tensors"])
    assert all(s.value > 0 for s in acc.Scalars("train/grad_norm"))
    assert max(s.value for s in acc.Scalars("train/lr")) == pytest.approx(2e-3)
    if variant == "model5":
        assert "layer_weights/values" in tags["histograms"]
        assert [e.step for e in acc.Histograms("layer_weights/values")] == [10, 20, 30]
        assert "layer_weights/heatmap" in tags["images"]
        # the layer weights are gathered from their ZeRO-3 partitions: 4 layers x hidden 64
        assert acc.Histograms("layer_weights/values")[0].histogram_value.num == 4 * 64
        # W gets gradients under ZeRO-3: its gathered rows move between logged steps (no weight decay on W)
        for layer in range(1, 5):
            norms = [e.value for e in acc.Scalars(f"layer_weights/norm/layer_{layer}")]
            assert len(norms) == 3 and len(set(norms)) == 3, (layer, norms)
            assert len(acc.Scalars(f"layer_weights/change/layer_{layer}")) == 3
        # its change from step 0's W (also gathered from the partitions) grows from 0 and is recorded
        changes = [r["layer_weights/change"] for r in rows if "layer_weights/change" in r]
        assert len(changes) == 3 and 0 < changes[0] < changes[2], changes
        assert state["layer_weights_init"].shape == (4, 64)  # the whole W0, for a resume
    else:
        assert "layer_weights/values" not in tags["histograms"]
        assert not any("layer_weights/change" in r for r in rows)
