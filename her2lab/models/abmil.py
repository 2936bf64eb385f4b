"""Attention-based deep multiple-instance learning (Ilse, Tomczak & Welling, ICML 2018).

A bag of tile embeddings ``(B, N, D)`` with a mask ``(B, N)`` (True = real tile) is projected,
scored by an attention network — plain ``w·tanh(Vh)`` or gated ``w·(tanh(Vh) ⊙ σ(Uh))`` —
softmax-normalised over the real tiles only (padding gets exactly zero weight, so padding a bag
changes nothing), pooled by the weighted sum and classified. The attention weights are returned
for heatmaps.

With ``chunk``, a bag is read ``chunk`` tiles at a time (cast to the net's dtype per chunk):
projection and attention logits per chunk, the pooled embedding accumulated with a running
softmax (rescaled when a larger logit appears), so a bag of any size costs one chunk's
activations, not N × hidden; the result equals the whole-bag pass up to float rounding.
"""

from __future__ import annotations

import torch
from torch import nn

from her2lab.models.base import MILNet, register_mil_net
from her2lab.models.heads import make_head


@register_mil_net("abmil")
class AttentionMIL(MILNet):
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

    def forward_chunked(self, x: torch.Tensor, mask: torch.Tensor, chunk: int) -> tuple[torch.Tensor, torch.Tensor]:
        """``forward`` ``chunk`` tiles at a time, with a running softmax: one chunk's activations."""
        dtype = self.dtype
        b = x.shape[0]
        top = torch.full((b,), float("-inf"), dtype=dtype, device=x.device)  # running max over real tiles
        total = torch.zeros(b, dtype=dtype, device=x.device)  # Σ exp(score - top)
        # one (B, N) buffer, made first: small per-chunk tensors kept between the large
        # temporaries would fragment the heap and hold memory the loop has freed
        scores = torch.empty(x.shape[:2], dtype=dtype, device=x.device)
        z = None
        for s in range(0, x.shape[1], chunk):
            h = self.project(x[:, s : s + chunk].to(dtype))  # (B, n, H)
            sc = self.attention_logits(h).masked_fill(~mask[:, s : s + chunk], float("-inf"))  # (B, n)
            scores[:, s : s + chunk] = sc
            new = torch.maximum(top, sc.max(1).values)  # (B,); -inf while a bag has no real tile yet
            shift = torch.where(torch.isfinite(new), new, torch.zeros_like(new))
            e = torch.exp(sc - shift[:, None])  # (B, n); padding → 0
            rescale = torch.exp(top - shift)  # (B,): the sums so far, moved to the new maximum
            part = torch.einsum("bn,bnh->bh", e, h)  # (B, H)
            z = part if z is None else z * rescale[:, None] + part
            total = total * rescale + e.sum(1)
            top = new
        attn = torch.nan_to_num(torch.softmax(scores, dim=1), nan=0.0)  # (B, N), as unchunked
        z = torch.where(total[:, None] > 0, z / total.clamp(min=torch.finfo(dtype).tiny)[:, None], torch.zeros_like(z))
        return self.classifier(z), attn  # an empty bag pools to zeros, as unchunked
