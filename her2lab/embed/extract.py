"""Embedding extraction: every tile of every slide through a frozen encoder, one h5 per slide.

One DataLoader streams tiles of all slides (workers stay alive across slides; each worker opens
its own slide handles); batches never mix slides, so a slide's features do not depend on which
other slides ran with it — a sharded run gives the same files as a single one. Tiles arrive as
uint8 NHWC; conversion, normalisation and channels-last layout happen on the device, in one
pass. Features are checked for NaN/Inf and written atomically (float16 by default).

Output: ``features/{tiling}/{backbone}/{slide}.h5`` with ``features`` (N, D), ``coords`` (N, 2)
and attributes naming the encoder, its weights and the tiling. With ``augment_views=K > 0``
(feature-level augmentation, :mod:`her2lab.embed.augment`) the file also holds ``views``
(K, N, D): every tile embedded K more times, each time augmented as the H&E-HER2 study did,
in the folder ``features/{tiling}/{backbone}+aug{K}/`` (so K is part of the cache's key).
"""

from __future__ import annotations

import logging
import os
import queue
import threading
import time
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from torch import nn
from torch.fx.experimental.optimization import fuse
from torch.utils.data import DataLoader, Dataset, Sampler

from her2lab.embed.augment import StudyAugment, view_seed
from her2lab.embed.backbones import Encoder
from her2lab.embed.features_file import check_features_file, features_attrs, write_features
from her2lab.errors import Her2labError, SlideError, StaleCacheError
from her2lab.progress import progress_bar
from her2lab.slides.tiles_file import SlideTiles, load_slide_tiles
from her2lab.slides.tiling import ReaderPool

log = logging.getLogger(__name__)

@dataclass(frozen=True)
class ExtractSettings:
    batch_size: int = 64
    num_workers: int = 0  # tile-reading processes; 0 reads in the main process
    device: str = "auto"  # "auto" → cuda if available
    precision: str = "auto"  # "auto" → bf16 autocast on CUDA, fp32 on CPU; or "bf16", "fp32"
    dtype: str = "float16"  # storage dtype of features
    overwrite: bool = False
    # With num_workers=0, read the next batch in a thread during the forward. None: only when the
    # model runs on a GPU (on a 2-core CPU the thread competes with torch's threads: measured
    # 0.62x vs 0.68x of model-only speed for AlexNet@96, see BENCHMARKS.md).
    prefetch: bool | None = None
    # torch.compile the encoder (inductor; batches padded to one shape so it compiles once).
    # "auto": when the run embeds at least COMPILE_MIN_TILES tiles, where the one-off compile
    # (30–40 s here) is repaid (ResNet-50-trunc 1.36x faster on CPU; ViT-L 1.03x; BENCHMARKS.md).
    compile: bool | str = "auto"
    # Feature-level augmentation: K augmented views of every tile besides the plain one (0: none).
    augment_views: int = 0
    augment_seed: int = 0

    def __post_init__(self) -> None:
        if self.compile not in (True, False, "auto"):
            raise Her2labError(f"extract.compile={self.compile!r}: use auto, true or false")
        if not isinstance(self.augment_views, int) or isinstance(self.augment_views, bool) or self.augment_views < 0:
            raise Her2labError(f"extract.augment_views={self.augment_views!r}: a whole number ≥ 0 (0: no augmented views)")


#: Tiles from which ``compile="auto"`` compiles the encoder.
COMPILE_MIN_TILES = 20_000


def prefetch(iterable, depth: int = 2):
    """Yield from ``iterable`` while a background thread fetches up to ``depth`` items ahead.

    Tile decoding (OpenSlide, through ctypes) and torch's kernels release the GIL, so reading
    the next batch overlaps the current forward without the cost of worker processes.
    """
    q: queue.Queue = queue.Queue(maxsize=depth)
    done = object()
    stop = threading.Event()

    def run() -> None:
        try:
            for item in iterable:
                if stop.is_set():
                    return
                q.put(item)
        except BaseException as exc:  # re-raised in the consumer
            q.put(exc)
        q.put(done)

    t = threading.Thread(target=run, daemon=True)
    t.start()
    try:
        while True:
            item = q.get()
            if item is done:
                return
            if isinstance(item, BaseException):
                raise item
            yield item
    finally:
        stop.set()
        while t.is_alive():  # unblock a producer waiting on a full queue
            try:
                q.get_nowait()
            except queue.Empty:
                t.join(timeout=0.05)


