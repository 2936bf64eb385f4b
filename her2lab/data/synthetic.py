"""The built-in demo cohort: synthetic H&E- and IHC-stained breast slides with known HER2 truth.

Each slide is a real pyramidal, tiled, JPEG-compressed TIFF (levels as top-level pages with
``subfiletype=1``, mpp in the resolution tags) that OpenSlide opens as ``generic-tiff``.
Generation is deterministic given ``seed`` and fast enough for CI.

Pixels follow the Beer–Lambert stain model: optical densities of hematoxylin, eosin and DAB
(Ruifrok & Johnston 2001 stain vectors) are painted per structure and turned into RGB.

- **Geometry** (shared by a case's H&E and IHC slide, like serial sections): tissue pieces with
  holes, tumour nests inside the tissue, and HER2 *positive regions* inside the tumour whose share
  of the tumour grows with the HER2 score.
- **IHC**: tumour cells in positive regions carry DAB membrane rings whose intensity and
  completeness follow clinical scoring (1+ faint/incomplete, 2+ weak-moderate complete,
  3+ strong complete); hematoxylin counterstain elsewhere.
- **HER2-ultralow** (``ultralow_fraction > 0``): that share of the score-0 patients is ultralow:
  faint, incomplete DAB rings on 3–9 % of the tumour cells (never more than 10 %); the other
  score-0 slides are HER2-null, with no DAB at all. The manifest then has a ``her2_ultralow``
  column (``yes``/``no`` on score-0 rows, empty on the others). With ``ultralow_fraction = 0``
  (the default) nothing changes: no such column, and score-0 slides keep their few faint cells
  (unlabelled) exactly as before. The label is the case's, so an H&E cohort with the same seed
  carries it too; H&E pixels do not show it.
- **H&E**: a subtler cue: in positive regions nuclei are larger and darker and cytoplasm more
  amphophilic; slide-to-slide stain variation is of the same order, so it is learnable, not trivial.
- **Nuisances**: off-white background with a gradient and dust, a pen mark on the glass, a black
  slide-holder border, an unscanned (pure white) band, and an out-of-focus patch of tissue.

Ground truth is saved as PNG masks at ``mask_mpp`` µm/px: ``masks/{slide_id}_{tissue,tumour,positive}.png``.
"""

from __future__ import annotations

import json
import logging
import shutil
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path

import cv2
import numpy as np
import pandas as pd
import tifffile

from her2lab.data.cohort import slide_id_problem
from her2lab.io import atomic_path, param_hash
from her2lab.progress import progress_bar

log = logging.getLogger(__name__)

SCORES = ("0", "1+", "2+", "3+")

#: Optical density per unit stain (rows: H, E, DAB; columns: R, G, B), Ruifrok & Johnston 2001.
STAIN_OD = np.array(
    [[0.650, 0.704, 0.286], [0.072, 0.990, 0.105], [0.268, 0.570, 0.776]], dtype=np.float32
)

#: Share of the tumour covered by positive regions, per score.
POSITIVE_SHARE = {"0": 0.0, "1+": 0.40, "2+": 0.60, "3+": 0.85}
#: IHC membrane (intensity, completeness as a fraction of the ring) per score.
MEMBRANE = {"0": (0.0, 0.0), "1+": (0.22, 0.45), "2+": (0.50, 0.85), "3+": (0.95, 1.0)}
#: H&E morphological strength per score (0 = no change).
HNE_STRENGTH = {"0": 0.0, "1+": 0.55, "2+": 0.8, "3+": 1.0}
#: HER2-ultralow membrane (intensity, completeness): fainter and less complete than 1+.
ULTRALOW_MEMBRANE = (0.12, 0.3)
#: Range of the share of tumour cells an ultralow slide stains (drawn per slide; ≤ 10 %).
ULTRALOW_CELLS = (0.03, 0.09)


