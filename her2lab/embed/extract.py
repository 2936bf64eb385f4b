"""Embedding extraction: every tile of every slide through a frozen encoder, one h5 per slide.

One DataLoader streams tiles of all slides (workers stay alive across slides; each worker opens
its own slide handles); batches never mix slides, so a slide's features do not depend on which
other slides ran with it — a sharded run gives the same files as a single one. Tiles arrive as
uint8 NHWC; conversion, normalisation and channels-last layout happen on the device, in one
pass. Features are checked for NaN/Inf and written atomically (float16 by default).

Output: ``features/{tiling}/{backbone}/{slide}.h5`` with ``features`` (N, D), ``coords`` (N, 2)
and attributes naming the encoder, its weights and the tiling.
"""

from __future__ import annotations

import errno
import json
import logging
import os
import queue
import threading
import time
import warnings
from dataclasses import dataclass
from pathlib import Path

import h5py
import numpy as np
import pandas as pd
import torch
from torch.utils.data import DataLoader, Dataset, Sampler

from her2lab import __version__
from her2lab.embed.backbones import Encoder
from her2lab.errors import Her2labError, OutputError, SlideError, StaleCacheError
from her2lab.io import param_hash, write_h5
from her2lab.progress import progress_bar
from her2lab.slides.tiling import ReaderPool, TileGeometry

log = logging.getLogger(__name__)

#: Attributes a tiles file from ``python -m her2lab.prepare`` always has.
TILES_KEYS = (
    "patch_px", "patch_px_level0", "stride_level0", "read_level", "read_px", "level0_mpp",
    "target_mpp", "mpp_source", "tiling", "param_hash",
)

#: Attributes compared to decide whether an existing features file is stale.
IDENTITY_KEYS = (
    "encoder", "encoder_source", "encoder_weights_sha256", "input_px", "target_mpp", "patch_px",
    "features_dtype", "tiles_param_hash",
)


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


@dataclass
class SlideTiles:
    """One slide's tiles as the tiles file describes them."""

    slide_id: str
    slide_path: str
    mpp: float | None
    coords: np.ndarray  # (N, 2) int64
    geom: TileGeometry
    attrs: dict


def load_slide_tiles(tiles_path: Path, slide_id: str, slide_path: str, mpp: float | None) -> SlideTiles:
    """Read a tiles file and check the slide it describes is still the one at ``slide_path``.

    Raises:
        SlideError: missing, corrupt or foreign tiles file (e.g. a CLAM/TRIDENT patch file, whose
            attributes are not these), impossible geometry (an older prepare of a slide with a
            wrong mpp), or a slide that moved or changed since it was tiled.
    """
    try:
        with h5py.File(tiles_path, "r") as f:
            coords = f["coords"][:]
            attrs = dict(f.attrs)
    except FileNotFoundError:
        raise SlideError(f"{tiles_path}: tiles file missing; run python -m her2lab.prepare first") from None
    except (OSError, KeyError) as exc:
        raise SlideError(
            f"{tiles_path}: corrupt tiles file ({type(exc).__name__}); delete it and re-run prepare"
        ) from None
    missing = [k for k in TILES_KEYS if k not in attrs]
    if missing:
        raise SlideError(
            f"{tiles_path}: not a her2lab tiles file (no {', '.join(missing[:3])} attribute"
            f"{'s' if len(missing) > 1 else ''}; another tool's patch file?); run python -m her2lab.prepare "
            "for this slide"
        )
    try:
        geom = TileGeometry(
            patch_px=int(attrs["patch_px"]),
            patch_px_level0=int(attrs["patch_px_level0"]),
            stride_level0=float(attrs["stride_level0"]),
            read_level=int(attrs["read_level"]),
            read_px=int(attrs["read_px"]),
            level0_mpp=float(attrs["level0_mpp"]),
        )
    except (TypeError, ValueError) as exc:
        raise SlideError(f"{tiles_path}: corrupt tiles attributes ({exc}); re-run prepare with prepare.overwrite=true") from None
    if min(geom.patch_px, geom.patch_px_level0, geom.read_px) < 1 or not geom.stride_level0 > 0:
        raise SlideError(
            f"{tiles_path}: tiles of {geom.patch_px_level0} level-0 px (slide at {geom.level0_mpp:.4g} µm/px "
            f"from {attrs['mpp_source']}: a wrong resolution tag?); fix the slide's mpp and re-run prepare "
            "with prepare.overwrite=true"
        )
    if coords.ndim != 2 or coords.shape[1] != 2 or not np.issubdtype(coords.dtype, np.integer):
        raise SlideError(
            f"{tiles_path}: coords are {coords.dtype} {coords.shape}, not (N, 2) integers; re-run prepare "
            "with prepare.overwrite=true"
        )
    p = Path(slide_path)
    if not p.exists():
        raise SlideError(
            f"{p}: slide not found (tiled from {attrs.get('slide_path')}); the slide moved: fix the manifest path"
        )
    if int(attrs.get("slide_bytes", -1)) != p.stat().st_size:
        raise SlideError(
            f"{p}: not the file that was tiled ({attrs.get('slide_bytes')} bytes then, {p.stat().st_size} now); "
            "re-run prepare with prepare.overwrite=true"
        )
    return SlideTiles(slide_id, str(p), mpp, coords, geom, attrs)


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


