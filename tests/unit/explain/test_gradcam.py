"""Grad-CAM of an image classifier on IHC thumbnails."""

from __future__ import annotations

import cv2
import numpy as np
import pytest
import torch

from her2lab.data.thumbnails import (
    ThumbnailDataset,
    ThumbRecord,
    tissue_box,
)

MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


@pytest.mark.slow  # trains a ConvNeXt for 60 steps
def test_gradcam_finds_the_positive_region_better_than_chance(ihc_thumbs):
    """A ConvNeXt taught 'is this 2+/3+' on IHC thumbnails looks at the stained tumour: its
    Grad-CAM ranks the generator's positive-region pixels above the rest of the tissue."""
    from sklearn.metrics import roc_auc_score

    from her2lab.explain.gradcam import cam_maps
    from her2lab.models.image import build_image_classifier

    _, _, recs, cohort_root = ihc_thumbs
    recs = [ThumbRecord(r.slide_id, r.thumb_path, r.tiles_path, int(r.label >= 2)) for r in recs]  # 0/1+ vs 2+/3+
    ds = ThumbnailDataset(recs, 8.0, 128, "long_side", 0.0, MEAN, STD, train=False)
    x, y, _ = zip(*[ds[i] for i in range(len(ds))], strict=True)
    x, y = torch.stack(x), torch.tensor(y)
    torch.manual_seed(0)
    net = build_image_classifier("convnext_atto", num_classes=2)
    opt = torch.optim.AdamW(net.parameters(), lr=1e-4, weight_decay=0.0)
    for _ in range(60):
        loss = torch.nn.functional.cross_entropy(net(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert loss < 0.3  # it learned the training slides
    aucs = []
    masks = cohort_root / "masks"
    for i, r in enumerate(recs):
        if r.label != 1:
            continue
        cam = cam_maps(net, x[i : i + 1], [1], layer="stages.2")[0]  # 8×8 map at 128 px
        pos = cv2.imread(str(masks / f"{r.slide_id}_positive.png"), cv2.IMREAD_GRAYSCALE)
        tis = cv2.imread(str(masks / f"{r.slide_id}_tissue.png"), cv2.IMREAD_GRAYSCALE)
        aucs.append(roc_auc_score(*_in_input(ds, i, pos, tis, cam)))
    assert len(aucs) >= 2 and np.mean(aucs) > 0.6, aucs  # chance is 0.5


def _in_input(ds: ThumbnailDataset, i: int, pos: np.ndarray, tis: np.ndarray, cam: np.ndarray):
    """Truth labels and CAM values of the tissue pixels of input ``i``."""
    thumb = cv2.imread(ds.records[i].thumb_path)
    x0, y0, x1, y1 = tissue_box(ds.records[i].tiles_path, 8.0, thumb.shape[:2], 0.0)
    size = (thumb.shape[1], thumb.shape[0])
    pos = cv2.resize(pos, size, interpolation=cv2.INTER_NEAREST)[y0:y1, x0:x1]
    tis = cv2.resize(tis, size, interpolation=cv2.INTER_NEAREST)[y0:y1, x0:x1]
    s = ds.base_scale(i)
    h, w = pos.shape
    nh, nw = max(1, round(h * s)), max(1, round(w * s))
    oy, ox = (ds.input_px - nh) // 2, (ds.input_px - nw) // 2
    c = cam[oy : oy + nh, ox : ox + nw]
    pos = cv2.resize(pos, (nw, nh), interpolation=cv2.INTER_NEAREST) > 0
    tis = cv2.resize(tis, (nw, nh), interpolation=cv2.INTER_NEAREST) > 0
    return pos[tis], c[tis]
