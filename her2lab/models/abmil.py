"""Attention-based deep multiple-instance learning (Ilse, Tomczak & Welling, ICML 2018).

A bag of tile embeddings ``(B, N, D)`` with a mask ``(B, N)`` (True = real tile) is projected,
scored by an attention network — plain ``w·tanh(Vh)`` or gated ``w·(tanh(Vh) ⊙ σ(Uh))`` —
softmax-normalised over the real tiles only (padding gets exactly zero weight, so padding a bag
changes nothing), pooled by the weighted sum and classified. The attention weights are returned
for heatmaps.
"""

from __future__ import annotations

import torch
from torch import nn

from her2lab.models.heads import make_head


class AttentionMIL(nn.Module):
    """ABMIL head.

    Args:
        in_dim: embedding size D of the tiles.
        num_classes: output logits.
        hidden_dim: projection size (0: no projection, attention on the raw embeddings, as in
            the H&E-HER2 study's code: Conv1d(1024→256) → tanh → Conv1d(256→1)).
        attn_dim: attention network width.
        gated: gated attention (Ilse et al. eq. 9) instead of plain (eq. 8).
        dropout: dropout on the projected embeddings.
        ordinal: cumulative-logit head for an ordered scale (outputs K-1 logits ``P(y > k)``;
            see :mod:`her2lab.models.heads`) instead of K class logits.
    """

    def __init__(
        self,
        in_dim: int,
        num_classes: int,
        hidden_dim: int = 256,
        attn_dim: int = 128,
        gated: bool = True,
        dropout: float = 0.25,
        ordinal: bool = False,
    ) -> None:
        super().__init__()
        if hidden_dim:
            self.project = nn.Sequential(nn.Linear(in_dim, hidden_dim), nn.ReLU(), nn.Dropout(dropout))
            d = hidden_dim
        else:
            self.project = nn.Dropout(dropout)
            d = in_dim
        self.attn_v = nn.Linear(d, attn_dim)
        self.attn_u = nn.Linear(d, attn_dim) if gated else None
        self.attn_w = nn.Linear(attn_dim, 1)
        self.ordinal = ordinal
        self.classifier = make_head(d, num_classes, ordinal)

    def attention_logits(self, h: torch.Tensor) -> torch.Tensor:
        a = torch.tanh(self.attn_v(h))  # (B, N, A)
        if self.attn_u is not None:
            a = a * torch.sigmoid(self.attn_u(h))  # (B, N, A)
        return self.attn_w(a).squeeze(-1)  # (B, N)

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """``x`` (B, N, D), ``mask`` (B, N) bool → logits (B, C or C-1), attention (B, N) summing to 1."""
        if mask is None:
            mask = torch.ones(x.shape[:2], dtype=torch.bool, device=x.device)
        h = self.project(x)  # (B, N, H)
        scores = self.attention_logits(h).masked_fill(~mask, float("-inf"))  # (B, N)
        attn = torch.softmax(scores, dim=1)  # (B, N); padded tiles get exactly 0
        attn = torch.nan_to_num(attn, nan=0.0)  # an empty bag: all-zero attention, not NaN
        z = torch.einsum("bn,bnh->bh", attn, h)  # (B, H)
        return self.classifier(z), attn
