"""Pooling heads: token states (and per-layer means) -> one embedding per text.

Shapes: B batch, T tokens, D hidden size, K selected layers, N latents, H heads, h head dim.

- last_token: the last-layer state at the last non-padding position (the appended EOS); works for
  left and right padding alike.
- mean: last-layer mean over non-padding positions.
- latent_attention: N learned latents [N, D] are the queries of a multi-head cross-attention whose
  keys / values are the last layer's token states (padding masked), then a GEGLU feed-forward,
  each with a residual and a pre-LayerNorm (as NV-Embed and the paper's code), then the mean over
  the latents. Attention runs in H x h channels and projects back to D.
- multi_layer_attention: the same block over the K per-layer masked means [B, K, D] (+ the learned
  `layer_weights` W[K, D] when enabled; standard-normal init as the paper's nn.Embedding, or zeros)
  instead of the T token states.

All parameters are created and initialised in the constructors: under ZeRO-3's zero.Init any
initialisation a parent applies afterwards would be lost. `count_head_parameters` counts a head
on the meta device (no memory), for `--dry-run`.
"""
from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from dsembed.config import LastTokenPooling, LatentAttentionPooling, MeanPooling, MultiLayerAttentionPooling
from dsembed.recipe_rules import head_sizes, resolve_layers
from dsembed.errors import RecipeError
from dsembed.modeling.layers import masked_mean


class Pooler(nn.Module):
    """Base class. `tapped_layers`: 1-based layers whose masked means `forward` needs (may be empty)."""

    tapped_layers: list[int]

    def __init__(self) -> None:
        super().__init__()
        self.tapped_layers = []

    def num_parameters(self) -> int:
        """How many parameters the head has (all trainable)."""
        return sum(p.numel() for p in self.parameters())

    def forward(self, last_hidden: torch.Tensor, attention_mask: torch.Tensor,
                layer_means: torch.Tensor | None = None) -> torch.Tensor:
        """Pool.

        Args:
            last_hidden: [B, T, D] final-normed token states.
            attention_mask: [B, T], 1 for real tokens.
            layer_means: [B, K, D] masked means of `tapped_layers` (multi-layer heads only).

        Returns:
            [B, D] embeddings (not normalised).
        """
        raise NotImplementedError


class LastTokenPooler(Pooler):
    def forward(self, last_hidden, attention_mask, layer_means=None):
        positions = torch.arange(attention_mask.shape[1], device=attention_mask.device)  # [T]
        last = (attention_mask.to(torch.long) * positions).argmax(dim=1)  # [B] last real token, any padding side
        return last_hidden[torch.arange(last_hidden.shape[0], device=last_hidden.device), last]  # [B, D]


class MeanPooler(Pooler):
    def forward(self, last_hidden, attention_mask, layer_means=None):
        return masked_mean(last_hidden, attention_mask)  # [B, D]


