"""Attention-free MIL baselines: mean- and max-pooling of tile embeddings (masked).

Same face as :class:`~her2lab.models.abmil.AttentionMIL`: ``(x (B, N, D), mask (B, N))`` →
``(logits (B, C), weights (B, N))``; the weights say how much each tile contributed (uniform for
the mean; for the max, the share of embedding dimensions a tile supplied), summing to 1. ``x``
may be in any float dtype (cast to the net's); with ``chunk``, at most that many tiles are
projected at a time (the pooled embedding accumulated chunk by chunk, the same result).
"""

from __future__ import annotations

import torch
from torch import nn

from her2lab.models.heads import make_head


class _PoolMIL(nn.Module):
    """Projection (Linear-ReLU-Dropout, or none with ``hidden_dim=0``) and a linear classifier."""

    def __init__(
        self, in_dim: int, num_classes: int, hidden_dim: int = 256, dropout: float = 0.25, ordinal: bool = False
    ) -> None:
        super().__init__()
        self.ordinal = ordinal
        self.project = nn.Sequential(nn.Linear(in_dim, hidden_dim), nn.ReLU(), nn.Dropout(dropout)) if hidden_dim else nn.Identity()
        self.classifier = make_head(hidden_dim or in_dim, num_classes, ordinal)

    def _chunks(self, x: torch.Tensor, chunk: int | None):
        """(start, projected chunk (B, n, H)) over the tiles, in the net's dtype."""
        dtype = next(self.classifier.parameters()).dtype
        step = chunk if chunk else x.shape[1]
        for s in range(0, x.shape[1], max(step, 1)):
            yield s, self.project(x[:, s : s + step].to(dtype))


class MeanPoolMIL(_PoolMIL):

    def forward(
        self, x: torch.Tensor, mask: torch.Tensor | None = None, chunk: int | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        if mask is None:
            mask = torch.ones(x.shape[:2], dtype=torch.bool, device=x.device)
        w = mask.float() / mask.sum(1, keepdim=True).clamp(min=1)  # (B, N)
        z = sum(torch.einsum("bn,bnh->bh", w[:, s : s + h.shape[1]].to(h.dtype), h) for s, h in self._chunks(x, chunk))
        return self.classifier(z), w  # z (B, H)


class MaxPoolMIL(_PoolMIL):

    def forward(
        self, x: torch.Tensor, mask: torch.Tensor | None = None, chunk: int | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        if mask is None:
            mask = torch.ones(x.shape[:2], dtype=torch.bool, device=x.device)
        z = arg = None
        for s, h in self._chunks(x, chunk):
            h = h.masked_fill(~mask[:, s : s + h.shape[1], None], float("-inf"))  # (B, n, H)
            zc, ac = h.max(dim=1)  # (B, H), (B, H)
            if z is None:
                z, arg = zc, ac + s
            else:  # ties keep the earlier tile, as one max over the whole bag does
                better = zc > z
                z, arg = torch.where(better, zc, z), torch.where(better, ac + s, arg)
        z = torch.nan_to_num(z, neginf=0.0)  # an empty bag pools to zeros
        w = torch.zeros(mask.shape, device=x.device).scatter_add_(1, arg, torch.ones_like(arg, dtype=torch.float))
        w = w / w.sum(1, keepdim=True).clamp(min=1)  # (B, N)
        return self.classifier(z), w
