"""bf16 training on CPU, 2 ranks, DeepSpeed ZeRO-2 and ZeRO-3, LoRA and full fine-tuning.

DeepSpeed's bf16 mode: the model computes in bf16 (weights, LoRA adapters and head), the optimizer
keeps float32 master weights and float32 AdamW state. One torchrun launch (tests/e2e/train_variants.py)
trains every case; checked: the loss falls, the checkpoint's model states are bf16 and its optimizer
states float32 (with master values that bf16 cannot hold), a run stopped at step 6 and resumed equals
the uninterrupted run, and `model.dtype: auto` is resolved once (one line, rank 0) and recorded.
"""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from dsembed.config import load_recipe
from dsembed.modeling.precision import resolve_dtype
from dsembed.training.engine import fp32_state_dict

from launch import REPO, TINY, check, env, metrics

STEPS = 12
CASES = {  # ZeRO-2 first (tests/e2e/train_variants.py)
    "zero2-lora": ["deepspeed.zero_stage=2"],
    "zero2-full": ["deepspeed.zero_stage=2", "lora.enabled=false", "optim.lr=5.0e-4"],
    "zero3-lora": ["deepspeed.zero_stage=3"],
    "zero3-full": ["deepspeed.zero_stage=3", "lora.enabled=false", "optim.lr=5.0e-4"],
}


def _tensors(node, path=""):
    if isinstance(node, torch.Tensor):
        yield path, node
    elif isinstance(node, dict):
        for key, value in node.items():
            yield from _tensors(value, f"{path}.{key}")
    elif isinstance(node, (list, tuple)):
        for i, value in enumerate(node):
            yield from _tensors(value, f"{path}[{i}]")


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, subprocess.CompletedProcess]:
    root = tmp_path_factory.mktemp("bf16")
    common = ["model.dtype=bfloat16", f"train.max_steps={STEPS}", f"train.save_steps={STEPS // 2}",
              "train.save_total_limit=2", "model.gradient_checkpointing=true"]
    spec_runs = [{"overrides": [f"train.output_dir={root / name}", *common, *over]} for name, over in CASES.items()]
    split = [f"train.output_dir={root / 'split'}", *common, *CASES["zero3-lora"]]
    spec_runs += [{"overrides": [*split, f"train.stop_after={STEPS // 2}"]}, {"overrides": split}]  # stop, then resume
    spec_runs += [{"overrides": [f"train.output_dir={root / 'auto'}", "model.dtype=auto", "train.max_steps=2",
                                 "train.save_steps=2", "deepspeed.zero_stage=3"]}]
    (root / "spec.json").write_text(json.dumps({"recipe": str(TINY), "runs": spec_runs}), encoding="utf-8")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           str(REPO / "tests" / "e2e" / "train_variants.py"), str(root / "spec.json")]
    run = subprocess.run(cmd, cwd=REPO, env=env(), capture_output=True, text=True, timeout=900)
    check(run)
    return root, run


@pytest.mark.parametrize("name", list(CASES))
def test_bf16_trains_with_float32_master_weights(runs, name: str) -> None:
    root, _ = runs
    out = root / name
    losses = [r["train/loss"] for r in metrics(out)]
    assert len(losses) == STEPS and all(torch.isfinite(torch.tensor(losses)))
    assert sum(losses[-3:]) / 3 < 0.8 * sum(losses[:3]) / 3, f"{name}: loss did not fall: {losses}"
    assert load_recipe(out / "recipe.yaml").model.dtype == "bfloat16"

    ckpt = out / "checkpoints" / f"step-{STEPS}"
    model_states = sorted(ckpt.glob("*model_states.pt"))
    optim_states = sorted(ckpt.glob("*optim_states.pt"))
    assert len(optim_states) == 2 and all(p.name.startswith("bf16_") for p in optim_states)
    module = torch.load(model_states[0], map_location="cpu", weights_only=False)["module"]
    floats = {t.dtype for _, t in _tensors(module) if t.is_floating_point()}
    assert floats == {torch.bfloat16}, floats  # the model itself computes in bf16
    optim = torch.load(optim_states[0], map_location="cpu", weights_only=False)["optimizer_state_dict"]
    big = [(p, t) for p, t in _tensors(optim) if t.is_floating_point() and t.numel() > 1]
    assert big and {t.dtype for _, t in big} == {torch.float32}, {p: t.dtype for p, t in big if t.dtype != torch.float32}
    assert any("exp_avg_sq" in p for p, _ in big)  # AdamW state in float32 too

    masters = fp32_state_dict(out / "checkpoints", f"step-{STEPS}")
    trained = [k for k in masters if ("lora_" in k if "lora" in name else "q_proj" in k)]
    assert trained
    # float32 masters hold values that bf16 cannot: the updates are not rounded away
    assert any((masters[k] != masters[k].bfloat16().float()).any() for k in trained)


def test_bf16_resume_equals_uninterrupted(runs) -> None:
    root, _ = runs
    whole, split = metrics(root / "zero3-lora"), metrics(root / "split")
    assert [r["step"] for r in split] == list(range(1, STEPS + 1))
    for a, b in zip(whole, split):
        assert abs(a["train/loss"] - b["train/loss"]) < 1e-5, (a["step"], a["train/loss"], b["train/loss"])
    expected = fp32_state_dict(root / "zero3-lora" / "checkpoints", f"step-{STEPS}")
    got = fp32_state_dict(root / "split" / "checkpoints", f"step-{STEPS}")
    assert expected.keys() == got.keys()
    assert max((expected[k] - got[k]).abs().max().item() for k in expected) <= 1e-6


def test_auto_is_resolved_once_and_recorded(runs) -> None:
    root, run = runs
    choice = resolve_dtype("auto", "cpu")
    assert load_recipe(root / "auto" / "recipe.yaml").model.dtype == choice.dtype
    state = torch.load(next((root / "auto" / "checkpoints" / "step-2").glob("*model_states.pt")),
                       map_location="cpu", weights_only=False)
    assert load_recipe(root / "auto" / "recipe.yaml").to_yaml() == state["recipe"]
    assert run.stderr.count("dtype: auto -> ") == 1 and choice.line() in run.stderr
