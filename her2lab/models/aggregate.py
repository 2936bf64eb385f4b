"""Tile predictions → one slide prediction (the patch-classifier baseline).

- ``mean``: the mean of the tiles' class probabilities.
- ``topk``: the mean probabilities of the ``k`` most positive tiles — those with the highest
  expected class index (the scores are ordered) — so a slide is as positive as its most
  positive tiles, however few.
- ``majority``: each tile votes for its most likely class; the slide's probabilities are the
  vote shares (ties broken towards the higher class index when taking the argmax, i.e. the higher
  HER2 score).
"""

from __future__ import annotations

import torch

AGGREGATIONS = ("mean", "topk", "majority")


def aggregate_tiles(probs: torch.Tensor, how: str = "mean", top_k: int = 8) -> torch.Tensor:
    """Tile class probabilities ``(N, C)`` → slide class probabilities ``(C,)`` summing to 1."""
    if probs.ndim != 2 or len(probs) == 0:
        raise ValueError(f"need (N ≥ 1, C) tile probabilities, got shape {tuple(probs.shape)}")
    if how == "mean":
        return probs.mean(0)
    if how == "topk":
        k = min(top_k, len(probs))
        expected = probs @ torch.arange(probs.shape[1], dtype=probs.dtype)
        return probs[expected.topk(k).indices].mean(0)
    if how == "majority":
        votes = torch.bincount(probs.argmax(1), minlength=probs.shape[1]).to(probs.dtype)
        share = votes + 1e-6 * torch.arange(probs.shape[1], dtype=probs.dtype)  # ties → higher score
        return share / share.sum()
    raise ValueError(f"aggregation {how!r}: use one of {AGGREGATIONS}")
