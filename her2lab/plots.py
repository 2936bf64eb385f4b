"""Figures written next to the numbers they show (matplotlib, no display needed)."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from her2lab.io import atomic_path


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
