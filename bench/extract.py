"""Benchmark: embedding extraction throughput against the encoder alone, and features storage.

Measures, on a synthetic cohort written to a temporary folder (removed at the end), for two
encoders with random weights (``pretrained=False``, nothing is downloaded) — light: AlexNet conv
features at 96 px (1024-d, as in the H&E-HER2 study), standard: resnet18 at 224 px (512-d) —
both on tiles at 0.5 µm/px:

1. Pipeline patches/s: wall time of ``extract_cohort`` over all tiles of the cohort (tiles-file
   loading, tile reads from the slides, DataLoader collation, uint8 → normalised float on the
   device, forward, NaN check, float16 h5 writing; a fresh output folder every run), with
   ``ExtractSettings.num_workers`` 0 and 1, against model-only patches/s: the same encoder, in
   ``torch.inference_mode``, on random float32 channels-last tensors already in memory, in batches
   of the same sizes as the pipeline's (batch size 64; batches never cross a slide, so each
   slide ends with a smaller one), with the same torch thread count — the upper bound.
2. Where the time goes (ms per patch, against the forward's ms per patch): reading the tiles
   alone (the pipeline's ``TileDataset`` through a ``DataLoader``, ``num_workers=0``), the uint8 →
   normalised float conversion as ``Embedder.embed`` does it, and their sum with the forward
   against the pipeline's time (``num_workers=0``).
3. Storage: bytes on disk of one slide's features file written with ``dtype="float16"`` (the
   default) against ``dtype="float32"``.
4. The forward itself, for ResNet-50 truncated after layer 3 (CLAM's and TRIDENT's ``resnet50``
   encoder, 1024-d): her2lab's inference encoder (BatchNorm folded, channels-last, as
   ``Embedder`` runs it), and the same through ``torch.compile`` (``extract.compile``), against
   the plain model in its default memory layout (what CLAM's ``extract_features_fp.py`` runs;
   CLAM itself is not installed here) and against the plain model channels-last; patches/s on
   the same in-memory batches. (Foundation-model presets: ``bench/presets.py``.)

5. With ``--views 0,2,8`` (``--views-only``: this alone): feature-level augmentation
   (``extract.augment_views=K``, the H&E-HER2 study's transforms on every tile, K more forwards)
   for the study's encoder (AlexNet@96): ``extract_cohort`` wall time and features file bytes for
   each K, against K=0, the variants side by side in every round.

The model-only baseline of (1) is the encoder exactly as the pipeline runs it (``Embedder``'s
inference encoder), so the ratio is the pipeline's overhead alone.

The competing variants run side by side in each round (their order rotating between rounds)
after one warm-up pass; the table gives the median over rounds of each, and the ratio is the
median of the per-round ratios.

Run: ``python bench/extract.py`` (``--quick`` for a smoke run; ``--help`` for the options).
"""

from __future__ import annotations

import argparse
import copy
import logging
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
from torch import nn
from torch.utils.data import DataLoader

from her2lab.data.cohort import load_manifest
from her2lab.data.synthetic import SyntheticConfig, generate_cohort
from her2lab.embed.backbones import BackboneSpec, Encoder, build_encoder, register_encoder
from her2lab.embed.extract import (
    Embedder,
    ExtractSettings,
    SlideBatchSampler,
    TileDataset,
    extract_cohort,
)
from her2lab.slides.prepare import PrepareSettings, prepare_cohort
from her2lab.slides.tiles_file import load_slide_tiles
from her2lab.slides.tiling import TilingParams
from her2lab.slides.tissue import TissueParams

BATCH = 64
WORKERS = ["0", "0t", "1"]  # num_workers; "t": with the prefetch thread (the default)
TRUNC_BATCHES = 4  # batches of BATCH tiles in the forward comparison (4)


