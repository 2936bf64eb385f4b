"""Benchmark: tissue segmentation + tiling (+ QC), against CLAM's and plain OpenSlide; tile reads.

Measures, on a synthetic cohort and a large synthetic slide written to a temporary folder
(removed at the end):

1. Segmentation + tiling seconds per slide (``Slide`` open, ``read_at_mpp(seg_mpp)``,
   ``segment_tissue``, ``tile_geometry``, ``tile_grid``) against only decoding the pyramid level
   that segmentation reads (``openslide.OpenSlide`` + ``read_region`` of that whole level), and the
   full ``prepare_slide`` (which also writes the h5, thumbnail and QC PNG) on its own row.
2. Tile reads per second of ``TileReader.read`` over all tile coords of a slide against a plain
   CLAM-style loop: ``read_region`` of ``patch_px_level0`` pixels at level 0, ``.convert("RGB")``
   and ``cv2.resize`` to ``patch_px`` when they differ. Settings: (a) 224 px at 0.5 µm/px and
   (b) 96 px at 0.5 µm/px on 0.5 µm/px slides; (c) 224 px at 1.0 µm/px on slides with
   downsamples (1, 2, 8), where her2lab reads level 1 and the plain loop reads 448 px and resizes.
3. On a large slide (``--large-px``, 32,768² px at 0.25 µm/px by default, levels at 1, 4, 16 and
   64× downsample): the full ``prepare_slide`` (one read at 8 µm/px from the 4 µm/px level,
   tissue mask, tile grid, tiles h5, QuPath outline, thumbnail and QC PNGs) against a CLAM-style
   segmentation + patching + mask picture (:func:`clam_seg_and_patch`: CLAM's
   ``create_patches_fp.py`` defaults, segmenting the coarsest level at most 64× downsample),
   with CLAM's default 256 px patches and with her2lab's grid (224 px at 0.5 µm/px = 448
   level-0 px).
   The large slide is one synthetic case rendered at 8× the level-0 µm/px, its level 0 that
   render with every pixel repeated 8×8 (level 0 is never read here).
4. Tissue masks against the generator's ground truth (IoU, the mask upsampled nearest-neighbour
   when coarser): every slide of the cohort, the large slide, and with ``--demo-iou`` the 40-slide
   ``demo`` and ``demo_ihc`` cohorts (their generator settings; a few minutes more).

The competing variants run side by side in each round (their order alternating between rounds,
each on a fresh slide handle, so with a cold OpenSlide tile cache); the table gives the median
over rounds of each, and the ratio is the median of the per-round ratios.

Run: ``python bench/tiling.py`` (``--quick`` for a smoke run; ``--help`` for the options).
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import cv2
import h5py
import numpy as np
import openslide
import tifffile
from PIL import Image

from her2lab.data.synthetic import SyntheticConfig, generate_cohort, write_pyramid_tiff
from her2lab.slides.prepare import PrepareSettings, prepare_slide
from her2lab.slides.reader import Slide
from her2lab.slides.thumbnails import resize_to_mpp
from her2lab.slides.tiling import TileReader, TilingParams, tile_geometry, tile_grid
from her2lab.slides.tissue import TissueParams, segment_tissue

TISSUE = TissueParams()
THUMB_MPP = 8.0  # prepare.thumb_mpp's default
LARGE_ZOOM = 8  # the large slide: a case rendered at 8x the level-0 µm/px, then 8x8 pixels a pixel
LARGE_DOWNSAMPLES = (1, 4, 16, 64)

# CLAM's create_patches_fp.py defaults (seg_params, filter_params, vis_params, patching).
CLAM_SEG_DOWNSAMPLE = 64  # seg_level -1: the coarsest level at most this downsample
CLAM_STHRESH, CLAM_MTHRESH, CLAM_CLOSE = 8, 7, 4  # use_otsu False: a fixed saturation threshold
CLAM_A_T, CLAM_A_H, CLAM_MAX_N_HOLES = 100, 16, 8  # in units of a 512 px reference patch
CLAM_REF_PATCH = 512
CLAM_PATCH = 256  # patch_size = step_size at level 0
CLAM_LINE = 500  # vis line_thickness at level 0


def write_large_slide(out_dir: Path, side_px: int, mpp: float) -> tuple[Path, Path]:
    """A ``side_px``² slide at ``mpp`` µm/px (levels 1, 4, 16, 64× downsample) and its tissue
    ground truth (PNG at 8 µm/px): one synthetic case rendered at ``8 × mpp`` over
    ``side_px / 8`` px, its level 0 that render with every pixel repeated 8×8, written tile by
    tile (the full level 0 never sits in memory), JPEG tiles as ``write_pyramid_tiff`` writes."""
    src_px = side_px // LARGE_ZOOM
    cfg = SyntheticConfig(
        n_slides=1, n_pairs=0, seed=0, width_px=src_px, height_px=src_px, mpp=mpp * LARGE_ZOOM
    )
    generate_cohort(out_dir / "large_src", cfg, num_workers=1)
    (src_path,) = (out_dir / "large_src" / "slides").glob("*.tiff")
    with Slide(src_path) as s:
        src = s.read_region((0, 0), 0, s.dimensions)
    truth = out_dir / "large_src" / "masks" / f"{src_path.stem}_tissue.png"
    path = out_dir / f"large_{side_px}px.tiff"
    tile = 256
    with tifffile.TiffWriter(path, bigtiff=True) as tw:
        for i, ds in enumerate(LARGE_DOWNSAMPLES):
            n = side_px // ds
            f = LARGE_ZOOM // ds  # level px per source px (0: the level is coarser than the source)
            level = None if f >= 1 else cv2.resize(src, (n, n), interpolation=cv2.INTER_AREA)

            def tiles(level=level, n=n, f=f):
                for y in range(0, n, tile):
                    for x in range(0, n, tile):
                        if level is None:  # a source patch, each pixel repeated f×f
                            t = src[y // f : (y + tile) // f, x // f : (x + tile) // f]
                            t = np.repeat(np.repeat(t, f, axis=0), f, axis=1)
                        else:
                            t = level[y : y + tile, x : x + tile]
                        if t.shape[:2] != (tile, tile):
                            pad = ((0, tile - t.shape[0]), (0, tile - t.shape[1]), (0, 0))
                            t = np.pad(t, pad, mode="edge")
                        ycbcr = cv2.cvtColor(np.ascontiguousarray(t), cv2.COLOR_RGB2YCrCb)
                        yield np.ascontiguousarray(ycbcr[..., [0, 2, 1]])

            res = 1e4 / (mpp * ds)  # pixels per cm
            tw.write(
                tiles(),
                shape=(n, n, 3),
                dtype=np.uint8,
                tile=(tile, tile),
                compression="jpeg",
                compressionargs={"level": 90},
                photometric="ycbcr",
                subfiletype=1 if i else 0,
                resolution=(res, res),
                resolutionunit="CENTIMETER",
                metadata=None,
            )
    return path, truth


def clam_seg_and_patch(path: Path, patch_px: int, out_dir: Path) -> int:
    """CLAM-style segmentation + patching + mask picture of one slide; returns the patch count.

    Written after CLAM's ``WholeSlideImage.segmentTissue``, ``process_contour`` (``four_pt``
    check, ``use_padding``) and ``visWSI`` with ``create_patches_fp.py``'s defaults: the coarsest
    level at most 64× downsample (OpenSlide's best level for it) read as RGBA, HSV saturation,
    median blur 7, a fixed threshold of 8, closing with a 4×4 kernel, outer contours and their
    holes (``RETR_CCOMP``) kept by area (tissue net of holes > 100 reference patches of 512²,
    holes > 16, the 8 largest), scaled to level 0; then every ``patch_px`` grid point of each
    contour's bounding box whose patch has one of four points (the centre ± a quarter patch) in
    the contour and its centre in no hole; coords to an h5, and the level drawn with the
    contours saved as JPEG (CLAM's mask picture).
    The candidate points are tested in this process, where CLAM starts a process pool for every
    contour: a lower bound of CLAM's time.
    """
    osr = openslide.OpenSlide(str(path))
    level = osr.get_best_level_for_downsample(CLAM_SEG_DOWNSAMPLE)
    ds = osr.level_downsamples[level]
    size = osr.level_dimensions[level]
    rgba = np.array(osr.read_region((0, 0), level, size))
    sat = cv2.medianBlur(cv2.cvtColor(rgba, cv2.COLOR_RGB2HSV)[..., 1], CLAM_MTHRESH)
    _, binary = cv2.threshold(sat, CLAM_STHRESH, 255, cv2.THRESH_BINARY)
    binary = cv2.morphologyEx(binary, cv2.MORPH_CLOSE, np.ones((CLAM_CLOSE, CLAM_CLOSE), np.uint8))
    ref_area = int(CLAM_REF_PATCH**2 / (ds * ds))
    contours, hierarchy = cv2.findContours(binary, cv2.RETR_CCOMP, cv2.CHAIN_APPROX_NONE)
    parent = hierarchy[0][:, 3] if hierarchy is not None else np.zeros(0, np.int32)
    tissue, holes = [], []
    for i in np.flatnonzero(parent == -1):
        inner = [contours[j] for j in np.flatnonzero(parent == i)]
        area = cv2.contourArea(contours[i]) - sum(cv2.contourArea(c) for c in inner)
        if area <= 0 or area <= CLAM_A_T * ref_area:
            continue
        inner = sorted(inner, key=cv2.contourArea, reverse=True)[:CLAM_MAX_N_HOLES]
        tissue.append((contours[i] * ds).astype(np.int32))
        holes.append(
            [(c * ds).astype(np.int32) for c in inner if cv2.contourArea(c) > CLAM_A_H * ref_area]
        )
    coords = []
    half, shift = patch_px // 2, int(patch_px // 2 * 0.5)
    for contour, its_holes in zip(tissue, holes, strict=True):
        x0, y0, w, h = cv2.boundingRect(contour)
        for x in range(x0, x0 + w, patch_px):
            for y in range(y0, y0 + h, patch_px):
                cx, cy = x + half, y + half
                corners = (
                    (cx - shift, cy - shift),
                    (cx + shift, cy + shift),
                    (cx + shift, cy - shift),
                    (cx - shift, cy + shift),
                )
                if not any(
                    cv2.pointPolygonTest(contour, (float(px), float(py)), False) >= 0
                    for px, py in corners
                ):
                    continue
                centre = (x + patch_px / 2, y + patch_px / 2)
                if any(cv2.pointPolygonTest(hole, centre, False) > 0 for hole in its_holes):
                    continue
                coords.append((x, y))
    with h5py.File(out_dir / f"{path.stem}_clam.h5", "w") as f:
        f.create_dataset("coords", data=np.array(coords, np.int64).reshape(-1, 2))
        f["coords"].attrs["patch_size"] = patch_px
    vis = np.array(osr.read_region((0, 0), level, size).convert("RGB"))
    thick = int(CLAM_LINE / ds)
    cv2.drawContours(vis, [(c / ds).astype(np.int32) for c in tissue], -1, (0, 255, 0), thick)
    for its_holes in holes:
        cv2.drawContours(
            vis, [(c / ds).astype(np.int32) for c in its_holes], -1, (0, 0, 255), thick
        )
    Image.fromarray(vis).save(out_dir / f"{path.stem}_clam_mask.jpg")
    osr.close()
    return len(coords)


def prepare_mask(path: Path) -> tuple[np.ndarray, float]:
    """The tissue mask as ``prepare_slide`` makes it, and its µm/px."""
    with Slide(path) as slide:
        img, img_mpp = slide.read_lowres(min(TISSUE.seg_mpp, THUMB_MPP))
        seg_mpp = max(TISSUE.seg_mpp, img_mpp)
        return segment_tissue(resize_to_mpp(img, img_mpp, seg_mpp), TISSUE, mpp=seg_mpp), seg_mpp


def mask_iou(path: Path, truth_png: Path) -> float:
    """IoU of the tissue mask against the ground truth (the coarser one resized to the finer)."""
    mask, _ = prepare_mask(path)
    truth = cv2.imread(str(truth_png), cv2.IMREAD_GRAYSCALE) > 0
    if mask.shape != truth.shape:
        (h, w), big = max(mask.shape, truth.shape), mask.size >= truth.size
        small = truth if big else mask
        small = cv2.resize(small.view(np.uint8), (w, h), interpolation=cv2.INTER_NEAREST) > 0
        mask, truth = (mask, small) if big else (small, truth)
    return float((mask & truth).sum() / max((mask | truth).sum(), 1))


def cohort_ious(root: Path) -> list[float]:
    """:func:`mask_iou` of every slide of a generated cohort."""
    slides = sorted((root / "slides").glob("*.tiff"))
    return [mask_iou(p, root / "masks" / f"{p.stem}_tissue.png") for p in slides]


def seg_and_tile(path: Path, tiling: TilingParams):
    """her2lab's segmentation + tiling of one slide; returns (geometry, coords)."""
    with Slide(path) as slide:
        mask = segment_tissue(slide.read_at_mpp(TISSUE.seg_mpp), TISSUE)
        geom = tile_geometry(slide, tiling)
        coords, _ = tile_grid(slide.dimensions, geom, mask, TISSUE.seg_mpp, tiling.min_tissue)
    return geom, coords


def decode_seg_level(path: Path, level: int) -> None:
    """Baseline: open the slide and decode the whole level that segmentation reads."""
    osr = openslide.OpenSlide(str(path))
    osr.read_region((0, 0), level, osr.level_dimensions[level])
    osr.close()


def read_ours(path: Path, geom, coords: np.ndarray) -> float:
    with Slide(path) as slide:
        reader = TileReader(slide, geom)
        t0 = time.perf_counter()
        for xy in coords:
            reader.read(xy)
        return time.perf_counter() - t0


def read_plain(path: Path, geom, coords: np.ndarray) -> float:
    osr = openslide.OpenSlide(str(path))
    p0, p = geom.patch_px_level0, geom.patch_px
    t0 = time.perf_counter()
    for x, y in coords:
        img = np.asarray(osr.read_region((int(x), int(y)), 0, (p0, p0)).convert("RGB"))
        if p0 != p:
            img = cv2.resize(img, (p, p), interpolation=cv2.INTER_AREA)
    dt = time.perf_counter() - t0
    osr.close()
    return dt


def timed(fn, *args) -> float:
    t0 = time.perf_counter()
    fn(*args)
    return time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--slides", type=int, default=6, help="0.5 µm/px slides (default 6)")
    ap.add_argument("--pyr2-slides", type=int, default=3, help="slides with downsamples (1,2,8)")
    ap.add_argument("--rounds", type=int, default=5, help="interleaved rounds (default 5)")
    ap.add_argument(
        "--large-px",
        type=int,
        default=32768,
        help="side of the large slide, px, rounded to a multiple of 512 (default "
        "32768; 0 leaves it out)",
    )
    ap.add_argument("--large-mpp", type=float, default=0.25, help="its µm/px (default 0.25)")
    ap.add_argument(
        "--demo-iou",
        action="store_true",
        help="also the tissue-mask IoU on the 40-slide demo and demo_ihc cohorts",
    )
    ap.add_argument(
        "--quick", action="store_true", help="2 + 1 slides, 2 rounds, 8192 px large slide"
    )
    args = ap.parse_args()
    if args.quick:
        args.slides, args.pyr2_slides, args.rounds = 2, 1, 2
        args.large_px = min(args.large_px, 8192)
    args.large_px = round(args.large_px / 512) * 512

    load0 = os.getloadavg()[0]
    tmp = Path(tempfile.mkdtemp(prefix="her2lab_bench_"))
    try:
        t0 = time.perf_counter()
        cfg = SyntheticConfig(n_slides=args.slides, n_pairs=0, seed=0)
        generate_cohort(tmp, cfg, num_workers=min(2, os.cpu_count() or 1))
        slides = sorted((tmp / "slides").glob("*.tiff"))
        pyr2 = []  # the same pixels re-written with a 2x level
        for i, src in enumerate(slides[: args.pyr2_slides]):
            osr = openslide.OpenSlide(str(src))
            rgb = np.asarray(osr.read_region((0, 0), 0, osr.dimensions).convert("RGB"))
            osr.close()
            pyr2.append(tmp / f"pyr2_{i}.tiff")
            write_pyramid_tiff(pyr2[-1], rgb, cfg.mpp, (1, 2, 8))
        large = write_large_slide(tmp, args.large_px, args.large_mpp) if args.large_px else None
        gen_s = time.perf_counter() - t0

        base = TilingParams()
        with Slide(slides[0]) as s:
            seg_level = s.level_for_mpp(TISSUE.seg_mpp)
            seg_dims = s.level_dimensions[seg_level]
        settings = PrepareSettings(tmp / "cache", base, TISSUE, thumb_mpp=8.0, qc=True)
        cases = [
            ("(a) 224 px @ 0.5 µm/px", slides, base),
            ("(b) 96 px @ 0.5 µm/px", slides, TilingParams(patch_px=96)),
            ("(c) 224 px @ 1.0 µm/px, 2x level", pyr2, TilingParams(target_mpp=1.0)),
        ]
        grids = {name: [(p, *seg_and_tile(p, tp)) for p in paths] for name, paths, tp in cases}

        seg, dec, prep, seg_ratio = [], [], [], []
        tiles = {name: ([], [], []) for name, _, _ in cases}  # ours/s, plain/s, ratio per round
        big = {"her2lab": [], "clam": [], "clam_grid": []}  # seconds per round
        big_cpu = {name: [] for name in big}  # CPU seconds of this process (all its threads)
        n_big = {}
        if large:
            with Slide(large[0]) as s:
                grid_px = tile_geometry(s, base).patch_px_level0
                big_levels = s.level_dimensions
            (clam_dir := tmp / "clam").mkdir()
            big_runs = {
                "her2lab": lambda: prepare_slide("large", str(large[0]), None, settings)["n_tiles"],
                "clam": lambda: clam_seg_and_patch(large[0], CLAM_PATCH, clam_dir),
                "clam_grid": lambda: clam_seg_and_patch(large[0], grid_px, clam_dir),
            }
            for name, run in big_runs.items():  # warm-up (imports, page cache); patch counts
                n_big[name] = run()
        for r in range(args.rounds):
            flip = r % 2 == 1
            for name in reversed(big) if flip else big:
                t, c = time.perf_counter(), time.process_time()
                big_runs[name]() if large else None
                big[name].append(time.perf_counter() - t)
                big_cpu[name].append(time.process_time() - c)
            a = b = c = 0.0
            for path in slides:
                pair = [(0, seg_and_tile, (path, base)), (1, decode_seg_level, (path, seg_level))]
                for k, fn, fargs in reversed(pair) if flip else pair:
                    dt = timed(fn, *fargs)
                    a, b = (a + dt, b) if k == 0 else (a, b + dt)
                c += timed(prepare_slide, path.stem, str(path), None, settings)
            n = len(slides)
            seg.append(a / n)
            dec.append(b / n)
            prep.append(c / n)
            seg_ratio.append(a / b)
            for name, grid in grids.items():
                t_ours = t_plain = 0.0
                n_tiles = sum(len(coords) for _, _, coords in grid)
                for path, geom, coords in grid:
                    if flip:
                        t_plain += read_plain(path, geom, coords)
                        t_ours += read_ours(path, geom, coords)
                    else:
                        t_ours += read_ours(path, geom, coords)
                        t_plain += read_plain(path, geom, coords)
                ours, plain, ratio = tiles[name]
                ours.append(n_tiles / t_ours)
                plain.append(n_tiles / t_plain)
                ratio.append(t_plain / t_ours)

        med = statistics.median
        w, h = cfg.width_px, cfg.height_px
        print(
            f"# bench/tiling.py: {os.cpu_count()} CPUs, Python {sys.version.split()[0]}, "
            f"OpenSlide {openslide.__library_version__}; {len(slides)} slides {w}x{h} px "
            f"@ {cfg.mpp} µm/px + {len(pyr2)} with downsamples (1,2,8)"
            + (
                f" + 1 of {args.large_px}x{args.large_px} px @ {args.large_mpp} µm/px"
                if large
                else ""
            )
            + f"; {args.rounds} rounds; slides written in {gen_s:.0f} s; 1-min load average "
            f"{load0:.2f} at start, {os.getloadavg()[0]:.2f} at end\n"
        )
        print("| measurement | her2lab | baseline | ratio |")
        print("|---|---:|---:|---:|")
        print(
            f"| segmentation + tiling, s/slide (baseline: decode level {seg_level}, "
            f"{seg_dims[0]}x{seg_dims[1]} px) | {med(seg):.4f} | {med(dec):.4f} "
            f"| {med(seg_ratio):.2f}x |"
        )
        print(f"| prepare_slide (+ h5, thumbnail, QC PNG), s/slide | {med(prep):.4f} | — | — |")
        if large:
            levels = ", ".join(f"{lw}²" for lw, _ in big_levels)
            for name, what in (
                ("clam", f"CLAM's default {CLAM_PATCH} px patches"),
                ("clam_grid", f"her2lab's grid, {grid_px} px patches"),
            ):
                for label, t in (("s", big), ("CPU s", big_cpu)):
                    ratio = med(a / b for a, b in zip(t["her2lab"], t[name], strict=True))
                    print(
                        f"| segmentation + tiling + QC, large slide (levels {levels}), {label}: "
                        f"her2lab prepare_slide ({n_big['her2lab']} tiles) against CLAM-style, "
                        f"{what} ({n_big[name]} patches) | {med(t['her2lab']):.4f} "
                        f"| {med(t[name]):.4f} | {ratio:.2f}x |"
                    )
        for name, grid in grids.items():
            n_tiles = sum(len(coords) for _, _, coords in grid)
            ours, plain, ratio = tiles[name]
            print(
                f"| tile reads/s {name}, {n_tiles} tiles (baseline: level-0 read_region"
                f"{' + cv2.resize' if grid[0][1].patch_px_level0 != grid[0][1].patch_px else ''}"
                f") | {med(ours):.0f} | {med(plain):.0f} | {med(ratio):.2f}x |"
            )
        print(
            "\nMedians over rounds; ratio = median of per-round ratios (segmentation: her2lab "
            "time / baseline time; CPU s: this process's CPU seconds, all its threads; tile "
            "reads: her2lab rate / plain rate)."
        )
        ious = {f"{len(slides)} cohort slides": cohort_ious(tmp)}
        if large:
            ious["large slide"] = [mask_iou(*large)]
        if args.demo_iou:
            for stain, name in (("hne", "demo"), ("ihc", "demo_ihc")):
                demo = SyntheticConfig(n_slides=40, n_pairs=6, seed=0, stain=stain)
                generate_cohort(tmp / name, demo, num_workers=min(2, os.cpu_count() or 1))
                ious[f"{name} (40 slides)"] = cohort_ious(tmp / name)
        print(
            "\nTissue mask IoU against the generator's ground truth, min (median): "
            + "; ".join(f"{k} {min(v):.3f} ({med(v):.3f})" for k, v in ious.items())
        )
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
