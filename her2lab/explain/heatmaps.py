"""MIL attention maps: heatmaps over the thumbnail, most/least attended tiles, QuPath GeoJSON, and
(where a ground-truth mask exists, as for the demo) how well they find positive tissue.

Two maps per slide: attention (which tiles the pooling weighs — evidence for *a* decision, not
necessarily for positivity), and the tile score: the slide classifier applied to each tile's
embedding alone, as the expected class index (where the model sees which HER2 class).

Attention is computed from the features file in chunks (``chunk`` tiles at a time: projection and
attention logits per chunk, one softmax over the N scalars, the pooled embedding accumulated
chunk by chunk), so memory stays bounded for slides of any number of tiles; the result equals the
model's forward pass on the whole bag.
"""

from __future__ import annotations

import json
import logging
import uuid
from dataclasses import dataclass
from pathlib import Path

import cv2
import h5py
import numpy as np
import torch

from her2lab.embed.features_file import nonfinite_rows
from her2lab.io import atomic_path
from her2lab.models.base import MILNet, MILNetError
from her2lab.plots import class_colours
from her2lab.slides.reader import Slide
from her2lab.slides.thumbnails import save_png

log = logging.getLogger(__name__)


@dataclass
class SlideAttention:
    slide_id: str
    coords: np.ndarray  # (N, 2) level-0 x, y of each tile's top-left corner
    attention: np.ndarray  # (N,) summing to 1
    probs: np.ndarray  # (C,) slide prediction
    tile_probs: np.ndarray  # (N, C) class probabilities of the slide classifier applied to each tile alone
    patch_px_level0: int
    level0_mpp: float
    slide_path: str

    @property
    def tile_score(self) -> np.ndarray:
        """(N,) each tile's expected class index (0 … C-1) under its own probabilities."""
        return self.tile_probs @ np.arange(self.tile_probs.shape[1], dtype=np.float64)

    def percentile(self) -> np.ndarray:
        """Each tile's attention rank in [0, 1] (1 = most attended)."""
        n = len(self.attention)
        r = np.empty(n)
        r[np.argsort(self.attention, kind="stable")] = np.arange(n)
        return r / max(n - 1, 1)


@torch.no_grad()
def bag_attention(net: MILNet, features_path: str | Path, probs_of, chunk: int = 8192) -> SlideAttention:
    """Attention of every tile of one slide, read and scored ``chunk`` tiles at a time.

    ``net`` is a :class:`~her2lab.models.base.MILNet`: its ``project`` and ``classifier`` score
    each tile; where its weights are a softmax of ``attention_logits``, they are computed chunk by
    chunk and ``pool`` accumulated over the chunks (a weighted sum, as the base class pools);
    otherwise the net's own chunked ``forward`` gives them. Tiles whose features hold NaN/Inf are
    left out (as ``data.nonfinite=drop_tiles`` leaves them out of the model's bag; under ``error``
    such a file never gets this far).
    """

    if not isinstance(net, MILNet):
        raise MILNetError(f"attention maps: {type(net).__name__} is not a MILNet; subclass her2lab.models.base.MILNet")

    net.eval()
    dev = next(net.parameters()).device
    dtype = next(net.parameters()).dtype
    with h5py.File(features_path, "r") as f:
        n = len(f["features"])
        coords = f["coords"][:]
        attrs = dict(f.attrs)
        keep = np.ones(n, bool)

        def tiles(s: int) -> torch.Tensor:
            """The finite tiles of chunk ``s`` (n, D), in the net's dtype."""
            x = f["features"][s : s + chunk]
            keep[s : s + len(x)] = ~nonfinite_rows(x)
            return torch.as_tensor(x[keep[s : s + len(x)]], device=dev).to(dtype)

        scores, tile = [], []
        for s in range(0, n, chunk):
            h = net.project(tiles(s))  # (n, H)
            tile.append(probs_of(net.classifier(h).float()))
            logits = net.attention_logits(h[None])  # (1, n), or None: weights not a softmax of logits
            if logits is not None:
                scores.append(logits[0])
        if scores:  # one softmax over the N scalars, then the pooled embedding chunk by chunk
            a = torch.softmax(torch.cat(scores), 0)  # (N,)
            z, at = 0, 0
            for s in range(0, n, chunk):
                h = net.project(tiles(s))[None]  # (1, n, H)
                w = a[None, at : at + h.shape[1]]  # (1, n)
                z = z + net.pool(h, w, torch.ones(w.shape, dtype=torch.bool, device=dev))  # (1, H)
                at += h.shape[1]
            logits = net.classifier(z)
        else:  # weights over the whole bag (pooling baselines): the net's own chunked forward
            x = f["features"][:]
            x = torch.as_tensor(x if keep.all() else x[keep], device=dev)[None]  # (1, N, D) in the file's dtype
            logits, w = net(x, chunk=chunk)
            a = w[0]
    return SlideAttention(
        slide_id=str(attrs.get("slide_id", Path(features_path).stem)), coords=coords[keep].astype(np.int64),
        attention=a.cpu().numpy().astype(np.float64), probs=probs_of(logits.float())[0].cpu().numpy(),
        tile_probs=torch.cat(tile).cpu().numpy().astype(np.float64),
        patch_px_level0=int(attrs.get("patch_px_level0", 0)), level0_mpp=float(attrs.get("level0_mpp", 0.0)),
        slide_path=str(attrs.get("slide_path", "")),
    )


