"""Pooling heads: padding never changes an embedding (either side, every head); head shapes and sizes."""
from __future__ import annotations

import pytest
import torch

from dsembed.config import LatentAttentionPooling, MultiLayerAttentionPooling, recipe_from_dict
from dsembed.modeling import build_model, build_pooler, count_head_parameters
from dsembed.modeling.pooling import LastTokenPooler, LatentAttentionPooler

POOLINGS = {
    "last_token": {"type": "last_token"},
    "mean": {"type": "mean"},
    "latent_attention": {"type": "latent_attention", "num_latents": 8, "num_heads": 4, "head_dim": 8},
    "multi_layer_attention": {"type": "multi_layer_attention", "layers": "all", "num_latents": 8, "num_heads": 4},
}
TEXTS = ["a short one", "this text is quite a bit longer than the others", "mid length text", "x"]


@pytest.mark.parametrize("attention", ["causal", "bidirectional"])
@pytest.mark.parametrize("side", ["left", "right"])
@pytest.mark.parametrize("pooling", list(POOLINGS))
def test_padding_never_changes_an_embedding(tiny_recipe, pooling, side, attention):
    arch = {"last_token": "llama", "mean": "qwen2", "latent_attention": "mistral", "multi_layer_attention": "llama"}[pooling]
    torch.manual_seed(0)
    model = build_model(tiny_recipe(arch, POOLINGS[pooling], attention, padding_side=side, normalize=False)).eval()
    batch = model.tokenize(TEXTS)
    assert (batch["attention_mask"] == 0).any()  # the batch really is padded
    with torch.no_grad():
        padded = model(**batch)  # [4, D]
        for i, text in enumerate(TEXTS):
            alone = model(**model.tokenize([text]))  # [1, D]
            torch.testing.assert_close(padded[i], alone[0], rtol=0, atol=1e-5)
    assert padded.shape == (4, 32)


def test_last_token_either_side():
    hidden = torch.arange(2 * 4 * 3, dtype=torch.float32).view(2, 4, 3)  # [B=2, T=4, D=3]
    left = torch.tensor([[0, 0, 1, 1], [1, 1, 1, 1]])
    right = torch.tensor([[1, 1, 0, 0], [1, 1, 1, 1]])
    pool = LastTokenPooler()
    assert torch.equal(pool(hidden, left), torch.stack([hidden[0, 3], hidden[1, 3]]))
    assert torch.equal(pool(hidden, right), torch.stack([hidden[0, 1], hidden[1, 3]]))


def test_latent_attention_masks_padding():
    torch.manual_seed(0)
    pooler = LatentAttentionPooler(16, {"num_latents": 4, "num_heads": 2, "head_dim": 8, "ffn_mult": 2, "dropout": 0.0})
    states = torch.randn(1, 5, 16)
    mask = torch.tensor([[1, 1, 1, 0, 0]])
    garbage = states.clone()
    garbage[0, 3:] = float("nan")  # padded positions must not matter, not even NaNs
    ref = pooler(states[:, :3], torch.ones(1, 3, dtype=torch.long))
    torch.testing.assert_close(pooler(garbage, mask), ref, rtol=0, atol=1e-6)
    assert ref.shape == (1, 16)


def test_head_sizes_and_projection_back_to_hidden():
    pooler = build_pooler(LatentAttentionPooling(num_latents=6, num_heads=3, head_dim=10, ffn_mult=2), 12, 4)
    block = pooler.block
    assert block.latents.shape == (6, 12)
    assert block.to_q.weight.shape == (30, 12) and block.to_kv.weight.shape == (60, 12)
    assert block.to_out.weight.shape == (12, 30)  # heads x head_dim -> D
    assert block.ffn_in.weight.shape == (2 * 2 * 12, 12) and block.ffn_out.weight.shape == (12, 24)  # GEGLU
    assert pooler(torch.randn(2, 5, 12), torch.ones(2, 5)).shape == (2, 12)
    # default head_dim: D // num_heads
    assert build_pooler(LatentAttentionPooling(num_latents=2, num_heads=4), 12, 4).block.to_q.weight.shape == (12, 12)


def test_multi_layer_head_uses_layer_means():
    torch.manual_seed(0)
    pooler = build_pooler(MultiLayerAttentionPooling(layers=[1, 3], num_latents=4, num_heads=2), 8, 3)
    with torch.no_grad():
        pooler.layer_weights.normal_()
    means = torch.randn(2, 2, 8)
    out = pooler(torch.randn(2, 5, 8), torch.ones(2, 5), means)
    other = pooler(torch.randn(2, 5, 8), torch.ones(2, 5), means)  # token states do not matter, only the means
    torch.testing.assert_close(out, other)
    assert not torch.allclose(out, pooler(torch.randn(2, 5, 8), torch.ones(2, 5), torch.randn(2, 2, 8)))
    with pytest.raises(ValueError):
        pooler(torch.randn(2, 5, 8), torch.ones(2, 5), None)


