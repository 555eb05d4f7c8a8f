"""Recipe rules that single fields cannot express: layer specs, head sizes and cross-section checks.

`validate()` runs after the strict schema (dsembed.config) has accepted every key and type: batch
arithmetic against the world size, layer indices against the backbone's depth, pooling options that
belong to the chosen head. Every failure is a `RecipeError` naming the recipe and the key, with the fix.
"""
from __future__ import annotations

import re
from typing import Any


from dsembed.errors import RecipeError
from dsembed.config import PAPER_HEAD, LatentAttentionPooling, MultiLayerAttentionPooling, Recipe


# ----------------------------------------------------------------------------- cross-section rules

_TOP_K = re.compile(r"^top-(\d+)$")


def resolve_layers(spec: str | list[int], num_layers: int, where: str = "<recipe>") -> list[int]:
    """The 1-based decoder-layer indices a multi-layer head reads, ascending.

    Args:
        spec: "all", "top-K" or an explicit list.
        num_layers: the backbone's number of decoder layers L.

    Raises:
        RecipeError: an unknown spec, K out of range, or an index outside 1..L.
    """
    if isinstance(spec, str):
        if spec == "all":
            return list(range(1, num_layers + 1))
        match = _TOP_K.match(spec)
        if not match:
            raise RecipeError(f"{where}: pooling.layers = {spec!r} should be 'all', 'top-K' or a list of indices")
        k = int(match.group(1))
        if not 1 <= k <= num_layers:
            raise RecipeError(f"{where}: pooling.layers = {spec!r} but the backbone has {num_layers} layers (use top-1..top-{num_layers})")
        return list(range(num_layers - k + 1, num_layers + 1))
    if not spec:
        raise RecipeError(f"{where}: pooling.layers is an empty list (name at least one layer)")
    bad = [i for i in spec if not 1 <= i <= num_layers]
    if bad:
        raise RecipeError(f"{where}: pooling.layers has {bad} outside 1..{num_layers} (the backbone's decoder layers)")
    if len(set(spec)) != len(spec):
        raise RecipeError(f"{where}: pooling.layers lists a layer twice (remove the duplicate)")
    return sorted(spec)


def head_sizes(pooling: LatentAttentionPooling | MultiLayerAttentionPooling) -> dict[str, Any]:
    """num_latents / num_heads / head_dim / ffn_mult / dropout after applying the preset."""
    sizes = {k: getattr(pooling, k) for k in ("num_latents", "num_heads", "head_dim", "ffn_mult", "dropout")}
    if pooling.preset == "paper":
        sizes.update(PAPER_HEAD)
    return sizes


