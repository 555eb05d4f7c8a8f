"""Attention mode: causal keeps token 0 blind to later tokens, bidirectional does not; idempotent; allowlist."""
from __future__ import annotations

import pytest
import torch

from dsembed.config import ModelConfig
from dsembed.errors import RecipeError
from dsembed.modeling import attention_mode, load_backbone, set_attention_mode
from tests.conftest import tiny_backbone_config

ARCHS = ["llama", "qwen2", "mistral", "qwen3"]


def _backbone(arch: str, impl: str = "sdpa"):
    torch.manual_seed(0)
    model, _ = load_backbone(ModelConfig(random_init=tiny_backbone_config(arch), tokenizer="bytes", attn_implementation=impl))
    return model.eval()


def _token0_shift(model) -> float:
    """How much token 0's final state moves when only the last token changes."""
    ids = torch.tensor([[10, 20, 30, 40, 50, 60]])
    changed = ids.clone()
    changed[0, -1] = 99
    mask = torch.ones_like(ids)
    with torch.no_grad():
        a = model(input_ids=ids, attention_mask=mask).last_hidden_state[0, 0]
        b = model(input_ids=changed, attention_mask=mask).last_hidden_state[0, 0]
    return (a - b).abs().max().item()


@pytest.mark.parametrize("impl", ["sdpa", "eager"])
@pytest.mark.parametrize("arch", ARCHS)
def test_causal_vs_bidirectional(arch, impl):
    model = _backbone(arch, impl)
    set_attention_mode(model, "causal")
    assert attention_mode(model) == "causal"
    assert _token0_shift(model) == 0.0
    set_attention_mode(model, "bidirectional")
    assert attention_mode(model) == "bidirectional"
    assert _token0_shift(model) > 1e-4


def test_idempotent_and_reversible():
    model = _backbone("llama")
    ids = torch.tensor([[5, 6, 7, 8]])
    with torch.no_grad():
        causal = model(input_ids=ids).last_hidden_state
        set_attention_mode(model, "bidirectional")
        once = model(input_ids=ids).last_hidden_state
        set_attention_mode(model, "bidirectional")
        twice = model(input_ids=ids).last_hidden_state
        set_attention_mode(model, "causal")
        back = model(input_ids=ids).last_hidden_state
    assert torch.equal(once, twice)
    assert not torch.allclose(once, causal)
    assert torch.equal(back, causal)
    flags = [m.is_causal for m in model.modules() if "is_causal" in vars(m)]
    assert flags and all(flags)


def test_unsupported_architecture_names_the_key():
    cfg = {"model_type": "gpt2", "n_embd": 32, "n_layer": 2, "n_head": 4, "vocab_size": 260, "n_positions": 64}
    model, _ = load_backbone(ModelConfig(random_init=cfg, tokenizer="bytes"))
    with pytest.raises(RecipeError, match=r"attention\.mode.*gpt2"):
        set_attention_mode(model, "bidirectional")
    set_attention_mode(model, "causal")  # native behaviour: always allowed


def test_unknown_mode():
    with pytest.raises(RecipeError, match="attention.mode"):
        set_attention_mode(_backbone("llama"), "sideways")


def test_flash_attention_without_package_is_a_recipe_error():
    import importlib.util

    if importlib.util.find_spec("flash_attn") is not None:
        pytest.skip("flash_attn is installed here")
    with pytest.raises(RecipeError, match="flash"):
        load_backbone(ModelConfig(random_init=tiny_backbone_config("llama"), tokenizer="bytes",
                                  attn_implementation="flash_attention_2"))
