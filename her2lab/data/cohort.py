"""The cohort manifest: one row per slide, validated before anything runs.

Columns: ``slide_id, patient_id, path, her2_score`` (``0``, ``1+``, ``2+``, ``3+``), optional
``ish`` (``pos``/``neg``), ``mpp`` (level-0 µm/px that overrides the slide's metadata),
``split`` and ``stain``. Relative paths are relative to the manifest's folder. A manifest of slides
to score (``allow_unlabelled=True``) may leave ``her2_score`` empty or have no such column: those
slides are unlabelled (``her2_score == ""``) and never enter a metric.

Slide ids become file names (tiles, thumbnails, features, heatmaps), so they are held to a safe
alphabet by :func:`check_slide_id`: nothing derived from a manifest can name a file outside the
folder it is meant for.

The optional ``her2_ultralow`` column (``yes``/``no``, empty allowed) splits score-0 slides into
HER2-ultralow and HER2-null; ``yes`` on a slide scored 1+ or more is an error (see
:func:`_normalise_ultralow`). Unknown values are errors like those of ``ish``.
"""

from __future__ import annotations

import csv
import os
import unicodedata
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
#: ``her2_ultralow``: HER2-ultralow (IHC 0 with faint, incomplete membrane staining in ≤ 10 % of
#: tumour cells) → ``yes``; HER2-null (no staining) → ``no``; empty when not assessed.
_ULTRALOW_ALIASES = {
    "": "",
    "nan": "",
    "none": "",
    "na": "",
    "yes": "yes",
    "y": "yes",
    "true": "yes",
    "1": "yes",
    "ultralow": "yes",
    "ultra-low": "yes",
    "her2-ultralow": "yes",
    "no": "no",
    "n": "no",
    "false": "no",
    "0": "no",
    "null": "no",
    "her2-null": "no",
}


#: Characters allowed in a slide id besides letters and digits (any script).
SLIDE_ID_PUNCTUATION = " ._-+(),=@~"
#: Longest slide id, in UTF-8 bytes: file names add up to about 30 bytes to it, within the
#: 255-byte limit of common file systems.
SLIDE_ID_MAX_BYTES = 200
_SLIDE_ID_RULE = (
    f"slide ids may hold letters, digits, spaces and {' '.join(SLIDE_ID_PUNCTUATION.strip())}, "
    f"must not start with '.' and are at most {SLIDE_ID_MAX_BYTES} bytes"
)


def slide_id_problem(slide_id: str) -> str | None:
    """Why ``slide_id`` cannot be used as a file name, or ``None`` if it can."""
    if not slide_id:
        return "it is empty"
    bad = sorted({c for c in slide_id if not (c.isalnum() or c in SLIDE_ID_PUNCTUATION)})
    if bad:
        return "it holds " + " ".join(_show_char(c) for c in bad[:5])
    if slide_id.startswith("."):  # ".", "..", hidden files, and atomic_path's temp-file names
        return "it starts with '.'"
    if len(slide_id.encode("utf-8", "surrogatepass")) > SLIDE_ID_MAX_BYTES:
        return f"it is longer than {SLIDE_ID_MAX_BYTES} bytes"
    return None


def check_slide_id(slide_id: str) -> str:
    """Return ``slide_id`` if it is safe as a file name (see :data:`SLIDE_ID_PUNCTUATION`).

    Code that builds a path from an id that did not come through :func:`load_manifest` calls this.

    Raises:
        ManifestError: path separators, ``..``, a leading ``.``, control or other characters
            outside the allowed set, empty or overlong ids.
    """
    problem = slide_id_problem(str(slide_id))
    if problem:
        raise ManifestError(f"slide id {str(slide_id)!r}: {problem}; {_SLIDE_ID_RULE}")
    return str(slide_id)


def _show_char(c: str) -> str:
    """A character as a reader can see it: ``'/'``, or ``U+0009 (control)`` for invisible ones."""
    if c.isascii() and c.isprintable() and not c.isspace():
        return repr(c)
    return f"U+{ord(c):04X} ({unicodedata.name(c, 'control').lower()})"


