"""The normalisation a pretraining run computes from its own training data."""

from __future__ import annotations

import numpy as np
import torch


def test_channel_stats_are_the_pixels_mean_and_std():
    from her2lab.data.patches import channel_stats

    rng = np.random.default_rng(0)
    images = [torch.from_numpy(rng.uniform(0, 1, (3, 8, 8)) * [[[1.0]], [[0.5]], [[0.2]]]).float() for _ in range(5)]
    mean, std = channel_stats(iter(images))
    pixels = np.concatenate([im.numpy().reshape(3, -1) for im in images], 1)
    np.testing.assert_allclose(mean, pixels.mean(1), rtol=1e-5)
    np.testing.assert_allclose(std, pixels.std(1), rtol=1e-4)


def test_a_patch_folder_gives_its_training_images_statistics(tmp_path):
    from PIL import Image

    from her2lab.data.patches import folder_stats

    for cls, colour in (("a", (200, 100, 50)), ("b", (100, 50, 200))):
        (tmp_path / "train" / cls).mkdir(parents=True)
        for i in range(3):
            Image.new("RGB", (16, 16), colour).save(tmp_path / "train" / cls / f"{i}.png")
    mean, std = folder_stats(str(tmp_path), 8)
    np.testing.assert_allclose(mean, np.array([150, 75, 125]) / 255, atol=1e-6)
    np.testing.assert_allclose(std, np.array([50, 25, 75]) / 255, atol=1e-5)
