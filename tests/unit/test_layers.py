"""Layer taps equal output_hidden_states' masked means (layer i = hidden_states[i], layer L after the
final norm), with and without gradient checkpointing, gradients included; top-K selects the last K."""
from __future__ import annotations

import pytest
import torch

from dsembed.config import ModelConfig, MultiLayerAttentionPooling
from dsembed.modeling import LayerTaps, build_pooler, load_backbone, masked_mean, set_attention_mode
from tests.conftest import tiny_backbone_config

DEPTH = 16


@pytest.fixture(scope="module")
def deep():
    torch.manual_seed(0)
    model, _ = load_backbone(ModelConfig(random_init=tiny_backbone_config("llama", layers=DEPTH, hidden=16),
                                         tokenizer="bytes"))
    set_attention_mode(model, "bidirectional")
    return model


def _batch():
    ids = torch.randint(4, 260, (3, 7), generator=torch.Generator().manual_seed(1))
    mask = torch.ones_like(ids)
    mask[0, :3] = 0  # left padded
    mask[1, 5:] = 0  # right padded
    return ids, mask


def _reference(model, ids, mask, layers):
    """Masked means from output_hidden_states: hidden_states[i] is decoder layer i's output, [-1] is normed."""
    out = model(input_ids=ids, attention_mask=mask, output_hidden_states=True)
    hs = out.hidden_states
    assert len(hs) == len(model.layers) + 1
    assert torch.equal(hs[-1], out.last_hidden_state)
    return torch.stack([masked_mean(hs[i], mask) for i in layers], dim=1)  # [B, K, D]


@pytest.mark.parametrize("spec,expected", [("top-4", list(range(13, 17))), ("top-8", list(range(9, 17))),
                                           ("top-16", list(range(1, 17))), ("all", list(range(1, 17))),
                                           ([2, 7, 16], [2, 7, 16])])
def test_layer_selection(spec, expected):
    pooler = build_pooler(MultiLayerAttentionPooling(layers=spec, num_latents=4, num_heads=2), 16, DEPTH)
    assert pooler.tapped_layers == expected
    assert pooler.layer_weights.shape == (len(expected), 16)


def test_layer_weights_off_has_no_parameter():
    pooler = build_pooler(MultiLayerAttentionPooling(layers="top-4", layer_weights=False, num_latents=4, num_heads=2), 16, DEPTH)
    names = [n for n, _ in pooler.named_parameters()]
    assert not any("layer_weights" in n for n in names) and not hasattr(pooler, "layer_weights")


@pytest.mark.parametrize("layers", [[1, 2, 3, 4], list(range(13, 17)), list(range(1, 17))])
def test_taps_equal_output_hidden_states(deep, layers):
    deep.eval()
    ids, mask = _batch()
    taps = LayerTaps(deep, layers)
    before = sum(len(m._forward_hooks) for m in deep.modules())
    with torch.no_grad():
        with taps.capture(mask):
            deep(input_ids=ids, attention_mask=mask)
        got = taps.stacked()
        after = sum(len(m._forward_hooks) for m in deep.modules())
        want = _reference(deep, ids, mask, layers)
    assert got.shape == (3, len(layers), 16)
    torch.testing.assert_close(got, want, rtol=0, atol=0)
    assert after == before  # our hooks are gone after the capture (transformers adds its own later)


@pytest.mark.parametrize("checkpointing", [False, True])
def test_taps_gradients_match_with_checkpointing(checkpointing):
    torch.manual_seed(0)
    model, _ = load_backbone(ModelConfig(random_init=tiny_backbone_config("qwen2", layers=4, hidden=16), tokenizer="bytes"))
    model.train()
    if checkpointing:
        model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    layers = [1, 3, 4]
    ids, mask = _batch()
    weight = torch.randn(3, len(layers), 16, generator=torch.Generator().manual_seed(2))

    taps = LayerTaps(model, layers)
    with taps.capture(mask):
        model(input_ids=ids, attention_mask=mask)
    got = taps.stacked()
    (got * weight).sum().backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()

    if checkpointing:
        model.activation_checkpointing_disable()
    want = _reference(model, ids, mask, layers)
    (want * weight).sum().backward()
    torch.testing.assert_close(got, want, rtol=0, atol=1e-6)
    for name, p in model.named_parameters():
        torch.testing.assert_close(grads[name], p.grad, rtol=1e-5, atol=1e-6, msg=name)
    assert grads["layers.0.self_attn.q_proj.weight"].abs().sum() > 0


def test_layer_out_of_range():
    torch.manual_seed(0)
    model, _ = load_backbone(ModelConfig(random_init=tiny_backbone_config("llama"), tokenizer="bytes"))
    with pytest.raises(ValueError):
        LayerTaps(model, [3])


def test_masked_mean_ignores_nan_and_inf_at_padded_positions():
    hidden = torch.randn(2, 4, 3)  # [B, T, D]
    mask = torch.tensor([[0, 1, 1, 1], [1, 1, 0, 0]])
    expected = torch.stack([hidden[0, 1:].mean(0), hidden[1, :2].mean(0)])  # [B, D]
    poisoned = hidden.clone()
    poisoned[0, 0] = float("nan")
    poisoned[1, 3] = float("inf")
    got = masked_mean(poisoned, mask)
    assert torch.isfinite(got).all()
    torch.testing.assert_close(got, expected)
