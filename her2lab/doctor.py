"""``her2lab doctor [--slide FILE] [--data-dir DIR] [--log-dir DIR]``: what this machine can do.

One line per check, ``ok`` / ``warn`` / ``FAIL``, and exit status 1 when a check fails:
Python and package versions (torch, CUDA, torchvision, timm, Lightning, Hydra, OpenSlide and its
library, W&B, the optional extras), the GPUs torch sees (and whether bf16 works on them), whether a
slide opens through OpenSlide and its µm/px (a slide the tool writes itself when none is given),
whether the data, log and weights folders are writable, and whether W&B would log online or offline.
Nothing is downloaded.

    her2lab doctor
    her2lab doctor --slide /path/to/slide.svs
"""

from __future__ import annotations

import argparse
import importlib.metadata as md
import os
import platform
import sys
import tempfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

OK, WARN, FAIL = "ok", "warn", "FAIL"


@dataclass
class Check:
    status: str
    name: str
    detail: str


def _version(dist: str) -> str | None:
    try:
        return md.version(dist)
    except md.PackageNotFoundError:
        return None


def check_packages() -> list[Check]:
    out = [Check(OK, "python", f"{platform.python_version()} ({sys.executable})")]
    for dist in ("her2lab", "torch", "torchvision", "timm", "pytorch-lightning", "torchmetrics", "hydra-core",
                 "openslide-python", "openslide-bin", "tifffile", "h5py", "wandb", "numpy"):
        v = _version(dist)
        out.append(Check(OK if v else FAIL, dist, v or "not installed: pip install her2lab"))
    extras = {
        "foundation": ("transformers", "open-clip-torch"),
        "optuna": ("hydra-optuna-sweeper", "optuna"),
        "slurm": ("hydra-submitit-launcher",),
        "tensorboard": ("tensorboard",),
    }
    for extra, dists in extras.items():
        have = {d: _version(d) for d in dists}
        if all(have.values()):
            out.append(Check(OK, f"extra [{extra}]", ", ".join(f"{d} {v}" for d, v in have.items())))
        else:
            missing = ", ".join(d for d, v in have.items() if not v)
            out.append(Check(WARN, f"extra [{extra}]", f"not installed ({missing}): pip install 'her2lab[{extra}]'"))
    return out


def check_torch() -> list[Check]:
    import torch

    out = [Check(OK, "torch build", f"{torch.__version__}, CUDA {torch.version.cuda or 'none (CPU build)'}, "
                                    f"{torch.get_num_threads()} CPU threads")]
    if not torch.cuda.is_available():
        why = "this torch has no CUDA" if torch.version.cuda is None else "no GPU visible (or no driver)"
        out.append(Check(WARN, "gpu", f"none: {why}; training and extraction run on the CPU"))
        return out
    for i in range(torch.cuda.device_count()):
        p = torch.cuda.get_device_properties(i)
        out.append(Check(OK, f"gpu {i}", f"{p.name}, {p.total_memory / 2**30:.0f} GiB, capability {p.major}.{p.minor}"))
    out.append(Check(OK if torch.cuda.is_bf16_supported() else WARN, "bf16",
                     "supported (trainer=gpu uses bf16-mixed)" if torch.cuda.is_bf16_supported()
                     else "not supported on this GPU: use trainer.precision=16-mixed"))
    return out


def check_openslide(slide: Path | None) -> list[Check]:
    try:
        import openslide
    except Exception as exc:  # the library itself cannot load
        return [Check(FAIL, "openslide", f"cannot load: {exc}")]
    out = [Check(OK, "openslide library", openslide.__library_version__)]
    made = None
    if slide is None:
        made = Path(tempfile.mkdtemp(prefix="her2lab-doctor-"))
        slide = _write_probe_slide(made / "probe.tiff")
    try:
        from her2lab.slides.reader import Slide

        with Slide(slide) as s:
            w, h = s.dimensions
            out.append(Check(OK, "slide", f"{slide.name}: {w}×{h} px, {s.level_count} levels, "
                                          f"{s.level0_mpp:.3f} µm/px" + (" (a probe written here)" if made else "")))
    except Exception as exc:
        out.append(Check(FAIL, "slide", f"{slide}: {str(exc).splitlines()[0] if str(exc) else type(exc).__name__}"))
    finally:
        if made is not None:
            for p in made.iterdir():
                p.unlink()
            made.rmdir()
    return out


