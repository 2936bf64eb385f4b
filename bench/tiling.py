"""Benchmark: tissue segmentation + tiling, and tile read throughput, against plain OpenSlide.

Measures, on a synthetic cohort written to a temporary folder (removed at the end):

1. Segmentation + tiling seconds per slide (``Slide`` open, ``read_at_mpp(seg_mpp)``,
   ``segment_tissue``, ``tile_geometry``, ``tile_grid``) against only decoding the pyramid level
   that segmentation reads (``openslide.OpenSlide`` + ``read_region`` of that whole level), and the
   full ``prepare_slide`` (which also writes the h5, thumbnail and QC PNG) on its own row.
2. Tile reads per second of ``TileReader.read`` over all tile coords of a slide against a plain
   CLAM-style loop: ``read_region`` of ``patch_px_level0`` pixels at level 0, ``.convert("RGB")``
   and ``cv2.resize`` to ``patch_px`` when they differ. Settings: (a) 224 px at 0.5 µm/px and
   (b) 96 px at 0.5 µm/px on 0.5 µm/px slides; (c) 224 px at 1.0 µm/px on slides with
   downsamples (1, 2, 8), where her2lab reads level 1 and the plain loop reads 448 px and resizes.

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
import numpy as np
import openslide

from her2lab.data.synthetic import SyntheticConfig, generate_cohort, write_pyramid_tiff
from her2lab.slides.prepare import PrepareSettings, prepare_slide
from her2lab.slides.reader import Slide
from her2lab.slides.tiling import TileReader, TilingParams, tile_geometry, tile_grid
from her2lab.slides.tissue import TissueParams, segment_tissue

TISSUE = TissueParams()


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
    ap.add_argument("--quick", action="store_true", help="2 + 1 slides, 2 rounds")
    args = ap.parse_args()
    if args.quick:
        args.slides, args.pyr2_slides, args.rounds = 2, 1, 2

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
        for r in range(args.rounds):
            flip = r % 2 == 1
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
            f"@ {cfg.mpp} µm/px + {len(pyr2)} with downsamples (1,2,8); {args.rounds} rounds; "
            f"cohort written in {gen_s:.0f} s\n"
        )
        print("| measurement | her2lab | baseline | ratio |")
        print("|---|---:|---:|---:|")
        print(
            f"| segmentation + tiling, s/slide (baseline: decode level {seg_level}, "
            f"{seg_dims[0]}x{seg_dims[1]} px) | {med(seg):.4f} | {med(dec):.4f} "
            f"| {med(seg_ratio):.2f}x |"
        )
        print(f"| prepare_slide (+ h5, thumbnail, QC PNG), s/slide | {med(prep):.4f} | — | — |")
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
            "time / decode time; tile reads: her2lab rate / plain rate)."
        )
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
