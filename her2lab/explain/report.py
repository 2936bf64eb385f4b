"""The per-slide report: one self-contained HTML page per scored slide, and an index page.

Each page holds the prediction (score, probabilities, conformal set, referral, ensemble spread),
the slide's explanation pictures embedded as PNG data URIs with captions saying how to read them,
and what made it (``meta``). No external files, no network, no JavaScript libraries: a page can
be mailed or archived on its own. The index is a table of every slide, sortable by clicking a
column header (a few lines of inline JavaScript).
"""

from __future__ import annotations

import base64
import glob
import html
import math
from pathlib import Path
from urllib.parse import quote

import cv2
import numpy as np
import pandas as pd

from her2lab.errors import Her2labError
from her2lab.io import atomic_path
from her2lab.plots import class_colours

#: The pictures a page shows, in order: title, what the note on a page without it names, how to read it.
PICTURES: dict[str, tuple[str, str, str]] = {
    "heatmap": ("Attention heatmap", "heatmap",
                "Left: the slide. Middle: each tile coloured by how much the model's attention weighs it "
                "(its attention percentile; bright yellow = most attended, dark = least). Right: each tile's "
                "own score (the slide classifier applied to that tile alone; blue = the lowest class, "
                "red = the highest). Attention shows what the decision rests on, not necessarily positive tissue."),
    "evidence": ("Per-class evidence", "evidence map",
                 "One panel per class: each tile coloured by the probability the classifier gives that class "
                 "from the tile alone (yellow = high, dark purple = low)."),
    "tiles": ("Most and least attended tiles", "tile montage",
              "Top row: the most attended tiles, most attended first. Bottom row: the least attended tiles, "
              "least attended first."),
    "gradcam": ("Grad-CAM", "Grad-CAM map",
                "Left: the image the model saw. Right: the Grad-CAM map of the predicted class over it "
                "(red = regions that raised that class's score most, blue = least)."),
    "qc": ("Tissue and tiles (quality control)", "QC picture",
           "The slide thumbnail with the detected tissue outlined in green and the tiles the model read "
           "outlined in blue. Check that the tissue is found and nothing else (pen, debris) is tiled."),
    "thumbnail": ("Slide thumbnail", "thumbnail", "The whole slide at low resolution."),
}

DISCLAIMER = ("Research tool, not a diagnostic device: these results are not validated for clinical use "
              "and must not replace a pathologist's assessment.")

_STYLE = """
body{font-family:system-ui,-apple-system,'Segoe UI',Helvetica,Arial,sans-serif;margin:1.5em auto;max-width:1100px;
padding:0 1em;color:#222;line-height:1.4}
h1{font-size:1.5em;margin-bottom:.2em}h2{font-size:1.15em;margin-top:1.6em}
.result{border:2px solid #345;border-radius:8px;padding:1em 1.2em;background:#f6f8fa}
.score{font-size:1.6em;font-weight:bold}.muted{color:#666}
.refer{background:#c00;color:#fff;font-weight:bold;padding:.4em .7em;border-radius:5px;display:inline-block}
.norefer{background:#2a7;color:#fff;padding:.3em .7em;border-radius:5px;display:inline-block}
table{border-collapse:collapse}td,th{padding:.25em .6em;text-align:left;border-bottom:1px solid #ddd;vertical-align:top}
.probs td{border:none;padding:.1em .5em}.bar{width:260px;background:#e4e4e4;height:1em;border-radius:3px}
.bar span{display:block;height:100%;border-radius:3px}.pred{font-weight:bold}
figure{margin:1em 0}figure img{max-width:100%;border:1px solid #ccc}figcaption{font-size:.92em;color:#444}
.note{color:#666;font-style:italic}.disclaimer{margin-top:2em;padding:.6em;border:1px solid #c90;background:#fff8e5}
th[data-col]{cursor:pointer;background:#eef}th[data-col]:hover{background:#dde}
"""

# Click a header: sort by its cells' data-sort (numbers as numbers), again to reverse; blanks last.
_SORT_JS = """
document.querySelectorAll("th[data-col]").forEach(function (th) {
  th.addEventListener("click", function () {
    var body = th.closest("table").tBodies[0], i = th.cellIndex, asc = th.dataset.dir !== "asc";
    th.dataset.dir = asc ? "asc" : "desc";
    var rows = Array.prototype.slice.call(body.rows);
    rows.sort(function (a, b) {
      var x = a.cells[i].dataset.sort, y = b.cells[i].dataset.sort;
      if (x === "" || y === "") return (x === "") - (y === "");
      var nx = Number(x), ny = Number(y);
      var c = (isNaN(nx) || isNaN(ny)) ? x.localeCompare(y) : nx - ny;
      return asc ? c : -c;
    });
    rows.forEach(function (r) { body.appendChild(r); });
  });
});
"""