def _write_probe_slide(path: Path) -> Path:
    """A small two-level tiled TIFF at 0.5 µm/px, as a scanner's generic TIFF export is laid out."""
    import numpy as np
    import tifffile

    rng = np.random.default_rng(0)
    img = np.full((1024, 1024, 3), 235, np.uint8)
    img[256:768, 256:768] = rng.integers(120, 200, (512, 512, 3), dtype=np.uint8)
    with tifffile.TiffWriter(path) as tw:
        tw.write(img, tile=(256, 256), photometric="rgb", resolution=(20_000, 20_000), resolutionunit="CENTIMETER")
        tw.write(img[::4, ::4].copy(), tile=(256, 256), photometric="rgb", subfiletype=1,
                 resolution=(5_000, 5_000), resolutionunit="CENTIMETER")
    return path


def _writable(name: str, folder: Path) -> Check:
    probe = folder
    while not probe.exists() and probe != probe.parent:
        probe = probe.parent  # the folder will be created under its first existing parent
    if os.access(probe, os.W_OK):
        how = "exists" if folder.exists() else f"will be created under {probe}"
        return Check(OK, name, f"{folder.resolve()} (writable, {how})")
    return Check(FAIL, name, f"{folder.resolve()}: not writable (set HER2LAB_{name.split()[0].upper()}_DIR)")


def check_folders(data_dir: Path | None, log_dir: Path | None) -> list[Check]:
    data = data_dir or Path(os.environ.get("HER2LAB_DATA_DIR", "data"))
    logs = log_dir or Path(os.environ.get("HER2LAB_LOG_DIR", "logs"))
    weights = Path(os.environ.get("HER2LAB_WEIGHTS_DIR", data / "weights"))
    return [_writable("data folder", data), _writable("log folder", logs), _writable("weights folder", weights)]


def check_wandb() -> list[Check]:
    v = _version("wandb")
    if v is None:
        return [Check(FAIL, "wandb", "not installed")]
    mode = os.environ.get("WANDB_MODE", "")
    key = bool(os.environ.get("WANDB_API_KEY")) or (Path.home() / ".netrc").is_file()
    if mode in ("offline", "dryrun", "disabled"):
        return [Check(OK, "wandb", f"WANDB_MODE={mode}: runs are written locally (`wandb sync` uploads later)")]
    detail = ("offline by default (logger.wandb.offline=true); "
              + ("an API key is set: logger.wandb.offline=false logs online" if key
                 else "no API key (WANDB_API_KEY or `wandb login`): online logging would fail, offline works"))
    return [Check(OK, "wandb", detail)]


def run_checks(slide: Path | None = None, data_dir: Path | None = None, log_dir: Path | None = None,
               echo: Callable[[Check], None] | None = None) -> list[Check]:
    """Every check, in order; ``echo`` sees each as soon as it is made."""
    checks: list[Check] = []
    for step in (check_packages, check_torch, lambda: check_openslide(slide),
                 lambda: check_folders(data_dir, log_dir), check_wandb):
        try:
            found = step()
        except Exception as exc:  # a check that breaks is itself a finding
            found = [Check(FAIL, getattr(step, "__name__", "check"), f"{type(exc).__name__}: {exc}")]
        for c in found:
            checks.append(c)
            if echo:
                echo(c)
    return checks


def main(argv: Sequence[str] | None = None) -> None:
    ap = argparse.ArgumentParser(prog="her2lab doctor", description="What this machine has: versions, GPU, "
                                 "OpenSlide and a slide, folders, W&B")
    ap.add_argument("--slide", type=Path, help="a slide to open (default: a small probe slide written here)")
    ap.add_argument("--data-dir", type=Path, help="default: $HER2LAB_DATA_DIR or ./data")
    ap.add_argument("--log-dir", type=Path, help="default: $HER2LAB_LOG_DIR or ./logs")
    a = ap.parse_args(argv)
    width = 20

    def echo(c: Check) -> None:
        print(f"{c.status:<4}  {c.name:<{width}} {c.detail}", flush=True)

    checks = run_checks(a.slide, a.data_dir, a.log_dir, echo)
    failed = [c for c in checks if c.status == FAIL]
    print(f"{len(checks)} checks: {len(failed)} failed, {sum(c.status == WARN for c in checks)} warnings")
    if failed:
        raise SystemExit(1)


if __name__ == "__main__":
    main()
