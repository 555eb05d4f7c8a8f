"""Switch a decoder between causal and bidirectional attention, in place and idempotently.

transformers 5 builds a bidirectional padding mask when `config.is_causal` is False (eager, sdpa,
flex and flash attention all honour it), and the attention call reads the flag from each
attention module for the paths that skip the mask. We set both; no modeling code is copied or
monkey-patched. Only architectures where this was verified are allowed to go bidirectional:
a model whose mask builder ignores the flag would stay silently causal.
"""
from __future__ import annotations

from torch import nn

from dsembed.errors import RecipeError
from dsembed.modeling.backbone import model_type, unwrap

# Verified (tests/unit/test_attention.py): changing the last token changes token 0's state.
BIDIRECTIONAL_ARCHITECTURES = ("llama", "mistral", "qwen2", "qwen3")
MODES = ("causal", "bidirectional")


def set_attention_mode(model: nn.Module, mode: str) -> nn.Module:
    """Make `model` attend causally or bidirectionally; calling it twice changes nothing more.

    Causal is every decoder's native behaviour and is accepted for any architecture;
    bidirectional only for `BIDIRECTIONAL_ARCHITECTURES`.

    Args:
        model: a transformers decoder, possibly wrapped by peft.
        mode: "causal" or "bidirectional".

    Returns:
        The same model object.

    Raises:
        RecipeError: an unknown mode, or bidirectional on an architecture not in the allowlist.
    """
    if mode not in MODES:
        raise RecipeError(f"attention.mode = {mode!r} should be one of {', '.join(MODES)}")
    kind = model_type(model)
    if mode == "bidirectional" and kind not in BIDIRECTIONAL_ARCHITECTURES:
        raise RecipeError(f"attention.mode = bidirectional is not supported for the {kind!r} architecture "
                          f"(supported: {', '.join(BIDIRECTIONAL_ARCHITECTURES)}); use attention.mode: causal")
    causal = mode == "causal"
    base = unwrap(model)
    base.config.is_causal = causal
    for module in base.modules():
        # attention modules carry the flag the sdpa / flash paths read when no mask is built
        if "is_causal" in vars(module) and isinstance(module.is_causal, bool):
            module.is_causal = causal
    return model


def attention_mode(model: nn.Module) -> str:
    """The mode `model` is in now: "bidirectional" when its config says not causal."""
    return "causal" if getattr(unwrap(model).config, "is_causal", True) else "bidirectional"
