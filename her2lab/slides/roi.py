"""QuPath GeoJSON in and out: regions of interest that limit tiling, and tissue outlines.

Both are in level-0 pixel coordinates (x right, y down; QuPath's full-resolution image).
A ROI file is what QuPath's *Export objects as GeoJSON* writes: a ``FeatureCollection``, one
``Feature``, or a bare list of features (QuPath 0.2). Its ``Polygon`` and ``MultiPolygon``
geometries (holes included) are repaired when they self-intersect and merged into one area;
points and lines are ignored. A tissue outline is a ``FeatureCollection`` of annotations, one
``Polygon`` a tissue component, that QuPath imports by drag and drop.
"""

from __future__ import annotations

import hashlib
import json
import logging
import uuid
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import shapely
from shapely.errors import ShapelyError
from shapely.geometry import LineString, Point, Polygon, shape
from shapely.geometry.polygon import orient

from her2lab.errors import SlideError
from her2lab.slides.tissue import tissue_contour_tree

log = logging.getLogger(__name__)

#: The class and colour the tissue outline's annotations carry in QuPath.
TISSUE_CLASS = {"name": "Tissue", "color": [0, 170, 0]}
_AREA_TYPES = ("Polygon", "MultiPolygon")


@dataclass(frozen=True)
class Roi:
    """One slide's region of interest: its area (level-0 px) and the hash of the file's bytes."""

    path: Path
    area: shapely.Polygon | shapely.MultiPolygon
    digest: str

    def contains_tiles(self, coords: np.ndarray, patch_px_level0: int) -> np.ndarray:
        """Which tiles (level-0 top-left ``coords``, (N, 2)) have their centre inside; bool (N,)."""
        c = coords.astype(np.float64) + patch_px_level0 / 2
        return shapely.contains_xy(self.area, c[:, 0], c[:, 1])


def roi_digest(data: bytes) -> str:
    """The hash of a ROI file's bytes that tiles made inside it carry (16 hex digits)."""
    return hashlib.sha1(data).hexdigest()[:16]


def file_digest(path: Path) -> str:
    """:func:`roi_digest` of the file at ``path``; a one-line :class:`SlideError` if unreadable."""
    try:
        return roi_digest(path.read_bytes())
    except OSError as exc:
        raise SlideError(f"{path}: ROI file unreadable ({exc.strerror or exc}); fix its permissions or remove it") from None


def read_roi(path: str | Path) -> Roi:
    """The region of interest in a QuPath GeoJSON export.

    Raises:
        SlideError: unreadable or not JSON, not GeoJSON features, or no polygon with an area.
    """
    path = Path(path)
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise SlideError(f"{path}: ROI file unreadable ({exc.strerror or exc}); fix its permissions or remove it") from None
    try:
        doc = json.loads(data)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        where = f"line {exc.lineno} column {exc.colno}: {exc.msg}" if isinstance(exc, json.JSONDecodeError) else "not UTF-8"
        raise SlideError(f"{path}: not valid JSON ({where}); re-export it from QuPath (File > Export objects as GeoJSON)") from None
    parts, skipped = [], {}
    for i, geometry in enumerate(_geometries(doc, path)):
        kind = geometry.get("type") if isinstance(geometry, dict) else None
        if kind not in _AREA_TYPES and kind != "GeometryCollection":
            skipped[str(kind)] = skipped.get(str(kind), 0) + 1
            continue
        try:
            g = shape(geometry)
        except (ValueError, TypeError, KeyError, IndexError, AttributeError, ShapelyError) as exc:
            raise SlideError(f"{path}: feature {i} has a malformed {kind} ({exc}); re-export it from QuPath") from None
        parts += _polygons(shapely.make_valid(g))
    if skipped:
        log.info("%s: ignored %s (no area)", path, ", ".join(f"{n} {k}" for k, n in sorted(skipped.items())))
    area = shapely.unary_union(parts) if parts else None
    if area is None or area.is_empty or area.area <= 0:
        raise SlideError(
            f"{path}: no polygon in the ROI file (a ROI is an area: Polygon or MultiPolygon annotations); "
            "export area annotations from QuPath or remove the file"
        )
    shapely.prepare(area)
    return Roi(path, area, roi_digest(data))


