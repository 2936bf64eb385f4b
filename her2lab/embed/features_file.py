"""The features file: one slide's tile embeddings and what made them (the one module that reads
and writes it).

``features/{tiling}/{backbone}/{slide}.h5`` (:func:`features_dir`) holds ``features`` (N, D),
``coords`` (N, 2) level-0 pixels and attributes naming the encoder, its weights (SHA-256), input
size, normalisation, the storage dtype and the tiles file it came from. TRIDENT's and CLAM's
files have the same two datasets (CLAM's features may be (1, N, D)) and are read alike.

Two lists of attributes say what a file is:

- :data:`ENCODER_KEYS`: the encoder, its weights and the tile geometry. Features of two cohorts
  fit one model only if these agree (evaluation on a new cohort checks them).
- :data:`IDENTITY_KEYS`: those plus the storage dtype and the tiles file's hash. A file whose
  identity differs from what extraction would write now is stale; so is one whose ``transform``
  (the encoder's normalisation mean/std) differs, compared beside the hash.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import h5py
import numpy as np

from her2lab import __version__
from her2lab.embed.backbones import Encoder
from her2lab.errors import Her2labError, StaleCacheError
from her2lab.io import param_hash, write_error, write_h5
from her2lab.slides.tiles_file import SlideTiles
from her2lab.slides.tiling import TilingParams

log = logging.getLogger(__name__)

#: What made the features: two cohorts' files fit one model only if these agree.
ENCODER_KEYS = ("encoder", "encoder_source", "encoder_weights_sha256", "input_px", "target_mpp", "patch_px", "pooling")
#: Compared to decide whether an existing features file is stale.
IDENTITY_KEYS = (*ENCODER_KEYS, "features_dtype", "tiles_param_hash")
#: Identity keys added after files were made without them, with the value such a file has: a key
#: at its default is left out of the hash, so those files stay current.
KEY_DEFAULTS = {"pooling": "model"}


def identity_hash(attrs: dict) -> str:
    """The hash of a features file's identity (:data:`IDENTITY_KEYS`)."""
    return param_hash({k: attrs[k] for k in IDENTITY_KEYS if not (k in KEY_DEFAULTS and attrs.get(k) == KEY_DEFAULTS[k])})


def features_dir(cache_dir: str | Path, tiling: TilingParams, backbone_label: str, augment_views: int = 0) -> Path:
    """``{cache}/features/{tiling}/{backbone}/`` (``{backbone}+aug{K}/`` with K augmented views a
    tile): the folder names its parameters."""
    return Path(cache_dir) / "features" / tiling.name / (backbone_label + (f"+aug{augment_views}" if augment_views else ""))


def features_attrs(encoder: Encoder, tiles: SlideTiles, dtype: str, augment_views: int = 0) -> dict:
    """The attributes of a features file made by ``encoder`` from ``tiles`` (with
    ``augment_views`` augmented views a tile), with their hash."""
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
        "pooling": spec.pooling,
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
    attrs["param_hash"] = identity_hash(attrs)
    # compared beside the hash (see check_features_file), so files without views keep their hash
    attrs["augment_views"] = int(augment_views)
    if augment_views:
        from her2lab.embed.augment import StudyAugment

        attrs["augment"] = StudyAugment().describe()
    return attrs


#: Attributes compared beside the identity hash (added after files were made without them):
#: attribute → the value a file without it has (None: the wanted value, i.e. not compared).
SIDE_KEYS = {"transform": None, "augment_views": 0, "augment": ""}


def check_features_file(path: Path, want: dict, overwrite: bool = False) -> bool:
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
    # the normalisation (transform) and the augmented views are compared beside the hash: a changed
    # backbone.mean/std with the same weights is stale too, and older files keep their hash
    side = [k for k, missing in SIDE_KEYS.items()
            if k in want and have.get(k, want[k] if missing is None else missing) != want[k]]
    if have.get("param_hash") == want["param_hash"] and not side:
        return True
    if overwrite:
        return False
    if "encoder" not in have or "param_hash" not in have:  # e.g. CLAM/TRIDENT features, same layout
        raise StaleCacheError(
            f"{path}: a features file not made by her2lab (no encoder attributes); move it out of "
            "this folder, or set extract.overwrite=true to replace it"
        )
    diffs = [f"{k}={have.get(k, KEY_DEFAULTS.get(k))!r} (now {want[k]!r})" for k in IDENTITY_KEYS
             if have.get(k, KEY_DEFAULTS.get(k)) != want[k]]
    diffs += [f"{k}={_plain(have.get(k, SIDE_KEYS[k]))!r} (now {want[k]!r})" for k in side]
    raise StaleCacheError(f"{path}: made with {', '.join(diffs)}; set extract.overwrite=true or use another backbone name")


def _plain(value):
    """An h5 attribute as a Python value (``np.int64(2)`` → ``2``), for messages."""
    return value.item() if isinstance(value, np.generic) else value


def write_features(path: Path, feats: np.ndarray, coords: np.ndarray, attrs: dict,
                   views: np.ndarray | None = None) -> None:
    """Write one slide's features (N, D), coords (N, 2) and augmented ``views`` (K, N, D) if any,
    atomically; a full disk is one line."""
    data = {"features": feats, "coords": coords.astype(np.int64)}
    if views is not None:
        data["views"] = views
    try:
        write_h5(path, data, attrs)
    except OSError as exc:
        raise write_error(path, exc, "free space or move paths.data_dir; finished slides are intact") from None


NONFINITE = ("error", "drop_tiles")


