"""Attention maps: chunked scoring equals the model's forward pass; GeoJSON round-trips."""

from __future__ import annotations

import json

import numpy as np
import torch

from her2lab.explain.heatmaps import (
    SlideAttention,
    bag_attention,
    geojson,
    localisation_auroc,
    read_geojson,
)
from her2lab.io import write_h5
from her2lab.models.abmil import AttentionMIL
from her2lab.models.heads import ordinal_probs
from her2lab.models.pooling import MeanPoolMIL
from tests.helpers import mil_nets, write_trident


def _features(tmp_path, n=1000, d=32):
    rng = np.random.default_rng(0)
    feats = rng.standard_normal((n, d)).astype(np.float16)
    coords = np.stack(np.meshgrid(np.arange(40), np.arange(25)), -1).reshape(-1, 2)[:n] * 224
    path = tmp_path / "s.h5"
    write_h5(path, {"features": feats, "coords": coords}, {"slide_id": "s", "patch_px_level0": 224, "level0_mpp": 0.5, "slide_path": ""})
    return path, torch.as_tensor(feats.astype(np.float32))


def test_chunked_attention_equals_the_whole_bag_forward(tmp_path):
    path, x = _features(tmp_path)
    torch.manual_seed(0)
    for net, probs_of in ((AttentionMIL(32, 4, dropout=0.0), lambda z: z.softmax(-1)),
                          (AttentionMIL(32, 4, dropout=0.0, ordinal=True), ordinal_probs),
                          (MeanPoolMIL(32, 3, dropout=0.0), lambda z: z.softmax(-1))):
        net.eval()
        att = bag_attention(net, path, probs_of, chunk=96)  # 11 chunks, the last one short
        logits, w = net(x[None])
        assert np.allclose(att.attention, w[0].detach().numpy(), atol=1e-6) and np.isclose(att.attention.sum(), 1)
        assert np.allclose(att.probs, probs_of(logits)[0].detach().numpy(), atol=1e-5)
        tile = probs_of(net.classifier(net.project(x)))
        assert np.allclose(att.tile_probs, tile.detach().numpy(), atol=1e-5)  # per-class evidence
        assert np.allclose(att.tile_score, (tile @ torch.arange(tile.shape[1]).float()).detach().numpy(), atol=1e-5)


def test_geojson_round_trips_for_qupath(tmp_path):
    rng = np.random.default_rng(1)
    att = SlideAttention("s", rng.integers(0, 10**5, (50, 2)), rng.dirichlet(np.ones(50)), np.array([0.2, 0.8]),
                         rng.dirichlet(np.ones(2), 50), 448, 0.25, "")
    path = geojson(att, tmp_path / "s.geojson", ["neg", "pos"])
    coords, a = read_geojson(path)
    assert np.array_equal(coords, att.coords) and np.allclose(a, att.attention)
    f = json.loads(path.read_text())["features"][0]
    ring = f["geometry"]["coordinates"][0]
    assert f["geometry"]["type"] == "Polygon" and ring[0] == ring[-1] and ring[2][0] - ring[0][0] == 448
    m = f["properties"]["measurements"]
    assert f["properties"]["objectType"] == "detection" and m["attention"] == att.attention[0]
    assert m["p_pos"] == att.tile_probs[0, 1] and m["tile_score"] == att.tile_probs[0, 1]  # two classes: score = P(pos)
    assert f["properties"]["classification"]["name"] == ["neg", "pos"][int(att.tile_probs[0].argmax())]


def test_geojson_tiles_are_valid_closed_uuid_detections_with_a_class(tmp_path):
    """What QuPath needs to import the tiles as classified detections: valid closed polygons,
    unique UUIDs, each tile classified as its own predicted class with a fixed colour per class."""
    import uuid

    from shapely.geometry import shape

    rng = np.random.default_rng(2)
    names = ["0", "1+", "2+", "3+", "ultralow", "extra"]
    n = 60
    tile_probs = rng.dirichlet(np.ones(len(names)), n)
    att = SlideAttention("s", rng.integers(0, 10**5, (n, 2)), rng.dirichlet(np.ones(n)), np.full(6, 1 / 6),
                         tile_probs, 256, 0.5, "")
    feats = json.loads(geojson(att, tmp_path / "s.geojson", names).read_text())["features"]
    assert len(feats) == n
    ids = [f["id"] for f in feats]
    assert len(set(ids)) == n and all(str(uuid.UUID(i)) == i for i in ids)
    colour_of = {}
    for i, f in enumerate(feats):
        poly = shape(f["geometry"])
        ring = f["geometry"]["coordinates"][0]
        assert poly.geom_type == "Polygon" and poly.is_valid and poly.area == 256 * 256 and ring[0] == ring[-1]
        cls = f["properties"]["classification"]
        assert cls["name"] in names and cls["name"] == names[int(tile_probs[i].argmax())]
        assert len(cls["color"]) == 3 and all(isinstance(v, int) and 0 <= v <= 255 for v in cls["color"])
        assert colour_of.setdefault(cls["name"], cls["color"]) == cls["color"]  # one colour per class
    assert len({tuple(c) for c in colour_of.values()}) == len(colour_of)  # and distinct ones
    coords, a = read_geojson(tmp_path / "s.geojson")
    assert np.array_equal(coords, att.coords) and np.allclose(a, att.attention)


def test_localisation_auroc_on_a_hand_made_slide():
    # 4 tiles in a row; the mask covers the right half; attention grows to the right
    att = SlideAttention("s", np.array([[0, 0], [100, 0], [200, 0], [300, 0]]), np.array([0.1, 0.2, 0.3, 0.4]),
                         np.array([1.0]), np.array([[1.0, 0.0], [1.0, 0.0], [0.0, 1.0], [0.0, 1.0]]), 100, 1.0, "")
    mask = np.zeros((10, 40), np.uint8)
    mask[:, 20:] = 1  # mask at 10 µm/px: x ≥ 200 µm
    assert localisation_auroc(att, mask, 10.0) == 1.0
    assert localisation_auroc(att, mask, 10.0, values=-att.attention) == 0.0
    assert np.isnan(localisation_auroc(att, np.ones_like(mask), 10.0))


def test_attention_maps_leave_out_non_finite_tiles(tmp_path):
    """Heatmaps read the file themselves: with ``data.nonfinite=drop_tiles`` they see the same
    tiles as the model did."""
    from her2lab.explain.heatmaps import bag_attention

    rng = np.random.default_rng(4)
    x = rng.standard_normal((300, 24)).astype(np.float16)
    x[[10, 299], 3] = np.nan
    path = write_trident(tmp_path / "s.h5", x)
    keep = np.setdiff1d(np.arange(300), [10, 299])
    for net in mil_nets():
        net.eval()
        att = bag_attention(net, path, lambda z: z.softmax(-1), chunk=64)
        logits, w = net(torch.from_numpy(x[keep].astype(np.float32))[None])
        assert np.array_equal(att.coords[:, 0], keep * 256) and np.isfinite(att.tile_probs).all()
        assert np.allclose(att.attention, w[0].detach().numpy(), atol=1e-6)
        assert np.allclose(att.probs, logits.softmax(-1)[0].detach().numpy(), atol=1e-5)