class TileDataset(Dataset):
    """Tiles of many slides, indexed globally; item = (uint8 (H, W, 3), slide index, tile index)."""

    def __init__(self, slides: list[SlideTiles], max_open: int = 4) -> None:
        self.slides = slides
        self.offsets = np.cumsum([0] + [len(s.coords) for s in slides])
        self.readers = ReaderPool(max_open)

    def __len__(self) -> int:
        return int(self.offsets[-1])

    def __getitem__(self, i: int):
        j = int(np.searchsorted(self.offsets, i, side="right") - 1)
        k = i - int(self.offsets[j])
        try:
            s = self.slides[j]
            tile = self.readers.get(j, s.slide_path, s.mpp, s.geom).read(s.coords[k])
            err = ""
        except Exception as exc:  # the slide fails, the run goes on (also for an unforeseen error)
            p = self.slides[j].geom.patch_px
            err = str(exc) if isinstance(exc, SlideError) else (
                f"{self.slides[j].slide_path}: tile {k} unreadable ({_one_line(exc)}); re-run prepare "
                "with prepare.overwrite=true"
            )
            tile = np.zeros((p, p, 3), np.uint8)
        with warnings.catch_warnings():  # PIL's arrays are read-only; the tensor is never written
            warnings.simplefilter("ignore", UserWarning)
            return torch.from_numpy(np.ascontiguousarray(tile)), j, k, err


class SlideBatchSampler(Sampler[list[int]]):
    """Consecutive batches that never cross a slide boundary."""

    def __init__(self, offsets: np.ndarray, batch_size: int) -> None:
        self.offsets = offsets
        self.batch_size = batch_size

    def __iter__(self):
        for a, b in zip(self.offsets[:-1], self.offsets[1:], strict=True):
            for s in range(int(a), int(b), self.batch_size):
                yield list(range(s, min(s + self.batch_size, int(b))))

    def __len__(self) -> int:
        n = np.diff(self.offsets)
        return int(np.sum((n + self.batch_size - 1) // self.batch_size))


def resolve_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def fold_batchnorm(encoder: Encoder) -> nn.Module:
    """The encoder with every BatchNorm that follows a convolution folded into it (torch.fx's
    conv-BN fusion): the same eval-mode arithmetic, one pass over the activations fewer per
    layer. An encoder without BatchNorm, or one torch.fx cannot trace, is returned as it is."""
    if not any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in encoder.modules()):
        return encoder
    try:
        return fuse(encoder.eval(), inplace=False)
    except Exception as exc:  # an untraceable model runs unfused: slower, never wrong
        log.info("%s: BatchNorm not folded (%s: %s)", encoder.spec.label, type(exc).__name__, str(exc).splitlines()[0][:80])
        return encoder


class Embedder:
    """Encoder on a device with its normalisation; ``embed(uint8 NHWC) → float32 (B, D)``.

    The encoder runs in eval mode, channels-last, with BatchNorm folded into its convolutions
    (:func:`fold_batchnorm`) and, on CUDA, under bf16 autocast. With ``compile=True`` it runs
    through ``torch.compile`` at one batch shape (``batch_size``; a smaller batch is padded and
    the padding's rows dropped); if compiling fails, it says so once and runs as it is.
    """

    def __init__(self, encoder: Encoder, device: str = "auto", precision: str = "auto",
                 compile: bool = False, batch_size: int | None = None) -> None:
        self.device = resolve_device(device)
        self.encoder = fold_batchnorm(encoder.eval()).to(self.device, memory_format=torch.channels_last).eval()
        spec = encoder.spec
        self.label = spec.label
        self.mean = torch.tensor(spec.mean, device=self.device).view(1, 3, 1, 1) * 255.0
        self.std = torch.tensor(spec.std, device=self.device).view(1, 3, 1, 1) * 255.0
        if precision == "auto":
            precision = "bf16" if self.device.type == "cuda" else "fp32"
        self.autocast = precision == "bf16"
        self.compiled = torch.compile(self.encoder, dynamic=False) if compile else None
        self.batch_size = batch_size

    def _forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.compiled is None:
            return self.encoder(x)
        n = len(x)
        if self.batch_size and n < self.batch_size:  # one shape: pad, then drop the padding's rows
            x = torch.cat([x, x.new_zeros((self.batch_size - n, *x.shape[1:]))]).contiguous(memory_format=torch.channels_last)
        try:
            return self.compiled(x)[:n]
        except Exception as exc:  # no compiler, an unsupported op…: slower, never wrong
            log.warning("%s: torch.compile failed (%s); running uncompiled", self.label, _one_line(exc)[:160])
            self.compiled = None
            return self.encoder(x[:n])

    @torch.inference_mode()
    def embed(self, tiles: torch.Tensor) -> torch.Tensor:
        """``tiles``: (B, H, W, 3) uint8 → (B, D) float32 on the CPU."""
        x = tiles.to(self.device, non_blocking=True).permute(0, 3, 1, 2)  # (B, 3, H, W), channels-last strides
        x = (x.float() - self.mean) / self.std
        with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.autocast):
            f = self._forward(x)  # (B, D)
        return f.float().cpu()

    @torch.inference_mode()
    def embed_view(self, tiles: torch.Tensor, augment: StudyAugment, seed: int) -> torch.Tensor:
        """One augmented view: ``tiles`` (B, H, W, 3) uint8 → (B, D) float32 on the CPU; each tile
        colour-jittered and moved (uint8), normalised, then noised, from ``seed`` alone."""
        with torch.random.fork_rng(devices=[]):  # the transforms draw from torch's global generator
            torch.manual_seed(seed)
            moved = augment.pixels(tiles)  # (B, 3, H, W) uint8
        x = moved.to(self.device, non_blocking=True).contiguous(memory_format=torch.channels_last)
        x = (x.float() - self.mean) / self.std
        x = augment.noise(x, torch.Generator().manual_seed(seed))
        with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.autocast):
            f = self._forward(x)  # (B, D)
        return f.float().cpu()