def validate(recipe: Recipe, world_size: int | None = None, num_layers: int | None = None) -> Recipe:
    """Cross-section rules that single fields cannot express.

    Args:
        recipe: the recipe to check.
        world_size: number of ranks, when known (batch arithmetic is checked then).
        num_layers: the backbone's decoder depth, when known (layer indices are checked then);
            taken from `model.random_init` when that names `num_hidden_layers`.

    Returns:
        The same recipe, for chaining.

    Raises:
        RecipeError: naming the recipe and the key at fault, with the fix.
    """
    where = recipe.source or "<recipe>"
    m, t = recipe.model, recipe.train
    if (m.name_or_path is None) == (m.random_init is None):
        raise RecipeError(f"{where}: model: give exactly one of model.name_or_path or model.random_init")
    if m.random_init is not None and "model_type" not in m.random_init:
        raise RecipeError(f"{where}: model.random_init needs a model_type (e.g. llama, qwen2, mistral)")
    if m.gguf_file is not None and m.random_init is not None:
        raise RecipeError(f"{where}: model.gguf_file needs model.name_or_path, not random_init")
    if m.max_length < 2:
        raise RecipeError(f"{where}: model.max_length = {m.max_length} must be at least 2")
    if m.attn_implementation == "flash_attention_2" and m.dtype == "float32":
        raise RecipeError(f"{where}: model.attn_implementation = flash_attention_2 with model.dtype float32: flash-attn "
                          "computes in bfloat16 / float16 only (set model.dtype: bfloat16, or use sdpa)")
    if m.dtype == "float16" and recipe.deepspeed.zero_stage == 0:
        raise RecipeError(f"{where}: model.dtype float16 needs DeepSpeed loss scaling (zero_stage >= 1) or use bfloat16")
    positive = {"train.max_steps": t.max_steps, "train.micro_batch_size": t.micro_batch_size,
                "train.gradient_accumulation_steps": t.gradient_accumulation_steps,
                "train.save_steps": t.save_steps, "train.log_steps": t.log_steps,
                "lora.r": recipe.lora.r, "data.num_negatives + 1": recipe.data.num_negatives + 1}
    for key, value in positive.items():
        if value < 1:
            raise RecipeError(f"{where}: {key} = {value} must be at least 1")
    if t.save_total_limit < 1:
        raise RecipeError(f"{where}: train.save_total_limit = {t.save_total_limit} must be at least 1 (keep one checkpoint to resume from)")
    if t.stop_after is not None and t.stop_after < 1:
        raise RecipeError(f"{where}: train.stop_after = {t.stop_after} must be at least 1 (or null to run to train.max_steps)")
    if t.cache_chunk_size is not None and not 1 <= t.cache_chunk_size <= t.micro_batch_size:
        raise RecipeError(f"{where}: train.cache_chunk_size = {t.cache_chunk_size} must be within 1..train.micro_batch_size ({t.micro_batch_size})")
    if recipe.loss.temperature <= 0:
        raise RecipeError(f"{where}: loss.temperature must be positive")
    _check_loss_extras(recipe, where)
    _check_batching(recipe, where)
    o = recipe.optim
    if o.lr <= 0 or (o.head_lr is not None and o.head_lr <= 0):
        key = "optim.lr" if o.lr <= 0 else "optim.head_lr"
        raise RecipeError(f"{where}: {key} must be positive")
    non_negative = {"optim.warmup_steps": o.warmup_steps, "optim.weight_decay": o.weight_decay,
                    "optim.max_grad_norm": o.max_grad_norm}
    for key, value in non_negative.items():
        if value < 0:
            raise RecipeError(f"{where}: {key} = {value} must not be negative (0 turns it off)")
    e = recipe.eval
    if e.every_steps is not None:
        if e.every_steps < 1:
            raise RecipeError(f"{where}: eval.every_steps = {e.every_steps} must be at least 1 (or null: no evaluation during training)")
        if not e.tasks and e.tasks_dir is None:
            raise RecipeError(f"{where}: eval.every_steps needs eval.tasks (mteb names) or eval.tasks_dir (local tasks)")
    if e.limit is not None and e.limit < 2:
        raise RecipeError(f"{where}: eval.limit = {e.limit} must be at least 2 (or null: every test item)")
    if e.batch_size < 1:
        raise RecipeError(f"{where}: eval.batch_size = {e.batch_size} must be at least 1")
    if len(recipe.optim.betas) != 2:
        raise RecipeError(f"{where}: optim.betas should be two numbers, e.g. [0.9, 0.999]")
    if recipe.deepspeed.offload and recipe.deepspeed.zero_stage != 3:
        raise RecipeError(f"{where}: deepspeed.offload needs deepspeed.zero_stage: 3")
    if "{query}" not in recipe.data.query_template:
        raise RecipeError(f"{where}: data.query_template must contain {{query}}")
    if world_size is not None and t.global_batch_size is not None:
        product = t.micro_batch_size * t.gradient_accumulation_steps * world_size
        if product != t.global_batch_size:
            raise RecipeError(
                f"{where}: train.global_batch_size = {t.global_batch_size} but micro_batch_size x "
                f"gradient_accumulation_steps x world size = {t.micro_batch_size} x "
                f"{t.gradient_accumulation_steps} x {world_size} = {product} (change one of them)")
    pooling = recipe.pooling
    if isinstance(pooling, (LatentAttentionPooling, MultiLayerAttentionPooling)):
        if pooling.preset is not None:
            explicit = [k for k in PAPER_HEAD if getattr(pooling, k) != getattr(type(pooling)(), k)]
            if explicit:
                raise RecipeError(f"{where}: pooling.preset = {pooling.preset!r} sets {', '.join(explicit)}; remove those keys or the preset")
        sizes = head_sizes(pooling)
        for key in ("num_latents", "num_heads", "ffn_mult"):
            if sizes[key] < 1:
                raise RecipeError(f"{where}: pooling.{key} must be at least 1")
    if isinstance(pooling, MultiLayerAttentionPooling):
        depth = num_layers
        if depth is None and m.random_init is not None:
            depth = m.random_init.get("num_hidden_layers")
        if depth is not None:
            resolve_layers(pooling.layers, int(depth), where)
        elif isinstance(pooling.layers, str) and pooling.layers != "all" and not _TOP_K.match(pooling.layers):
            raise RecipeError(f"{where}: pooling.layers = {pooling.layers!r} should be 'all', 'top-K' or a list of indices")
    return recipe


def _check_loss_extras(recipe: Recipe, where: str) -> None:
    """loss.false_negative_margin and the Matryoshka sizes and weights."""
    loss = recipe.loss
    margin = loss.false_negative_margin
    if margin is not None and not 0 < margin <= 1:
        raise RecipeError(f"{where}: loss.false_negative_margin = {margin} must be within (0, 1] "
                          "(e.g. 0.95: mask candidates scoring above 95% of the positive's score; null: off)")
    dims, weights = loss.matryoshka_dims, loss.matryoshka_weights
    if any(d < 1 for d in dims) or len(set(dims)) != len(dims):
        raise RecipeError(f"{where}: loss.matryoshka_dims = {dims} should be distinct positive sizes, e.g. [64, 128, 256]")
    hidden = (recipe.model.random_init or {}).get("hidden_size")
    if isinstance(hidden, int) and dims and max(dims) > hidden:
        raise RecipeError(f"{where}: loss.matryoshka_dims = {dims} but the embedding has {hidden} dimensions (list sizes up to {hidden})")
    if weights and not dims:
        raise RecipeError(f"{where}: loss.matryoshka_weights needs loss.matryoshka_dims (one weight per size)")
    if weights and (len(weights) != len(dims) or any(w < 0 for w in weights) or sum(weights) <= 0):
        raise RecipeError(f"{where}: loss.matryoshka_weights = {weights} should be {len(dims)} non-negative numbers, "
                          "one per loss.matryoshka_dims entry, not all 0 (or leave it empty: weight 1 each)")


def _check_batching(recipe: Recipe, where: str) -> None:
    """data.source_weights belongs to by_source batching and holds non-negative weights."""
    data = recipe.data
    if data.source_weights and data.batching != "by_source":
        raise RecipeError(f"{where}: data.source_weights applies to data.batching: by_source (set it, or remove the weights)")
    bad = {k: v for k, v in data.source_weights.items() if v < 0}
    if bad:
        raise RecipeError(f"{where}: data.source_weights {bad}: weights must not be negative (0 leaves a source out)")
    if data.source_weights and not any(v > 0 for v in data.source_weights.values()):
        raise RecipeError(f"{where}: data.source_weights are all 0 (give at least one source a positive weight)")
