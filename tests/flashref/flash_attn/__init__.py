"""A reference flash-attn 2 for tests: the functions transformers' `flash_attention_2` path imports,
written in plain PyTorch (one `scaled_dot_product_attention` call per sequence) so that path runs
on a CPU. Not the real package: put on sys.path only by `tests.flashref.install`.

transformers 5 imports exactly these names (modeling_flash_attention_utils._lazy_imports):
`flash_attn_func`, `flash_attn_varlen_func`, `flash_attn_with_kvcache` and, from
`flash_attn.bert_padding`, `pad_input` / `unpad_input`; it reads the keyword arguments each
function accepts from its signature, so the signatures below are flash-attn 2.6's.

Semantics reproduced (flash-attn's docstrings): tensors are [batch, seq, heads, head_dim]
(varlen: [total_tokens, heads, head_dim] with int32 `cu_seqlens` of length batch + 1); grouped-query
attention maps query head h to key/value head h // (H / H_kv); `causal` masks are aligned to the
bottom-right corner (query i of Sq sees key j <= i + Sk - Sq); `window_size=(left, right)`, -1
unbounded; `softmax_scale` None means 1/sqrt(head_dim); a query row that sees no key outputs zeros.
Not reproduced (raise NotImplementedError): softcap, ALiBi, attention probabilities, the KV cache.
Accepted although the real kernels refuse them: float32 tensors (so tests compare at 1e-5) and CPU
tensors; set `HALF_ONLY = True` to refuse float32 as the real package does.

`CALLS` counts the calls per function, so a test can tell which path transformers took.
"""
from __future__ import annotations

import math
from typing import Sequence

import torch
import torch.nn.functional as F

__version__ = "2.8.3"  # the API level imitated; transformers wants >= 2.3.3

HALF_ONLY = False
CALLS = {"flash_attn_func": 0, "flash_attn_varlen_func": 0, "flash_attn_with_kvcache": 0}


def _unsupported(q: torch.Tensor, softcap: float, alibi_slopes: torch.Tensor | None, return_attn_probs: bool) -> None:
    if HALF_ONLY and q.dtype not in (torch.float16, torch.bfloat16):
        raise RuntimeError("FlashAttention only support fp16 and bf16 data type")  # the real kernels' message
    if softcap:
        raise NotImplementedError("reference flash_attn: softcap is not implemented")
    if alibi_slopes is not None:
        raise NotImplementedError("reference flash_attn: alibi_slopes is not implemented")
    if return_attn_probs:
        raise NotImplementedError("reference flash_attn: return_attn_probs is not implemented")


def allowed_keys(sq: int, sk: int, causal: bool, window_size: Sequence[int], device: torch.device) -> torch.Tensor:
    """[Sq, Sk] bool: which keys each query may see (flash-attn's bottom-right alignment)."""
    i = torch.arange(sq, device=device)[:, None] + (sk - sq)  # the key position "diagonal" to query i
    j = torch.arange(sk, device=device)[None, :]
    left, right = window_size
    if causal:
        right = 0  # flash-attn: causal=True sets window_size[1] to 0
    allowed = torch.ones(sq, sk, dtype=torch.bool, device=device)
    if left >= 0:
        allowed &= j >= i - left
    if right >= 0:
        allowed &= j <= i + right
    return allowed


def attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool, softmax_scale: float | None,
           window_size: Sequence[int], dropout_p: float) -> torch.Tensor:
    """One sequence: q [Sq, H, Dh], k/v [Sk, Hk, Dh] -> [Sq, H, Dh]."""
    sq, heads, dim = q.shape
    sk, kv_heads, _ = k.shape
    if heads % kv_heads:
        raise ValueError(f"reference flash_attn: {heads} query heads are not a multiple of {kv_heads} kv heads")
    k = k.repeat_interleave(heads // kv_heads, dim=1)  # [Sk, H, Dh]: query head h uses kv head h // group
    v = v.repeat_interleave(heads // kv_heads, dim=1)
    allowed = allowed_keys(sq, sk, causal, window_size, q.device)  # [Sq, Sk]
    scale = softmax_scale if softmax_scale is not None else 1.0 / math.sqrt(dim)
    out = F.scaled_dot_product_attention(q.transpose(0, 1), k.transpose(0, 1), v.transpose(0, 1),
                                         attn_mask=allowed, dropout_p=dropout_p, scale=scale)  # [H, Sq, Dh]
    out = out.transpose(0, 1)  # [Sq, H, Dh]
    blind = ~allowed.any(dim=-1)  # rows with no key: flash-attn writes zeros, SDPA would give NaN
    return out.masked_fill(blind[:, None, None], 0.0) if blind.any() else out


def flash_attn_func(q, k, v, dropout_p=0.0, softmax_scale=None, causal=False, window_size=(-1, -1), softcap=0.0,
                    alibi_slopes=None, deterministic=False, return_attn_probs=False):
    """q [B, Sq, H, Dh], k/v [B, Sk, Hk, Dh] -> [B, Sq, H, Dh]; every sequence of the batch is full length."""
    CALLS["flash_attn_func"] += 1
    _unsupported(q, softcap, alibi_slopes, return_attn_probs)
    return torch.stack([attend(q[b], k[b], v[b], causal, softmax_scale, window_size, dropout_p)
                        for b in range(q.shape[0])])


def flash_attn_varlen_func(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, dropout_p=0.0,
                           softmax_scale=None, causal=False, window_size=(-1, -1), softcap=0.0, alibi_slopes=None,
                           deterministic=False, return_attn_probs=False, block_table=None):
    """q [total_q, H, Dh], k/v [total_k, Hk, Dh], sequence b = rows cu_seqlens[b]:cu_seqlens[b+1] -> [total_q, H, Dh]."""
    CALLS["flash_attn_varlen_func"] += 1
    _unsupported(q, softcap, alibi_slopes, return_attn_probs)
    if block_table is not None:
        raise NotImplementedError("reference flash_attn: paged KV (block_table) is not implemented")
    bq, bk = cu_seqlens_q.tolist(), cu_seqlens_k.tolist()
    if len(bq) != len(bk) or bq[-1] != q.shape[0] or bk[-1] != k.shape[0]:
        raise ValueError(f"reference flash_attn: cu_seqlens {bq} / {bk} do not cover q {tuple(q.shape)} / k {tuple(k.shape)}")
    lengths_q = [b - a for a, b in zip(bq, bq[1:])]
    lengths_k = [b - a for a, b in zip(bk, bk[1:])]
    if max(lengths_q) > int(max_seqlen_q) or max(lengths_k) > int(max_seqlen_k):
        raise ValueError(f"reference flash_attn: a sequence is longer than max_seqlen ({max_seqlen_q}, {max_seqlen_k})")
    out = torch.empty_like(q)
    for b in range(len(bq) - 1):
        out[bq[b]:bq[b + 1]] = attend(q[bq[b]:bq[b + 1]], k[bk[b]:bk[b + 1]], v[bk[b]:bk[b + 1]], causal,
                                      softmax_scale, window_size, dropout_p)
    return out


def flash_attn_with_kvcache(q, k_cache, v_cache, k=None, v=None, rotary_cos=None, rotary_sin=None, cache_seqlens=None,
                            cache_batch_idx=None, cache_leftpad=None, block_table=None, softmax_scale=None, causal=False,
                            window_size=(-1, -1), softcap=0.0, rotary_interleaved=True, alibi_slopes=None, num_splits=0,
                            return_softmax_lse=False):
    """Imported by transformers for paged decoding only; dsembed never decodes."""
    CALLS["flash_attn_with_kvcache"] += 1
    raise NotImplementedError("reference flash_attn: flash_attn_with_kvcache (paged decoding) is not implemented")
