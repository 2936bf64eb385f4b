"""Label schemes: manifest HER2 score (+ ISH) → class index, one registered function per scheme.

- ``her2_4way``: 0 / 1+ / 2+ / 3+ (the H&E-HER2 study).
- ``her2_3way``: HER2-0 / HER2-low (1+, or 2+ with negative ISH) / HER2-high (3+, or 2+ with
  positive ISH) — the IHC study's 0 / Low / High.
- ``binary``: {0, 1+} → negative, {2+, 3+} → positive (the study code's binary variant).
- ``her2_ultralow``: 0-null / ultralow / 1+ / 2+ / 3+ (DESTINY-Breast06): score-0 slides split by
  the manifest's ``her2_ultralow`` column (``yes``: faint, incomplete membrane staining in ≤ 10 %
  of tumour cells; ``no``: none). Slides with an empty ``her2_score`` (unlabelled) are -1.

A new scheme is one function: ``@register_label_scheme("name", classes=(...))`` over
``encode(manifest) -> pd.Series`` of class indices; ``labels.name=name`` then selects it.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import pandas as pd

from her2lab.errors import ManifestError
from her2lab.registry import Registry

#: name → (default class names, encode(manifest) → class index per row)
_SCHEMES: Registry[tuple[tuple[str, ...], Callable[[pd.DataFrame], pd.Series]]] = Registry(
    "label scheme", key="labels.name", error=ManifestError
)


def register_label_scheme(name: str, classes: tuple[str, ...] | list[str]):
    """Decorator: register ``fn(manifest) -> pd.Series`` (class index per row) as scheme ``name``.

    Registering a name again replaces the scheme registered before.

    Args:
        name: the ``labels.name`` that selects the scheme.
        classes: the default class names, in index order.
    """

    def deco(fn: Callable[[pd.DataFrame], pd.Series]) -> Callable[[pd.DataFrame], pd.Series]:
        _SCHEMES.register(name, (tuple(str(c) for c in classes), fn), replace=True)
        return fn

    return deco


def unregister_label_scheme(name: str) -> None:
    """Remove a registered scheme (no error if it is not there)."""
    _SCHEMES.unregister(name)


def list_label_schemes() -> list[str]:
    """Names of the registered label schemes, sorted."""
    return _SCHEMES.names()


#: Class index of a slide without a HER2 score (scored, never measured).
UNLABELLED = -1


@dataclass(frozen=True)
class LabelScheme:
    name: str
    classes: tuple[str, ...]

    def encode(self, manifest: pd.DataFrame) -> pd.Series:
        """Class index per row, ``-1`` for an unlabelled slide (empty ``her2_score``); raises
        naming the slides a scheme cannot label."""
        known = manifest["her2_score"].astype(str) != ""
        out = pd.Series(UNLABELLED, index=manifest.index, dtype=int)
        if known.any():
            out[known] = _SCHEMES.get(self.name)[1](manifest[known]).astype(int)
        return out


def label_scheme(name: str, classes: list[str] | tuple[str, ...] | None = None) -> LabelScheme:
    """The registered scheme ``name``, with ``classes`` (default: the scheme's own names)."""
    default_classes = _SCHEMES.get(name)[0]
    return LabelScheme(name, tuple(classes) if classes else default_classes)


create_label_scheme = label_scheme


@register_label_scheme("her2_4way", classes=("0", "1+", "2+", "3+"))
def _her2_4way(manifest: pd.DataFrame) -> pd.Series:
    return manifest["her2_score"].map({"0": 0, "1+": 1, "2+": 2, "3+": 3})


@register_label_scheme("binary", classes=("negative", "positive"))
def _binary(manifest: pd.DataFrame) -> pd.Series:
    return manifest["her2_score"].map({"0": 0, "1+": 0, "2+": 1, "3+": 1})


@register_label_scheme("her2_3way", classes=("0", "low", "high"))
def _her2_3way(manifest: pd.DataFrame) -> pd.Series:
    score, ish = manifest["her2_score"], manifest.get("ish", pd.Series("", index=manifest.index))
    idx = score.map({"0": 0, "1+": 1, "3+": 2})
    two = score == "2+"
    idx[two & (ish == "neg")] = 1
    idx[two & (ish == "pos")] = 2
    missing = manifest.slide_id[two & ~ish.isin(["pos", "neg"])]
    if len(missing):
        raise ManifestError(
            f"labels=her2_3way: 2+ slide(s) {', '.join(missing[:5])} have no ISH result; "
            "add ish=pos/neg to the manifest or drop them"
        )
    return idx


@register_label_scheme("her2_ultralow", classes=("0-null", "ultralow", "1+", "2+", "3+"))
def _her2_ultralow(manifest: pd.DataFrame) -> pd.Series:
    score = manifest["her2_score"]
    ultralow = manifest.get("her2_ultralow", pd.Series("", index=manifest.index)).fillna("")
    idx = score.map({"1+": 2, "2+": 3, "3+": 4})
    zero = score == "0"
    idx[zero & (ultralow == "no")] = 0
    idx[zero & (ultralow == "yes")] = 1
    idx[score.isna() | (score == "")] = -1  # unlabelled: never checked, never an error
    missing = manifest.slide_id[zero & ~ultralow.isin(["yes", "no"])]
    if len(missing):
        raise ManifestError(
            f"labels=her2_ultralow: score-0 slide(s) {', '.join(missing[:5])} have no her2_ultralow value; "
            "add her2_ultralow=yes (faint, incomplete membrane staining in ≤ 10 % of tumour cells) "
            "or no (none) to the manifest, or drop them"
        )
    wrong = manifest.slide_id[score.isin(["1+", "2+", "3+"]) & (ultralow == "yes")]
    if len(wrong):  # load_manifest refuses these; a frame made another way may hold them
        raise ManifestError(
            f"labels=her2_ultralow: slide(s) {', '.join(wrong[:5])} have her2_ultralow=yes but a score "
            "above 0; HER2-ultralow is a subcategory of IHC 0: fix the score or clear her2_ultralow"
        )
    return idx