def collect_pictures(folder: Path, slide_ids: list[str], prep=None,
                     classes: list[str] | None = None) -> dict[str, dict[str, Path]]:
    """The explanation pictures that exist for each slide: under the evaluation (or run) folder
    ``folder``, ``heatmaps/{slide}_heatmap.png``, ``_evidence.png``, ``_tiles.png`` and the Grad-CAM
    overlay ``gradcam/{slide}_{class}.png`` (the newest, if several); given a
    :class:`~her2lab.slides.prepare.PrepareSettings` ``prep``, the QC picture and the thumbnail.

    ``classes`` pins the Grad-CAM names down exactly; without it, ``{slide}_*.png`` is matched,
    less the files of another listed slide whose id starts with ``{slide}_``.
    """
    folder = Path(folder)
    out: dict[str, dict[str, Path]] = {}
    for sid in slide_ids:
        found = {kind: folder / "heatmaps" / f"{sid}_{kind}.png" for kind in ("heatmap", "evidence", "tiles")}
        if prep is not None:
            found["qc"] = Path(prep.qc_path(sid))
            found["thumbnail"] = Path(prep.thumb_path(sid))
        found = {k: p for k, p in found.items() if p.is_file()}
        cams = _gradcams(folder / "gradcam", sid, slide_ids, classes)
        if cams:
            found["gradcam"] = max(cams, key=lambda p: p.stat().st_mtime)
        out[sid] = found
    return out


def _gradcams(cam_dir: Path, sid: str, slide_ids: list[str], classes: list[str] | None) -> list[Path]:
    """Grad-CAM overlays of slide ``sid`` (``save_gradcam`` names them ``{slide}_{class}.png``)."""
    if not cam_dir.is_dir():
        return []
    if classes is not None:
        return [p for c in classes if (p := cam_dir / f"{sid}_{c}.png").is_file()]
    longer = [o for o in slide_ids if o != sid and o.startswith(f"{sid}_")]
    return [p for p in cam_dir.glob(f"{glob.escape(sid)}_*.png")
            if p.is_file() and not any(p.name.startswith(f"{o}_") for o in longer)]


def write_reports(out: Path, predictions: pd.DataFrame, classes: list[str], pictures: dict[str, dict[str, Path]],
                  meta: dict, max_px: int = 1600, title: str = "HER2 scoring report") -> Path:
    """One page per slide of ``predictions`` in ``out/reports/{slide}.html`` and the index
    ``out/reports/index.html`` (returned).

    ``predictions`` has ``slide_id``, ``p_<class>`` for each of ``classes``, ``pred`` (else the
    argmax), and, shown where present: ``label`` (blank or NaN: unknown), ``set`` (class names
    joined by ``|``; "" is the empty set), ``refer``, ``refer_reason``, ``spread``, ``n_models``,
    ``coverage``. ``pictures[slide]`` maps names of :data:`PICTURES` to PNG files; a picture that
    some slide has and this one lacks (or cannot be read) is a note on its page. Pictures larger
    than ``max_px`` on their long side are shrunk to it. ``meta``'s key/values go on every page.
    """
    rows = _rows(predictions, classes)
    folder = Path(out) / "reports"
    kinds = [k for k in PICTURES if any(k in (pictures.get(r["slide_id"]) or {}) for r in rows)]
    kinds += sorted({k for r in rows for k in (pictures.get(r["slide_id"]) or {})} - set(kinds))
    colours = class_colours(len(classes))
    for r in rows:
        page = _slide_page(r, classes, colours, pictures.get(r["slide_id"]) or {}, kinds, meta, max_px, title)
        _write(folder / f"{r['slide_id']}.html", page)
    index = folder / "index.html"
    _write(index, _index_page(rows, classes, meta, title))
    return index


def _write(path: Path, text: str) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8")


def _missing(v) -> bool:
    return v is None or (isinstance(v, float) and math.isnan(v)) or v is pd.NA or v is pd.NaT


def _flag(v) -> bool | None:
    """A ``refer`` cell as True/False, or None when unknown (NaN, blank)."""
    if _missing(v):
        return None
    if isinstance(v, str):
        s = v.strip().lower()
        return None if not s else s in ("true", "1", "yes", "y")
    return bool(v)


def _num(v) -> float | None:
    try:
        x = float(v)
    except (TypeError, ValueError):
        return None
    return None if math.isnan(x) else x


