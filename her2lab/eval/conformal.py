"""Split-conformal prediction sets and the referral rule: when the model is unsure, say so.

A model's probabilities alone do not say how often the true score lies among the classes it
finds plausible. Split-conformal prediction (Vovk et al. 2005; the LAC / "least ambiguous set"
score of Sadinle et al. 2019, as in Angelopoulos & Bates 2021, *A gentle introduction to
conformal prediction*) calibrates that on held-out labelled slides: with the non-conformity
score ``s = 1 - p_true`` on ``n`` calibration slides, the threshold ``q̂`` is the
``⌈(n+1)·coverage⌉ / n`` empirical quantile of the scores, and a new slide's set is every class
with ``1 - p ≤ q̂``. If calibration and new slides are exchangeable, the set holds the true score
with probability ≥ ``coverage`` (marginally, over slides). Too few calibration slides for the
coverage asked (``⌈(n+1)·coverage⌉ > n``) give ``q̂ = ∞``: every set is every class, and every
slide is referred — the honest answer.

Referral (``refer``): a set that spans more than one clinical category of the label scheme
(``labels.clinical``, e.g. HER2-low vs HER2-equivocal), that holds a class needing a further
test (``labels.refer_always``, e.g. 2+ needs ISH), or that is empty (unlike every calibration
slide).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import numpy as np


def conformal_threshold(probs: np.ndarray, labels: np.ndarray, coverage: float = 0.9) -> float:
    """``q̂`` from calibration probabilities (n, K) and their true class indices (n,).

    Returns ``inf`` when ``n`` is too small for ``coverage`` (every class in every set).
    """
    if not 0.0 < coverage < 1.0:
        raise ValueError(f"coverage={coverage}: give a number between 0 and 1 (e.g. 0.9)")
    probs, labels = np.asarray(probs, dtype=float), np.asarray(labels, dtype=int)
    n = len(labels)
    rank = math.ceil((n + 1) * coverage)
    if n == 0 or rank > n:
        return math.inf
    scores = np.sort(1.0 - probs[np.arange(n), labels])
    return float(scores[rank - 1])


def min_calibration_slides(coverage: float) -> int:
    """Smallest number of calibration slides that gives a finite threshold at ``coverage``."""
    return max(1, math.ceil(coverage / (1.0 - coverage) - 1e-9))


def prediction_sets(probs: np.ndarray, threshold: float) -> np.ndarray:
    """Boolean (N, K): class ``k`` is in slide ``i``'s set when ``1 - p_ik ≤ threshold``."""
    return (1.0 - np.asarray(probs, dtype=float)) <= threshold + 1e-12


def referral(members: Sequence[str], clinical: Mapping[str, str] | None = None,
             refer_always: Sequence[str] = ()) -> tuple[bool, str]:
    """Whether a prediction set (class names) needs a pathologist, and why (``""`` if not)."""
    if not members:
        return True, "empty set: unlike every calibration slide"
    clinical = clinical or {}
    categories = sorted({clinical.get(c, c) for c in members})
    if len(categories) > 1:
        return True, "set spans " + " / ".join(categories)
    needs = [c for c in members if c in set(refer_always)]
    if needs:
        return True, f"{', '.join(needs)}: confirm with a further test (e.g. ISH)"
    return False, ""


def set_names(sets: np.ndarray, classes: Sequence[str]) -> list[str]:
    """Each row of a boolean (N, K) set matrix as ``"1+|2+"`` (``""`` for the empty set)."""
    return ["|".join(c for c, m in zip(classes, row, strict=True) if m) for row in np.asarray(sets, dtype=bool)]


def empirical_coverage(sets: np.ndarray, labels: np.ndarray) -> float:
    """Fraction of slides whose true class (index; ``-1`` = unknown, left out) is in their set."""
    labels = np.asarray(labels, dtype=int)
    known = labels >= 0
    if not known.any():
        return float("nan")
    rows = np.asarray(sets, dtype=bool)[known]
    return float(rows[np.arange(len(rows)), labels[known]].mean())