@dataclass
class SyntheticConfig:
    """Parameters of a synthetic cohort; the defaults make a 40-slide cohort in about a minute."""

    n_slides: int = 40
    n_pairs: int = 6  # patients with two slides
    stain: str = "hne"  # "hne" or "ihc"
    seed: int = 0
    width_px: int = 4096
    height_px: int = 3072
    mpp: float = 0.5
    downsamples: tuple[int, ...] = (1, 4, 16)
    tile_px: int = 256
    jpeg_quality: int = 90
    mask_mpp: float = 8.0
    signal: float = 1.0  # multiplies the HER2 cue; 0 makes the classes indistinguishable
    nuisances: bool = True
    scores: tuple[str, ...] = field(default=SCORES)
    id_prefix: str = ""  # slide and patient ids start with it (tells cohorts of other seeds apart)
    ultralow_fraction: float = 0.0  # share of the score-0 patients that are HER2-ultralow (0: off)

    def __post_init__(self) -> None:
        if self.stain not in ("hne", "ihc"):
            raise ValueError(f"synthetic stain {self.stain!r} is not 'hne' or 'ihc'")
        if self.n_pairs * 2 > self.n_slides:
            raise ValueError(f"n_pairs={self.n_pairs} needs at least {2 * self.n_pairs} slides")
        if self.width_px * self.mpp < 1000 or self.height_px * self.mpp < 750:
            raise ValueError(
                f"synthetic slide of {self.width_px}x{self.height_px}px at {self.mpp} µm/px is "
                "smaller than 1 x 0.75 mm: too small for tissue; raise width_px/height_px"
            )
        self.downsamples = tuple(int(d) for d in self.downsamples)
        self.scores = tuple(str(s) for s in self.scores)
        if not 0.0 <= self.ultralow_fraction <= 1.0:
            raise ValueError(f"synthetic ultralow_fraction={self.ultralow_fraction} is not within 0..1")
        # The prefix becomes part of file names: hold it to the manifest's rule for slide ids.
        problem = slide_id_problem(f"{self.id_prefix}case000_{self.stain}")
        if problem:
            raise ValueError(f"synthetic id_prefix {self.id_prefix!r} cannot start file names: {problem}")


@dataclass
class CaseGeometry:
    """Layout of one case at ``layout_mpp`` (boolean masks) plus cell positions at level 0."""

    tissue: np.ndarray
    tumour: np.ndarray
    positive: np.ndarray
    pen: np.ndarray  # polyline points, level-0 px
    extras: dict


# --------------------------------------------------------------------------------------------
# Cohort
# --------------------------------------------------------------------------------------------
def cohort_table(cfg: SyntheticConfig) -> pd.DataFrame:
    """Slide/patient/label table of the cohort (no pixels): deterministic from ``cfg.seed``."""
    rng = np.random.default_rng([cfg.seed, 7919])
    n_patients = cfg.n_slides - cfg.n_pairs
    labels = np.array([cfg.scores[i % len(cfg.scores)] for i in range(n_patients)])
    rng.shuffle(labels)
    # 2+ is split by ISH (about half amplified); other scores carry no ISH result, as in practice.
    ish = np.array(["" if s != "2+" else ("pos" if rng.random() < 0.5 else "neg") for s in labels])
    # HER2-ultralow: drawn after everything else, so the rest of the table is the same with it off.
    ultralow = np.full(n_patients, "", dtype=object)
    if cfg.ultralow_fraction > 0:
        zero = np.flatnonzero(labels == "0")
        k = min(len(zero), max(1, round(cfg.ultralow_fraction * len(zero))))
        ultralow[zero] = "no"
        ultralow[rng.permutation(zero)[:k]] = "yes"
    rows = []
    case = 0
    for p in range(n_patients):
        for _ in range(2 if p < cfg.n_pairs else 1):
            rows.append(
                {
                    "slide_id": f"{cfg.id_prefix}case{case:03d}_{cfg.stain}",
                    "patient_id": f"{cfg.id_prefix}P{p:03d}",
                    "case": case,
                    "her2_score": labels[p],
                    "ish": ish[p],
                    "her2_ultralow": ultralow[p],
                }
            )
            case += 1
    return pd.DataFrame(rows)


#: What a cohort folder holds that was made from its slides (her2lab's caches, see
#: slides/prepare.py and embed/cohort.py): removed when the slides are made again.
DERIVED = ("tiles", "thumbs", "qc", "outlines", "features")
DERIVED_FILES = ("prepare_report*.csv", "failures*.csv")