def _rows(predictions: pd.DataFrame, classes: list[str]) -> list[dict]:
    """Plain per-slide dicts: slide_id, probs, pred (index), and the optional columns present."""
    need = ["slide_id"] + [f"p_{c}" for c in classes]
    lost = [c for c in need if c not in predictions.columns]
    if lost:
        raise Her2labError(f"per-slide report: the predictions lack column(s) {', '.join(lost)}")
    ids = predictions["slide_id"].astype(str)
    bad = [s for s in ids if s in ("", ".", "..") or any(ch in s for ch in "/\\\0")]
    if bad:
        raise Her2labError(f"per-slide report: slide id(s) {', '.join(map(repr, bad[:5]))} are not file names")
    dup = sorted(set(ids[ids.duplicated()]))
    if dup:
        raise Her2labError(f"per-slide report: slide(s) {', '.join(dup[:5])} appear more than once in the predictions")
    rows = []
    for rec in predictions.to_dict("records"):
        probs = np.array([float(rec[f"p_{c}"]) for c in classes])
        pred = rec.get("pred")
        pred = classes.index(str(pred)) if not _missing(pred) and str(pred) in classes else int(np.nanargmax(probs))
        label = rec.get("label")
        r = {"slide_id": str(rec["slide_id"]), "probs": probs, "pred": pred,
             "label": "" if _missing(label) else str(label).strip()}
        if "set" in predictions.columns:
            s = rec["set"]
            r["set"] = None if _missing(s) else [c for c in str(s).split("|") if c]
        if "refer" in predictions.columns:
            r["refer"] = _flag(rec["refer"])
            reason = rec.get("refer_reason")
            r["refer_reason"] = "" if _missing(reason) else str(reason)
        for k in ("spread", "n_models", "coverage"):
            if k in predictions.columns:
                r[k] = _num(rec[k])
        rows.append(r)
    # referred first, then the highest predicted score, the surest, the slide id
    rows.sort(key=lambda r: (not r.get("refer"), -r["pred"], -r["probs"][r["pred"]], r["slide_id"]))
    return rows


def _e(v) -> str:
    return html.escape(str(v), quote=True)


def _head(title: str) -> str:
    return (f'<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">'
            f'<meta name="viewport" content="width=device-width, initial-scale=1">'
            f"<title>{_e(title)}</title><style>{_STYLE}</style></head><body>\n")


def _set_text(r: dict) -> str:
    s = r.get("set")
    if s is None:
        return ""
    return "{" + ", ".join(s) + "}" if s else "∅ (empty)"


def _slide_page(r: dict, classes: list[str], colours, pics: dict[str, Path], kinds: list[str], meta: dict,
                max_px: int, title: str) -> str:
    sid, probs, pred = r["slide_id"], r["probs"], r["pred"]
    parts = [_head(f"{sid} — {title}"), f'<p class="muted"><a href="index.html">← all slides</a> · {_e(title)}</p>',
             f"<h1>Slide {_e(sid)}</h1>", '<div class="result">',
             f'<div>Predicted score: <span class="score">{_e(classes[pred])}</span> '
             f"with probability {probs[pred]:.2f}</div>", '<table class="probs">']
    for c, (name, p) in enumerate(zip(classes, probs, strict=True)):
        w = 0.0 if math.isnan(p) else min(max(p, 0.0), 1.0) * 100
        rgb = "rgb({},{},{})".format(*colours[c])
        cls = ' class="pred"' if c == pred else ""
        parts.append(f"<tr{cls}><td>{_e(name)}</td>"
                     f'<td><div class="bar"><span style="width:{w:.1f}%;background:{rgb}"></span></div></td>'
                     f"<td>{p:.2f}</td></tr>")
    parts.append("</table>")
    if r.get("set") is not None:
        cov = r.get("coverage")
        calib = f" (calibrated to contain the true score {100 * cov:g}% of the time)" if cov is not None else ""
        empty = "" if r["set"] else " — no score is plausible enough at this level; treat as uncertain"
        parts.append(f"<p>Prediction set: <b>{_e(_set_text(r))}</b>{_e(calib)}{_e(empty)}</p>")
    if "refer" in r:
        reason = f": {r['refer_reason']}" if r["refer_reason"] else ""
        if r["refer"]:
            parts.append(f'<p><span class="refer">REFER for pathologist review{_e(reason)}</span></p>')
        elif r["refer"] is False:
            parts.append('<p><span class="norefer">not referred</span></p>')
        else:
            parts.append('<p class="muted">referral unknown</p>')
    n = r.get("n_models")
    if r.get("spread") is not None or n is not None:
        models = f"{int(n)} model{'s' if int(n) != 1 else ''}" if n is not None else "the ensemble"
        spread = (f"; spread of the probabilities across models: {r['spread']:.3f}" if r.get("spread") is not None
                  else "")
        parts.append(f"<p>{_e(models)}{_e(spread)}</p>")
    if r["label"]:
        agree = "agrees with" if r["label"] == classes[pred] else "differs from"
        parts.append(f"<p>True score: <b>{_e(r['label'])}</b> ({agree} the prediction)</p>")
    else:
        parts.append('<p class="muted">True score: unknown</p>')
    parts.append("</div>")
    if kinds:
        parts.append("<h2>Pictures</h2>")
    for k in kinds:
        name, short, caption = PICTURES.get(k, (k, k, ""))
        uri = _data_uri(pics.get(k), max_px)
        if uri is None:
            parts.append(f'<p class="note">no {_e(short)} for this slide</p>')
            continue
        parts.append(f'<figure><img src="{uri}" alt="{_e(name)} of slide {_e(sid)}">'
                     f"<figcaption><b>{_e(name)}.</b> {_e(caption)}</figcaption></figure>")
    parts += [_meta_table(meta), f'<p class="disclaimer">{_e(DISCLAIMER)}</p>', "</body></html>\n"]
    return "\n".join(parts)


