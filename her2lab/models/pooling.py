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

from her2lab.models.base import MILNet, register_mil_net
from her2lab.models.heads import make_head


class _PoolMIL(MILNet):
    """Projection (Linear-ReLU-Dropout, or none with ``hidden_dim=0``) and a linear classifier."""

    def __init__(
        self, in_dim: int, num_classes: int, hidden_dim: int = 256, dropout: float = 0.25, ordinal: bool = False
    ) -> None:
        super().__init__()
        self.ordinal = ordinal
        self.project = nn.Sequential(nn.Linear(in_dim, hidden_dim), nn.ReLU(), nn.Dropout(dropout)) if hidden_dim else nn.Identity()
        self.classifier = make_head(hidden_dim or in_dim, num_classes, ordinal)

    def _chunks(self, x: torch.Tensor, chunk: int):
        """(start, projected chunk (B, n, H)) over the tiles, in the net's dtype."""
        for s in range(0, x.shape[1], max(chunk, 1)):
            yield s, self.project(x[:, s : s + chunk].to(self.dtype))


@register_mil_net("meanpool")
class MeanPoolMIL(_PoolMIL):
    """Mean of the real tiles' projections; uniform weights."""

    def attention(self, h: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        return mask.float() / mask.sum(1, keepdim=True).clamp(min=1)  # (B, N)

    def forward_chunked(self, x: torch.Tensor, mask: torch.Tensor, chunk: int) -> tuple[torch.Tensor, torch.Tensor]:
        w = self.attention(x, mask)  # (B, N); needs only the mask
        z = sum(self.pool(h, w[:, s : s + h.shape[1]], mask[:, s : s + h.shape[1]]) for s, h in self._chunks(x, chunk))
        return self.classifier(z), w  # z (B, H)


@register_mil_net("maxpool")
class MaxPoolMIL(_PoolMIL):
    """Per-dimension max over the real tiles; a tile's weight is the share of dimensions it supplied."""

    @staticmethod
    def _max(h: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Masked max ``(B, H)`` and the tile supplying each dimension ``(B, H)``."""
        return h.masked_fill(~mask[..., None], float("-inf")).max(dim=1)

    @staticmethod
    def _shares(arg: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        w = torch.zeros(mask.shape, device=mask.device).scatter_add_(1, arg, torch.ones_like(arg, dtype=torch.float))
        return w / w.sum(1, keepdim=True).clamp(min=1)  # (B, N)

    def attention(self, h: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        return self._shares(self._max(h, mask)[1], mask)

    def pool(self, h: torch.Tensor, weights: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        return torch.nan_to_num(self._max(h, mask)[0], neginf=0.0)  # (B, H); an empty bag pools to zeros

    def forward_chunked(self, x: torch.Tensor, mask: torch.Tensor, chunk: int) -> tuple[torch.Tensor, torch.Tensor]:
        z = arg = None
        for s, h in self._chunks(x, chunk):
            zc, ac = self._max(h, mask[:, s : s + h.shape[1]])  # (B, H), (B, H)
            if z is None:
                z, arg = zc, ac + s
            else:  # ties keep the earlier tile, as one max over the whole bag does
                better = zc > z
                z, arg = torch.where(better, zc, z), torch.where(better, ac + s, arg)
        z = torch.nan_to_num(z, neginf=0.0)  # an empty bag pools to zeros
        return self.classifier(z), self._shares(arg, mask)