@register_encoder("bench_resnet50_trunc")
def _resnet50_trunc(spec: BackboneSpec, num_classes: int = 0) -> nn.Module:
    """ResNet-50 up to layer 3, average-pooled: the 1024-d encoder CLAM and TRIDENT call resnet50."""
    import timm

    net = timm.create_model("resnet50", pretrained=False, num_classes=0)
    return nn.Sequential(net.conv1, net.bn1, net.act1, net.maxpool, net.layer1, net.layer2, net.layer3,
                         nn.AdaptiveAvgPool2d(1), nn.Flatten(1))


ENCODERS = {
    "light (AlexNet@96)": BackboneSpec(
        name="alexnet", source="torchvision", input_px=96, pretrained=False
    ),
    "standard (resnet18@224)": BackboneSpec(name="resnet18", input_px=224, pretrained=False),
}


class Case:
    """One encoder with its tiles: the items ``extract_cohort`` takes and its batch sizes."""

    def __init__(self, label: str, spec: BackboneSpec, manifest, cache: Path) -> None:
        self.label = label
        self.encoder: Encoder = build_encoder(spec)
        self.px = spec.input_px
        settings = PrepareSettings(
            cache,
            tiling=TilingParams(target_mpp=0.5, patch_px=self.px),
            tissue=TissueParams(),
            qc=False,
        )
        report = prepare_cohort(manifest, settings, num_workers=min(2, os.cpu_count() or 1))
        if (report.status != "done").any():
            raise SystemExit(
                f"prepare failed: {report[report.status != 'done'].to_dict('records')}"
            )
        self.items = [
            (r.slide_id, r.path, None, settings.tiles_path(r.slide_id))
            for r in manifest.itertuples()
        ]
        self.dataset = TileDataset([load_slide_tiles(p, s, sp, m) for s, sp, m, p in self.items])
        self.n_tiles = len(self.dataset)
        self.batches = [len(b) for b in SlideBatchSampler(self.dataset.offsets, BATCH)]
        # Model-only inputs: one random channels-last tensor per batch size, made once.
        gen = torch.Generator().manual_seed(0)
        self.inputs = {
            b: torch.randn(b, 3, self.px, self.px, generator=gen).contiguous(
                memory_format=torch.channels_last
            )
            for b in set(self.batches)
        }
        self.encoder.to(memory_format=torch.channels_last)  # as Embedder does
        self.embedder = Embedder(self.encoder, device="cpu")


def run_pipeline(case: Case, out: Path, mode: str, dtype: str = "float16", items=None) -> float:
    workers, thread = int(mode.rstrip("t")), mode.endswith("t")
    settings = ExtractSettings(
        batch_size=BATCH, num_workers=workers, device="cpu", dtype=dtype, prefetch=thread
    )
    t0 = time.perf_counter()
    report = extract_cohort(items or case.items, case.encoder, out, settings)
    dt = time.perf_counter() - t0
    if (report.status != "done").any():
        raise SystemExit(f"extract failed: {report[report.status != 'done'].to_dict('records')}")
    return dt


def run_views(case: Case, out: Path, k: int) -> float:
    """``extract_cohort`` with ``augment_views=k`` (defaults otherwise: num_workers=0, float16)."""
    settings = ExtractSettings(batch_size=BATCH, device="cpu", augment_views=k)
    t0 = time.perf_counter()
    report = extract_cohort(case.items, case.encoder, out, settings)
    dt = time.perf_counter() - t0
    if (report.status != "done").any():
        raise SystemExit(f"extract failed: {report[report.status != 'done'].to_dict('records')}")
    return dt