def _data_uri(path: Path | None, max_px: int) -> str | None:
    """A PNG data URI of the image at ``path``, shrunk to ``max_px`` on its long side; None if
    there is no such file or it is not a readable image."""
    if path is None or not Path(path).is_file():
        return None
    raw = Path(path).read_bytes()
    img = cv2.imdecode(np.frombuffer(raw, np.uint8), cv2.IMREAD_UNCHANGED)
    if img is None:
        return None
    h, w = img.shape[:2]
    if max(h, w) > max_px or not raw.startswith(b"\x89PNG"):
        s = min(1.0, max_px / max(h, w))
        if s < 1:
            img = cv2.resize(img, (max(1, round(w * s)), max(1, round(h * s))), interpolation=cv2.INTER_AREA)
        ok, buf = cv2.imencode(".png", img)
        if not ok:
            return None
        raw = buf.tobytes()
    return "data:image/png;base64," + base64.b64encode(raw).decode("ascii")


def _meta_table(meta: dict) -> str:
    rows = "".join(f"<tr><th>{_e(k)}</th><td>{_e(v)}</td></tr>" for k, v in (meta or {}).items())
    return f"<h2>About this report</h2><table class=\"meta\">{rows}</table>" if rows else ""


def _index_page(rows: list[dict], classes: list[str], meta: dict, title: str) -> str:
    has = {k: any(k in r for r in rows) for k in ("set", "refer", "spread")}
    has["label"] = any(r["label"] for r in rows)
    referred = sum(bool(r.get("refer")) for r in rows)
    counts = [sum(r["pred"] == c for r in rows) for c in range(len(classes))]
    summary = (f"<p><b>{len(rows)}</b> slide{'s' if len(rows) != 1 else ''}"
               + (f", <b>{referred}</b> referred" if has["refer"] else "") + ". Predicted: "
               + ", ".join(f"{_e(c)}: {n}" for c, n in zip(classes, counts, strict=True)) + ".</p>")
    head = ["slide", "predicted", "probability"] + [k for k in ("set", "refer", "spread", "label") if has[k]]
    parts = [_head(title), f"<h1>{_e(title)}</h1>", summary,
             '<p class="muted">Referred slides first, then the highest predicted score. '
             "Click a column header to sort by it (again to reverse).</p>",
             "<table><thead><tr>" + "".join(f'<th data-col="{h}">{h}</th>' for h in head) + "</tr></thead><tbody>"]
    for r in rows:
        sid, pred = r["slide_id"], r["pred"]
        cells = [(sid, f'<a href="{_e(quote(sid))}.html">{_e(sid)}</a>'),
                 (pred, _e(classes[pred])), (f"{r['probs'][pred]:.4f}", f"{r['probs'][pred]:.2f}")]
        if has["set"]:
            cells.append((len(r["set"]) if r.get("set") is not None else "", _e(_set_text(r))))
        if has["refer"]:
            f = r.get("refer")
            text = "" if f is None else ("REFER" if f else "no")
            if f and r["refer_reason"]:
                text += f" — {r['refer_reason']}"
            cells.append(("" if f is None else int(not f), f'<b>{_e(text)}</b>' if f else _e(text)))
        if has["spread"]:
            s = r.get("spread")
            cells.append(("" if s is None else s, "" if s is None else f"{s:.3f}"))
        if has["label"]:
            lab = r["label"]
            cells.append((classes.index(lab) if lab in classes else lab, _e(lab)))
        parts.append("<tr>" + "".join(f'<td data-sort="{_e(k)}">{v}</td>' for k, v in cells) + "</tr>")
    parts += ["</tbody></table>", _meta_table(meta), f'<p class="disclaimer">{_e(DISCLAIMER)}</p>',
              f"<script>{_SORT_JS}</script>", "</body></html>\n"]
    return "\n".join(parts)
