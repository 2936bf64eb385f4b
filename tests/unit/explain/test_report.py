"""The per-slide report: self-contained pages with embedded pictures, escaped data, a sortable index."""

from __future__ import annotations

import base64
from html.parser import HTMLParser
from pathlib import Path
from urllib.parse import unquote

import cv2
import numpy as np
import pandas as pd
import pytest

from her2lab.errors import Her2labError
from her2lab.explain.report import collect_pictures, write_reports
from her2lab.slides.prepare import PrepareSettings
from her2lab.slides.thumbnails import save_png
from her2lab.slides.tiling import TilingParams
from her2lab.slides.tissue import TissueParams

CLASSES = ["0", "1+", "2+", "3+"]
HOSTILE = "<script>alert(1)</script>"


class _Page(HTMLParser):
    """Tags, links, images, scripts and table rows of one page."""

    def __init__(self, text: str):
        super().__init__()
        self.tags, self.links, self.images, self.scripts, self.rows = [], [], [], [], []
        self._script = self._row = None
        self.feed(text)

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        self.tags.append(tag)
        if tag == "a":
            self.links.append(a["href"])
            if self._row is not None:
                self._row["href"] = a["href"]
        elif tag == "img":
            self.images.append(a["src"])
        elif tag == "script":
            self._script = ""
        elif tag == "tr":
            self._row = {"text": ""}

    def handle_endtag(self, tag):
        if tag == "script":
            self.scripts.append(self._script)
            self._script = None
        elif tag == "tr" and self._row is not None:
            self.rows.append(self._row)
            self._row = None

    def handle_data(self, data):
        if self._script is not None:
            self._script += data
        if self._row is not None:
            self._row["text"] += data


def _png(path: Path, h: int = 40, w: int = 60, seed: int = 0) -> Path:
    save_png(path, np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8))
    return path


def _predictions() -> pd.DataFrame:
    p = np.array([[0.05, 0.10, 0.55, 0.30], [0.80, 0.15, 0.04, 0.01], [0.10, 0.20, 0.30, 0.40],
                  [0.30, 0.40, 0.20, 0.10]])
    df = pd.DataFrame({"slide_id": ["s1", "s2", "s3", "s4"], "label": ["2+", np.nan, HOSTILE, ""],
                       **{f"p_{c}": p[:, i] for i, c in enumerate(CLASSES)},
                       "pred": ["2+", "0", "3+", "1+"], "set": ["2+|3+", "0", "", "1+"],
                       "refer": [True, False, False, True],
                       "refer_reason": ["two classes in the set", "", "", HOSTILE],
                       "spread": [0.12, 0.02, np.nan, 0.05], "n_models": [5, 5, 5, 5], "coverage": 0.9})
    return df


def test_reports_embed_pictures_escape_data_and_list_every_slide(tmp_path):
    pics = {"s1": {k: _png(tmp_path / "pics" / f"s1_{k}.png", seed=i) for i, k in enumerate(("heatmap", "evidence", "tiles", "qc"))},
            "s2": {"heatmap": _png(tmp_path / "pics" / "s2_heatmap.png"), "qc": tmp_path / "pics" / "gone.png"},
            "s3": {}}
    meta = {"model": f"abmil {HOSTILE}", "encoder": "resnet50_trunc", "made": "2025-01-01T12:00:00"}
    index = write_reports(tmp_path / "out", _predictions(), CLASSES, pics, meta)
    reports = tmp_path / "out" / "reports"
    assert index == reports / "index.html" and index.is_file()
    assert sorted(p.name for p in reports.iterdir()) == ["index.html", "s1.html", "s2.html", "s3.html", "s4.html"]

    s1 = (reports / "s1.html").read_text()
    page = _Page(s1)
    assert len(page.images) == 4 and all(src.startswith("data:image/png;base64,") for src in page.images)
    img = cv2.imdecode(np.frombuffer(base64.b64decode(page.images[0].split(",", 1)[1]), np.uint8), cv2.IMREAD_COLOR)
    assert img.shape == (40, 60, 3)  # the picture itself, not a link to it
    assert "src=\"http" not in s1 and "<script" not in s1 and "<link" not in s1  # self-contained, no JavaScript
    for text in ("Slide s1", "0.55", "0.30", "0.05", "{2+, 3+}", "REFER", "two classes in the set", "90%",
                 "5 models", "0.120", "True score: <b>2+</b>", "Attention heatmap", "not a diagnostic device",
                 "resnet50_trunc", "2025-01-01T12:00:00"):
        assert text in s1, text
    assert "abmil &lt;script&gt;alert(1)&lt;/script&gt;" in s1 and HOSTILE not in s1

    s2 = (reports / "s2.html").read_text()
    assert len(_Page(s2).images) == 1 and "no QC picture for this slide" in s2  # its file is missing
    assert "no evidence map for this slide" in s2 and "True score: unknown" in s2 and "not referred" in s2
    s3 = (reports / "s3.html").read_text()
    assert "no heatmap for this slide" in s3 and "∅ (empty)" in s3 and "data:image" not in s3
    assert HOSTILE not in s3 and "&lt;script&gt;" in s3 and "<script" not in s3
    s4 = (reports / "s4.html").read_text()
    assert "REFER for pathologist review: &lt;script&gt;" in s4 and "True score: unknown" in s4

    text = index.read_text()
    idx = _Page(text)
    assert len(idx.scripts) == 1 and "alert" not in idx.scripts[0]  # only the sorting code
    assert HOSTILE not in text.replace(idx.scripts[0], "")
    body = [r for r in idx.rows if "href" in r]
    assert sorted(unquote(r["href"]) for r in body) == ["s1.html", "s2.html", "s3.html", "s4.html"]
    assert all((reports / unquote(h)).is_file() for h in idx.links)
    # referred first (s1 2+, s4 1+), then by predicted score, highest first (s3 3+, s2 0)
    assert [r["href"] for r in body] == ["s1.html", "s4.html", "s3.html", "s2.html"]
    assert "<b>4</b> slides, <b>2</b> referred" in text
    assert "0: 1, 1+: 1, 2+: 1, 3+: 1" in text
    assert [t for t in idx.tags if t == "th"] and text.count('data-col="') == 7  # all columns sortable