class Embedder:
    """Encoder on a device with its normalisation; ``embed(uint8 NHWC) → float32 (B, D)``."""

    def __init__(self, encoder: Encoder, device: str = "auto", precision: str = "auto") -> None:
        self.device = resolve_device(device)
        self.encoder = encoder.to(self.device, memory_format=torch.channels_last).eval()
        spec = encoder.spec
        self.mean = torch.tensor(spec.mean, device=self.device).view(1, 3, 1, 1) * 255.0
        self.std = torch.tensor(spec.std, device=self.device).view(1, 3, 1, 1) * 255.0
        if precision == "auto":
            precision = "bf16" if self.device.type == "cuda" else "fp32"
        self.autocast = precision == "bf16"

    @torch.inference_mode()
    def embed(self, tiles: torch.Tensor) -> torch.Tensor:
        """``tiles``: (B, H, W, 3) uint8 → (B, D) float32 on the CPU."""
        x = tiles.to(self.device, non_blocking=True).permute(0, 3, 1, 2)  # (B, 3, H, W), channels-last strides
        x = (x.float() - self.mean) / self.std
        with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.autocast):
            f = self.encoder(x)  # (B, D)
        return f.float().cpu()


def features_attrs(encoder: Encoder, tiles: SlideTiles, dtype: str) -> dict:
    spec = encoder.spec
    a = tiles.attrs
    attrs = {
        "slide_id": tiles.slide_id,
        "slide_path": tiles.slide_path,
        "encoder": spec.name,
        "encoder_source": spec.source,
        "backbone": spec.label,
        "encoder_weights": encoder.weights_source,  # file | hub | random
        "encoder_weights_file": str(spec.weights or ""),
        "encoder_weights_sha256": encoder.weights_sha256,
        "pretrained": encoder.weights_source != "random",
        "embed_dim": int(spec.embed_dim or 0),
        "input_px": spec.input_px,
        "transform": json.dumps({"mean": list(spec.mean), "std": list(spec.std), "scale": "1/255", "resize": "none"}),
        "features_dtype": dtype,
        "target_mpp": float(a["target_mpp"]),
        "patch_px": int(a["patch_px"]),
        "patch_px_level0": int(a["patch_px_level0"]),
        "level0_mpp": float(a["level0_mpp"]),
        "mpp_source": str(a["mpp_source"]),
        "tiling": str(a["tiling"]),
        "tiles_param_hash": str(a["param_hash"]),
        "her2lab_version": __version__,
    }
    attrs["param_hash"] = param_hash({k: attrs[k] for k in IDENTITY_KEYS})
    return attrs