def extract_cohort(
    items: list[tuple[str, str, float | None, Path]],
    encoder: Encoder,
    features_dir: Path,
    settings: ExtractSettings = ExtractSettings(),
) -> pd.DataFrame:
    """Embed slides given as ``(slide_id, slide_path, mpp, tiles_path)``; returns a report.

    Slides already done with the same parameters are skipped; a stale file stops the run with a
    message naming the mismatch; a bad slide is reported and the rest finish.
    """
    rows: list[dict] = []
    todo: list[tuple[SlideTiles, dict, Path]] = []
    for slide_id, slide_path, mpp, tiles_path in items:
        out = features_dir / f"{slide_id}.h5"
        try:
            tiles = load_slide_tiles(tiles_path, slide_id, slide_path, mpp)
            if tiles.geom.patch_px != encoder.spec.input_px:
                raise SlideError(
                    f"{tiles_path}: tiles are {tiles.geom.patch_px}px but the encoder takes "
                    f"{encoder.spec.input_px}px; tile at backbone.input_px"
                )
            attrs = features_attrs(encoder, tiles, settings.dtype, settings.augment_views)
            if check_features_file(out, attrs, settings.overwrite):
                rows.append({"slide_id": slide_id, "status": "skipped", "n_tiles": len(tiles.coords), "error": ""})
                continue
        except StaleCacheError:
            raise
        except Her2labError as exc:
            rows.append({"slide_id": slide_id, "status": "failed", "n_tiles": 0, "error": str(exc)})
            continue
        except Exception as exc:  # a file no one foresaw fails its slide, not the run
            log.debug("unexpected error on %s", slide_id, exc_info=True)
            rows.append({"slide_id": slide_id, "status": "failed", "n_tiles": 0,
                         "error": f"{tiles_path}: {_one_line(exc)}; re-run prepare with prepare.overwrite=true"})
            continue
        todo.append((tiles, attrs, out))
    if todo:
        rows += _run(todo, encoder, settings)
    report = pd.DataFrame(rows, columns=["slide_id", "status", "n_tiles", "seconds", "error"])
    for r in report[report.status == "failed"].itertuples():
        log.warning("failed: %s", r.error)
    return report