def test_reports_show_only_the_columns_there_are(tmp_path):
    df = _predictions()[["slide_id", *(f"p_{c}" for c in CLASSES), "pred"]]
    index = write_reports(tmp_path, df, CLASSES, {}, {})
    text = index.read_text()
    assert text.count('data-col="') == 3 and "REFER" not in text
    s1 = (tmp_path / "reports" / "s1.html").read_text()
    assert "Prediction set" not in s1 and "REFER" not in s1 and "referred" not in s1 and "spread" not in s1
    assert 'data-col="set"' not in text and "True score: <b>2+</b>" not in s1
    assert "<h2>Pictures</h2>" not in s1 and "About this report" not in s1


def test_large_pictures_are_shrunk_and_bad_ones_noted(tmp_path):
    big = _png(tmp_path / "big.png", h=300, w=900)
    bad = tmp_path / "bad.png"
    bad.write_bytes(b"\x89PNG not really")
    df = _predictions().iloc[:1]
    write_reports(tmp_path, df, CLASSES, {"s1": {"heatmap": big, "gradcam": bad}}, {}, max_px=120)
    page = _Page((tmp_path / "reports" / "s1.html").read_text())
    img = cv2.imdecode(np.frombuffer(base64.b64decode(page.images[0].split(",", 1)[1]), np.uint8), cv2.IMREAD_COLOR)
    assert len(page.images) == 1 and img.shape == (40, 120, 3)
    assert "no Grad-CAM map for this slide" in (tmp_path / "reports" / "s1.html").read_text()


def test_reports_refuse_bad_predictions(tmp_path):
    df = _predictions()
    with pytest.raises(Her2labError, match="p_3"):
        write_reports(tmp_path, df.drop(columns="p_3+"), CLASSES, {}, {})
    with pytest.raises(Her2labError, match="more than once"):
        write_reports(tmp_path, pd.concat([df, df.iloc[:1]]), CLASSES, {}, {})
    with pytest.raises(Her2labError, match="not file names"):
        write_reports(tmp_path, df.assign(slide_id=["a/b", "s2", "s3", "s4"]), CLASSES, {}, {})


def test_collect_pictures_finds_the_explanations_and_the_prepared_pictures(tmp_path):
    ev = tmp_path / "eval"
    for name in ("s1_heatmap.png", "s1_evidence.png", "s1_tiles.png", "s1_b_heatmap.png"):
        _png(ev / "heatmaps" / name)
    _png(ev / "gradcam" / "s1_3+.png")
    _png(ev / "gradcam" / "s1_b_0.png")
    prep = PrepareSettings(tmp_path / "cache", TilingParams(), TissueParams())
    _png(prep.qc_path("s1"))
    _png(prep.thumb_path("s1"))
    _png(prep.thumb_path("s1_b"))
    got = collect_pictures(ev, ["s1", "s1_b", "s2"], prep)
    assert got["s1"] == {"heatmap": ev / "heatmaps" / "s1_heatmap.png", "evidence": ev / "heatmaps" / "s1_evidence.png",
                         "tiles": ev / "heatmaps" / "s1_tiles.png", "qc": prep.qc_path("s1"),
                         "thumbnail": prep.thumb_path("s1"), "gradcam": ev / "gradcam" / "s1_3+.png"}
    assert got["s1_b"] == {"heatmap": ev / "heatmaps" / "s1_b_heatmap.png", "thumbnail": prep.thumb_path("s1_b"),
                           "gradcam": ev / "gradcam" / "s1_b_0.png"}
    assert got["s2"] == {}
    assert collect_pictures(ev, ["s1"], classes=CLASSES)["s1"]["gradcam"] == ev / "gradcam" / "s1_3+.png"
    assert collect_pictures(ev, ["s1"], classes=["0"])["s1"].get("gradcam") is None
