"""What many test files need: launching a task, composing a config, random encoder weights, and
small inputs written by hand (slides, TRIDENT features, a hostile checkpoint)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import cv2
import h5py
import numpy as np
import pandas as pd
import tifffile
from omegaconf import OmegaConf

from her2lab.slides.tiling import TilingParams

REPO = Path(__file__).resolve().parents[1]
HAND_TILING = TilingParams(target_mpp=2.0, patch_px=64)  # what the hand-written slides are tiled with


# --- tasks in a subprocess --------------------------------------------------------------------


def task_command(entry: str, *args: str) -> list[str]:
    """The command line of a task: ``train.py``/``eval.py`` from the repository, or a module
    (``her2lab.prepare``, ``her2lab.extract``) run with ``python -m``."""
    head = [str(REPO / entry)] if entry.endswith(".py") else ["-m", entry]
    return [sys.executable, *head, *args]


def task_env(cwd: Path, data_dir: Path | None = None, log_dir: Path | None = None, **extra: str) -> dict[str, str]:
    """The environment of a task: W&B silent, offline and writing under ``cwd``; data and log
    folders when given; ``extra`` on top."""
    env = {**os.environ, "WANDB_SILENT": "true", "WANDB_DIR": str(cwd)}
    env.pop("WANDB_API_KEY", None)
    if data_dir is not None:
        env["HER2LAB_DATA_DIR"] = str(data_dir)
    if log_dir is not None:
        env["HER2LAB_LOG_DIR"] = str(log_dir)
    return {**env, **extra}


def run_task(entry: str, *args: str, cwd: Path, data_dir: Path | None = None, log_dir: Path | None = None,
             env: dict[str, str] | None = None, timeout: float = 900) -> subprocess.CompletedProcess:
    """Run a task to its end in a subprocess (see :func:`task_command`, :func:`task_env`); its
    output is captured as text."""
    return subprocess.run(task_command(entry, *args), cwd=cwd, env=task_env(cwd, data_dir, log_dir, **(env or {})),
                          capture_output=True, text=True, timeout=timeout)


# --- configs and weights ----------------------------------------------------------------------


def compose_config(config_name: str, overrides: list[str] | tuple[str, ...] = ()):
    """A config of ``conf/`` composed as the entry points compose it."""
    from hydra import compose, initialize_config_dir

    from her2lab import CONF_DIR

    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        return compose(config_name=config_name, overrides=list(overrides))


def save_random_weights(path: Path, name: str = "resnet18", seed: int = 0) -> Path:
    """Random (seeded) weights of encoder ``name`` saved with ``torch.save``, as a user's file."""
    import torch

    from her2lab.embed.backbones import BackboneSpec, create_model

    torch.manual_seed(seed)
    torch.save(create_model(BackboneSpec(name=name, pretrained=False)).state_dict(), path)
    return path


# --- inputs written by hand -------------------------------------------------------------------


def gradient_rgb(h: int, w: int, seed: int = 0) -> np.ndarray:
    """A smooth, non-periodic RGB test image (JPEG keeps it close to the source)."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    img = np.stack(
        [
            128 + 100 * np.sin(xx / 97 + rng.uniform(0, 6)) * np.cos(yy / 131),
            128 + 90 * np.cos(xx / 53 + yy / 71),
            128 + 80 * np.sin((xx + yy) / 113 + rng.uniform(0, 6)),
        ],
        -1,
    )
    return np.clip(img, 0, 255).astype(np.uint8)


def tissue_image(size: int) -> np.ndarray:
    """Grey glass with one stained ellipse (axes size/3), a little noise so JPEG has texture."""
    rng = np.random.default_rng(0)
    img = np.full((size, size, 3), 235, np.uint8)
    cv2.ellipse(img, (size // 2, size // 2), (size // 3, size // 3), 0, 0, 360, (170, 90, 160), -1)
    return np.clip(img.astype(np.int16) + rng.integers(-6, 7, img.shape), 0, 255).astype(np.uint8)


def write_hand_slide(path: Path, size: int = 2048, res: tuple[float, float] = (20_000, 20_000),
                     unit: str = "CENTIMETER") -> Path:
    """A two-level tiled JPEG TIFF written by hand (top-level pages, ``subfiletype=1`` for the
    reduced level, as OpenSlide reads generic TIFFs); ``res`` pixels per ``unit`` at level 0."""
    img = tissue_image(size)
    with tifffile.TiffWriter(path) as tw:
        tw.write(img, tile=(256, 256), compression="jpeg", photometric="rgb", resolution=res, resolutionunit=unit)
        tw.write(img[::4, ::4].copy(), tile=(256, 256), compression="jpeg", photometric="rgb", subfiletype=1,
                 resolution=(res[0] / 4, res[1] / 4), resolutionunit=unit)
    return path


def hand_manifest(folder: Path, rows: list[tuple[str, str, str]]) -> pd.DataFrame:
    """``folder/manifest.csv`` with one row ``(slide_id, path, mpp)`` a slide, loaded."""
    from her2lab.data.cohort import load_manifest

    text = "slide_id,patient_id,path,her2_score,mpp\n" + "".join(
        f"{sid},P{i},{p},0,{mpp}\n" for i, (sid, p, mpp) in enumerate(rows)
    )
    (folder / "manifest.csv").write_text(text)
    return load_manifest(folder / "manifest.csv")


def hand_settings(cache: Path, **kw):
    """Prepare settings for the hand-written slides (no QC pictures unless asked)."""
    from her2lab.slides.prepare import PrepareSettings
    from her2lab.slides.tissue import TissueParams

    return PrepareSettings(cache_dir=cache, tiling=kw.pop("tiling", HAND_TILING), tissue=kw.pop("tissue", TissueParams()),
                           qc=kw.pop("qc", False), **kw)


def write_trident(path: Path, feats: np.ndarray) -> Path:
    """A features file in TRIDENT's layout, written by hand (no her2lab attributes)."""
    import h5py

    with h5py.File(path, "w") as f:
        f.create_dataset("features", data=feats)
        f.create_dataset("coords", data=np.stack([np.arange(len(feats)) * 256, np.zeros(len(feats), np.int64)], 1))
    return path


