"""Slide scores from tile probabilities."""

from __future__ import annotations

import pytest
import torch

from her2lab.models.aggregate import aggregate_tiles


def test_patch_aggregation_on_a_hand_made_slide():
    # 10 tiles: 6 clearly 0, 4 clearly 3+ (a heterogeneous slide)
    p = torch.tensor([[0.9, 0.05, 0.03, 0.02]] * 6 + [[0.02, 0.03, 0.05, 0.9]] * 4)
    assert aggregate_tiles(p, "mean").argmax() == 0
    assert aggregate_tiles(p, "majority").argmax() == 0
    assert torch.allclose(aggregate_tiles(p, "majority")[[0, 3]], torch.tensor([0.6, 0.4]), atol=1e-4)
    assert aggregate_tiles(p, "topk", top_k=4).argmax() == 3  # its most positive tiles say 3+
    assert torch.allclose(aggregate_tiles(p, "mean"), p.mean(0))
    tie = torch.tensor([[0.6, 0.4], [0.4, 0.6]])
    assert aggregate_tiles(tie, "majority").argmax() == 1  # a tied vote goes to the higher score
    for how in ("mean", "topk", "majority"):
        assert torch.isclose(aggregate_tiles(p, how).sum(), torch.tensor(1.0))
    with pytest.raises(ValueError, match="aggregation 'median'"):
        aggregate_tiles(p, "median")
