"""Benchmark: every foundation-model preset's extraction against its own model-only throughput.

For each preset of ``conf/backbone`` (composed as ``python -m her2lab.extract backbone=<name>``
composes it), with random weights written to a file and loaded back through ``backbone.weights``
(nothing is downloaded), on one synthetic slide (8192 × 6144 px at 0.5 µm/px) tiled at the preset's input size and µm/px:

- pipeline patches/s: ``extract_cohort`` end to end (tile reads from the slide, uint8 → normalised
  float, forward, NaN check, float16 h5 writing; a fresh output folder each time);
- model-only patches/s: the same inference encoder (``Embedder``'s: BatchNorm folded,
  channels-last), in ``torch.inference_mode``, on the same tiles already read, normalised and in
  memory (channels-last), in the pipeline's batches, with the same torch threads — the upper
  bound. (Real tiles, not random tensors: a ViT's forward on random input measured 9 % faster
  than on the slide's tiles, which would count as pipeline overhead what is not.)

Full-size foundation models run at 0.1–1 patches/s on a 2-core CPU, so each transformer keeps its
full width and its authors' token layout but only ``--blocks`` blocks (default 2; CTransPath and
the ResNets run whole). Fewer blocks make the forward cheaper and the pipeline's fixed per-tile
cost relatively larger: the ratio measured is a lower bound of the full model's.

Pipeline and model-only alternate within each round (order swapped every round) after a warm-up;
the table gives medians over rounds, the ratio the median of per-round ratios.

Run: ``python bench/presets.py`` (``--presets uni,conch`` for some; ``--quick`` for a smoke run).
"""

from __future__ import annotations

import argparse
import logging
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf
from torch.utils.data import DataLoader

from her2lab import CONF_DIR
from her2lab.data.cohort import load_manifest
from her2lab.data.synthetic import SyntheticConfig, generate_cohort
from her2lab.embed.backbones import BackboneSpec, build_encoder, create_model
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

BATCH = 32
PRESETS = ["uni", "uni2", "conch", "conch15", "virchow", "virchow2", "hoptimus0", "hoptimus1", "h0mini", "gigapath",
           "phikon", "phikon2", "ctranspath"]
#: the config key that sets a preset's number of transformer blocks, per source
DEPTH_KEY = {"timm": "depth", "conch": "depth", "transformers": "num_hidden_layers"}


def preset_spec(name: str, blocks: int) -> BackboneSpec:
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        cfg = compose(config_name="extract", overrides=[f"backbone={name}"])
    d = OmegaConf.to_container(cfg.backbone, resolve=True)
    if blocks and name != "ctranspath":  # a Swin-T is small enough to run whole
        d["model_kwargs"] = {**d["model_kwargs"], DEPTH_KEY[d["source"]]: blocks}
    return BackboneSpec(**{**d, "weights": None, "pretrained": False})


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--presets", default=",".join(PRESETS), help="comma-separated presets (default: all)")
    ap.add_argument("--blocks", type=int, default=2, help="transformer blocks kept (default 2; 0: all)")
    ap.add_argument("--rounds", type=int, default=3, help="interleaved rounds (default 3)")
    ap.add_argument("--size", type=int, default=8192, help="slide width in px at 0.5 µm/px (default 8192; height 3/4)")
    ap.add_argument("--quick", action="store_true", help="1 round, 1 block, a 4096 px slide")
    args = ap.parse_args()
    if args.quick:
        args.rounds, args.blocks, args.size = 1, 1, 4096
    logging.getLogger("her2lab").setLevel(logging.ERROR)  # "random weights" warnings
    load0 = os.getloadavg()[0]
    tmp = Path(tempfile.mkdtemp(prefix="her2lab_bench_"))
    rows = []
    try:
        cfg = SyntheticConfig(n_slides=1, n_pairs=0, seed=0, width_px=args.size, height_px=args.size * 3 // 4)
        manifest = load_manifest(generate_cohort(tmp / "cohort", cfg, num_workers=1))
        for name in args.presets.split(","):
            spec = preset_spec(name, args.blocks)
            weights = tmp / f"{name}.pt"
            torch.save(create_model(spec).state_dict(), weights)
            spec.weights, spec.pretrained = str(weights), True
            encoder = build_encoder(spec)
            prep = PrepareSettings(tmp / "cache", tiling=TilingParams(target_mpp=spec.target_mpp, patch_px=spec.input_px),
                                   tissue=TissueParams(), qc=False)
            report = prepare_cohort(manifest, prep, num_workers=1)
            if (report.status == "failed").any():
                raise SystemExit(f"prepare failed: {report.to_dict('records')}")
            items = [(r.slide_id, r.path, None, prep.tiles_path(r.slide_id)) for r in manifest.itertuples()]
            ds = TileDataset([load_slide_tiles(p, s, sp, m) for s, sp, m, p in items])
            embedder = Embedder(encoder, device="cpu")
            loader = DataLoader(ds, batch_sampler=SlideBatchSampler(ds.offsets, BATCH))
            inputs = [(tiles.permute(0, 3, 1, 2).float() - embedder.mean) / embedder.std for tiles, *_ in loader]
            net = embedder.encoder
            settings = ExtractSettings(batch_size=BATCH, device="cpu", compile=False)

            def pipeline(out: Path) -> float:
                t0 = time.perf_counter()
                rep = extract_cohort(items, encoder, out, settings)  # noqa: B023
                dt = time.perf_counter() - t0
                if (rep.status != "done").any():
                    raise SystemExit(f"{name}: extract failed: {rep.to_dict('records')}")  # noqa: B023
                shutil.rmtree(out)
                return dt

            def model() -> float:
                with torch.inference_mode():
                    t0 = time.perf_counter()
                    for x in inputs:  # noqa: B023
                        net(x)  # noqa: B023
                    return time.perf_counter() - t0

            model(), pipeline(tmp / "warm")  # warm-up
            times = {"pipe": [], "model": []}
            for r in range(args.rounds):
                for k in (["pipe", "model"] if r % 2 == 0 else ["model", "pipe"]):
                    times[k].append(pipeline(tmp / f"out{r}") if k == "pipe" else model())
            n, med = len(ds), statistics.median
            ratio = med(m / p for m, p in zip(times["model"], times["pipe"], strict=True))
            blocks = "all" if name == "ctranspath" or not args.blocks else str(args.blocks)
            rows.append(f"| {name} | {spec.name} ({spec.source}) | {blocks} | {spec.embed_dim} | {spec.input_px} px @ "
                        f"{spec.target_mpp} µm/px | {n} | {n / med(times['pipe']):.1f} | {n / med(times['model']):.1f} "
                        f"| {ratio:.2f}x |")
            print(rows[-1], file=sys.stderr, flush=True)
        print(f"# bench/presets.py: {os.cpu_count()} CPUs, torch {torch.__version__} with {torch.get_num_threads()} "
              f"threads, Python {sys.version.split()[0]}; 1 synthetic slide {cfg.width_px}x{cfg.height_px} px @ "
              f"{cfg.mpp} µm/px; batch size {BATCH}; random weights loaded from a file; {args.rounds} rounds; "
              f"1-min load average {load0:.2f} at start, {os.getloadavg()[0]:.2f} at end\n")
        print("| preset | architecture (source) | blocks | dim | tiles | n tiles | pipeline patches/s "
              "| model-only patches/s | ratio |")
        print("|---|---|---:|---:|---|---:|---:|---:|---:|")
        print("\n".join(rows))
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