def check_features_file(path: Path, want: dict, overwrite: bool) -> bool:
    """True if ``path`` is done with the same parameters; raise if it is stale; False if absent."""
    if not path.exists():
        return False
    try:
        with h5py.File(path, "r") as f:
            have = dict(f.attrs)
            ok = "features" in f and "coords" in f
    except OSError:
        return False  # unreadable (e.g. killed mid-write by another tool): rebuild
    if not ok:
        return False
    if have.get("param_hash") == want["param_hash"]:
        return True
    if overwrite:
        return False
    if "encoder" not in have or "param_hash" not in have:  # e.g. CLAM/TRIDENT features, same layout
        raise StaleCacheError(
            f"{path}: a features file not made by her2lab (no encoder attributes); move it out of "
            "this folder, or set extract.overwrite=true to replace it"
        )
    diffs = [f"{k}={have.get(k)!r} (now {want[k]!r})" for k in IDENTITY_KEYS if have.get(k) != want[k]]
    raise StaleCacheError(f"{path}: made with {', '.join(diffs)}; set extract.overwrite=true or use another backbone name")


def write_features(path: Path, feats: np.ndarray, coords: np.ndarray, attrs: dict) -> None:
    try:
        write_h5(path, {"features": feats, "coords": coords.astype(np.int64)}, attrs)
    except OSError as exc:
        full = exc.errno in (errno.ENOSPC, errno.EFBIG, errno.EDQUOT)
        why = "disk full" if full else (exc.strerror or type(exc).__name__)
        raise OutputError(
            f"{path}: could not write features ({why}); free space or move paths.data_dir; "
            "finished slides are intact"
        ) from None


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
            attrs = features_attrs(encoder, tiles, settings.dtype)
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
    embedder = Embedder(encoder, settings.device, settings.precision)
    ds = TileDataset([t for t, _, _ in todo])
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
    parts: list[torch.Tensor] = []
    current, error, t_slide, done_tiles, t0 = 0, "", time.perf_counter(), 0, time.perf_counter()
    desc = f"embedding {len(ds)} tiles of {len(todo)} slides ({encoder.spec.label})"
    with progress_bar(desc, len(ds), unit="patches") as advance:
        use_thread = embedder.device.type == "cuda" if settings.prefetch is None else settings.prefetch
        batches = prefetch(loader, depth=2) if use_thread and not settings.num_workers else loader
        for tiles, j, _k, errs in batches:
            j = int(j[0])
            if j != current:
                parts, current, error, t_slide = [], j, "", time.perf_counter()
            error = error or next((e for e in errs if e), "")
            if not error:
                parts.append(embedder.embed(tiles))
            done_tiles += len(tiles)
            advance(len(tiles), rate=f"{done_tiles / (time.perf_counter() - t0):.0f} patches/s")
            slide, n = todo[j][0], len(todo[j][0].coords)
            last = int(ds.offsets[j + 1]) - 1
            if int(_k[-1]) + int(ds.offsets[j]) == last:
                seconds = time.perf_counter() - t_slide
                if error:
                    rows.append({"slide_id": slide.slide_id, "status": "failed", "n_tiles": n, "seconds": seconds, "error": error})
                else:
                    rows.append(_finish(todo[j], torch.cat(parts).numpy(), np_dtype, seconds))
                parts = []
    return rows


def _finish(job: tuple[SlideTiles, dict, Path], feats: np.ndarray, np_dtype: np.dtype, seconds: float) -> dict:
    tiles, attrs, out = job
    bad = ~np.isfinite(feats).all(axis=1)
    stored = feats.astype(np_dtype)
    bad |= ~np.isfinite(stored).all(axis=1)  # float16 overflow (|x| > 65504) shows up here
    if bad.any():
        hint = "extract.dtype=float32" if np.isfinite(feats).all() else "check the encoder weights"
        return {
            "slide_id": tiles.slide_id, "status": "failed", "n_tiles": len(feats), "seconds": seconds,
            "error": f"{tiles.slide_path}: {int(bad.sum())} of {len(feats)} tiles gave NaN/Inf features; {hint}",
        }
    write_features(out, stored, tiles.coords, attrs)
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