def mil_nets():
    """One of each MIL net (24-d features, dropout off), seeded."""
    import torch

    from her2lab.models.abmil import AttentionMIL
    from her2lab.models.pooling import MaxPoolMIL, MeanPoolMIL

    torch.manual_seed(0)
    return [AttentionMIL(24, 4, dropout=0.0), AttentionMIL(24, 3, gated=False, hidden_dim=0, dropout=0.0),
            AttentionMIL(24, 4, dropout=0.0, ordinal=True), MeanPoolMIL(24, 4, dropout=0.0), MaxPoolMIL(24, 4, dropout=0.0)]


class _Touch:
    """Unpickling this calls ``Path.touch(marker)``: the code a hostile checkpoint could run."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (self.marker,))


def hostile_checkpoint(path: Path, marker: Path) -> Path:
    """A checkpoint whose unrestricted load creates ``marker``."""
    import torch

    torch.save({"state_dict": {}, "epoch": 0, "global_step": 0, "payload": _Touch(marker)}, path)
    return path


# --- thumbnails of a synthetic cohort ---------------------------------------------------------


def prepare_thumbnails(root: Path, cohort_root: Path, thumb_mpp: float = 8.0):
    """Tiles (64 px at 2 µm/px) and thumbnails of a generated cohort under ``root``; the
    settings and the manifest."""
    from her2lab.slides.prepare import PrepareSettings, prepare_cohort
    from her2lab.slides.tissue import TissueParams

    manifest = pd.read_csv(cohort_root / "manifest.csv", dtype=str, keep_default_na=False)
    manifest["path"] = [str(cohort_root / p) for p in manifest.path]
    manifest["mpp"] = np.nan
    settings = PrepareSettings(cache_dir=root, tiling=TilingParams(target_mpp=2.0, patch_px=64), tissue=TissueParams(),
                               thumb_mpp=thumb_mpp, qc=False)
    report = prepare_cohort(manifest, settings, num_workers=1)
    assert (report.status != "failed").all(), report.error.tolist()
    return settings, manifest


def thumb_records(settings, manifest: pd.DataFrame):
    """One :class:`ThumbRecord` a slide, labelled by its HER2 score (0…3)."""
    from her2lab.data.thumbnails import ThumbRecord

    score = {"0": 0, "1+": 1, "2+": 2, "3+": 3}
    return [ThumbRecord(r.slide_id, str(settings.thumb_path(r.slide_id)), str(settings.tiles_path(r.slide_id)), score[r.her2_score])
            for r in manifest.itertuples()]


def read_features_file(path: Path) -> tuple[np.ndarray, np.ndarray, dict]:
    """``features``, ``coords`` and the attributes of a features h5."""
    with h5py.File(path) as f:
        return f["features"][:], f["coords"][:], dict(f.attrs)


def train_run(cfg) -> dict:
    """Train in-process from a composed config; the run's ``metrics.json``."""
    from her2lab.run.train import train

    train(cfg)
    return json.loads((Path(cfg.paths.output_dir) / "metrics.json").read_text())


def eval_config(run: Path, out: Path, **kw):
    """An ``eval.py`` config testing ``run``'s test split into ``out`` (20 bootstrap resamples)."""
    return OmegaConf.create({"run_dir": str(run), "ckpt_path": None, "split": "test", "n_boot": 20, "seed": 0,
                             "output_dir": str(out), **kw})
