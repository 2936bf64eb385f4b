"""The run folder: what training and evaluation write, and how to find a run from its files.

A training run's folder holds ``config.yaml`` (the resolved config), ``splits.csv``,
``features.json`` (bags: what made the features), ``checkpoints/``, ``metrics.json`` (with
``best_checkpoint``, ``selected_epoch`` and that epoch's ``val/*``), ``predictions.csv`` (one
row per tested slide: ``slide_id, label, label_index, p_<class>…, pred, fold``),
``confusion_matrix.png`` and, for a failed run,
``failed.txt`` (its one-line error, read by the sweep summary). An evaluation writes the same
prediction and metrics files under ``<run>/eval/<split>-<time>/``.
"""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

import pandas as pd
from omegaconf import DictConfig, OmegaConf

from her2lab.errors import Her2labError
from her2lab.io import atomic_path


def write_json(path: Path, data: dict) -> None:
    """``data`` as indented JSON with sorted keys, written atomically."""
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(data, indent=2, sort_keys=True))


def write_config(run_dir: Path, cfg: DictConfig) -> None:
    """The resolved config as ``config.yaml``."""
    with atomic_path(run_dir / "config.yaml") as tmp:
        tmp.write_text(OmegaConf.to_yaml(cfg, resolve=True))


def write_failure(run_dir: Path, message: str) -> None:
    """``failed.txt``: the run's error on one line."""
    (run_dir / "failed.txt").write_text(message.replace("\n", " ") + "\n")


def write_predictions(outputs: list[dict], records: list, classes: list[str], fold: int, path: Path) -> pd.DataFrame:
    """One row per tested slide from a module's ``test_outputs`` (``index``, ``label``, ``probs``)
    and the tested dataset's ``records``: slide_id, label (empty for an unlabelled slide, whose
    ``label_index`` is -1), per-class probabilities, pred, fold."""
    rows = []
    for o in sorted(outputs, key=lambda o: o["index"]):
        probs = list(o["probs"])
        rows.append({"slide_id": records[o["index"]].slide_id, "label": classes[o["label"]] if o["label"] >= 0 else "",
                     "label_index": o["label"],
                     **{f"p_{c}": p for c, p in zip(classes, probs, strict=True)},
                     "pred": classes[max(range(len(classes)), key=probs.__getitem__)], "fold": int(fold)})
    table = pd.DataFrame(rows)
    with atomic_path(path) as tmp:
        table.to_csv(tmp, index=False)
    return table


def best_checkpoint(run_dir: Path) -> str:
    """The checkpoint a finished run selected (``metrics.json``'s ``best_checkpoint``)."""
    metrics = run_dir / "metrics.json"
    ckpt = json.loads(metrics.read_text()).get("best_checkpoint") if metrics.exists() else None
    if not ckpt:
        raise Her2labError(f"{run_dir}: no best checkpoint recorded (unfinished run?); give ckpt_path=…")
    return str(ckpt)


def find_run_dir(run_dir: str | None, ckpt_path: str | None) -> Path | None:
    """``run_dir``, or the run folder a checkpoint lies in (the nearest folder above it with a
    ``config.yaml``)."""
    if run_dir:
        return Path(run_dir)
    if ckpt_path:
        return next((d for d in Path(ckpt_path).absolute().parents if (d / "config.yaml").is_file()), None)
    return None


def require_run_dir(run_dir: str | None, ckpt_path: str | None) -> Path:
    """:func:`find_run_dir`, or a one-line error saying what to give."""
    found = find_run_dir(run_dir, ckpt_path)
    if found is None:
        raise Her2labError(f"ckpt_path={ckpt_path}: not inside a training run folder (no config.yaml above it); "
                           "give run_dir=…" if ckpt_path else
                           "give run_dir=<a training run folder> or ckpt_path=<one of its checkpoints>")
    if not (found / "config.yaml").is_file():
        raise Her2labError(f"run_dir={found}: not a training run folder (no config.yaml)")
    return found


def eval_dir(run_dir: str | None, ckpt_path: str | None, split: str | None, cohort: str | None,
             slides: str | None = None) -> str:
    """Where an evaluation goes: ``<run>/eval/<split>``, ``<run>/eval/external-<cohort>`` or
    ``<run>/eval/slides-<folder>`` (the timestamp is added after it; ``<run>`` may be a sweep
    folder). Without a run folder the evaluation stops with a message; its Hydra folder then goes
    to the temporary directory rather than litter the working folder."""
    found = find_run_dir(run_dir, ckpt_path)
    if slides:
        path = Path(str(slides)).expanduser().absolute()
        base = (path if path.is_dir() else path.parent).name or "slides"
        name = "slides-" + "".join(c if c.isalnum() or c in "-_." else "_" for c in base)[:60]
    else:
        name = f"external-{cohort}" if cohort else str(split or "test")
    return str((found if found is not None else Path(tempfile.gettempdir()) / "her2lab-no-run") / "eval" / name)