def _geometries(doc, path: Path) -> list:
    """The geometries of a FeatureCollection, a Feature, a list of features or a bare geometry."""
    if isinstance(doc, list):
        features = doc
    elif isinstance(doc, dict) and doc.get("type") == "FeatureCollection":
        features = doc.get("features")
    elif isinstance(doc, dict) and doc.get("type") == "Feature":
        features = [doc]
    elif isinstance(doc, dict) and ("coordinates" in doc or "geometries" in doc):
        return [doc]  # a bare geometry
    else:
        features = None
    if not isinstance(features, list) or not all(isinstance(f, dict) for f in features):
        raise SlideError(
            f"{path}: not GeoJSON features (expected a FeatureCollection, a Feature or a list of features); "
            "export it from QuPath with File > Export objects as GeoJSON"
        )
    return [f.get("geometry") for f in features]


def _polygons(g) -> list:
    """The polygons of any geometry (a repaired polygon may come back as a collection)."""
    if isinstance(g, Polygon):
        return [g] if not g.is_empty else []
    if hasattr(g, "geoms"):
        return [p for part in g.geoms for p in _polygons(part)]
    return []


# --- tissue outlines -------------------------------------------------------------------------


def tissue_polygons(mask: np.ndarray, level0_per_mask_px: float) -> list[Polygon]:
    """The tissue mask as valid polygons with holes, one a component, in level-0 pixels.

    OpenCV traces the centres of a component's edge pixels; the outer ring is grown and the hole
    rings shrunk by half a pixel, so the area matches the mask's pixels (a one-pixel strand or
    hole keeps its area instead of vanishing).
    """
    contours, hierarchy = tissue_contour_tree(mask)
    polys = []
    for i, c in enumerate(contours):
        if hierarchy[i][3] != -1:
            continue  # a hole: handled with its component
        area = _region(c).buffer(0.5, join_style="mitre")
        j = hierarchy[i][2]
        holes = []
        while j != -1:
            holes.append(_region(contours[j]).buffer(-0.5, join_style="mitre"))
            j = hierarchy[j][0]
        if holes:
            area = area.difference(shapely.unary_union(holes))
        # mask pixel i spans [i, i+1): its centre i + 0.5 is at (i + 0.5) × scale in level 0
        area = shapely.transform(area, lambda xy: (xy + 0.5) * level0_per_mask_px)
        # snapped to a quarter level-0 pixel (exact in binary: short JSON), kept valid
        area = shapely.set_precision(shapely.make_valid(area), 0.25)
        polys += [orient(p) for p in _polygons(area) if p.area > 0]
    return polys


def _region(contour: np.ndarray):
    """An OpenCV contour (k, 1, 2) as a geometry (a line or point when it has no area)."""
    pts = contour.reshape(-1, 2).astype(np.float64)
    if len(pts) >= 3:
        return shapely.make_valid(Polygon(pts))
    return LineString(pts) if len(pts) == 2 else Point(pts[0])


def outline_geojson(polys: list[Polygon]) -> dict:
    """A QuPath-importable FeatureCollection: one ``Tissue`` annotation a polygon, closed rings."""
    features = [
        {
            "type": "Feature",
            "id": str(uuid.uuid4()),
            "geometry": _polygon_geometry(p),
            "properties": {"objectType": "annotation", "classification": dict(TISSUE_CLASS)},
        }
        for p in polys
    ]
    return {"type": "FeatureCollection", "features": features}


def _polygon_geometry(p: Polygon) -> dict:
    """GeoJSON geometry of a polygon: what ``shapely.geometry.mapping`` gives, the rings' points
    taken as arrays instead of one point at a time."""
    rings = [p.exterior, *p.interiors]
    return {"type": "Polygon", "coordinates": [shapely.get_coordinates(r).tolist() for r in rings]}


def write_outline(path: Path, polys: list[Polygon]) -> None:
    """Write the tissue outline GeoJSON to ``path`` (the caller makes the write atomic)."""
    path.write_text(json.dumps(outline_geojson(polys), separators=(",", ":")))