def _painter(att: SlideAttention, thumb: np.ndarray, thumb_mpp: float):
    """``paint(values)``: a thumbnail-sized masked array, each tile's square filled with its value."""
    s = att.level0_mpp / thumb_mpp
    p = max(1, round(att.patch_px_level0 * s))
    xy = np.round(att.coords * s).astype(int)

    def paint(values: np.ndarray) -> np.ndarray:
        heat = np.full(thumb.shape[:2], np.nan)
        for (x, y), v in zip(xy, values, strict=True):
            heat[max(y, 0) : y + p, max(x, 0) : x + p] = v
        return np.ma.masked_invalid(heat)

    return paint


def _save(fig, path: Path) -> Path:
    import matplotlib.pyplot as plt

    fig.tight_layout()
    with atomic_path(Path(path)) as tmp:
        fig.savefig(tmp, format="png")
    plt.close(fig)
    return Path(path)


def heatmap_png(att: SlideAttention, thumb: np.ndarray, thumb_mpp: float, path: Path, title: str = "",
                class_names: list[str] | None = None) -> Path:
    """The thumbnail; every tile coloured by its attention percentile; and by its own score (the
    slide classifier applied to the tile alone: where the model sees which HER2 class)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    paint = _painter(att, thumb, thumb_mpp)
    k = len(att.probs)
    h, w = thumb.shape[:2]
    fig, axes = plt.subplots(1, 3, figsize=(3 * 3.6 * w / max(h, w) + 2.0, 3.6 * h / max(h, w) + 0.8), dpi=120)
    axes[0].imshow(thumb)
    axes[0].set_title("slide", fontsize=9)
    axes[1].imshow(thumb)
    im = axes[1].imshow(paint(att.percentile()), cmap="inferno", vmin=0, vmax=1, alpha=0.65)
    axes[1].set_title("attention", fontsize=9)
    fig.colorbar(im, ax=axes[1], fraction=0.046, pad=0.02, label="attention percentile")
    axes[2].imshow(thumb)
    im = axes[2].imshow(paint(att.tile_score), cmap="coolwarm", vmin=0, vmax=k - 1, alpha=0.65)
    axes[2].set_title("tile score", fontsize=9)
    cb = fig.colorbar(im, ax=axes[2], fraction=0.046, pad=0.02, ticks=range(k))
    cb.ax.set_yticklabels(class_names or [str(i) for i in range(k)])
    for ax in axes:
        ax.set_axis_off()
    fig.suptitle(title, fontsize=9)
    return _save(fig, path)


def evidence_png(att: SlideAttention, thumb: np.ndarray, thumb_mpp: float, path: Path, title: str = "",
                 class_names: list[str] | None = None) -> Path:
    """Per-class evidence: one panel per class, every tile coloured by the probability the slide
    classifier gives that class from the tile alone (one colour bar, 0 to 1)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    paint = _painter(att, thumb, thumb_mpp)
    k = att.tile_probs.shape[1]
    names = class_names or [str(i) for i in range(k)]
    h, w = thumb.shape[:2]
    fig, axes = plt.subplots(1, k, figsize=(k * 3.2 * w / max(h, w) + 1.2, 3.2 * h / max(h, w) + 0.8), dpi=120)
    for c, ax in enumerate(np.atleast_1d(axes)):
        ax.imshow(thumb)
        im = ax.imshow(paint(att.tile_probs[:, c]), cmap="viridis", vmin=0, vmax=1, alpha=0.7)
        ax.set_title(f"P({names[c]} | tile)", fontsize=9)
        ax.set_axis_off()
    fig.colorbar(im, ax=list(np.atleast_1d(axes)), fraction=0.02, pad=0.01, label="tile probability")
    fig.suptitle(title, fontsize=9)
    with atomic_path(Path(path)) as tmp:  # no tight_layout: it fights the shared colour bar
        fig.savefig(tmp, format="png")
    plt.close(fig)
    return Path(path)


