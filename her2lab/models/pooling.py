"""Attention-free MIL baselines: mean- and max-pooling of tile embeddings (masked).

Same face as :class:`~her2lab.models.abmil.AttentionMIL`: ``(x (B, N, D), mask (B, N))`` →
``(logits (B, C), weights (B, N))``; the weights say how much each tile contributed (uniform for
the mean; for the max, the share of embedding dimensions a tile supplied), summing to 1.
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


class MeanPoolMIL(_PoolMIL):

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        if mask is None:
            mask = torch.ones(x.shape[:2], dtype=torch.bool, device=x.device)
        h = self.project(x)  # (B, N, H)
        w = mask.float() / mask.sum(1, keepdim=True).clamp(min=1)  # (B, N)
        return self.classifier(torch.einsum("bn,bnh->bh", w, h)), w


class MaxPoolMIL(_PoolMIL):

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        if mask is None:
            mask = torch.ones(x.shape[:2], dtype=torch.bool, device=x.device)
        h = self.project(x).masked_fill(~mask[..., None], float("-inf"))  # (B, N, H)
        z, arg = h.max(dim=1)  # (B, H), (B, H)
        z = torch.nan_to_num(z, neginf=0.0)  # an empty bag pools to zeros
        w = torch.zeros(mask.shape, device=x.device).scatter_add_(1, arg, torch.ones_like(arg, dtype=torch.float))
        w = w / w.sum(1, keepdim=True).clamp(min=1)  # (B, N)
        return self.classifier(z), w