def generate_cohort(
    out_dir: str | Path, cfg: SyntheticConfig | None = None, num_workers: int = 2,
    cache_dir: str | Path | None = None,
) -> Path:
    """Write slides, masks and ``manifest.csv`` under ``out_dir``; return the manifest path.

    Idempotent: slides already written with the same parameters are kept, so an interrupted
    generation resumes where it stopped. A slide is done when its TIFF and its three masks
    exist; the TIFF is written last, so a slide whose masks are missing is made again whole.

    A folder made with other parameters (``cohort.json``) is made again whole, with a warning
    naming what changed: its slides, masks and the caches made from them in ``out_dir`` (tiles,
    thumbnails, QC, outlines, features, reports) are removed first, so nothing made from the old
    slides is read as if it were made from the new ones (a tiles file is keyed by slide id, and
    the same id may now name another slide). ``cache_dir``: the cohort's cache folder when it is
    not ``out_dir``; its caches are not removed (it may be shared), only reported.
    """
    cfg = cfg or SyntheticConfig()
    out_dir = Path(out_dir)
    (out_dir / "slides").mkdir(parents=True, exist_ok=True)
    (out_dir / "masks").mkdir(parents=True, exist_ok=True)
    params = asdict(cfg)
    if not cfg.ultralow_fraction:  # off: the hash (and cohort.json) of cohorts made before it
        del params["ultralow_fraction"]
    h = param_hash(params)
    meta_path = out_dir / "cohort.json"
    if meta_path.exists():
        old = json.loads(meta_path.read_text())
        if old.get("param_hash") != h:
            _start_again(out_dir, old.get("params") or {}, params, cache_dir)
    with atomic_path(meta_path) as tmp:
        tmp.write_text(json.dumps({"param_hash": h, "params": params}, indent=2, default=list))

    table = cohort_table(cfg)
    todo = [r for r in table.itertuples() if not _case_done(out_dir, r.slide_id)]
    jobs = [
        (cfg, r.case, r.slide_id, r.her2_score, r.ish, out_dir, _ultralow_arg(cfg, r.her2_ultralow))
        for r in todo
    ]
    if jobs:
        with progress_bar(
            f"generating {len(jobs)} synthetic {cfg.stain} slides", len(jobs)
        ) as advance:
            if num_workers > 1 and len(jobs) > 1:
                with ProcessPoolExecutor(num_workers) as pool:
                    for _ in pool.map(_write_case_job, jobs):
                        advance()
            else:
                for job in jobs:
                    _write_case_job(job)
                    advance()

    columns = ["slide_id", "patient_id", "path", "her2_score", "ish", "stain"]
    if cfg.ultralow_fraction > 0:
        columns.insert(5, "her2_ultralow")
    manifest = table.drop(columns=["case"]).assign(
        path=[f"slides/{s}.tiff" for s in table.slide_id], stain=cfg.stain
    )[columns]
    manifest_path = out_dir / "manifest.csv"
    with atomic_path(manifest_path) as tmp:
        manifest.to_csv(tmp, index=False)
    return manifest_path


def _start_again(out_dir: Path, old: dict, new: dict, cache_dir: str | Path | None) -> None:
    """Remove a cohort folder's slides, masks and derived caches made with other parameters."""
    changed = [f"{k}: {old.get(k, '(unset)')!r} → {new.get(k, '(unset)')!r}"
               for k in sorted({*old, *new}) if _plain(old.get(k)) != _plain(new.get(k))]
    removed = [d for d in DERIVED if (out_dir / d).is_dir()]
    removed += sorted({p.name for pattern in DERIVED_FILES for p in out_dir.glob(pattern)})
    made = f" and the caches made from them ({', '.join(removed)})" if removed else ""
    log.warning("synthetic cohort in %s was made with other parameters (%s): making it again; "
                "removed its slides and masks%s",
                out_dir, ", ".join(changed) or "an earlier version's", made)
    for p in [*(out_dir / "slides").glob("*.tiff"), *(out_dir / "masks").glob("*.png")]:
        p.unlink()
    for d in DERIVED:
        if (out_dir / d).is_dir():
            shutil.rmtree(out_dir / d)
    for pattern in DERIVED_FILES:
        for p in out_dir.glob(pattern):
            p.unlink()
    if cache_dir is not None and Path(cache_dir).resolve() != out_dir.resolve():
        stale = [d for d in DERIVED if (Path(cache_dir) / d).is_dir()]
        if stale:
            log.warning("cohort cache folder %s holds %s made from the old slides; remove "
                        "them (or set prepare.overwrite=true and extract.overwrite=true) before "
                        "using it", cache_dir, ", ".join(stale))


