"""The thumbnail path (end-to-end image models) and the patch-classifier baseline, on real
synthetic slides: input geometry, augmentations, aggregation, a run per model, Grad-CAM."""

from __future__ import annotations

import cv2
import numpy as np
import pytest
import torch

from her2lab.data.thumbnails import (
    ThumbnailDataset,
    ThumbRecord,
    fit_square,
    hed_jitter,
    tissue_box,
)
from her2lab.errors import Her2labError

MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


def test_tissue_box_holds_all_the_tissue_and_the_input_keeps_its_aspect(ihc_thumbs):
    _, _, recs, _ = ihc_thumbs
    import h5py

    for fit in ("mpp", "long_side"):
        ds = ThumbnailDataset(recs, 8.0, 128, fit, 100.0, MEAN, STD, train=False, mask_background=False)
        masked = ThumbnailDataset(recs, 8.0, 128, fit, 100.0, MEAN, STD, train=False)
        for i, r in enumerate(recs):
            thumb = cv2.imread(r.thumb_path)
            x0, y0, x1, y1 = tissue_box(r.tiles_path, 8.0, thumb.shape[:2], 0.0)
            with h5py.File(r.tiles_path) as f:
                mask = f["tissue_mask"][:]
                s = float(f.attrs["mask_mpp"]) / 8.0
            ys, xs = np.nonzero(mask)
            assert x0 <= xs.min() * s and (xs.max() + 1) * s <= x1 + 1 and y0 <= ys.min() * s and (ys.max() + 1) * s <= y1 + 1
            img = ds.image(i)
            assert img.shape == (128, 128, 3)
            # the crop, resized with its aspect ratio, sits whole inside the square input
            h, w = ds.crops[i].shape[:2]
            content = np.argwhere((img != 255).any(-1))
            ch, cw = content.max(0) - content.min(0) + 1
            assert max(ch, cw) <= 128 and abs(cw / ch - w / h) < 0.1 * (w / h) + 2 / min(ch, cw)
            if fit == "long_side":
                assert max(ch, cw) >= 126  # the tissue's long side fills the input
            # with the default masking, outside the tissue is glass: no black slide edge, no pen
            m = masked.image(i)
            assert (m.max(-1) < 100).sum() == 0
            assert ((m[..., 2].astype(int) - m[..., 0]) > 60).sum() == 0  # blue pen
            assert (m != 255).any(-1).mean() > 0.2  # and the tissue is still there


def test_extreme_aspect_ratio_is_padded_not_cut():
    strip = np.zeros((20, 400, 3), np.uint8)
    out = fit_square(strip, 64, 1.0)
    content = np.argwhere((out != 255).any(-1))
    assert out.shape == (64, 64, 3)
    assert content[:, 1].min() == 0 and content[:, 1].max() == 63  # full width
    assert 2 <= content[:, 0].max() - content[:, 0].min() + 1 <= 4  # height scaled by the same factor


def test_augmentations_keep_labels_and_image_statistics(ihc_thumbs):
    _, _, recs, _ = ihc_thumbs
    plain = ThumbnailDataset(recs, 8.0, 128, "mpp", 100.0, MEAN, STD, train=False)
    aug = ThumbnailDataset(recs, 8.0, 128, "mpp", 100.0, MEAN, STD, train=True, hed_sigma=0.05, scale_jitter=0.1)
    for i in range(len(recs)):
        for epoch in range(3):
            aug.epoch = epoch
            xa, ya, ia = aug[i]
            xp, yp, ip = plain[i]
            assert ya == yp == recs[i].label and ia == ip == i
            assert xa.shape == xp.shape == (3, 128, 128) and torch.isfinite(xa).all()
            # per-channel means stay close: stain jitter is modest, dihedral moves do not change them
            assert (xa.mean((1, 2)) - xp.mean((1, 2))).abs().max() < 0.35
    img = plain.crops[0]
    same = hed_jitter(img, np.random.default_rng(0), 0.0)
    assert np.abs(same.astype(int) - img.astype(int)).max() <= 1  # no jitter, no change
    moved = hed_jitter(img, np.random.default_rng(1), 0.05)
    assert 0 < np.abs(moved.astype(int) - img.astype(int)).mean() < 12  # a modest change


def test_tiny_tissue_is_a_clear_error(ihc_thumbs):
    _, _, recs, _ = ihc_thumbs
    with pytest.raises(Her2labError, match="tissue spans only .* px at 400 µm/px; use a finer data.thumb_mpp"):
        # at 400 µm/px the whole 2 mm slide is 5 px
        settings = ihc_thumbs[0]
        tiny = settings.thumb_path(recs[0].slide_id).with_name("tiny.png")
        img = cv2.imread(recs[0].thumb_path)
        cv2.imwrite(str(tiny), cv2.resize(img, (5, 4), interpolation=cv2.INTER_AREA))
        ThumbnailDataset([ThumbRecord(recs[0].slide_id, str(tiny), recs[0].tiles_path, 0)], 400.0, 64, "mpp", 0.0,
                         MEAN, STD, train=False)