def _run(todo: list[tuple[SlideTiles, dict, Path]], encoder: Encoder, settings: ExtractSettings) -> list[dict]:
    ds = TileDataset([t for t, _, _ in todo])
    compile_ = len(ds) >= COMPILE_MIN_TILES if settings.compile == "auto" else bool(settings.compile)
    embedder = Embedder(encoder, settings.device, settings.precision, compile=compile_, batch_size=settings.batch_size)
    loader = DataLoader(
        ds,
        batch_sampler=SlideBatchSampler(ds.offsets, settings.batch_size),
        num_workers=settings.num_workers,
        pin_memory=embedder.device.type == "cuda",
        persistent_workers=False,
        prefetch_factor=4 if settings.num_workers else None,
    )
    np_dtype = np.dtype(settings.dtype)
    rows: list[dict] = []
    k_views = settings.augment_views
    augment = StudyAugment() if k_views else None
    parts: list[torch.Tensor] = []
    views: list[list[torch.Tensor]] = [[] for _ in range(k_views)]
    current, error, t_slide, done_tiles, t0 = 0, "", time.perf_counter(), 0, time.perf_counter()
    desc = f"embedding {len(ds)} tiles of {len(todo)} slides ({encoder.spec.label}" + \
        (f", {k_views} augmented views each)" if k_views else ")")
    with progress_bar(desc, len(ds), unit="patches") as advance:
        use_thread = embedder.device.type == "cuda" if settings.prefetch is None else settings.prefetch
        batches = prefetch(loader, depth=2) if use_thread and not settings.num_workers else loader
        for tiles, j, _k, errs in batches:
            j = int(j[0])
            if j != current:
                parts, current, error, t_slide = [], j, "", time.perf_counter()
                views = [[] for _ in range(k_views)]
            error = error or next((e for e in errs if e), "")
            if not error:
                parts.append(embedder.embed(tiles))
                for v in range(k_views):
                    seed = view_seed(settings.augment_seed, todo[j][0].slide_id, int(_k[0]), v)
                    views[v].append(embedder.embed_view(tiles, augment, seed))
            done_tiles += len(tiles)
            advance(len(tiles), rate=f"{done_tiles / (time.perf_counter() - t0):.0f} patches/s")
            slide, n = todo[j][0], len(todo[j][0].coords)
            last = int(ds.offsets[j + 1]) - 1
            if int(_k[-1]) + int(ds.offsets[j]) == last:
                seconds = time.perf_counter() - t_slide
                if error:
                    rows.append({"slide_id": slide.slide_id, "status": "failed", "n_tiles": n, "seconds": seconds, "error": error})
                else:
                    stack = torch.stack([torch.cat(v) for v in views]).numpy() if k_views else None  # (K, N, D)
                    rows.append(_finish(todo[j], torch.cat(parts).numpy(), np_dtype, seconds, stack))
                parts, views = [], [[] for _ in range(k_views)]
    return rows


def _finish(job: tuple[SlideTiles, dict, Path], feats: np.ndarray, np_dtype: np.dtype, seconds: float,
            views: np.ndarray | None = None) -> dict:
    tiles, attrs, out = job
    # per tile: finite as computed (NaN/Inf from the encoder) and as stored (float16 overflow,
    # |x| > 65504); with views (K, N, D), a tile with a non-finite view fails like one with
    # non-finite features
    computed = np.isfinite(feats).all(axis=1)
    stored = feats.astype(np_dtype)
    bad = ~(computed & np.isfinite(stored).all(axis=1))
    stored_views = None
    if views is not None:
        stored_views = views.astype(np_dtype)
        computed &= np.isfinite(views).all(axis=(0, 2))
        bad |= ~(computed & np.isfinite(stored_views).all(axis=(0, 2)))
    finite = bool(computed.all())
    if bad.any():
        hint = "extract.dtype=float32" if finite else "check the encoder weights"
        return {
            "slide_id": tiles.slide_id, "status": "failed", "n_tiles": len(feats), "seconds": seconds,
            "error": f"{tiles.slide_path}: {int(bad.sum())} of {len(feats)} tiles gave NaN/Inf features; {hint}",
        }
    write_features(out, stored, tiles.coords, attrs, stored_views)
    return {"slide_id": tiles.slide_id, "status": "done", "n_tiles": len(feats), "seconds": round(seconds, 3), "error": ""}


def _one_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return f"{type(exc).__name__}: {text.splitlines()[0]}" if text else type(exc).__name__


def shard_of(shard: int | None, num_shards: int | None) -> tuple[int, int]:
    """This process's (shard, num_shards): explicit, else torchrun's RANK/WORLD_SIZE, else SLURM's."""
    if num_shards is None:
        for rank_var, size_var in (("RANK", "WORLD_SIZE"), ("SLURM_PROCID", "SLURM_NTASKS")):
            if size_var in os.environ and rank_var in os.environ:
                return int(os.environ[rank_var]), int(os.environ[size_var])
        return 0, 1
    shard = 0 if shard is None else int(shard)
    if not 0 <= shard < num_shards:
        raise Her2labError(f"extract.shard={shard} is outside 0..{num_shards - 1} (extract.num_shards={num_shards})")
    return shard, int(num_shards)
