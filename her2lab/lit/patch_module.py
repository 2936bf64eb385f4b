"""Patch-classifier baseline: a CNN trained on tiles labelled with their slide's label, scored
per slide.

Training is per tile (``train/*`` metrics are tile-level). Validation and test aggregate the
tiles of each slide (:mod:`her2lab.models.aggregate`: mean probability, top-k, majority vote)
into one prediction per slide, so ``val/*`` and ``test/*`` are slide-level metrics, comparable
with MIL and with the end-to-end thumbnail model on the same splits. ``val/loss``/``test/loss``
stay the tile-level cross-entropy. Patches without a slide (``data=patch_folder``) are scored
per tile.
"""

from __future__ import annotations

from collections import defaultdict

import torch

from her2lab.errors import Her2labError
from her2lab.lit.image_module import ImageClassifierModule
from her2lab.models.aggregate import AGGREGATIONS, aggregate_tiles


class PatchToSlideModule(ImageClassifierModule):
    def __init__(self, *args, aggregate: str = "mean", top_k: int = 8, **kwargs) -> None:
        if aggregate not in AGGREGATIONS:
            raise Her2labError(f"model.aggregate={aggregate!r}: use one of {', '.join(AGGREGATIONS)}")
        super().__init__(*args, **kwargs)
        self.aggregate, self.top_k = aggregate, top_k
        self._tiles: dict[int, list[torch.Tensor]] = defaultdict(list)
        self._labels: dict[int, int] = {}

    def setup(self, stage: str) -> None:
        if self.trainer is not None and self.trainer.world_size > 1:
            raise Her2labError("model=patch_classifier scores slides in one process; use trainer.devices=1")

    def _eval_step(self, batch, stage: str) -> None:
        if len(batch) < 3:  # a patch folder: no slides, tile-level metrics
            self._step(batch, stage)
            return
        logits, y, idx = self.logits_of(batch)
        known = y >= 0  # an unlabelled slide's tiles (label -1) are scored, never measured
        if known.any():
            self.mean_loss[f"{stage}_"].update(self.loss(logits[known], y[known]).detach(), weight=int(known.sum()))
        probs = self.probs(logits.float()).detach().cpu()
        for p, t, s in zip(probs, y.tolist(), idx.tolist(), strict=True):
            self._tiles[s].append(p)
            self._labels[s] = t

    def validation_step(self, batch, batch_idx):
        self._eval_step(batch, "val")

    def test_step(self, batch, batch_idx):
        self._eval_step(batch, "test")

    def _slides(self, stage: str) -> None:
        """Aggregate the epoch's tiles per slide and feed the slide-level metrics."""
        ids = sorted(self._tiles)
        if ids:
            probs = torch.stack([aggregate_tiles(torch.stack(self._tiles[s]), self.aggregate, self.top_k) for s in ids])
            y = torch.tensor([self._labels[s] for s in ids])
            if self.nonfinite_items(stage, probs, torch.tensor(ids)):  # kept out of the metrics; reported at the end
                ok = torch.isfinite(probs).all(1)  # (S,)
                probs, y, ids = probs[ok], y[ok], [s for s, k in zip(ids, ok.tolist(), strict=True) if k]
        if ids:
            probs, y = probs.to(self.device), y.to(self.device)
            if stage == "test":
                self.test_outputs = [{"index": s, "label": int(t), "probs": p.tolist()} for s, t, p in zip(ids, y, probs, strict=True)]
            known = y >= 0
            probs, y = probs[known], y[known]
        if ids and len(y):
            self.metrics[f"{stage}_"].update(probs, y)
            self.per_class[f"{stage}_"].update(probs, y)
            self.support[f"{stage}_"].update(y)
            if stage == "test":
                self.confusion.update(probs, y)
        self._tiles.clear()
        self._labels.clear()

    def on_validation_epoch_end(self) -> None:
        self._slides("val")
        super().on_validation_epoch_end()

    def on_test_epoch_end(self) -> None:
        self._slides("test")
        super().on_test_epoch_end()