class LatentCrossAttention(nn.Module):
    """Learned latents attend over a context, then a GEGLU feed-forward; mean over latents.

    Args:
        dim: D, the context (and output) width.
        num_latents: N.
        num_heads: H.
        head_dim: h; the attention runs in H*h channels.
        ffn_mult: feed-forward width as a multiple of D.
        dropout: attention dropout while training.
        dtype: parameter dtype (None: torch's default).
    """

    def __init__(self, dim: int, num_latents: int, num_heads: int, head_dim: int, ffn_mult: int = 4,
                 dropout: float = 0.0, dtype: torch.dtype | None = None):
        super().__init__()
        inner = num_heads * head_dim
        self.num_heads, self.head_dim, self.dropout = num_heads, head_dim, dropout
        # NV-Embed initialises its latents as a standard normal; the pre-norm makes the scale moot for queries.
        self.latents = nn.Parameter(torch.randn(num_latents, dim, dtype=dtype))  # [N, D]
        self.norm_latents = nn.LayerNorm(dim, dtype=dtype)
        self.norm_context = nn.LayerNorm(dim, dtype=dtype)
        self.to_q = nn.Linear(dim, inner, bias=False, dtype=dtype)
        self.to_kv = nn.Linear(dim, 2 * inner, bias=False, dtype=dtype)
        self.to_out = nn.Linear(inner, dim, dtype=dtype)
        self.norm_ffn = nn.LayerNorm(dim, dtype=dtype)
        self.ffn_in = nn.Linear(dim, 2 * ffn_mult * dim, dtype=dtype)  # GEGLU: value and gate halves
        self.ffn_out = nn.Linear(ffn_mult * dim, dim, dtype=dtype)

    def forward(self, context: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        """Args: context [B, S, D]; mask [B, S] (True / 1 = attend) or None. Returns [B, D]."""
        b, s, _ = context.shape
        dtype = self.to_kv.weight.dtype
        if mask is not None:
            mask = mask.to(device=context.device, dtype=torch.bool)  # [B, S]
            # zero padded states: a NaN there would survive a 0 attention weight
            context = context.masked_fill(~mask.unsqueeze(-1), 0.0)
        context = context.to(dtype)
        k, v = self.to_kv(self.norm_context(context)).chunk(2, dim=-1)  # [B, S, H*h] each
        k = k.view(b, s, self.num_heads, self.head_dim).transpose(1, 2)  # [B, H, S, h]
        v = v.view(b, s, self.num_heads, self.head_dim).transpose(1, 2)  # [B, H, S, h]
        attn_mask = None if mask is None else mask[:, None, None, :]  # [B, 1, 1, S]
        # Every latent is a query of its own: attention, residual and feed-forward of one latent do
        # not depend on the others, and the output is the mean over latents. So the block streams
        # over chunks of latents, summing x and the GEGLU hidden state: mean_N(x + ffn_out(g)) =
        # mean_N(x) + ffn_out(mean_N(g)) as ffn_out is affine. No [B, N, *] tensor is ever built:
        # the head's working set is one chunk's, below the backbone's own activations, in
        # inference and training alike. With a graph each chunk is checkpointed (only k, v, which
        # all chunks share, are kept; the chunk is recomputed in backward).
        n = self.latents.shape[0]
        x_sum, hidden_sum = None, None
        for start in range(0, n, self.LATENT_CHUNK):
            latents = self.latents[start:start + self.LATENT_CHUNK]  # [c, D]
            if torch.is_grad_enabled() and (latents.requires_grad or k.requires_grad):
                x_part, hidden_part = checkpoint(self._chunk_sums, latents, k, v, attn_mask, use_reentrant=False)
            else:
                x_part, hidden_part = self._chunk_sums(latents, k, v, attn_mask)  # [B, D], [B, mult*D]
            x_sum = x_part if x_sum is None else x_sum + x_part
            hidden_sum = hidden_part if hidden_sum is None else hidden_sum + hidden_part
        return x_sum / n + self.ffn_out(hidden_sum / n)  # [B, D]

    # latents per chunk: bounds the head's working set (see forward); 32 keeps SmolLM2's head at
    # batch 8 to ~2.5 MiB fp32 and a Mistral-sized head's matmuls large enough for a GPU
    LATENT_CHUNK = 32

    def _chunk_sums(self, latents: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                    attn_mask: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
        """One chunk of latents through attention, residual and GEGLU, summed over the chunk.

        Args:
            latents: [c, D] this chunk's latents (queries and residual).
            k, v: [B, H, S, h] keys and values of the context.
            attn_mask: [B, 1, 1, S] boolean or None.

        Returns:
            (sum over the chunk of x = latents + to_out(attn): [B, D],
             sum over the chunk of the GEGLU hidden state: [B, mult*D]).
        """
        b, c = k.shape[0], latents.shape[0]
        # the queries are the same for every text: project them once, broadcast over the batch
        q = self.to_q(self.norm_latents(latents))  # [c, H*h]
        q = q.view(1, c, self.num_heads, self.head_dim).transpose(1, 2).expand(b, -1, -1, -1)  # [B, H, c, h]
        drop = self.dropout if self.training else 0.0
        attn = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, dropout_p=drop)  # [B, H, c, h]
        attn = attn.transpose(1, 2).reshape(b, c, self.num_heads * self.head_dim)  # [B, c, H*h]
        x = latents + self.to_out(attn)  # [B, c, D]
        value, gate = self.ffn_in(self.norm_ffn(x)).chunk(2, dim=-1)  # [B, c, mult*D] each
        return x.sum(dim=1), (value * F.gelu(gate)).sum(dim=1)  # [B, D], [B, mult*D]


class LatentAttentionPooler(Pooler):
    """Latent cross-attention over the last layer's token states (padding masked)."""

    def __init__(self, hidden_size: int, sizes: dict[str, Any], dtype: torch.dtype | None = None):
        super().__init__()
        self.block = LatentCrossAttention(hidden_size, sizes["num_latents"], sizes["num_heads"], sizes["head_dim"],
                                          sizes["ffn_mult"], sizes["dropout"], dtype=dtype)

    def forward(self, last_hidden, attention_mask, layer_means=None):
        return self.block(last_hidden, attention_mask)  # [B, D]


class MultiLayerAttentionPooler(Pooler):
    """Latent cross-attention over per-layer masked means, plus optional layer weights W[K, D]."""

    def __init__(self, hidden_size: int, sizes: dict[str, Any], layers: list[int], use_layer_weights: bool,
                 dtype: torch.dtype | None = None, layer_weights_init: str = "normal"):
        super().__init__()
        self.tapped_layers = list(layers)
        if use_layer_weights:
            # "normal" as the paper's nn.Embedding: at the paper's lr W barely moves from its init, so a
            # random code is what gives the K layer vectors an identity; "zeros" starts as plain attention
            init = torch.randn if layer_weights_init == "normal" else torch.zeros
            self.layer_weights = nn.Parameter(init(len(layers), hidden_size, dtype=dtype))  # [K, D]
        self.block = LatentCrossAttention(hidden_size, sizes["num_latents"], sizes["num_heads"], sizes["head_dim"],
                                          sizes["ffn_mult"], sizes["dropout"], dtype=dtype)

    def forward(self, last_hidden, attention_mask, layer_means=None):
        if layer_means is None or layer_means.shape[1] != len(self.tapped_layers):
            raise ValueError(f"multi_layer_attention needs layer_means [B, {len(self.tapped_layers)}, D]")
        context = layer_means.to(self.block.to_kv.weight.dtype)  # [B, K, D]
        if hasattr(self, "layer_weights"):
            context = context + self.layer_weights  # [B, K, D]
        return self.block(context)  # [B, D]; all K vectors are real, nothing to mask


def build_pooler(pooling_cfg: Any, hidden_size: int, num_layers: int, dtype: torch.dtype | None = None) -> Pooler:
    """The head a `pooling:` section describes.

    Args:
        pooling_cfg: one of the pooling dataclasses of dsembed.config.
        hidden_size: D of the backbone.
        num_layers: L of the backbone (resolves `layers: top-K / all`).
        dtype: parameter dtype (None: torch's default, float32).

    Returns:
        A `Pooler`; `tapped_layers` lists the 1-based layers it reads (empty for last-layer heads).

    Raises:
        RecipeError: an unknown pooling type, bad layer selection, or a head dim that cannot be derived.
    """
    if isinstance(pooling_cfg, LastTokenPooling):
        return LastTokenPooler()
    if isinstance(pooling_cfg, MeanPooling):
        return MeanPooler()
    if isinstance(pooling_cfg, (LatentAttentionPooling, MultiLayerAttentionPooling)):
        sizes = resolved_head_sizes(pooling_cfg, hidden_size)
        if isinstance(pooling_cfg, LatentAttentionPooling):
            return LatentAttentionPooler(hidden_size, sizes, dtype=dtype)
        layers = resolve_layers(pooling_cfg.layers, num_layers)
        return MultiLayerAttentionPooler(hidden_size, sizes, layers, pooling_cfg.layer_weights, dtype=dtype,
                                         layer_weights_init=pooling_cfg.layer_weights_init)
    raise RecipeError(f"pooling.type: unknown pooling config {type(pooling_cfg).__name__}")


def resolved_head_sizes(pooling_cfg: Any, hidden_size: int) -> dict[str, Any]:
    """`config.head_sizes` with the default head_dim (D // num_heads) filled in."""
    sizes = head_sizes(pooling_cfg)
    if sizes["head_dim"] is None:
        if hidden_size % sizes["num_heads"]:
            raise RecipeError(f"pooling.num_heads = {sizes['num_heads']} does not divide the hidden size {hidden_size}; set pooling.head_dim")
        sizes["head_dim"] = hidden_size // sizes["num_heads"]
    return sizes


def count_head_parameters(pooling_cfg: Any, hidden_size: int, num_layers: int) -> int:
    """Parameters of the head for a backbone of width `hidden_size` and depth `num_layers`.

    Built on the meta device: the paper head at Mistral size (~1.28B parameters) costs no memory.
    """
    with torch.device("meta"):
        pooler = build_pooler(pooling_cfg, hidden_size, num_layers)
    return pooler.num_parameters()
