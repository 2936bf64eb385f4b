"""Image classifier LightningModule: patch classifiers (the encoder pretraining step) and
end-to-end models on images: ``net(x (B, 3, H, W)) → logits (B, C)``."""

from __future__ import annotations

import torch

from her2lab.lit.classification import ClassificationModule


class ImageClassifierModule(ClassificationModule):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)  # (B, C)

    def logits_of(self, batch):
        x, y, *idx = batch  # (B, 3, H, W), (B,), [item indices (B,)]
        return self(x), y, idx[0] if idx else None