def test_layer_weights_start_standard_normal_as_the_paper_or_zeros():
    torch.manual_seed(0)
    normal = build_pooler(MultiLayerAttentionPooling(layers="all", num_latents=4, num_heads=2), 64, 6)
    w = normal.layer_weights.detach()  # [K=6, D=64]
    assert w.shape == (6, 64)
    assert abs(w.mean().item()) < 0.2 and 0.8 < w.std().item() < 1.2  # nn.Embedding's N(0, 1)
    zeros = build_pooler(MultiLayerAttentionPooling(layers="all", layer_weights_init="zeros", num_latents=4, num_heads=2), 64, 6)
    assert torch.count_nonzero(zeros.layer_weights) == 0


def test_layer_weights_change_the_embedding_at_initialisation():
    """With the paper's init, "with W" and "without W" are different models before any training."""
    torch.manual_seed(0)
    pooler = build_pooler(MultiLayerAttentionPooling(layers="all", num_latents=4, num_heads=2), 16, 3).eval()
    means = torch.randn(2, 3, 16)  # [B, K, D]
    token_states, mask = torch.randn(2, 5, 16), torch.ones(2, 5)
    with torch.no_grad():
        with_w = pooler(token_states, mask, means)
        pooler.layer_weights.zero_()
        without_w = pooler(token_states, mask, means)
    assert (with_w - without_w).norm(dim=-1).min() > 1e-2 * without_w.norm(dim=-1).max()


def test_only_layer_weights_give_the_layers_an_identity():
    """Attention over K unmasked layer vectors is invariant to their order; W breaks the symmetry."""
    torch.manual_seed(0)
    means = torch.randn(2, 4, 16)  # [B, K, D]
    order = torch.tensor([2, 0, 3, 1])
    token_states, mask = torch.randn(2, 5, 16), torch.ones(2, 5)
    plain = build_pooler(MultiLayerAttentionPooling(layers="all", layer_weights=False, num_latents=4, num_heads=2), 16, 4)
    assert not hasattr(plain, "layer_weights")
    with torch.no_grad():
        torch.testing.assert_close(plain(token_states, mask, means), plain(token_states, mask, means[:, order]),
                                   rtol=0, atol=1e-6)
        torch.manual_seed(0)
        weighted = build_pooler(MultiLayerAttentionPooling(layers="all", num_latents=4, num_heads=2), 16, 4)
        out, permuted = weighted(token_states, mask, means), weighted(token_states, mask, means[:, order])
    assert (out - permuted).abs().max() > 1e-3


def test_count_head_parameters_matches_and_paper_size():
    cfg = MultiLayerAttentionPooling(layers="top-2", num_latents=5, num_heads=2, head_dim=6)
    assert count_head_parameters(cfg, 16, 4) == build_pooler(cfg, 16, 4).num_parameters()
    paper = count_head_parameters(LatentAttentionPooling(preset="paper"), 4096, 32)
    assert 1.27e9 < paper < 1.29e9  # the paper's head at Mistral-7B size
    multi = count_head_parameters(MultiLayerAttentionPooling(preset="paper"), 4096, 32)
    assert multi - paper == 32 * 4096  # + W[K, D]
    assert build_pooler(recipe_from_dict({}).pooling, 16, 4).num_parameters() == 0


def test_chunked_checkpointed_head_equals_plain_formula():
    """The head streams over chunks of latents (each checkpointed with a graph); the result and the
    gradients equal the plain formula mean_N(x + ffn_out(GEGLU(x))) over all latents at once."""
    import torch.nn.functional as F

    from dsembed.modeling.pooling import LatentCrossAttention

    torch.manual_seed(0)
    block = LatentCrossAttention(16, 2 * LatentCrossAttention.LATENT_CHUNK + 5, 2, 8, ffn_mult=2).double()
    context = torch.randn(3, 5, 16, dtype=torch.double)
    mask = torch.ones(3, 5)
    mask[0, :2] = 0

    def reference(x_block):
        b, s, _ = context.shape
        keep = mask.bool()
        ctx = context.masked_fill(~keep.unsqueeze(-1), 0.0)
        n = x_block.latents.shape[0]
        q = x_block.to_q(x_block.norm_latents(x_block.latents)).view(1, n, 2, 8).transpose(1, 2).expand(b, -1, -1, -1)
        k, v = x_block.to_kv(x_block.norm_context(ctx)).chunk(2, dim=-1)
        k, v = (t.view(b, s, 2, 8).transpose(1, 2) for t in (k, v))
        attn = F.scaled_dot_product_attention(q, k, v, attn_mask=keep[:, None, None, :]).transpose(1, 2).reshape(b, n, 16)
        x = x_block.latents + x_block.to_out(attn)
        value, gate = x_block.ffn_in(x_block.norm_ffn(x)).chunk(2, dim=-1)
        return (x + x_block.ffn_out(value * F.gelu(gate))).mean(dim=1)

    probe = torch.randn(3, 16, dtype=torch.double)
    (block(context, mask) * probe).sum().backward()
    grads = {n: p.grad.clone() for n, p in block.named_parameters()}
    block.zero_grad()
    (reference(block) * probe).sum().backward()
    assert torch.allclose(block(context, mask), reference(block), atol=1e-12)
    for name, param in block.named_parameters():
        assert torch.allclose(grads[name], param.grad, atol=1e-12), name
    with torch.no_grad():
        assert torch.allclose(block(context, mask), reference(block), atol=1e-12)