def _plain(v):
    return list(v) if isinstance(v, tuple | list) else v


MASK_NAMES = ("tissue", "tumour", "positive")


def _case_done(out_dir: Path, slide_id: str) -> bool:
    """A slide and its masks are one unit: done only when all of its files exist."""
    files = [out_dir / "slides" / f"{slide_id}.tiff"]
    files += [out_dir / "masks" / f"{slide_id}_{name}.png" for name in MASK_NAMES]
    return all(f.exists() for f in files)


def _ultralow_arg(cfg: SyntheticConfig, value: str) -> bool | None:
    """``render_slide``'s ``ultralow``: None with the option off (score 0 as it always was)."""
    return None if cfg.ultralow_fraction <= 0 or value == "" else value == "yes"


def _write_case_job(job: tuple) -> None:
    cfg, case, slide_id, score, ish, out_dir, ultralow = job
    write_case(cfg, case, slide_id, score, ish, Path(out_dir), ultralow)


def write_case(
    cfg: SyntheticConfig,
    case: int,
    slide_id: str,
    score: str,
    ish: str,
    out_dir: Path,
    ultralow: bool | None = None,
) -> Path:
    """Render one slide and write it (atomically) with its ground-truth masks.

    The masks are written first and the slide last: the slide's TIFF marks the case as done.
    ``ultralow`` is :func:`render_slide`'s.
    """
    geom = case_geometry(cfg, case, score)
    rgb = render_slide(cfg, case, geom, score, ish, ultralow)  # also makes geom agree with the pixels
    mask_w = round(cfg.width_px * cfg.mpp / cfg.mask_mpp)
    mask_h = round(cfg.height_px * cfg.mpp / cfg.mask_mpp)
    for name in MASK_NAMES:
        m = cv2.resize(
            getattr(geom, name).astype(np.float32), (mask_w, mask_h), interpolation=cv2.INTER_AREA
        )
        with atomic_path(out_dir / "masks" / f"{slide_id}_{name}.png") as tmp:
            # imwrite reports a failed write (e.g. a full disk) only by returning False.
            if not cv2.imwrite(str(tmp), ((m > 0.5) * 255).astype(np.uint8)):
                raise OSError(f"{tmp}: writing the {name} mask failed")
    path = out_dir / "slides" / f"{slide_id}.tiff"
    with atomic_path(path) as tmp:
        write_pyramid_tiff(tmp, rgb, cfg.mpp, cfg.downsamples, cfg.tile_px, cfg.jpeg_quality)
    return path


