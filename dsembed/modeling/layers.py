"""Lazy per-layer taps: each selected layer is reduced to its masked mean the moment it is produced.

A multi-layer head needs one vector per selected layer, never the full [B, T, D] states of every
layer, so instead of `output_hidden_states=True` (which keeps all L+1 of them alive) forward hooks
on the decoder layers pool each output as it appears. Layer i (1-based, i < L) is the output of
decoder layer i; layer L is the final-normed state (the output of the final norm), matching
`output_hidden_states`' hidden_states[i] for i < L and hidden_states[-1] for L.

Hooks are registered only for the duration of one forward (`capture`): transformers 5 checkpoints
a layer's `forward`, not its `__call__`, so under gradient checkpointing a hook fires once, in the
original forward, and the backward recompute never sees it.

Shapes: B batch, T tokens, D hidden size, K selected layers.
"""
from __future__ import annotations

from contextlib import contextmanager
from typing import Iterator

import torch
from torch import nn

from dsembed.modeling.backbone import decoder_layers, final_norm


def masked_mean(hidden: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """Mean over non-padding positions, accumulated in float32.

    Args:
        hidden: [B, T, D] states.
        attention_mask: [B, T], 1 for real tokens.

    Returns:
        [B, D] in `hidden`'s dtype.
    """
    keep = attention_mask.to(device=hidden.device, dtype=torch.bool).unsqueeze(-1)  # [B, T, 1]
    # select, not multiply: 0 * NaN (or inf) at a padded position would still poison the sum
    total = torch.where(keep, hidden.float(), 0.0).sum(dim=1)  # [B, D]
    count = keep.sum(dim=1).clamp_min(1).float()  # [B, 1]
    return (total / count).to(hidden.dtype)  # [B, D]


class LayerTaps:
    """Masked means of selected layers, collected by forward hooks during one backbone forward.

    Usage::

        taps = LayerTaps(backbone, [13, 14, 15, 16])
        with taps.capture(attention_mask):
            out = backbone(input_ids=ids, attention_mask=attention_mask)
        means = taps.stacked()  # [B, K, D]

    Args:
        backbone: the transformers decoder (peft / DeepSpeed wrappers are looked through).
        layers: 1-based layer indices, each in 1..L.

    Raises:
        ValueError: an index outside 1..L.
    """

    def __init__(self, backbone: nn.Module, layers: list[int]):
        self.backbone = backbone
        self.layers = list(layers)
        depth = len(decoder_layers(backbone))
        bad = [i for i in self.layers if not 1 <= i <= depth]
        if bad:
            raise ValueError(f"layers {bad} outside 1..{depth}")
        self.depth = depth
        self._means: dict[int, torch.Tensor] = {}
        self._mask: torch.Tensor | None = None

    def _modules(self) -> dict[int, nn.Module]:
        # Looked up at every capture: LoRA merging or a DeepSpeed wrapper may have replaced objects.
        blocks = decoder_layers(self.backbone)
        return {i: (final_norm(self.backbone) if i == self.depth else blocks[i - 1]) for i in self.layers}

    def _hook(self, index: int):
        def hook(module: nn.Module, args: tuple, output) -> None:
            if self._mask is None:
                return
            hidden = output[0] if isinstance(output, (tuple, list)) else output  # [B, T, D]
            self._means[index] = masked_mean(hidden, self._mask)  # [B, D]
        return hook

    @contextmanager
    def capture(self, attention_mask: torch.Tensor) -> Iterator["LayerTaps"]:
        """Register the hooks for one forward; they are removed on exit.

        Args:
            attention_mask: [B, T] of the batch about to run.
        """
        self._means = {}
        self._mask = attention_mask
        handles = [m.register_forward_hook(self._hook(i)) for i, m in self._modules().items()]
        try:
            yield self
        finally:
            for h in handles:
                h.remove()
            self._mask = None

    def stacked(self) -> torch.Tensor:
        """The captured means in `layers` order.

        Returns:
            [B, K, D]; the stored tensors are released.

        Raises:
            RuntimeError: a selected layer did not run during the capture.
        """
        missing = [i for i in self.layers if i not in self._means]
        if missing:
            raise RuntimeError(f"layer taps {missing} did not fire (was the backbone run inside capture()?)")
        out = torch.stack([self._means[i] for i in self.layers], dim=1)  # [B, K, D]
        self._means = {}
        return out
