"""The DeepSpeed config of a run, built from a ZeRO template (ds_configs/) and the recipe.

The templates hold the ZeRO settings; batch sizes, precision, clipping and the optimizer come from
the recipe, so one recipe key never disagrees with a JSON file. "auto" fields that depend on the
model (bucket sizes) are filled once the hidden size is known (`finish_ds_config`). Plain JSON
work: this module does not import deepspeed (dsembed.training.engine does).
"""
from __future__ import annotations

import copy
import json
import sys
from pathlib import Path
from typing import Any


from dsembed.config import Recipe
from dsembed.errors import RecipeError


# A source checkout keeps the templates at the repo root; an installed wheel under <prefix>/share/dsembed.
TEMPLATE_DIRS = [Path(__file__).resolve().parents[2] / "ds_configs", Path(sys.prefix) / "share" / "dsembed" / "ds_configs"]


# ----------------------------------------------------------------------------- ds-config


def _template_path(recipe: Recipe) -> Path:
    ds = recipe.deepspeed
    where = recipe.source or "<recipe>"
    if ds.template is not None:
        path = recipe.resolve_path(ds.template)
        if not path.is_file():
            named = [d / ds.template for d in TEMPLATE_DIRS if (d / ds.template).is_file()]
            if not named:
                raise RecipeError(f"{where}: deepspeed.template = {ds.template!r} not found (give a path to a DeepSpeed JSON file)")
            path = named[0]
        return path
    name = "zero3_offload.json" if ds.offload else ("zero3.json" if ds.zero_stage == 3 else "zero2.json")
    for folder in TEMPLATE_DIRS:
        if (folder / name).is_file():
            return folder / name
    raise RecipeError(f"{where}: the DeepSpeed template {name} is missing from {TEMPLATE_DIRS[-1]} (reinstall dsembed or set deepspeed.template)")


def _merge(base: dict[str, Any], extra: dict[str, Any]) -> dict[str, Any]:
    out = copy.deepcopy(base)
    for key, value in extra.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = _merge(out[key], value)
        else:
            out[key] = copy.deepcopy(value)
    return out


def _autos(node: Any, prefix: str = "") -> list[str]:
    if isinstance(node, dict):
        return [k for key, v in node.items() for k in _autos(v, f"{prefix}{key}.")]
    return [prefix.rstrip(".")] if node == "auto" else []


def build_ds_config(recipe: Recipe, hidden_size: int | None = None) -> dict[str, Any]:
    """The DeepSpeed JSON for a recipe: template + "auto" fields from the recipe + overrides.

    Args:
        recipe: the validated recipe (`deepspeed.*`, `train.*`, `optim.max_grad_norm`, `model.dtype`).
        hidden_size: the backbone's hidden size, for ZeRO bucket sizes (as transformers does);
            None leaves those fields for `finish_ds_config` once the model is built.

    Returns:
        A plain dict; "auto" is left only in the hidden-size fields when hidden_size is None.

    Raises:
        RecipeError: missing/invalid template, a stage that contradicts deepspeed.zero_stage, or an
            "auto" the recipe cannot fill.
    """
    where = recipe.source or "<recipe>"
    path = _template_path(recipe)
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as err:
        raise RecipeError(f"{path}:{err.lineno}: invalid JSON in the DeepSpeed template ({err.msg})") from None
    zero = config.setdefault("zero_optimization", {})
    stage = recipe.deepspeed.zero_stage
    if recipe.deepspeed.template is None:
        zero["stage"] = stage
    elif zero.get("stage", 0) != stage:
        raise RecipeError(f"{where}: deepspeed.template {path.name} has stage {zero.get('stage', 0)} but deepspeed.zero_stage = {stage} (make them agree)")
    dtype = recipe.model.dtype
    if dtype == "auto":  # the trainer resolves it first; resolving again gives the same answer
        from dsembed.modeling.precision import resolve_dtype

        dtype = resolve_dtype(dtype).dtype
    fills = {
        "train_micro_batch_size_per_gpu": recipe.train.micro_batch_size,
        "gradient_accumulation_steps": recipe.train.gradient_accumulation_steps,
        "gradient_clipping": recipe.optim.max_grad_norm,
        "bf16.enabled": dtype == "bfloat16",
        "fp16.enabled": dtype == "float16",
    }
    _fill(config, fills)
    config.pop("train_batch_size", None)  # DeepSpeed derives it: micro x accumulation x world
    config = _merge(config, recipe.deepspeed.overrides)
    if hidden_size is not None:
        finish_ds_config(config, hidden_size)
    left = [k for k in _autos(config) if k not in _HIDDEN_FIELDS]
    if left:
        raise RecipeError(f"{where}: DeepSpeed config field(s) {', '.join(left)} are 'auto' but the recipe cannot fill them (set them in deepspeed.overrides)")
    return config


_HIDDEN_FIELDS = ("zero_optimization.reduce_bucket_size", "zero_optimization.stage3_prefetch_bucket_size",
                  "zero_optimization.stage3_param_persistence_threshold")


def _fill(config: dict[str, Any], fills: dict[str, Any]) -> None:
    for dotted, value in fills.items():
        *parents, leaf = dotted.split(".")
        node = config
        for part in parents:
            node = node.get(part) if isinstance(node, dict) else None
        if isinstance(node, dict) and node.get(leaf) == "auto":
            node[leaf] = value


def finish_ds_config(config: dict[str, Any], hidden_size: int) -> None:
    """Fill the bucket sizes that depend on the hidden size, in place (transformers' rule of thumb).

    In place because transformers' `HfDeepSpeedConfig` holds this very dict.
    """
    sizes = (hidden_size * hidden_size, int(0.9 * hidden_size * hidden_size), 10 * hidden_size)
    _fill(config, dict(zip(_HIDDEN_FIELDS, sizes)))
