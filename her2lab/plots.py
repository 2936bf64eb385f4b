"""Figures written next to the numbers they show (matplotlib, no display needed)."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from her2lab.io import atomic_path

#: A colour per class index, as HER2 scores read: 0 blue, 1+ yellow, 2+ orange, 3+ red.
CLASS_COLOURS = [(52, 101, 164), (237, 201, 0), (245, 121, 0), (204, 0, 0)]


def class_colours(k: int) -> list[tuple[int, int, int]]:
    """RGB (0–255) of classes ``0 … k-1``: :data:`CLASS_COLOURS`, then matplotlib's ``tab10``
    (from its fifth colour on) for classes beyond the fourth."""
    out = list(CLASS_COLOURS[:k])
    if k > len(CLASS_COLOURS):
        import matplotlib

        tab = matplotlib.colormaps["tab10"].colors[4:]
        out += [tuple(round(255 * v) for v in tab[i % len(tab)]) for i in range(k - len(CLASS_COLOURS))]
    return out


def confusion_png(matrix, class_names: list[str], path: Path, title: str = "") -> Path:
    """Confusion matrix (rows: true class, columns: predicted) with counts and row shares."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    m = np.asarray(matrix, dtype=float)
    share = m / np.clip(m.sum(1, keepdims=True), 1, None)
    k = len(class_names)
    fig, ax = plt.subplots(figsize=(1.2 * k + 1.8, 1.1 * k + 1.4), dpi=120)
    ax.imshow(share, cmap="Blues", vmin=0, vmax=1)
    for i in range(k):
        for j in range(k):
            ax.text(j, i, f"{int(m[i, j])}\n{share[i, j]:.0%}", ha="center", va="center",
                    color="white" if share[i, j] > 0.6 else "black", fontsize=9)
    ax.set_xticks(range(k), class_names)
    ax.set_yticks(range(k), class_names)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    ax.set_title(title or "confusion matrix", fontsize=10)
    fig.tight_layout()
    with atomic_path(Path(path)) as tmp:
        fig.savefig(tmp, format="png")
    plt.close(fig)
    return Path(path)


def _figure(size: tuple[float, float]):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt, *plt.subplots(figsize=size, dpi=120)


def _save(plt, fig, path: Path) -> Path:
    fig.tight_layout()
    with atomic_path(Path(path)) as tmp:
        fig.savefig(tmp, format="png")
    plt.close(fig)
    return Path(path)


def curves_png(y: np.ndarray, probs: np.ndarray, class_names: list[str], path: Path, title: str = "") -> Path:
    """One-vs-rest ROC and precision-recall curves per class (classes absent from ``y`` skipped)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from sklearn.metrics import (
        average_precision_score,
        precision_recall_curve,
        roc_auc_score,
        roc_curve,
    )

    fig, (roc, pr) = plt.subplots(1, 2, figsize=(9.2, 4.2), dpi=120)
    for c, name in enumerate(class_names):
        t = y == c
        if 0 < t.sum() < len(t):
            fpr, tpr, _ = roc_curve(t, probs[:, c])
            roc.plot(fpr, tpr, label=f"{name} (AUROC {roc_auc_score(t, probs[:, c]):.3f}, n={int(t.sum())})")
            prec, rec, _ = precision_recall_curve(t, probs[:, c])
            pr.plot(rec, prec, label=f"{name} (AP {average_precision_score(t, probs[:, c]):.3f}, prevalence {t.mean():.2f})")
    roc.plot([0, 1], [0, 1], ls=":", c="grey")
    roc.set(xlabel="false positive rate", ylabel="true positive rate", title="ROC, one vs rest")
    pr.set(xlabel="recall", ylabel="precision", title="precision-recall, one vs rest", ylim=(0, 1.02))
    for ax in (roc, pr):
        ax.legend(fontsize=7, loc="lower right" if ax is roc else "lower left")
        ax.title.set_fontsize(10)
    if title:
        fig.suptitle(title, fontsize=10)
    return _save(plt, fig, path)


def reliability_png(y: np.ndarray, probs: np.ndarray, path: Path, n_bins: int = 10, title: str = "") -> float:
    """Reliability diagram of the top-label confidence; returns the expected calibration error
    (torchmetrics, ``n_bins`` equal-width bins)."""
    import torch
    from torchmetrics.functional.classification import multiclass_calibration_error

    # copies: the arrays may be read-only (pandas' to_numpy), which torch.as_tensor warns about
    p_t = torch.from_numpy(np.array(probs, dtype=np.float32))
    y_t = torch.from_numpy(np.array(y, dtype=np.int64))
    ece = float(multiclass_calibration_error(p_t, y_t, num_classes=probs.shape[1], n_bins=n_bins,
                                             norm="l1"))
    conf, correct = probs.max(1), (probs.argmax(1) == y)
    edges = np.linspace(0, 1, n_bins + 1)
    which = np.clip(np.digitize(conf, edges[1:-1]), 0, n_bins - 1)
    plt, fig, ax = _figure((4.2, 4.2))
    for b in range(n_bins):
        m = which == b
        if m.any():
            ax.bar(edges[b], correct[m].mean(), width=1 / n_bins, align="edge", color="tab:blue", alpha=0.7, edgecolor="k")
            ax.text(edges[b] + 0.5 / n_bins, 0.02, str(int(m.sum())), ha="center", fontsize=7)
    ax.plot([0, 1], [0, 1], ls=":", c="grey")
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1)
    ax.set_xlabel("confidence (top class)")
    ax.set_ylabel("accuracy")
    ax.set_title(f"{title}  ECE {ece:.3f}" if title else f"ECE {ece:.3f}", fontsize=10)
    _save(plt, fig, path)
    return ece
