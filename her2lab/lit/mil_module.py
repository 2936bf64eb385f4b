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
        bags_chunk: random bags scored at a time when a test slide comes as many bags
            (``eval.bag_sampling``; 64, the study's batch).
        *args, **kwargs: see :class:`~her2lab.lit.classification.ClassificationModule`.
    """

    def __init__(self, *args, chunk: int = 8192, bags_chunk: int = 64, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.chunk, self.bags_chunk = chunk, bags_chunk
        self._takes_chunk = "chunk" in inspect.signature(self.net.forward).parameters

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if self._takes_chunk:
            return self.net(x, mask, chunk=self.chunk)
        return self.net(x.to(self.dtype), mask)

    def logits_of(self, batch):
        if len(batch) == 5:  # eval.bag_sampling: one slide and its random bags (her2lab.data.bags.SampledBags)
            x, _, y, idx, bags = batch  # (1, N, D), (1, N), (1,), (1,), (1, n_bags, k)
            return self.bag_average(x[0], bags[0]), y, idx
        x, mask, y, idx = batch  # (B, N, D), (B, N), (B,), (B,)
        logits, _ = self(x, mask)
        return logits, y, idx

    def bag_average(self, x: torch.Tensor, bags: torch.Tensor) -> torch.Tensor:
        """Logits (1, C) whose class probabilities are the mean of the bags' probabilities.

        ``x`` (N, D) a slide's tiles, ``bags`` (n_bags, k) tile indices; ``bags_chunk`` bags are
        scored at a time. Nominal heads: the log of the mean softmax; ordinal heads: the logit of
        the mean cumulative probabilities ``P(y > k)`` (class probabilities are linear in them,
        so they are averaged alike).
        """
        parts = []
        for s in range(0, len(bags), self.bags_chunk):
            sub = x[bags[s : s + self.bags_chunk]]  # (c, k, D)
            logits, _ = self(sub, torch.ones(sub.shape[:2], dtype=torch.bool, device=sub.device))
            logits = logits.float()
            parts.append(torch.sigmoid(logits) if self.ordinal else logits.softmax(-1))
        mean = torch.cat(parts).mean(0, keepdim=True)  # (1, C) or (1, C-1)
        tiny = torch.finfo(mean.dtype).tiny
        if self.ordinal:
            return torch.logit(mean.clamp(tiny, 1 - torch.finfo(mean.dtype).eps))
        return mean.clamp_min(tiny).log()
