"""The cohort manifest: one row per slide, validated before anything runs.

Columns: ``slide_id, patient_id, path, her2_score`` (``0``, ``1+``, ``2+``, ``3+``), optional
``ish`` (``pos``/``neg``), ``mpp`` (level-0 µm/px that overrides the slide's metadata),
``split`` and ``stain``. Relative paths are relative to the manifest's folder.
"""

from __future__ import annotations

import os
from pathlib import Path

import pandas as pd

from her2lab.errors import ManifestError

REQUIRED_COLUMNS = ("slide_id", "patient_id", "path", "her2_score")
HER2_SCORES = ("0", "1+", "2+", "3+")
_SCORE_ALIASES = {
    "0": "0",
    "0+": "0",
    "1": "1+",
    "1+": "1+",
    "+1": "1+",
    "2": "2+",
    "2+": "2+",
    "+2": "2+",
    "3": "3+",
    "3+": "3+",
    "+3": "3+",
}
_ISH_ALIASES = {
    "": "",
    "nan": "",
    "none": "",
    "na": "",
    "pos": "pos",
    "positive": "pos",
    "amplified": "pos",
    "+": "pos",
    "1": "pos",
    "neg": "neg",
    "negative": "neg",
    "not amplified": "neg",
    "-": "neg",
    "0": "neg",
}


def load_manifest(path: str | os.PathLike, mpp_override: float | None = None) -> pd.DataFrame:
    """Read and validate a manifest; returns a frame with absolute ``path`` and normalised labels.

    Raises:
        ManifestError: missing file or columns, empty manifest, duplicate slide ids, unknown
            HER2 scores or ISH values. Each message names the manifest, the rows and the fix.
    """
    path = Path(path)
    if not path.is_file():
        raise ManifestError(
            f"{path}: manifest not found; set cohort.manifest=<csv with {', '.join(REQUIRED_COLUMNS)}>"
        )
    try:
        df = pd.read_csv(path, dtype=str, keep_default_na=False)
    except (pd.errors.ParserError, UnicodeDecodeError, pd.errors.EmptyDataError) as exc:
        raise ManifestError(
            f"{path}: not a readable CSV ({str(exc).splitlines()[0]}); save it as UTF-8 CSV"
        ) from None
    df.columns = [c.strip() for c in df.columns]
    missing = [c for c in REQUIRED_COLUMNS if c not in df.columns]
    if missing:
        raise ManifestError(
            f"{path}: missing column(s) {', '.join(missing)}; a manifest needs {', '.join(REQUIRED_COLUMNS)}"
        )
    if df.empty:
        raise ManifestError(f"{path}: the manifest has no rows")
    for col in df.columns:
        df[col] = df[col].str.strip()
    empty = df.index[(df["slide_id"] == "") | (df["path"] == "")]
    if len(empty):
        raise ManifestError(
            f"{path}: empty slide_id or path on line(s) {_lines(empty)}; fill them in or drop the rows"
        )
    dup = df["slide_id"][df["slide_id"].duplicated(keep=False)]
    if len(dup):
        raise ManifestError(
            f"{path}: duplicate slide_id {', '.join(sorted(set(dup))[:5])} on line(s) {_lines(dup.index)}; "
            "slide ids must be unique"
        )
    df["her2_score"] = _normalise(df, "her2_score", _SCORE_ALIASES, path, f"use one of {', '.join(HER2_SCORES)}")
    df["ish"] = _normalise(df, "ish", _ISH_ALIASES, path, "use pos, neg or leave empty") if "ish" in df.columns else ""
    if "mpp" in df.columns:
        mpp = pd.to_numeric(df["mpp"].replace("", None), errors="coerce")
        bad = df.index[(df["mpp"] != "") & ~(mpp > 0)]
        if len(bad):
            raise ManifestError(
                f"{path}: mpp must be a positive number (µm/px) on line(s) {_lines(bad)}"
            )
        df["mpp"] = mpp
    else:
        df["mpp"] = float("nan")
    if mpp_override is not None:
        df["mpp"] = df["mpp"].fillna(float(mpp_override))
    base = path.parent
    df["path"] = [str(p if Path(p).is_absolute() else (base / p)) for p in df["path"]]
    return df.reset_index(drop=True)


def _normalise(df: pd.DataFrame, col: str, aliases: dict[str, str], path: Path, fix: str) -> pd.Series:
    """Map a column's values through ``aliases``; unknown values are one error naming the lines."""
    values = df[col].str.lower().map(aliases)
    bad = df.index[values.isna()]
    if len(bad):
        vals = sorted(set(df.loc[bad, col]))
        raise ManifestError(f"{path}: unknown {col} {', '.join(map(repr, vals[:5]))} on line(s) {_lines(bad)}; {fix}")
    return values


def _lines(index: pd.Index) -> str:
    """CSV line numbers (header is line 1) of frame rows, at most five."""
    lines = [str(i + 2) for i in list(index)[:5]]
    return ", ".join(lines) + (" …" if len(index) > 5 else "")