def write_pyramid_tiff(
    path: str | Path,
    rgb: np.ndarray,
    mpp: float,
    downsamples: tuple[int, ...] = (1, 4, 16),
    tile_px: int = 256,
    jpeg_quality: int = 90,
) -> None:
    """Write an RGB array as a tiled JPEG pyramid that OpenSlide reads as ``generic-tiff``.

    OpenSlide finds reduced levels only in top-level pages marked ``subfiletype=1`` (not in
    SubIFDs), and takes mpp from the resolution tags (pixels per centimetre). Tiles are YCbCr
    4:2:0 JPEG like most scanners'; tifffile expects the pixels already in YCbCr for that.
    """
    h, w = rgb.shape[:2]
    with tifffile.TiffWriter(path, bigtiff=rgb.nbytes > 2**31) as tw:
        for i, ds in enumerate(downsamples):
            level = rgb if ds == 1 else cv2.resize(rgb, (w // ds, h // ds), interpolation=cv2.INTER_AREA)
            ycbcr = cv2.cvtColor(level, cv2.COLOR_RGB2YCrCb)[..., [0, 2, 1]]
            res = 1e4 / (mpp * ds)
            tw.write(
                _edge_padded_tiles(ycbcr, tile_px),
                shape=ycbcr.shape,
                dtype=np.uint8,
                tile=(tile_px, tile_px),
                compression="jpeg",
                compressionargs={"level": jpeg_quality},
                photometric="ycbcr",
                subfiletype=1 if i else 0,
                resolution=(res, res),
                resolutionunit="CENTIMETER",
                metadata=None,
            )


def _edge_padded_tiles(img: np.ndarray, tile_px: int):
    """Row-major tiles; edge tiles padded by repeating the last row/column, not with zeros.

    Zero padding is (Y, Cb, Cr) = 0, which chroma subsampling would bleed into the last real
    pixels as a green fringe.
    """
    h, w = img.shape[:2]
    for y in range(0, h, tile_px):
        for x in range(0, w, tile_px):
            t = img[y : y + tile_px, x : x + tile_px]
            if t.shape[:2] != (tile_px, tile_px):
                t = np.pad(t, ((0, tile_px - t.shape[0]), (0, tile_px - t.shape[1]), (0, 0)), mode="edge")
            yield np.ascontiguousarray(t)


# --------------------------------------------------------------------------------------------
# Geometry
# --------------------------------------------------------------------------------------------
LAYOUT_DS = 8  # geometry is drawn at 1/8 of level 0, then upsampled smoothly


def _noise_field(rng: np.random.Generator, shape: tuple[int, int], cell_px: float) -> np.ndarray:
    """Smooth noise with features about ``cell_px`` wide, standardised to mean 0, sd 1."""
    h, w = shape
    gh, gw = max(2, int(h / cell_px) + 2), max(2, int(w / cell_px) + 2)
    coarse = rng.standard_normal((gh, gw)).astype(np.float32)
    f = cv2.resize(coarse, (w, h), interpolation=cv2.INTER_CUBIC)
    f = cv2.GaussianBlur(f, (0, 0), cell_px / 4)
    return (f - f.mean()) / (f.std() + 1e-6)


def _share_threshold(field_: np.ndarray, inside: np.ndarray, share: float) -> np.ndarray:
    """Mask of the ``share`` highest values of ``field_`` within ``inside``."""
    if share <= 0 or not inside.any():
        return np.zeros_like(inside)
    t = np.quantile(field_[inside], 1 - share)
    return inside & (field_ > t)


def case_geometry(cfg: SyntheticConfig, case: int, score: str) -> CaseGeometry:
    """Tissue, tumour and positive-region masks at layout resolution; same for H&E and IHC."""
    rng = np.random.default_rng([cfg.seed, case, 0])
    h, w = cfg.height_px // LAYOUT_DS, cfg.width_px // LAYOUT_DS
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    # Tissue: 1–2 irregular pieces in the left ~75% of the slide (the right keeps glass for
    # the pen mark and the unscanned band).
    env = np.zeros((h, w), np.float32)
    for _ in range(rng.integers(1, 3)):
        cx, cy = rng.uniform(0.28, 0.45) * w, rng.uniform(0.4, 0.6) * h
        ax, ay = rng.uniform(0.14, 0.22) * w, rng.uniform(0.2, 0.3) * h
        env = np.maximum(env, 1 - ((xx - cx) / ax) ** 2 - ((yy - cy) / ay) ** 2)
    env -= np.clip(xx / w - 0.62, 0, None) * 10  # fade out before the glass on the right
    tissue = (env + 0.3 * _noise_field(rng, (h, w), 40)) > 0.15
    tissue = _keep_large(tissue, min_px=int(40_000 / (cfg.mpp * LAYOUT_DS) ** 2))  # ≥ 0.04 mm²
    # Holes (fat, lumina): 2–5 ellipses of 80–160 µm radius.
    layout_mpp = cfg.mpp * LAYOUT_DS
    ys, xs = np.nonzero(cv2.erode(tissue.astype(np.uint8), np.ones((25, 25), np.uint8)))
    holes = np.zeros((h, w), np.uint8)
    for _ in range(rng.integers(2, 6)):
        if len(xs) == 0:
            break
        i = rng.integers(len(xs))
        r = rng.uniform(80, 160) / layout_mpp
        cv2.ellipse(
            holes,
            (int(xs[i]), int(ys[i])),
            (int(r), int(r * rng.uniform(0.6, 1))),
            float(rng.uniform(0, 180)),
            0,
            360,
            1,
            -1,
        )
    tissue &= holes == 0
    tissue = _keep_large(tissue, min_px=int(40_000 / layout_mpp**2))
    # Tumour nests: about half of the tissue, away from its edge.
    inner = cv2.erode(tissue.astype(np.uint8), np.ones((7, 7), np.uint8)).astype(bool)
    tumour = _share_threshold(_noise_field(rng, (h, w), 30), inner, rng.uniform(0.4, 0.6))
    # Positive regions: a score-dependent share of the tumour, in smooth blobs.
    share = POSITIVE_SHARE[score]
    share = float(np.clip(share + rng.uniform(-0.08, 0.08), 0, 0.95)) if share > 0 else 0.0
    positive = _share_threshold(_noise_field(rng, (h, w), 45), tumour, share)
    # Pen mark: a wavy stroke on the glass to the right of the tissue.
    x0 = rng.uniform(0.83, 0.88) * cfg.width_px
    ys_pen = np.linspace(0.15, 0.75, 12) * cfg.height_px
    xs_pen = x0 + np.cumsum(rng.normal(0, 0.01 * cfg.width_px, 12))
    pen = np.stack([xs_pen, ys_pen], 1).astype(np.int32)
    extras = {
        "pen_color": [(30, 110, 60), (30, 50, 140), (25, 25, 30)][rng.integers(3)],
        "black_border": bool(rng.random() < 0.5),
        "unscanned": bool(rng.random() < 0.5),
        "blur_center": (float(rng.uniform(0.3, 0.5)), float(rng.uniform(0.4, 0.6))),
    }
    return CaseGeometry(tissue=tissue, tumour=tumour, positive=positive, pen=pen, extras=extras)


def _keep_large(mask: np.ndarray, min_px: int) -> np.ndarray:
    n, lab, stats, _ = cv2.connectedComponentsWithStats(mask.astype(np.uint8), connectivity=8)
    keep = np.zeros(n, bool)
    keep[1:] = stats[1:, cv2.CC_STAT_AREA] >= min_px
    return keep[lab]


def _upsample_mask(mask: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    m = cv2.GaussianBlur(mask.astype(np.float32), (0, 0), 0.8)
    return cv2.resize(m, size, interpolation=cv2.INTER_LINEAR) > 0.5


# --------------------------------------------------------------------------------------------
# Rendering
# --------------------------------------------------------------------------------------------
def render_slide(
    cfg: SyntheticConfig,
    case: int,
    geom: CaseGeometry,
    score: str,
    ish: str,
    ultralow: bool | None = None,
) -> np.ndarray:
    """Paint the level-0 RGB image (H, W, 3) uint8 of one case in ``cfg.stain``.

    ``ultralow`` matters for IHC score-0 slides only: ``True`` paints HER2-ultralow (faint,
    incomplete rings on a share of :data:`ULTRALOW_CELLS` of the tumour cells), ``False``
    HER2-null (no DAB), ``None`` score 0 as before the option (a few faint cells). Every other
    pixel is the same in the three. ``geom.extras`` gets ``tumour_cells`` and ``membrane_cells``
    (tumour cells painted with any DAB membrane): the truth of the stained share.
    """
    rng = np.random.default_rng([cfg.seed, case, 1 if cfg.stain == "hne" else 2])
    cell_rng = np.random.default_rng([cfg.seed, case, 3])  # cell layout shared across stains
    W, H = cfg.width_px, cfg.height_px
    # Fragments smaller than 0.04 mm² (e.g. cut off a piece by a hole) are not tissue in the
    # truth either: drop them so the truth is what a segmentation can be asked to find.
    tissue = _keep_large(_upsample_mask(geom.tissue, (W, H)), min_px=int(40_000 / cfg.mpp**2))
    tumour = _upsample_mask(geom.tumour, (W, H)) & tissue
    positive = _upsample_mask(geom.positive, (W, H)) & tumour
    # The layout masks are the truth: make them agree with what is painted.
    geom.tissue, geom.tumour, geom.positive = tissue, tumour, positive
    hne = cfg.stain == "hne"
    # 2+ with amplification (ISH+) stains a little more, as amplified tumours tend to.
    strength = HNE_STRENGTH[score] * cfg.signal
    intensity, completeness = MEMBRANE[score]
    if score == "2+" and ish == "pos":
        intensity += 0.35 * (MEMBRANE["3+"][0] - intensity)
        strength += 0.35 * (HNE_STRENGTH["3+"] - HNE_STRENGTH["2+"]) * cfg.signal
    intensity *= cfg.signal

    # Stroma / background optical density at half resolution, then upsampled (cheaper).
    hh, hw = H // 2, W // 2
    fibres = cv2.GaussianBlur(
        rng.standard_normal((hh, hw)).astype(np.float32), (0, 0), sigmaX=6, sigmaY=1.2
    )
    fibres = cv2.resize(fibres / (fibres.std() + 1e-6), (W, H), interpolation=cv2.INTER_LINEAR)
    t = tissue.astype(np.float32)
    od_h = t * (0.05 if hne else 0.04)
    od_e = t * np.clip(0.30 + 0.10 * fibres, 0.05, None) if hne else np.zeros((H, W), np.float32)
    od_d = np.zeros((H, W), np.float32)
    if not hne:
        od_h = od_h + t * np.clip(0.08 + 0.03 * fibres, 0, None)

    # Tumour cells on a jittered hexagonal grid (about 11 µm apart).
    spacing = 11.0 / cfg.mpp
    gy, gx = np.mgrid[0 : H : spacing * 0.866, 0:W:spacing]
    gx = gx + (np.arange(gx.shape[0])[:, None] % 2) * spacing / 2
    cx = (gx + cell_rng.normal(0, spacing * 0.15, gx.shape)).ravel()
    cy = (gy + cell_rng.normal(0, spacing * 0.15, gy.shape)).ravel()
    ok = (cx >= 0) & (cx < W - 1) & (cy >= 0) & (cy < H - 1)
    cx, cy = cx[ok], cy[ok]
    in_tumour = tumour[cy.astype(int), cx.astype(int)]
    cx, cy = cx[in_tumour], cy[in_tumour]
    pos = positive[cy.astype(int), cx.astype(int)]
    n = len(cx)
    nuc_r = cell_rng.uniform(2.2, 3.2, n) / cfg.mpp  # nucleus radius, px
    nuc_ratio = cell_rng.uniform(0.65, 1.0, n)
    angle = cell_rng.uniform(0, 180, n)
    nuc_od = rng.uniform(0.55, 0.8, n) * (1.0 if hne else 0.55)
    cyto_od = rng.uniform(0.22, 0.32, n)
    if hne and strength > 0:
        # Positive regions in H&E: larger, darker, more pleomorphic nuclei; bluer cytoplasm.
        nuc_r[pos] *= 1 + 0.5 * strength * cell_rng.uniform(0.6, 1.4, pos.sum())
        nuc_od[pos] += 0.18 * strength
        cyto_od[pos] -= 0.08 * strength
    cell_r = spacing * 0.48
    start = rng.uniform(0, 360, n)
    jitter = rng.uniform(0.75, 1.25, n)
    # Ultralow cells from their own stream: the others' draws stay those of the option off.
    ultra = np.zeros(n, bool)
    if not hne and score == "0" and ultralow:
        ul_rng = np.random.default_rng([cfg.seed, case, 4])
        share = ul_rng.uniform(*ULTRALOW_CELLS)
        ultra[ul_rng.choice(n, size=min(n, max(1, int(share * n))), replace=False)] = True
    membrane_cells = 0
    for i in range(n):
        c = (int(cx[i]), int(cy[i]))
        if hne:
            cv2.circle(od_e, c, int(cell_r), float(cyto_od[i]), -1)
            if pos[i] and strength > 0:
                cv2.circle(od_h, c, int(cell_r), float(0.06 * strength), -1)
        else:
            cv2.circle(od_h, c, int(cell_r), 0.05, -1)
            membrane = intensity * jitter[i] if pos[i] else 0.0
            arc = completeness
            if not pos[i] and score != "0" and rng.random() < 0.05:  # sporadic faint cells
                membrane, arc = 0.12 * cfg.signal, 0.4
            if score == "0" and rng.random() < 0.04 and ultralow is None:
                membrane, arc = 0.08 * cfg.signal, 0.3
            if ultra[i]:
                membrane = ULTRALOW_MEMBRANE[0] * jitter[i] * cfg.signal
                arc = ULTRALOW_MEMBRANE[1]
            if membrane > 0:
                membrane_cells += 1
                cv2.ellipse(
                    od_d,
                    c,
                    (int(cell_r), int(cell_r)),
                    0.0,
                    float(start[i]),
                    float(start[i] + 360 * arc),
                    float(membrane),
                    2,
                )
        ax = round(nuc_r[i])
        cv2.ellipse(
            od_h,
            c,
            (ax, max(1, round(ax * nuc_ratio[i]))),
            float(angle[i]),
            0,
            360,
            float(nuc_od[i]),
            -1,
        )
    geom.extras["tumour_cells"], geom.extras["membrane_cells"] = int(n), membrane_cells
    # Stromal nuclei: sparse, elongated, along the fibres.
    stroma = tissue & ~tumour
    m = int(stroma.sum() / (22 / cfg.mpp) ** 2)
    sx = cell_rng.uniform(0, W - 1, m * 2)
    sy = cell_rng.uniform(0, H - 1, m * 2)
    keep = stroma[sy.astype(int), sx.astype(int)]
    for x, y in zip(sx[keep], sy[keep], strict=True):
        cv2.ellipse(
            od_h,
            (int(x), int(y)),
            (int(3.5 / cfg.mpp), int(1.2 / cfg.mpp)),
            float(rng.normal(0, 15)),
            0,
            360,
            float(rng.uniform(0.5, 0.75) * (1 if hne else 0.55)),
            -1,
        )

    # Beer–Lambert: per-slide stain strength variation (a nuisance of the size of the cue).
    scale = rng.uniform(0.8, 1.2, 3).astype(np.float32)
    od = np.stack([od_h, od_e, od_d], -1)
    od = cv2.GaussianBlur(od, (0, 0), 0.6)
    od_rgb = od.reshape(-1, 3) @ (STAIN_OD * scale[:, None])  # (H*W, 3)
    bg = np.array([236, 234, 238], np.float32) + rng.uniform(-3, 3, 3).astype(np.float32)
    grad = (np.linspace(-1, 1, W, dtype=np.float32)[None, :] * rng.uniform(-6, 6)).reshape(1, W, 1)
    img = (bg + grad) * np.power(10.0, -od_rgb.reshape(H, W, 3), dtype=np.float32)
    img += rng.normal(0, 2.5, (H // 4, W // 4, 1)).astype(np.float32).repeat(4, 0).repeat(4, 1)
    rgb = np.clip(img, 0, 255).astype(np.uint8)
    if cfg.nuisances:
        _add_nuisances(rgb, geom, rng, cfg)
    return rgb


def _add_nuisances(
    rgb: np.ndarray, geom: CaseGeometry, rng: np.random.Generator, cfg: SyntheticConfig
) -> None:
    H, W = rgb.shape[:2]
    # Dust on the glass: small grey specks (low saturation, must not count as tissue).
    for _ in range(40):
        x, y = int(rng.uniform(0, W)), int(rng.uniform(0, H))
        g = int(rng.uniform(150, 200))
        cv2.circle(rgb, (x, y), int(rng.uniform(1, 4)), (g, g, g), -1)
    # Pen mark on the glass.
    cv2.polylines(rgb, [geom.pen], False, geom.extras["pen_color"], thickness=int(120 / cfg.mpp))  # 120 µm
    # Out-of-focus patch of tissue.
    bx, by = geom.extras["blur_center"]
    r = int(0.08 * W)
    x0, y0 = int(bx * W) - r, int(by * H) - r
    x0, y0 = max(0, x0), max(0, y0)
    patch = rgb[y0 : y0 + 2 * r, x0 : x0 + 2 * r]
    patch[:] = cv2.GaussianBlur(patch, (0, 0), 4)
    # Unscanned band (pure white) at the right edge, black slide-holder border at the top.
    # What they cover is no longer tissue in the ground truth either.
    if geom.extras["unscanned"]:
        rgb[:, int(0.94 * W) :] = 255
        geom.tissue[:, int(0.94 * W) :] = False
    if geom.extras["black_border"]:
        rgb[: int(0.03 * H)] = (12, 12, 14)
        geom.tissue[: int(0.03 * H)] = False
