"""The weights an EmbeddingModel saves: the backbone's plain state dict, LoRA merged at a safe precision.

Merging LoRA into bf16 / fp16 weights would round the delta away (a delta below a weight's bf16
resolution, ~0.4% of its magnitude, vanishes): a merged low-precision backbone is written in
float32 instead (`merged_dtype`), so the export computes what the live engine computes.
"""
from __future__ import annotations

import json
import warnings
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

import torch
from torch import nn



def merged_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype a LoRA-merged backbone is written in: float32 unless it already is float32 / float64.

    Merged into bf16 weights, a LoRA delta below a weight's bf16 resolution (2^-8 of its magnitude)
    vanishes and larger ones are quantised: measured on a bf16 run the rounded export drifts from
    the live engine (README, "Exact export of bf16 runs"); in float32 it does not.
    """
    return dtype if dtype in (torch.float32, torch.float64) else torch.float32


DTYPE_NAMES = {torch.float32: "float32", torch.bfloat16: "bfloat16", torch.float16: "float16", torch.float64: "float64"}


def set_config_dtype(config_path: Path, dtype: torch.dtype) -> None:
    # save_pretrained records the live parameters' dtype, not the state dict's
    config = json.loads(config_path.read_text(encoding="utf-8"))
    config["dtype"] = DTYPE_NAMES[dtype]
    config_path.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n", encoding="utf-8")


def plain_state_dict(base: nn.Module, merge: bool, dtype: torch.dtype | None = None) -> dict[str, torch.Tensor]:
    """The backbone's state dict under its original key names, LoRA weights removed (merged in if `merge`).

    Out of place: peft's `get_delta_weight` gives each adapter's delta; the live model is untouched.
    With `dtype` every tensor is cast to it and each delta is added in that dtype (float32 keeps a
    small delta that bf16 would round away).
    """
    from peft.tuners.lora import LoraLayer

    state: dict[str, torch.Tensor] = {}
    for key, tensor in base.state_dict().items():
        if any(part.startswith("lora_") for part in key.split(".")):
            continue
        state[key.replace(".base_layer.", ".")] = tensor if dtype is None or not tensor.is_floating_point() else tensor.to(dtype)
    if merge:
        for name, module in base.named_modules():
            if isinstance(module, LoraLayer) and hasattr(module, "base_layer"):
                key = f"{name}.weight"
                weight = state[key]
                for adapter in module.active_adapters:
                    if adapter in module.lora_A:
                        weight = weight + module.get_delta_weight(adapter).to(weight.dtype)
                state[key] = weight.detach()
    return state


@contextmanager
def quiet_peft() -> Iterator[None]:
    # peft 0.21 reads transformers' deprecated is_gradient_checkpointing alias (a FutureWarning per call)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)
        yield