def montage_png(att: SlideAttention, path: Path, k: int = 8, px: int = 96, mpp: float | None = None) -> Path:
    """Two rows: the ``k`` most attended tiles, then the ``k`` least attended, read from the slide."""

    order = np.argsort(-att.attention, kind="stable")
    k = min(k, len(order))
    rows = []
    with Slide(att.slide_path, mpp_override=mpp) as slide:
        for idx in (order[:k], order[::-1][:k]):
            tiles = []
            for i in idx:
                x, y = (int(v) for v in att.coords[i])
                tile = slide.read_region((x, y), 0, (att.patch_px_level0, att.patch_px_level0))
                tiles.append(cv2.resize(tile, (px, px), interpolation=cv2.INTER_AREA))
            tiles += [np.full((px, px, 3), 255, np.uint8)] * (k - len(tiles))
            rows.append(np.concatenate(tiles, axis=1))
    gap = np.full((6, rows[0].shape[1], 3), 255, np.uint8)

    save_png(path, np.concatenate([rows[0], gap, rows[1]], axis=0))
    return Path(path)


def geojson(att: SlideAttention, path: Path, class_names: list[str] | None = None) -> Path:
    """Tiles as QuPath-readable GeoJSON (level-0 pixel polygons): detections with a UUID each,
    classified as the tile's own predicted class (the argmax of its tile probabilities, coloured
    by :func:`~her2lab.plots.class_colours`), with measurements: attention, its percentile, the
    tile score and each class's tile probability (``p_<class>``)."""
    p = att.patch_px_level0
    pct = att.percentile()
    score = att.tile_score
    names = class_names or [str(i) for i in range(att.tile_probs.shape[1])]
    colours = class_colours(len(names))
    top = att.tile_probs.argmax(1) if len(att.tile_probs) else np.zeros(0, int)
    feats = []
    for i, ((x, y), a) in enumerate(zip(att.coords.tolist(), att.attention.tolist(), strict=True)):
        c = int(top[i])
        feats.append({
            "type": "Feature", "id": str(uuid.uuid4()),
            "geometry": {"type": "Polygon", "coordinates": [[[x, y], [x + p, y], [x + p, y + p], [x, y + p], [x, y]]]},
            "properties": {"objectType": "detection", "name": f"tile {i}",
                           "classification": {"name": names[c], "color": list(colours[c])},
                           "measurements": {"attention": a, "attention_percentile": float(pct[i]),
                                            "tile_score": float(score[i]),
                                            **{f"p_{n}": float(v) for n, v in zip(names, att.tile_probs[i], strict=True)}}},
        })
    with atomic_path(Path(path)) as tmp:
        tmp.write_text(json.dumps({"type": "FeatureCollection", "features": feats}))
    return Path(path)


def read_geojson(path: Path) -> tuple[np.ndarray, np.ndarray]:
    """Tile top-left corners (N, 2) and attention (N,) back from :func:`geojson`'s file."""
    feats = json.loads(Path(path).read_text())["features"]
    coords = np.array([f["geometry"]["coordinates"][0][0] for f in feats], dtype=np.int64).reshape(-1, 2)
    return coords, np.array([f["properties"]["measurements"]["attention"] for f in feats])


def localisation_auroc(att: SlideAttention, mask: np.ndarray, mask_mpp: float, values: np.ndarray | None = None) -> float:
    """AUROC of ``values`` (default: attention) for 'the tile's centre lies in the mask' (NaN if
    all or none do)."""
    from sklearn.metrics import roc_auc_score

    inside = tiles_inside(att, mask, mask_mpp)
    if inside.all() or not inside.any():
        return float("nan")
    return float(roc_auc_score(inside, att.attention if values is None else values))


def tiles_inside(att: SlideAttention, mask: np.ndarray, mask_mpp: float) -> np.ndarray:
    """(N,) bool: the tile's centre lies in ``mask`` (an image at ``mask_mpp`` µm/px)."""
    c = (att.coords + att.patch_px_level0 / 2) * att.level0_mpp / mask_mpp
    xs = np.clip(c[:, 0].astype(int), 0, mask.shape[1] - 1)
    ys = np.clip(c[:, 1].astype(int), 0, mask.shape[0] - 1)
    return mask[ys, xs] > 0
