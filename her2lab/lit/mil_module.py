"""MIL LightningModule: bags of embeddings → slide-level logits, one prediction per slide."""

from __future__ import annotations

import torch

from her2lab.lit.classification import ClassificationModule


class MILModule(ClassificationModule):
    """``net(x (B, N, D), mask (B, N)) → (logits (B, C), attention (B, N))``, e.g. ABMIL."""

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.net(x, mask)

    def logits_of(self, batch):
        x, mask, y, idx = batch  # (B, N, D), (B, N), (B,), (B,)
        logits, _ = self(x, mask)
        return logits, y, idx