def views_table(case: Case, views: list[int], rounds: int, fresh) -> list[str]:
    """Rows comparing ``augment_views`` K against K=0, measured side by side (order rotating)."""
    run_views(case, fresh(), max(views))  # warm-up: the transforms' first calls
    secs: dict[int, list[float]] = {k: [] for k in views}
    size: dict[int, int] = {}
    for r in range(rounds):
        for k in views[r % len(views):] + views[: r % len(views)]:
            out = fresh()
            secs[k].append(run_views(case, out, k))
            size[k] = sum(f.stat().st_size for f in out.glob("*.h5"))
            shutil.rmtree(out)
    med, n, rows = statistics.median, case.n_tiles, []
    base = 0 if 0 in views else views[0]
    for k in views:
        ratio = med(b / a for a, b in zip(secs[k], secs[base], strict=True))
        rows.append(f"| {case.label}: extract_cohort with extract.augment_views={k}, {n} tiles: seconds, "
                    f"patches/s of tiles (baseline: augment_views={base}) | {med(secs[k]):.1f} s, "
                    f"{n / med(secs[k]):.1f}/s | {med(secs[base]):.1f} s, {n / med(secs[base]):.1f}/s "
                    f"| {1 / ratio:.2f}x the time |")
    for k in views:
        rows.append(f"| {case.label}: features files, bytes, augment_views={k} (baseline: augment_views={base}) "
                    f"| {size[k]} | {size[base]} | {size[k] / size[base]:.2f}x |")
    return rows


def run_model(case: Case) -> float:
    net = case.embedder.encoder  # as the pipeline runs it
    with torch.inference_mode():
        t0 = time.perf_counter()
        for b in case.batches:
            net(case.inputs[b])
        return time.perf_counter() - t0


def run_forwards(rounds: int, compile_: bool = True) -> dict[str, list[float]]:
    """Seconds for TRUNC_BATCHES batches through ResNet-50-trunc: her2lab's inference encoder
    (and the same compiled, as ``extract.compile`` runs it), the plain model in its default
    (NCHW) layout, and the plain model channels-last."""
    enc = build_encoder(BackboneSpec(name="resnet50_trunc", source="bench_resnet50_trunc", pretrained=False))
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(BATCH, 3, 224, 224, generator=gen)
    nets = {"her2lab": (Embedder(enc, device="cpu").encoder, x.contiguous(memory_format=torch.channels_last)),
            "plain": (enc, x)}
    plain_cl = copy.deepcopy(enc).to(memory_format=torch.channels_last)
    nets["plain_cl"] = (plain_cl, x.contiguous(memory_format=torch.channels_last))
    if compile_:  # Embedder(compile=True)'s encoder: torch.compile of the inference encoder
        nets["compiled"] = (torch.compile(nets["her2lab"][0], dynamic=False), nets["her2lab"][1])
    out = {k: [] for k in nets}
    with torch.inference_mode():
        for k, (net, inp) in nets.items():  # warm-up (and the one-off compile)
            t0 = time.perf_counter()
            net(inp)
            if k == "compiled":
                out["compile_s"] = [time.perf_counter() - t0]
        for r in range(rounds):
            keys = list(nets)
            for k in keys[r % len(keys):] + keys[: r % len(keys)]:
                net, inp = nets[k]
                t0 = time.perf_counter()
                for _ in range(TRUNC_BATCHES):
                    net(inp)
                out[k].append(time.perf_counter() - t0)
    return out


def run_read(case: Case) -> tuple[float, list[torch.Tensor]]:
    """The pipeline's tile reading alone: TileDataset through a DataLoader, no model."""
    loader = DataLoader(
        case.dataset, batch_sampler=SlideBatchSampler(case.dataset.offsets, BATCH), num_workers=0
    )
    t0 = time.perf_counter()
    batches = [tiles for tiles, _, _, _ in loader]
    return time.perf_counter() - t0, batches


