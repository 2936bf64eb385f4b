"""Classifier heads for the pooled slide embedding: nominal (linear) or ordinal.

The HER2 score is ordered (0 < 1+ < 2+ < 3+). The ordinal head is rank-consistent cumulative
logits (CORAL; Cao, Mirjalili & Raschka 2020): one score ``s(z)`` and K-1 thresholds, output
``logit P(y > k) = s(z) - b_k``. The thresholds are kept increasing (first + cumulative softplus
gaps), so ``P(y > k)`` falls with ``k`` and the class probabilities
``P(y = k) = P(y > k-1) - P(y > k)`` are never negative.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class OrdinalHead(nn.Module):
    """``z (B, D)`` → cumulative logits ``(B, K-1)``: column k is ``logit P(y > k)``."""

    def __init__(self, in_dim: int, num_classes: int) -> None:
        super().__init__()
        if num_classes < 2:
            raise ValueError(f"an ordinal head needs at least 2 classes, got {num_classes}")
        self.score = nn.Linear(in_dim, 1)
        k = num_classes - 1
        self.first = nn.Parameter(torch.tensor([-(k - 1) / 2]))  # thresholds start at -…, 1 apart
        self.gaps = nn.Parameter(torch.full((k - 1,), 0.5413))  # softplus(0.5413) = 1

    def thresholds(self) -> torch.Tensor:
        return torch.cat([self.first, self.first + torch.cumsum(F.softplus(self.gaps), 0)])

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return self.score(z) - self.thresholds()


def make_head(in_dim: int, num_classes: int, ordinal: bool = False) -> nn.Module:
    return OrdinalHead(in_dim, num_classes) if ordinal else nn.Linear(in_dim, num_classes)


def ordinal_probs(cum_logits: torch.Tensor) -> torch.Tensor:
    """Cumulative logits (B, K-1) → class probabilities (B, K), rows summing to 1."""
    p_gt = torch.sigmoid(cum_logits)
    one = torch.ones_like(p_gt[:, :1])
    return (torch.cat([one, p_gt], 1) - torch.cat([p_gt, torch.zeros_like(one)], 1)).clamp(min=0)


def ordinal_loss(cum_logits: torch.Tensor, y: torch.Tensor, weight: torch.Tensor | None = None) -> torch.Tensor:
    """Binary cross-entropy of the K-1 tasks ``y > k``; ``weight`` (K,) weighs samples by class."""
    k = torch.arange(cum_logits.shape[1], device=y.device)
    target = (y[:, None] > k).to(cum_logits.dtype)
    per_sample = F.binary_cross_entropy_with_logits(cum_logits, target, reduction="none").sum(1)
    if weight is None:
        return per_sample.mean()
    w = weight.to(per_sample)[y]
    return (per_sample * w).sum() / w.sum()