def load_manifest(path: str | os.PathLike, mpp_override: float | None = None,
                  allow_unlabelled: bool = False) -> pd.DataFrame:
    """Read and validate a manifest; returns a frame with absolute ``path`` and normalised labels.

    With ``allow_unlabelled`` (scoring new slides) ``her2_score`` may be empty or absent: such rows
    keep ``her2_score == ""``.

    Raises:
        ManifestError: missing file or columns, a column given twice, empty manifest, empty
            required fields, slide ids unfit as file names (see :func:`check_slide_id`),
            duplicate slide ids (also when they differ only in case), unknown HER2 scores or
            ISH values. Each message names the manifest, the rows and the fix.
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
    _check_header(path)
    if allow_unlabelled and "her2_score" not in df.columns:
        df["her2_score"] = ""
    missing = [c for c in REQUIRED_COLUMNS if c not in df.columns]
    if missing:
        raise ManifestError(
            f"{path}: missing column(s) {', '.join(missing)}; a manifest needs {', '.join(REQUIRED_COLUMNS)}"
        )
    if df.empty:
        raise ManifestError(f"{path}: the manifest has no rows")
    for col in df.columns:
        df[col] = df[col].str.strip()
    needed = [c for c in REQUIRED_COLUMNS if not (allow_unlabelled and c == "her2_score")]
    empty = [(c, df.index[df[c] == ""]) for c in needed]
    empty = [f"empty {c} on line(s) {_lines(rows)}" for c, rows in empty if len(rows)]
    if empty:
        # An empty patient_id would silently make all such slides one patient.
        fix = ("; training needs a score for every slide: to score unlabelled slides, use "
               "eval.py run_dir=<run> slides=<folder> or cohort.manifest=<this csv>"
               if any(e.startswith("empty her2_score") for e in empty) else "")
        raise ManifestError(f"{path}: {'; '.join(empty)}; fill them in or drop the rows{fix}")
    problems = df["slide_id"].map(slide_id_problem)
    bad = df.index[problems.notna()]
    if len(bad):
        first = bad[0]
        raise ManifestError(
            f"{path}: slide_id {df.slide_id[first]!r} on line {first + 2} cannot name files "
            f"({problems[first]})" + (f", nor can those on line(s) {_lines(bad[1:])}" if len(bad) > 1 else "")
            + f"; {_SLIDE_ID_RULE}"
        )
    dup = df["slide_id"][df["slide_id"].duplicated(keep=False)]
    if len(dup):
        raise ManifestError(
            f"{path}: duplicate slide_id {', '.join(sorted(set(dup))[:5])} on line(s) {_lines(dup.index)}; "
            "slide ids must be unique"
        )
    folded = df["slide_id"].str.casefold()
    dup = df["slide_id"][folded.duplicated(keep=False)]
    if len(dup):
        raise ManifestError(
            f"{path}: slide_id {', '.join(sorted(set(dup))[:5])} on line(s) {_lines(dup.index)} differ only "
            "in case; their files would be one file on a case-insensitive disk: make them unique"
        )
    scores = {**_SCORE_ALIASES, "": ""} if allow_unlabelled else _SCORE_ALIASES
    df["her2_score"] = _normalise(df, "her2_score", scores, path, f"use one of {', '.join(HER2_SCORES)}")
    df["ish"] = _normalise(df, "ish", _ISH_ALIASES, path, "use pos, neg or leave empty") if "ish" in df.columns else ""
    df["her2_ultralow"] = _normalise_ultralow(df, path)
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


def _check_header(path: Path) -> None:
    """A column named twice is an error: pandas would silently read only the first."""
    with open(path, encoding="utf-8-sig", newline="") as f:
        header = [c.strip() for c in next(csv.reader(f), [])]
    twice = sorted({c for c in header if header.count(c) > 1})
    if twice:
        raise ManifestError(f"{path}: column(s) {', '.join(twice)} appear more than once in the header; keep one of each")


def _normalise(df: pd.DataFrame, col: str, aliases: dict[str, str], path: Path, fix: str) -> pd.Series:
    """Map a column's values through ``aliases``; unknown values are one error naming the lines."""
    values = df[col].str.lower().map(aliases)
    bad = df.index[values.isna()]
    if len(bad):
        vals = sorted(set(df.loc[bad, col]))
        raise ManifestError(f"{path}: unknown {col} {', '.join(map(repr, vals[:5]))} on line(s) {_lines(bad)}; {fix}")
    return values


def _normalise_ultralow(df: pd.DataFrame, path: Path) -> pd.Series:
    """The optional ``her2_ultralow`` column as ``yes``/``no``/``""`` (all ``""`` when absent).

    HER2-ultralow is a subcategory of IHC 0: ``yes`` on a slide scored 1+, 2+ or 3+ is an error.
    Slides with an empty ``her2_score`` (unlabelled) are not checked.
    """
    if "her2_ultralow" not in df.columns:
        return pd.Series("", index=df.index)
    values = _normalise(df, "her2_ultralow", _ULTRALOW_ALIASES, path, "use yes, no or leave empty")
    bad = df.index[(values == "yes") & ~df["her2_score"].isin(["0", ""])]
    if len(bad):
        raise ManifestError(
            f"{path}: her2_ultralow=yes on slide(s) {', '.join(df.slide_id[bad][:5])} (line(s) {_lines(bad)}) "
            "whose her2_score is not 0; HER2-ultralow is a subcategory of IHC 0: fix the score or clear her2_ultralow"
        )
    return values


def _lines(index: pd.Index) -> str:
    """CSV line numbers (header is line 1) of frame rows, at most five."""
    lines = [str(i + 2) for i in list(index)[:5]]
    return ", ".join(lines) + (" …" if len(index) > 5 else "")
