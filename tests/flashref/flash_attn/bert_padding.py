"""flash_attn.bert_padding of the reference package: unpad / pad a batch by its attention mask."""
from __future__ import annotations

import torch
import torch.nn.functional as F


def index_first_axis(x: torch.Tensor, indices: torch.Tensor) -> torch.Tensor:
    """x [B, S, ...] flattened to [B*S, ...], rows `indices`."""
    return x.reshape(-1, *x.shape[2:])[indices]


def unpad_input(hidden_states, attention_mask, unused_mask=None):
    """hidden_states [B, S, ...], attention_mask [B, S] (1 = real) ->
    (tokens [nnz, ...], indices [nnz], cu_seqlens [B+1] int32, max_seqlen int, seqused [B] int32), as flash-attn >= 2.7."""
    used = attention_mask.bool()
    allm = used | unused_mask.bool() if unused_mask is not None else used
    seqlens = allm.sum(dim=-1, dtype=torch.int32)  # [B]
    indices = torch.nonzero(allm.flatten(), as_tuple=False).flatten()
    cu_seqlens = F.pad(torch.cumsum(seqlens, dim=0, dtype=torch.int32), (1, 0))
    return (index_first_axis(hidden_states, indices), indices, cu_seqlens, int(seqlens.max().item()),
            used.sum(dim=-1, dtype=torch.int32))


def pad_input(hidden_states, indices, batch, seqlen):
    """tokens [nnz, ...] back to [batch, seqlen, ...], zeros at the padding."""
    out = torch.zeros(batch * seqlen, *hidden_states.shape[1:], dtype=hidden_states.dtype, device=hidden_states.device)
    out[indices] = hidden_states
    return out.reshape(batch, seqlen, *hidden_states.shape[1:])