def nonfinite_rows(feats: np.ndarray) -> np.ndarray:
    """(N,) bool, True where a row of ``feats`` (N, D) holds a NaN or an Inf.

    One pass with a float64 row sum (NaN and Inf propagate; finite float16/32 values cannot
    overflow it), so no (N, D) temporary is made.
    """
    return ~np.isfinite(feats.sum(axis=1, dtype=np.float64))


def load_bag(
    path: str | Path, expect_dim: int | None = None, nonfinite: str = "error"
) -> tuple[np.ndarray, np.ndarray, int]:
    """``features`` (N, D), ``coords`` (N, 2) and the number of tiles left out, of one slide.

    Features keep the file's dtype when it is float16 or float32 (anything else becomes float32).

    Args:
        path: a features h5 (her2lab's, TRIDENT's or CLAM's layout).
        expect_dim: the feature size the model expects, or None.
        nonfinite: ``error``: a row with NaN/Inf is a one-line error; ``drop_tiles``: such rows
            (and their coords) are left out, with a warning.

    Raises:
        Her2labError: missing or unreadable file, empty bag, wrong feature size, non-finite rows
            (``error``) or no finite row at all (``drop_tiles``).
    """
    feats, coords, n_bad, _ = _load(path, expect_dim, nonfinite, views=False)
    return feats, coords, n_bad


def load_bag_views(
    path: str | Path, expect_dim: int | None = None, nonfinite: str = "error"
) -> tuple[np.ndarray, np.ndarray | None, int]:
    """``features`` (N, D), the augmented ``views`` (K, N, D) or None when the file has none
    (``extract.augment_views=0``, files made elsewhere), and the number of tiles left out; a tile
    whose features or any view hold NaN/Inf is treated as :func:`load_bag` treats a bad row."""
    feats, _, n_bad, views = _load(path, expect_dim, nonfinite, views=True)
    return feats, views, n_bad


def _load(path: str | Path, expect_dim: int | None, nonfinite: str, views: bool):
    if nonfinite not in NONFINITE:
        raise Her2labError(f"data.nonfinite={nonfinite!r}: use {' or '.join(NONFINITE)}")
    extra = None
    try:
        with h5py.File(path, "r") as f:
            feats = f["features"][:]
            coords = f["coords"][:] if "coords" in f else np.zeros((len(feats), 2), np.int64)
            if views and "views" in f:
                extra = f["views"][:]
    except FileNotFoundError:
        raise Her2labError(f"{path}: features file missing; run python -m her2lab.extract") from None
    except (OSError, KeyError) as exc:
        raise Her2labError(f"{path}: not a features file ({type(exc).__name__}); re-run extraction") from None
    if feats.ndim == 3 and feats.shape[0] == 1:  # CLAM-style (1, N, D)
        feats = feats[0]
    if feats.ndim != 2 or len(feats) == 0:
        raise Her2labError(f"{path}: empty bag or features of shape {feats.shape}; expected (N, D) with N ≥ 1")
    if expect_dim is not None and feats.shape[1] != expect_dim:
        raise Her2labError(
            f"{path}: {feats.shape[1]}-d features but the model expects {expect_dim}; "
            "match backbone.embed_dim to the features (or re-extract)"
        )
    if feats.dtype not in (np.float16, np.float32):  # float64 would double the cache; ints are not features
        feats = feats.astype(np.float32)
    bad = nonfinite_rows(feats)
    if extra is not None:
        if extra.ndim != 3 or extra.shape[1:] != feats.shape:
            raise Her2labError(f"{path}: views of shape {extra.shape} for features {feats.shape}; re-extract the slide")
        extra = extra.astype(feats.dtype, copy=False)
        for v in extra:
            bad |= nonfinite_rows(v)
    n_bad = int(bad.sum())
    if n_bad and nonfinite == "error":
        raise Her2labError(
            f"{path}: {n_bad} of {len(feats)} tiles have non-finite features (NaN/Inf, first at row "
            f"{int(np.argmax(bad))}); re-extract the slide, or set data.nonfinite=drop_tiles to leave those tiles out"
        )
    if n_bad == len(feats):
        raise Her2labError(f"{path}: no finite tile (all {n_bad} rows hold NaN/Inf); re-extract the slide")
    if n_bad:
        log.warning("%s: %d of %d tiles have non-finite features (NaN/Inf); left out (data.nonfinite=drop_tiles)",
                    path, n_bad, len(feats))
        feats, coords = feats[~bad], coords[~bad] if len(coords) == len(bad) else coords
        extra = extra[:, ~bad] if extra is not None else None
    return feats, coords, n_bad, extra


def read_features(
    path: str | Path, expect_dim: int | None = None, nonfinite: str = "error"
) -> tuple[np.ndarray, np.ndarray]:
    """``features`` (N, D) in the file's float dtype and ``coords`` (N, 2) of one slide; one-line
    errors for bad files (see :func:`load_bag`)."""
    feats, coords, _ = load_bag(path, expect_dim, nonfinite)
    return feats, coords


def features_identity(path: str | Path) -> dict:
    """What made a features file: the encoder and its weights, its normalisation, the tile
    geometry (her2lab files), and the feature size (any file). Two cohorts fit one model only
    if these agree."""
    try:
        with h5py.File(path, "r") as f:
            ident = {k: f.attrs[k] for k in (*ENCODER_KEYS, "transform") if k in f.attrs}
            ident["dim"] = int(f["features"].shape[-1])
    except (OSError, KeyError) as exc:
        raise Her2labError(f"{path}: not a features file ({type(exc).__name__}); re-run extraction") from None
    return {k: v.item() if isinstance(v, np.generic) else str(v) if isinstance(v, bytes | np.ndarray) else v
            for k, v in ident.items()}