def run_convert(case: Case, batches: list[torch.Tensor]) -> float:
    """uint8 NHWC → normalised float32 channels-last, as ``Embedder.embed`` does it."""
    e = case.embedder
    with torch.inference_mode():
        t0 = time.perf_counter()
        for tiles in batches:
            x = tiles.to(e.device).permute(0, 3, 1, 2)
            (x.float() - e.mean) / e.std
        return time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--slides", type=int, default=3, help="synthetic slides (default 3)")
    ap.add_argument("--rounds", type=int, default=5, help="interleaved rounds (default 5)")
    ap.add_argument("--quick", action="store_true", help="1 slide, 2 rounds")
    ap.add_argument("--no-compile", action="store_true", help="leave out the torch.compile row (its compile takes ~40 s)")
    ap.add_argument("--views", default="", help="comma-separated extract.augment_views values to compare "
                    "(AlexNet@96), e.g. 0,2,8; empty: none")
    ap.add_argument("--views-only", action="store_true", help="run the --views comparison alone")
    args = ap.parse_args()
    if args.quick:
        args.slides, args.rounds = 1, 2
    views = [int(v) for v in args.views.split(",") if v.strip()]
    if args.views_only and not views:
        ap.error("--views-only needs --views")
    logging.getLogger("her2lab").setLevel(logging.ERROR)  # "random weights" warnings

    load0 = os.getloadavg()[0]
    tmp = Path(tempfile.mkdtemp(prefix="her2lab_bench_"))
    try:
        t0 = time.perf_counter()
        cfg = SyntheticConfig(n_slides=args.slides, n_pairs=0, seed=0)
        manifest = load_manifest(
            generate_cohort(tmp / "cohort", cfg, num_workers=min(2, os.cpu_count() or 1))
        )
        gen_s = time.perf_counter() - t0
        encoders = {k: v for k, v in ENCODERS.items() if not args.views_only or k.startswith("light")}
        cases = [Case(label, spec, manifest, tmp / "cache") for label, spec in encoders.items()]

        runs = 0

        def fresh() -> Path:
            nonlocal runs
            runs += 1
            return tmp / "features" / f"run{runs}"

        header = (
            f"# bench/extract.py: {os.cpu_count()} CPUs, torch {torch.__version__} with "
            f"{torch.get_num_threads()} threads, Python {sys.version.split()[0]}; {args.slides} "
            f"synthetic slides {cfg.width_px}x{cfg.height_px} px @ {cfg.mpp} µm/px, tiles at "
            f"0.5 µm/px; batch size {BATCH}; random weights; {args.rounds} rounds; cohort "
            f"written in {gen_s:.0f} s; 1-min load average {load0:.2f} at start"
        )
        if args.views_only:
            rows = views_table(cases[0], views, args.rounds, fresh)
            print(f"{header}, {os.getloadavg()[0]:.2f} at end\n")
            print("| measurement | her2lab | baseline | ratio |\n|---|---:|---:|---:|")
            print("\n".join(rows))
            print("\nMedians over rounds; ratio = median of per-round ratios.")
            return

        # Warm-up: the encoder's kernels for every batch shape, the pipeline's imports and files.
        for case in cases:
            run_model(case)
            run_pipeline(case, fresh(), "0", items=case.items[:1])

        variants = [f"pipe{w}" for w in WORKERS] + ["model", "read"]
        res = {c.label: {v: [] for v in [*variants, "convert"]} for c in cases}
        ratio = {c.label: {w: [] for w in WORKERS} for c in cases}
        for r in range(args.rounds):
            for case in cases:
                order = variants[r % len(variants) :] + variants[: r % len(variants)]
                got = {}
                for v in order:
                    if v == "model":
                        got[v] = run_model(case)
                    elif v == "read":
                        got[v], batches = run_read(case)
                        got["convert"] = run_convert(case, batches)
                        del batches
                    else:
                        out = fresh()
                        got[v] = run_pipeline(case, out, v[4:])
                        shutil.rmtree(out)
                for v, dt in got.items():
                    res[case.label][v].append(dt)
                for w in WORKERS:
                    ratio[case.label][w].append(got["model"] / got[f"pipe{w}"])

        forwards = run_forwards(args.rounds, compile_=not args.no_compile)
        storage = {}
        for case in cases:  # deterministic: one run per dtype, on the first slide
            sizes = {}
            for dtype in ("float16", "float32"):
                out = fresh()
                run_pipeline(case, out, "0", dtype=dtype, items=case.items[:1])
                sizes[dtype] = (out / f"{case.items[0][0]}.h5").stat().st_size
            storage[case.label] = sizes

        view_rows = views_table(cases[0], views, args.rounds, fresh) if views else []
        med = statistics.median
        print(f"{header}, {os.getloadavg()[0]:.2f} at end\n")
        print("| measurement | her2lab | baseline | ratio |")
        print("|---|---:|---:|---:|")
        for case in cases:
            m, n = res[case.label], case.n_tiles
            model = med(m["model"])
            for w in WORKERS:
                print(
                    f"| {case.label}: patches/s, extract_cohort num_workers={w.rstrip('t')}"
                    f"{' + prefetch thread' if w.endswith('t') else ', no prefetch'}, {n} tiles "
                    f"(baseline: model-only forward) | {n / med(m[f'pipe{w}']):.1f} "
                    f"| {n / model:.1f} | {med(ratio[case.label][w]):.2f}x |"
                )
        for case in cases:
            m, n = res[case.label], case.n_tiles
            fwd = [t / n * 1e3 for t in m["model"]]
            for what, key in (
                ("tile reading alone (DataLoader, num_workers=0)", "read"),
                ("uint8 → normalised float (as Embedder.embed)", "convert"),
            ):
                ms = [t / n * 1e3 for t in m[key]]
                print(
                    f"| {case.label}: {what}, ms/patch (baseline: forward ms/patch) "
                    f"| {med(ms):.3f} | {med(fwd):.3f} "
                    f"| {med(a / b for a, b in zip(ms, fwd, strict=True)):.2f}x |"
                )
            serial = [
                (a + b + c) / n * 1e3
                for a, b, c in zip(m["read"], m["convert"], m["model"], strict=True)
            ]
            pipe = [t / n * 1e3 for t in m["pipe0"]]
            print(
                f"| {case.label}: read + convert + forward, ms/patch (baseline: extract_cohort "
                f"num_workers=0 ms/patch) | {med(serial):.3f} | {med(pipe):.3f} "
                f"| {med(a / b for a, b in zip(serial, pipe, strict=True)):.2f}x |"
            )
        for case in cases:
            s = storage[case.label]
            n1 = len(case.dataset.slides[0].coords)
            d = case.encoder.spec.embed_dim
            print(
                f"| {case.label}: features file bytes, 1 slide ({n1} tiles x {d}-d), float16 "
                f"(baseline: float32) | {s['float16']} | {s['float32']} "
                f"| {s['float16'] / s['float32']:.2f}x |"
            )
        n_fwd = TRUNC_BATCHES * BATCH
        pairs = [("her2lab", "plain", "plain model, default NCHW layout (as CLAM runs it)"),
                 ("her2lab", "plain_cl", "plain model, channels-last")]
        if "compiled" in forwards:
            pairs += [("compiled", "plain", "plain model, default NCHW layout (as CLAM runs it)"),
                      ("compiled", "her2lab", "her2lab's inference encoder uncompiled")]
        names = {"her2lab": "her2lab's inference encoder (BatchNorm folded, channels-last)",
                 "compiled": f"the same, torch.compile'd (extract.compile; compiled once in {forwards.get('compile_s', [0])[0]:.0f} s)"}
        for ours, base, what in pairs:
            print(
                f"| ResNet-50-trunc@224 (1024-d): forward patches/s, {names[ours]} "
                f"(baseline: {what}) | {n_fwd / med(forwards[ours]):.1f} "
                f"| {n_fwd / med(forwards[base]):.1f} "
                f"| {med(b / a for a, b in zip(forwards[ours], forwards[base], strict=True)):.2f}x |"
            )
        for row in view_rows:
            print(row)
        print(
            "\nMedians over rounds; ratio = median of per-round ratios (patches/s: pipeline "
            "rate / model-only rate; ms/patch: her2lab / baseline); storage: float16 bytes / "
            "float32 bytes."
        )
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
