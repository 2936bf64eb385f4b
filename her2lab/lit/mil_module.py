"""MIL LightningModule: bags of embeddings → slide-level logits, one prediction per slide."""

from __future__ import annotations

import inspect

import torch

from her2lab.lit.classification import ClassificationModule


class MILModule(ClassificationModule):
    """``net(x (B, N, D), mask (B, N)) → (logits (B, C), attention (B, N))``, e.g. ABMIL.

    Bags arrive in the features file's dtype (float16 stays float16). Nets that take a ``chunk``
    argument (her2lab's) cast and project at most ``chunk`` tiles at a time, so a whole-slide
    bag at validation/test costs one chunk's activations; other nets get the bag cast whole.

    Args:
        chunk: tiles projected at a time (bounded memory for bags of any size; the same result).
        *args, **kwargs: see :class:`~her2lab.lit.classification.ClassificationModule`.
    """

    def __init__(self, *args, chunk: int = 8192, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.chunk = chunk
        self._takes_chunk = "chunk" in inspect.signature(self.net.forward).parameters

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if self._takes_chunk:
            return self.net(x, mask, chunk=self.chunk)
        return self.net(x.to(self.dtype), mask)

    def logits_of(self, batch):
        x, mask, y, idx = batch  # (B, N, D), (B, N), (B,), (B,)
        logits, _ = self(x, mask)
        return logits, y, idx
